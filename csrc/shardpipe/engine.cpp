#include "shardpipe/engine.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <stdexcept>

#include "shardpipe/copy.h"
#include "shardpipe/stage_stream.h"

namespace shardpipe {

namespace {

// Older PyTorch releases hold autograd nodes by std::shared_ptr, newer ones by
// c10::intrusive_ptr; the edge type says which this build has.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

// Where the gradient of a stage input ends up. The stage sees its input as a tensor whose
// grad_fn is this node (not as a leaf), so a first layer may work in place on it, as it
// may in the unsplit model; the node keeps what flows into it instead of passing it on.
class GradSink : public torch::autograd::Node {
 public:
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    if (grads[0].defined()) grad_ = grad_.defined() ? grad_ + grads[0] : grads[0];
    return {};
  }
  std::string name() const override { return "shardpipe::StageInput"; }
  at::Tensor take() {
    std::lock_guard<std::mutex> lock(mutex_);
    return std::exchange(grad_, at::Tensor());
  }

 private:
  std::mutex mutex_;
  at::Tensor grad_;
};

}  // namespace

// What one (stage, micro-batch) keeps between its forward and its backward.
struct Slot {
  Activations input;                 // on the stage's device, detached from the producer's graph
  std::vector<bool> input_has_grad;  // per input: its producer's output needed a gradient
  std::vector<NodePtr> sinks;        // per input: collects its gradient (null: none wanted)
  Activations output;                // with the stage's graph, unless the forward was checkpointed
  Activations grad;                  // gradient of `output`, sent by the next stage (or the caller)
  RngState rng;                      // for recomputation
  bool checkpointed = false;
  bool has_input = false;
  bool forward_done = false;
  bool has_grad = false;
};

// One mini-batch on its way through the pipeline. Shared by the caller, the workers and (for
// `forward` with grad) the autograd node that later runs the backward schedule.
struct Step {
  int stages = 0;
  int micro_batches = 0;
  int64_t batch = 0;
  std::vector<int64_t> sizes;  // of the micro-batches
  std::vector<Slot> slots;
  Slot& at(int s, int i) { return slots[static_cast<size_t>(s) * micro_batches + i]; }

  bool grad_enabled = false;
  // Generator locks the caller's thread holds; the workers then serialise on `own_generator`.
  std::vector<std::mutex*> generators_held_by_caller;
  std::mutex own_generator;
  std::vector<bool> batched;
  std::vector<bool> input_requires_grad;
  std::vector<at::Device> input_devices;
  std::vector<Activations> outputs;      // last stage, per micro-batch, detached
  std::vector<Activations> input_grads;  // first stage, per micro-batch

  // train_step only
  bool fused = false;
  const LossFn* loss = nullptr;
  std::vector<Activations> targets;  // per micro-batch, on the last stage's device
  std::vector<double> weights;
  std::vector<at::Tensor> losses;
  bool backward_ran = false;

  at::ThreadLocalState tls;  // grad mode, autocast, ... of the thread that started the phase
  std::mutex mutex;
  std::condition_variable changed;
  // Bumped (under `mutex`) at every change a waiting worker may care about; lets a worker
  // spin briefly for its next task before paying for a sleep and a wake-up.
  std::atomic<uint64_t> generation{0};
  int pending = 0;
  bool cancelled = false;
  std::exception_ptr error;
  std::string where;
};

namespace {

ErrorAnnotator& annotator() {
  static ErrorAnnotator instance = [](std::exception_ptr error, const std::string& where) {
    try {
      std::rethrow_exception(error);
    } catch (c10::Error& e) {
      e.add_context("shardpipe: raised in " + where);
      return std::current_exception();
    } catch (...) {
      return error;
    }
  };
  return instance;
}

// The engines with a call running on this thread (a stage may run a pipeline of its own).
thread_local std::vector<const Engine*> engines_in_call;

// Keeps the engine from being shut down during a call, and marks the call on this thread.
class EngineCall {
 public:
  EngineCall(const Engine* engine, std::shared_mutex& lifecycle, const bool& closed)
      : lock_(lifecycle) {
    TORCH_CHECK(!closed, "shardpipe: this pipeline was closed");
    engines_in_call.push_back(engine);
  }
  ~EngineCall() { engines_in_call.pop_back(); }
  EngineCall(const EngineCall&) = delete;
  EngineCall& operator=(const EngineCall&) = delete;

 private:
  std::shared_lock<std::shared_mutex> lock_;
};

std::string describe(const Task& t) {
  return "stage " + std::to_string(t.stage) + ", micro-batch " + std::to_string(t.micro_batch) +
         (t.phase == Phase::kForward ? " (forward)" : " (backward)");
}

bool differentiable(const at::Tensor& t) {
  return t.defined() && (t.is_floating_point() || t.is_complex());
}

// Moves activations (or gradients) to `to`, where `consumer` will use them. The producer is
// whatever stream is current on the tensors' devices in the calling thread.
Activations transfer(const Activations& xs, at::Device to,
                     const std::optional<c10::Stream>& consumer) {
  Activations detached;
  detached.reserve(xs.size());
  bool local = true;
  for (const auto& x : xs) {
    detached.push_back(x.defined() ? x.detach() : x);
    local = local && (!x.defined() || x.device() == to);
  }
  if (local) {
    wait_stream(consumer, current_stream(to));
    record_on(detached, consumer);
    return detached;
  }
  // With the consumer's stream current on `to`, copy_to makes it wait on the copy; the
  // inputs already on `to` were made on the producer's stream there, which the guard hides
  // from copy_to, so the consumer waits on it first. A CPU consumer has no stream to wait
  // with: its copy finishes before the host goes on.
  wait_stream(consumer, current_stream(to));
  StreamsGuard guard({consumer});
  return copy_to_kernel(detached, to, /*non_blocking=*/!to.is_cpu());
}

// Concatenates per-micro-batch activations along the batch dimension; with one micro-batch
// the tensors are returned as they are.
Activations gather(const std::vector<Activations>& parts, const char* what) {
  if (parts.size() == 1) return parts[0];
  Activations out(parts[0].size());
  for (size_t k = 0; k < out.size(); ++k) {
    std::vector<at::Tensor> pieces;
    for (size_t i = 0; i < parts.size(); ++i) {
      TORCH_CHECK(parts[i].size() == out.size(), "shardpipe: micro-batch ", i, " gave ",
                  parts[i].size(), " ", what, ", micro-batch 0 gave ", out.size());
      TORCH_CHECK(parts[i][k].defined() && parts[i][k].dim() >= 1, "shardpipe: ", what, " ", k,
                  " of micro-batch ", i,
                  " has no batch dimension, so micro-batches cannot be concatenated");
      pieces.push_back(parts[i][k]);
    }
    out[k] = at::cat(pieces, 0);
  }
  return out;
}

// The autograd node of `Engine::forward`'s outputs: it runs the backward schedule.
class PipelineBackward : public torch::autograd::Node {
 public:
  PipelineBackward(std::shared_ptr<Engine> engine, std::shared_ptr<Step> step,
                   std::vector<size_t> outputs, size_t total_outputs)
      : engine_(std::move(engine)),
        step_(std::move(step)),
        outputs_(std::move(outputs)),
        total_outputs_(total_outputs) {}

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    TORCH_CHECK(step_, "shardpipe: the pipeline's backward already ran for this forward ",
                "(retain_graph=True is not supported: run the forward again)");
    std::vector<at::Tensor> all(total_outputs_);
    for (size_t k = 0; k < outputs_.size(); ++k) all[outputs_[k]] = grads[k];
    auto step = step_;
    return engine_->backward(*step, all);
  }

  std::string name() const override { return "shardpipe::PipelineBackward"; }
  void release_variables() override { step_.reset(); }

 private:
  std::shared_ptr<Engine> engine_;
  std::shared_ptr<Step> step_;
  std::vector<size_t> outputs_;  // which outputs have this node as grad_fn, in input order
  size_t total_outputs_;
};

}  // namespace

void Engine::set_error_annotator(ErrorAnnotator a) { annotator() = std::move(a); }

std::shared_ptr<Engine> Engine::create(std::vector<StageFn> stages, EngineOptions options) {
  return std::shared_ptr<Engine>(new Engine(std::move(stages), std::move(options)));
}

Engine::Engine(std::vector<StageFn> stages, EngineOptions options)
    : stages_(std::move(stages)), options_(std::move(options)) {
  const int S = static_cast<int>(stages_.size());
  TORCH_CHECK_VALUE(S >= 1, "shardpipe: a pipeline needs at least one stage");
  TORCH_CHECK_VALUE(static_cast<int>(options_.devices.size()) == S, "shardpipe: ", S,
                    " stages but ", options_.devices.size(), " devices");
  TORCH_CHECK_VALUE(options_.chunks >= 1, "shardpipe: chunks must be at least 1, got ",
                    options_.chunks);
  if (options_.workers == 0) options_.workers = S;
  const int W = options_.workers;
  TORCH_CHECK_VALUE(W >= 1 && S % W == 0, "shardpipe: workers (", W, ") must divide stages (", S,
                    ")");
  TORCH_CHECK_VALUE(W == S || options_.schedule == ScheduleKind::kInterleaved,
                    "shardpipe: only the interleaved schedule runs several stages per worker");
  for (int s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(options_.devices[s] == options_.devices[s % W], "shardpipe: stage ", s,
                      " is on ", options_.devices[s], " but shares worker ", s % W, " with stage ",
                      s % W, " on ", options_.devices[s % W]);
    streams_.push_back(pool_stream(options_.devices[s]));
  }
  for (int w = 0; w < W; ++w) {
    workers_.push_back(std::make_unique<StageWorker>("shardpipe worker " + std::to_string(w)));
  }
  epoch_ = std::chrono::steady_clock::now();
}

Engine::~Engine() { workers_.clear(); }

void Engine::shutdown() {
  // From one of its own stages the call that runs the stage would wait for itself.
  bool inside =
      std::find(engines_in_call.begin(), engines_in_call.end(), this) != engines_in_call.end();
  for (const auto& w : workers_) inside = inside || w->is_current_thread();
  TORCH_CHECK(!inside, "shardpipe: a pipeline cannot be closed from inside one of its own ",
              "stages or its loss function");
  std::unique_lock<std::shared_mutex> lock(lifecycle_);
  closed_ = true;
  workers_.clear();
}

const Schedule& Engine::schedule_for(int micro_batches, std::optional<Phase> phase) {
  std::lock_guard<std::mutex> lock(schedules_mutex_);
  const int key = phase ? static_cast<int>(*phase) : 2;
  auto it = schedules_.find({micro_batches, key});
  if (it == schedules_.end()) {
    auto schedule = make_schedule(options_.schedule, stages(), micro_batches, options_.workers);
    if (phase) schedule = schedule.only(*phase);
    it = schedules_.emplace(std::make_pair(micro_batches, key), std::move(schedule)).first;
  }
  return it->second;  // std::map keeps references valid while entries are added
}

at::Device Engine::worker_device(int w) const { return options_.devices[w]; }

// Stages must not read what the caller is still writing on its streams (optimizer.step()
// updating parameters), and the caller must not read what stages wrote on theirs (gradients,
// running statistics) before it is done; with stages on several GPUs the inputs and outputs
// alone do not order every device.
void Engine::stages_wait_for_caller() {
  for (int s = 0; s < stages(); ++s) wait_stream(streams_[s], current_stream(options_.devices[s]));
}

void Engine::caller_waits_for_stages() {
  for (int s = 0; s < stages(); ++s) wait_stream(current_stream(options_.devices[s]), streams_[s]);
}

void Engine::set_tracing(bool on) {
  std::lock_guard<std::mutex> lock(trace_mutex_);
  tracing_ = on;
}

std::vector<TraceEvent> Engine::take_trace() {
  std::lock_guard<std::mutex> lock(trace_mutex_);
  return std::exchange(trace_, {});
}

std::shared_ptr<Step> Engine::scatter(const Activations& inputs, const std::vector<bool>& batched) {
  TORCH_CHECK_VALUE(inputs.size() == batched.size(), "shardpipe: ", inputs.size(), " inputs but ",
                    batched.size(), " batched flags");
  stages_wait_for_caller();
  auto step = std::make_shared<Step>();
  step->stages = stages();
  step->generators_held_by_caller = generator_locks_held_here();
  step->batched = batched;
  int64_t batch = -1;
  for (size_t k = 0; k < inputs.size(); ++k) {
    TORCH_CHECK_TYPE(inputs[k].defined(), "shardpipe: input ", k, " is not a tensor");
    step->input_devices.push_back(inputs[k].device());
    if (!batched[k]) continue;
    TORCH_CHECK_VALUE(inputs[k].dim() >= 1, "shardpipe: input ", k,
                      " is a 0-dim tensor, so it cannot be split into micro-batches");
    if (batch < 0) batch = inputs[k].size(0);
    TORCH_CHECK_VALUE(inputs[k].size(0) == batch, "shardpipe: inputs must share their batch size,",
                      " got ", batch, " and ", inputs[k].size(0), " (input ", k, ")");
  }
  TORCH_CHECK_VALUE(batch >= 0, "shardpipe: at least one input must be split into micro-batches");
  TORCH_CHECK_VALUE(batch > 0, "shardpipe: the batch is empty");
  step->batch = batch;

  std::vector<std::vector<at::Tensor>> pieces(inputs.size());
  for (size_t k = 0; k < inputs.size(); ++k) {
    if (batched[k]) pieces[k] = at::chunk(inputs[k], options_.chunks, 0);
  }
  const auto& first =
      *std::find_if(pieces.begin(), pieces.end(), [](const auto& p) { return !p.empty(); });
  step->micro_batches = static_cast<int>(first.size());
  for (const auto& piece : first) step->sizes.push_back(piece.size(0));
  step->slots.resize(static_cast<size_t>(step->stages) * step->micro_batches);
  step->outputs.resize(step->micro_batches);
  step->input_grads.resize(step->micro_batches);

  step->grad_enabled = at::GradMode::is_enabled();
  for (const auto& x : inputs) {
    step->input_requires_grad.push_back(step->grad_enabled && x.requires_grad());
  }
  for (int i = 0; i < step->micro_batches; ++i) {
    Activations mb;
    for (size_t k = 0; k < inputs.size(); ++k) mb.push_back(batched[k] ? pieces[k][i] : inputs[k]);
    Slot& slot = step->at(0, i);
    slot.input = transfer(mb, options_.devices[0], streams_[0]);
    slot.has_input = true;
  }
  return step;
}

void Engine::execute(Step& step, const Schedule& schedule,
                     std::optional<at::Device> inline_device) {
  std::vector<const std::vector<Task>*> inline_lists;
  std::vector<int> posted;
  for (int w = 0; w < schedule.workers; ++w) {
    if (schedule.per_worker[w].empty()) continue;
    if (inline_device && worker_device(w) == *inline_device) {
      inline_lists.push_back(&schedule.per_worker[w]);
    } else {
      posted.push_back(w);
    }
  }
  {
    std::lock_guard<std::mutex> lock(step.mutex);
    step.pending = static_cast<int>(posted.size());
    step.cancelled = false;
    step.error = nullptr;
  }
  {
    std::lock_guard<std::mutex> posting(post_mutex_);
    for (int w : posted) {
      const auto* list = &schedule.per_worker[w];
      workers_[w]->post([this, &step, list] {
        run_lists(step, {list});
        // Notify under the lock: once `pending` reaches 0 the caller may free the step.
        std::lock_guard<std::mutex> lock(step.mutex);
        --step.pending;
        step.generation++;
        step.changed.notify_all();
      });
    }
  }
  // A backward that autograd runs on a CUDA device's thread must run that device's stages
  // itself: their autograd calls need that very thread, which is busy waiting here.
  if (!inline_lists.empty()) run_lists(step, inline_lists);
  std::unique_lock<std::mutex> lock(step.mutex);
  step.changed.wait(lock, [&] { return step.pending == 0; });
  if (step.error) {
    auto error = annotator()(std::exchange(step.error, nullptr), step.where);
    lock.unlock();
    std::rethrow_exception(error);
  }
}

namespace {

// Waits until the step changes. Hand-offs between stages are frequent and a thread's sleep
// and wake-up cost tens of microseconds, so it first spins (lock released) for a few.
void wait_for_change(Step& step, std::unique_lock<std::mutex>& lock) {
  const uint64_t seen = step.generation.load();
  lock.unlock();
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
  while (step.generation.load() == seen && std::chrono::steady_clock::now() < until) {
    std::this_thread::yield();
  }
  lock.lock();
  step.changed.wait(lock, [&] { return step.generation.load() != seen; });
}

}  // namespace

void Engine::run_lists(Step& step, const std::vector<const std::vector<Task>*>& lists) {
  at::ThreadLocalStateGuard tls_guard(step.tls);
  // OpenMP's thread count is per thread: take the process-wide torch.set_num_threads value
  // now, not the default this worker was born with.
  at::init_num_threads();
  std::vector<size_t> next(lists.size(), 0);
  auto ready = [&](const Task& t) {
    Slot& slot = step.at(t.stage, t.micro_batch);
    if (t.phase == Phase::kForward) return slot.has_input;
    return slot.forward_done && (slot.has_grad || (step.fused && t.stage == step.stages - 1));
  };
  for (;;) {
    const Task* task = nullptr;
    {
      std::unique_lock<std::mutex> lock(step.mutex);
      for (;;) {
        if (step.cancelled) return;
        bool finished = true;
        for (size_t k = 0; k < lists.size() && !task; ++k) {
          if (next[k] >= lists[k]->size()) continue;
          finished = false;
          if (ready((*lists[k])[next[k]])) task = &(*lists[k])[next[k]++];
        }
        if (task || finished) break;
        wait_for_change(step, lock);
      }
    }
    if (!task) return;
    auto start = std::chrono::steady_clock::now();
    try {
      run_task(step, *task);
    } catch (...) {
      std::lock_guard<std::mutex> lock(step.mutex);
      if (!step.error) {
        step.error = std::current_exception();
        step.where = describe(*task);
      }
      step.cancelled = true;
      step.generation++;
      step.changed.notify_all();
      return;
    }
    if (tracing_) {
      auto us = [this](auto t) {
        return std::chrono::duration<double, std::micro>(t - epoch_).count();
      };
      std::lock_guard<std::mutex> lock(trace_mutex_);
      trace_.push_back({task->stage, task->micro_batch, task->phase, task->stage % options_.workers,
                        us(start), us(std::chrono::steady_clock::now())});
    }
    std::lock_guard<std::mutex> lock(step.mutex);
    if (task->phase == Phase::kForward) step.at(task->stage, task->micro_batch).forward_done = true;
    step.generation++;
    step.changed.notify_all();
  }
}

void Engine::run_task(Step& step, const Task& task) {
  const at::Device device = options_.devices[task.stage];
  c10::OptionalDeviceGuard device_guard;
  if (!device.is_cpu()) device_guard.reset_device(device);
  StreamsGuard stream_guard({streams_[task.stage]});
  GeneratorLocksInherited serving(step.generators_held_by_caller);
  if (task.phase == Phase::kForward) {
    run_forward(step, task.stage, task.micro_batch);
  } else {
    run_backward(step, task.stage, task.micro_batch);
  }
}

Activations Engine::call_stage(Step& step, int s, int i, const Activations& input) {
  Activations stage_input;
  std::vector<NodePtr> sinks(input.size());
  stage_input.reserve(input.size());
  for (size_t k = 0; k < input.size(); ++k) {
    // Inputs of the first stage need a gradient only where the caller's do; later stages'
    // where the previous stage's output needed one (a frozen stage's output does not).
    const bool upstream =
        s == 0 ? step.input_requires_grad[k]
               : k < step.at(s, i).input_has_grad.size() && step.at(s, i).input_has_grad[k];
    bool wanted =
        step.grad_enabled && at::GradMode::is_enabled() && differentiable(input[k]) && upstream;
    at::Tensor x = input[k].defined() ? input[k].detach() : input[k];
    if (wanted) {
      sinks[k] = make_node<GradSink>();
      torch::autograd::create_gradient_edge(x, sinks[k]);
    }
    stage_input.push_back(std::move(x));
  }
  Activations out = stages_[s](stage_input);
  if (step.fused && s == step.stages - 1) {
    at::Tensor loss = (*step.loss)(out, step.targets[i]);
    TORCH_CHECK_VALUE(loss.defined() && loss.numel() == 1,
                      "shardpipe: loss_fn must return a scalar tensor, got shape ", loss.sizes());
    out = {loss.reshape({}) * step.weights[i]};
  }
  Slot& slot = step.at(s, i);
  slot.sinks = std::move(sinks);
  return out;
}

void Engine::run_forward(Step& step, int s, int i) {
  Slot& slot = step.at(s, i);
  const bool last = s == step.stages - 1;
  const bool checkpointed =
      step.grad_enabled && is_checkpointed(options_.checkpoint, i, step.micro_batches);
  Activations out;
  {
    GeneratorLock generator;
    if (step.grad_enabled && options_.checkpoint != CheckpointMode::kNever) {
      generator =
          GeneratorLock(options_.devices[s], step.generators_held_by_caller, step.own_generator);
    }
    Activations replay;
    if (checkpointed) {
      slot.rng = RngState::capture(options_.devices[s]);
      // The recomputation needs the input as it was: a first layer working in place would
      // otherwise hand it a modified one.
      for (const auto& t : slot.input) replay.push_back(t.defined() ? t.clone() : t);
    }
    at::AutoGradMode grad_mode(step.grad_enabled && !checkpointed);
    out = call_stage(step, s, i, slot.input);
    if (checkpointed) slot.input = std::move(replay);
  }
  if (step.grad_enabled) {
    slot.checkpointed = checkpointed;
    if (checkpointed) {
      slot.sinks.clear();
    } else {
      slot.output = out;
    }
  } else {
    slot.sinks.clear();
    slot.input.clear();
  }
  if (!slot.checkpointed && step.grad_enabled) slot.input.clear();
  if (last) {
    Activations detached;
    for (const auto& t : out) detached.push_back(t.defined() ? t.detach() : t);
    if (step.fused) step.losses[i] = detached[0];
    step.outputs[i] = std::move(detached);
  } else {
    send(step, out, s + 1, i, /*grads=*/false, checkpointed);
  }
}

void Engine::run_backward(Step& step, int s, int i) {
  Slot& slot = step.at(s, i);
  Activations outputs;
  if (slot.checkpointed) {
    GeneratorLock generator(options_.devices[s], step.generators_held_by_caller,
                            step.own_generator);
    RecomputeGuard recomputing;
    RngFork replay(slot.rng);
    at::AutoGradMode grad_mode(true);
    outputs = call_stage(step, s, i, slot.input);
  } else {
    outputs = std::move(slot.output);
  }
  std::vector<at::Tensor> roots, grads;
  if (step.fused && s == step.stages - 1) {
    // As loss.backward() would: a loss without a graph leaves every gradient unset.
    TORCH_CHECK(outputs[0].requires_grad(), "shardpipe: the loss of micro-batch ", i,
                " does not require grad (loss_fn ",
                "returned a detached loss, or nothing before it requires grad)");
    roots.push_back(outputs[0]);
    grads.push_back(at::ones_like(outputs[0]));
  } else {
    for (size_t k = 0; k < outputs.size() && k < slot.grad.size(); ++k) {
      if (outputs[k].defined() && outputs[k].requires_grad() && slot.grad[k].defined()) {
        roots.push_back(outputs[k]);
        grads.push_back(slot.grad[k]);
      }
    }
  }
  if (!roots.empty()) torch::autograd::backward(roots, grads);
  Activations input_grads(slot.sinks.size());
  for (size_t k = 0; k < slot.sinks.size(); ++k) {
    if (slot.sinks[k]) input_grads[k] = static_cast<GradSink*>(slot.sinks[k].get())->take();
  }
  slot.sinks.clear();
  slot.input.clear();
  slot.grad.clear();
  slot.rng = RngState();
  outputs.clear();
  if (s > 0) {
    send(step, input_grads, s - 1, i, /*grads=*/true);
  } else {
    step.input_grads[i] = std::move(input_grads);
  }
}

void Engine::send(Step& step, const Activations& xs, int to_stage, int i, bool grads,
                  bool checkpointed) {
  // A checkpointed forward ran without a graph: whether its output needs a gradient is
  // known only when it is recomputed, so the next stage assumes it does.
  std::vector<bool> has_grad;
  if (!grads) {
    for (const auto& t : xs) has_grad.push_back(checkpointed || (t.defined() && t.requires_grad()));
  }
  // The producer's stream is the current one.
  Activations moved = transfer(xs, options_.devices[to_stage], streams_[to_stage]);
  std::lock_guard<std::mutex> lock(step.mutex);
  Slot& slot = step.at(to_stage, i);
  if (grads) {
    slot.grad = std::move(moved);
    slot.has_grad = true;
  } else {
    slot.input = std::move(moved);
    slot.input_has_grad = std::move(has_grad);
    slot.has_input = true;
  }
  step.generation++;
  step.changed.notify_all();
}

Activations Engine::forward(const Activations& inputs, const std::vector<bool>& batched) {
  EngineCall call(this, lifecycle_, closed_);
  auto step = scatter(inputs, batched);
  const int S = stages(), m = step->micro_batches;
  const Schedule& schedule = schedule_for(m, Phase::kForward);
  execute(*step, schedule, std::nullopt);

  caller_waits_for_stages();
  auto here = current_stream(options_.devices[S - 1]);
  for (const auto& mb : step->outputs) record_on(mb, here);
  Activations outputs = gather(step->outputs, "output");
  for (auto& t : outputs) t = t.detach();

  bool attach = false;
  if (step->grad_enabled) {
    attach = options_.checkpoint != CheckpointMode::kNever;
    for (int i = 0; i < m && !attach; ++i) {
      for (const auto& t : step->at(S - 1, i).output) attach = attach || t.requires_grad();
    }
  }
  step->outputs.clear();
  if (!attach) return outputs;

  std::vector<size_t> with_grad;
  for (size_t k = 0; k < outputs.size(); ++k) {
    if (differentiable(outputs[k])) with_grad.push_back(k);
  }
  auto node = make_node<PipelineBackward>(shared_from_this(), step, with_grad, outputs.size());
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  for (size_t k : with_grad) torch::autograd::create_gradient_edge(outputs[k], node);
  return outputs;
}

std::vector<at::Tensor> Engine::backward(Step& step, const std::vector<at::Tensor>& grads) {
  EngineCall call(this, lifecycle_, closed_);
  TORCH_CHECK(!step.backward_ran,
              "shardpipe: the pipeline's backward already ran for this forward");
  step.backward_ran = true;
  step.tls = at::ThreadLocalState();
  // The backward's caller may hold other locks than the forward's (or none).
  step.generators_held_by_caller = generator_locks_held_here();
  const int S = stages(), m = step.micro_batches;
  std::optional<at::Device> inline_device;
  std::vector<std::vector<at::Tensor>> parts(grads.size());
  for (size_t k = 0; k < grads.size(); ++k) {
    if (!grads[k].defined()) continue;
    // Autograd runs this node on the thread of its first non-CPU gradient's device.
    if (grads[k].is_cuda() && !inline_device) inline_device = grads[k].device();
    parts[k] =
        m == 1 ? std::vector<at::Tensor>{grads[k]} : grads[k].split_with_sizes(step.sizes, 0);
  }
  stages_wait_for_caller();
  for (int i = 0; i < m; ++i) {
    Activations g(grads.size());
    for (size_t k = 0; k < grads.size(); ++k) {
      if (!parts[k].empty()) g[k] = parts[k][i];
    }
    Slot& slot = step.at(S - 1, i);
    slot.grad = transfer(g, options_.devices[S - 1], streams_[S - 1]);
    slot.has_grad = true;
  }
  const Schedule& schedule = schedule_for(m, Phase::kBackward);
  execute(step, schedule, inline_device);
  caller_waits_for_stages();

  return input_gradients(step);
}

std::vector<at::Tensor> Engine::input_gradients(Step& step) {
  const int m = step.micro_batches;
  std::vector<at::Tensor> result(step.input_devices.size());
  const at::Device first = options_.devices[0];
  auto here = current_stream(first);  // already after the stages' streams (the callers join)
  for (const auto& g : step.input_grads) record_on(g, here);
  for (size_t k = 0; k < result.size(); ++k) {
    if (!step.input_requires_grad[k]) continue;
    std::vector<at::Tensor> pieces;
    for (int i = 0; i < m; ++i) {
      const auto& g = step.input_grads[i];
      if (k < g.size() && g[k].defined()) pieces.push_back(g[k]);
    }
    if (pieces.size() != static_cast<size_t>(m)) continue;  // no gradient reached this input
    at::Tensor grad =
        step.batched[k] ? (m == 1 ? pieces[0] : at::cat(pieces, 0)) : at::stack(pieces).sum(0);
    if (grad.device() != step.input_devices[k]) {
      // Blocking towards the host, like Tensor.to's backward: the caller may read it at once.
      const bool to_host = step.input_devices[k].is_cpu();
      grad = copy_to_kernel({grad}, step.input_devices[k], /*non_blocking=*/!to_host)[0];
    }
    result[k] = grad;
  }
  step.input_grads.clear();
  return result;
}

at::Tensor Engine::train_step(const Activations& inputs, const std::vector<bool>& batched,
                              const Activations& targets, const LossFn& loss, bool sum_reduction) {
  TORCH_CHECK(at::GradMode::is_enabled(),
              "shardpipe: train_step needs grad mode; it was called under torch.no_grad() or "
              "torch.inference_mode()");
  EngineCall call(this, lifecycle_, closed_);
  auto step = scatter(inputs, batched);
  const int S = stages(), m = step->micro_batches;
  step->fused = true;
  step->loss = &loss;
  const at::Device last = options_.devices[S - 1];
  std::vector<std::vector<at::Tensor>> pieces;
  for (size_t k = 0; k < targets.size(); ++k) {
    TORCH_CHECK_VALUE(
        targets[k].defined() && targets[k].dim() >= 1 && targets[k].size(0) == step->batch,
        "shardpipe: target ", k, " must have the batch size ", step->batch,
        " in its first dimension");
    pieces.push_back(targets[k].split_with_sizes(step->sizes, 0));
  }
  for (int i = 0; i < m; ++i) {
    Activations t;
    for (const auto& p : pieces) t.push_back(p[i]);
    step->targets.push_back(transfer(t, last, streams_[S - 1]));
    step->weights.push_back(sum_reduction ? 1.0
                                          : static_cast<double>(step->sizes[i]) / step->batch);
  }
  step->losses.resize(m);
  execute(*step, schedule_for(m, std::nullopt), std::nullopt);

  caller_waits_for_stages();
  auto here = current_stream(last);
  record_on(step->losses, here);
  at::Tensor total = at::stack(step->losses).sum();

  // Gradients of the inputs travel on into whatever produced them.
  auto input_grads = input_gradients(*step);
  std::vector<at::Tensor> roots, grads;
  for (size_t k = 0; k < inputs.size(); ++k) {
    if (!input_grads[k].defined()) continue;
    roots.push_back(inputs[k]);
    grads.push_back(input_grads[k]);
  }
  if (!roots.empty()) torch::autograd::backward(roots, grads);
  return total;
}

}  // namespace shardpipe
