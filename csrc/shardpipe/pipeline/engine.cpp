#include "shardpipe/pipeline/engine.h"

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <stdexcept>

#include "shardpipe/pipeline/autograd.h"
#include "shardpipe/pipeline/microbatch.h"
#include "shardpipe/pipeline/process_group_transport.h"
#include "shardpipe/pipeline/stage_stream.h"

namespace shardpipe {
namespace {

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

// The placement the options describe, validated; c10::ValueError names what is wrong.
Placement placement_of(size_t stages, EngineOptions& options) {
  TORCH_CHECK_VALUE(stages >= 1, "shardpipe: a pipeline needs at least one stage");
  TORCH_CHECK_VALUE(options.devices.size() == stages, "shardpipe: ", stages, " stages but ",
                    options.devices.size(), " devices");
  TORCH_CHECK_VALUE(options.chunks >= 1, "shardpipe: chunks must be at least 1, got ",
                    options.chunks);
  if (options.workers == 0) {
    const int n = static_cast<int>(stages);
    options.workers = options.schedule == ScheduleKind::kZeroBubbleV ? std::max(1, n / 2) : n;
  }
  Placement placement{options.devices, options.workers, options.schedule};
  try {
    placement.validate();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, "shardpipe: ", e.what());
  }
  return placement;
}

// Runs a phase that makes parameter gradients (`run(reduction)`), with their data-parallel
// reduction when there is one and it is on. A phase that raises still finishes the reduction,
// so every peer hears of it and none waits for this rank's gradients; finish rethrows.
template <class Run>
auto with_reduction(GradientReducer* reducer, Run&& run) {
  auto reduction = reducer && reducer->enabled() ? reducer->begin() : nullptr;
  if (!reduction) return run(nullptr);
  decltype(run(nullptr)) result;
  try {
    result = run(reduction.get());
  } catch (...) {
    reduction->finish(std::current_exception());
    throw;  // not reached: finish rethrows
  }
  reduction->finish(nullptr);
  return result;
}

}  // namespace

std::shared_ptr<Engine> Engine::create(std::vector<StageFn> stages, EngineOptions options,
                                       std::vector<StageTensors> tensors) {
  return std::shared_ptr<Engine>(
      new Engine(std::move(stages), std::move(options), std::move(tensors)));
}

Engine::Engine(std::vector<StageFn> stages, EngineOptions options,
               std::vector<StageTensors> tensors)
    : options_(std::move(options)), placement_(placement_of(stages.size(), options_)) {
  if (options_.group_name.empty()) {
    transport_ = std::make_unique<LocalTransport>(placement_, streams_);
  } else {
    TORCH_CHECK_VALUE(options_.timeout > 0, "shardpipe: timeout must be positive, got ",
                      options_.timeout);
    auto ranks = std::make_unique<ProcessGroupTransport>(
        placement_, streams_, options_.group_name,
        std::chrono::milliseconds(static_cast<int64_t>(options_.timeout * 1000.0)));
    ranks_ = ranks.get();
    transport_ = std::move(ranks);
  }
  for (int s = 0; s < placement_.stages(); ++s) {
    streams_.push_back(pool_stream(placement_.stage_devices[s]));
  }
  for (int s = 0; s < placement_.stages(); ++s) {
    stage_workers_.emplace_back(s, placement_.stages(), std::move(stages[s]),
                                s < static_cast<int>(tensors.size()) ? tensors[s] : StageTensors(),
                                placement_.stage_devices[s], streams_[s], options_.checkpoint,
                                options_.check_finite, *transport_);
  }
  executor_ = std::make_unique<Executor>(placement_, *transport_, stage_workers_);
  if (!options_.data_parallel_group.empty()) {
    std::vector<TensorsFn> parameters(static_cast<size_t>(placement_.stages()));
    std::optional<at::Device> device;
    for (int s = 0; s < placement_.stages(); ++s) {
      if (!runs_stage(s)) continue;
      if (!device) device = placement_.stage_devices[s];
      parameters[s] = s < static_cast<int>(tensors.size()) && tensors[s].parameters
                          ? tensors[s].parameters
                          : TensorsFn([] { return std::vector<at::Tensor>(); });
    }
    Executor* executor = executor_.get();
    reducer_ = std::make_unique<GradientReducer>(
        options_.data_parallel_group, std::move(parameters), streams_, device.value(),
        std::chrono::milliseconds(static_cast<int64_t>(options_.timeout * 1000.0)),
        [executor] { return executor->now_us(); });
  }
}

uint64_t Engine::bytes_sent() const { return ranks_ ? ranks_->bytes_sent() : 0; }

void Engine::set_tracing(bool on) {
  executor_->set_tracing(on);
  if (reducer_) reducer_->set_recording(on);
}

void Engine::set_gradient_sync(bool on) {
  TORCH_CHECK_VALUE(reducer_, "shardpipe: gradient sync needs a data_parallel_group");
  reducer_->set_enabled(on);
}

Engine::~Engine() { executor_.reset(); }

void Engine::shutdown() {
  // From one of its own stages the call that runs the stage would wait for itself.
  const bool inside =
      std::find(engines_in_call.begin(), engines_in_call.end(), this) != engines_in_call.end() ||
      executor_->is_worker_thread();
  TORCH_CHECK(!inside, "shardpipe: a pipeline cannot be closed from inside one of its own ",
              "stages or its loss function");
  std::unique_lock<std::shared_mutex> lock(lifecycle_);
  closed_ = true;
  executor_->stop();
}

const Schedule& Engine::schedule_for(int micro_batches, std::optional<Phase> phase) {
  std::lock_guard<std::mutex> lock(schedules_mutex_);
  const int key = phase ? static_cast<int>(*phase) : -1;
  auto it = schedules_.find({micro_batches, key});
  if (it == schedules_.end()) {
    auto schedule = make_schedule(options_.schedule, stages(), micro_batches, workers());
    // The backward phase of `pipe(x)` is everything but the forwards: B, and W when split.
    if (phase == Phase::kForward) schedule = schedule.only(Phase::kForward);
    if (phase == Phase::kBackward) schedule = schedule.without(Phase::kForward);
    it = schedules_.emplace(std::make_pair(micro_batches, key), std::move(schedule)).first;
  }
  return it->second;  // std::map keeps references valid while entries are added
}

void Engine::stages_wait_for_caller() {
  for (int s = 0; s < stages(); ++s) {
    wait_stream(streams_[s], current_stream(placement_.stage_devices[s]));
  }
}

void Engine::caller_waits_for_stages() {
  for (int s = 0; s < stages(); ++s) {
    wait_stream(current_stream(placement_.stage_devices[s]), streams_[s]);
  }
}

std::shared_ptr<Step> Engine::make_step(const Values& values, const std::vector<bool>& batched,
                                        bool training, std::exception_ptr refused) {
  const Activations& inputs = values.tensors;
  auto step = std::make_shared<Step>();
  step->stages = stages();
  step->training = training;
  std::vector<Activations> parts;
  if (!ranks_) {
    if (refused) std::rethrow_exception(refused);
    parts = split_into_micro_batches(*step, inputs, batched, options_.chunks);
  } else {
    // The first stage's rank splits the input and every rank learns the batch from it, so
    // all make the same micro-batches; or it cannot, and all raise. Another rank that cannot
    // go on (a bad target) fails the phase below, which makes every rank raise after it.
    int64_t batch = 0;
    std::exception_ptr first_refused;
    if (runs_stage(0)) {
      first_refused = std::exchange(refused, nullptr);
      if (!first_refused) {
        try {
          parts = split_into_micro_batches(*step, inputs, batched, options_.chunks);
          batch = step->batch;
        } catch (...) {
          first_refused = std::current_exception();
        }
      }
    }
    batch = ranks_->share_batch(batch, first_refused);
    if (!runs_stage(0)) {
      step->batch = batch;
      step->sizes = chunk_rows(batch, options_.chunks);
      step->micro_batches = static_cast<int>(step->sizes.size());
      step->slots.resize(static_cast<size_t>(step->stages) * step->micro_batches);
      step->outputs.resize(step->micro_batches);
      step->input_grads.resize(step->micro_batches);
    }
    if (refused) step->fail(refused, ranks_->place() + "reading its arguments");
  }
  stages_wait_for_caller();
  step->generators_held_by_caller = generator_locks_held_here();
  step->grad_enabled = at::GradMode::is_enabled();
  step->split_backward = splits_backward(options_.schedule);
  for (const auto& x : inputs) {
    step->input_requires_grad.push_back(step->grad_enabled && x.requires_grad());
  }
  // The caller's micro-batches are the first stage's input.
  for (int i = 0; i < static_cast<int>(parts.size()); ++i) {
    Slot& slot = step->at(0, i);
    slot.input = transfer(parts[i], placement_.stage_devices[0], streams_[0]);
    slot.input_structure = values.structure;
    slot.has_input = true;
  }
  return step;
}

Values Engine::forward(const Values& values, const std::vector<bool>& batched, bool training,
                       std::exception_ptr refused) {
  EngineCall call(this, lifecycle_, closed_);
  TORCH_CHECK(!ranks_ || !at::GradMode::is_enabled(),
              "shardpipe: over ranks, pipe(x) runs without autograd only (under "
              "torch.no_grad()); train with pipe.train_step(x, y, loss_fn)");
  auto step = make_step(values, batched, training, refused);
  const Activations& inputs = values.tensors;
  const int S = stages(), m = step->micro_batches;
  executor_->execute(*step, schedule_for(m, Phase::kForward), std::nullopt);
  if (!runs_stage(S - 1)) return {};

  caller_waits_for_stages();
  auto here = current_stream(placement_.stage_devices[S - 1]);
  for (const auto& mb : step->outputs) record_on(mb, here);
  Activations outputs = concat_micro_batches(step->outputs, "output");
  for (auto& t : outputs) {
    if (t.requires_grad()) t = t.detach();
  }

  Values result{std::move(outputs), std::move(step->output_structure)};
  Activations& outputs_ref = result.tensors;
  bool attach = false;
  if (step->grad_enabled) {
    attach = training && options_.checkpoint != CheckpointMode::kNever;
    for (int i = 0; i < m && !attach; ++i) {
      for (const auto& t : step->at(S - 1, i).output) attach = attach || t.requires_grad();
    }
  }
  step->outputs.clear();
  if (!attach) return result;

  std::vector<size_t> differentiable;
  for (size_t k = 0; k < outputs_ref.size(); ++k) {
    if (outputs_ref[k].is_floating_point() || outputs_ref[k].is_complex()) {
      differentiable.push_back(k);
    }
  }
  attach_pipeline_backward(shared_from_this(), step, inputs, outputs_ref, differentiable);
  return result;
}

std::vector<at::Tensor> Engine::backward(Step& step, const std::vector<at::Tensor>& grads) {
  return with_reduction(reducer_.get(), [&](GradientReduction* reduction) {
    return run_backward(step, grads, reduction);
  });
}

std::vector<at::Tensor> Engine::run_backward(Step& step, const std::vector<at::Tensor>& grads,
                                             GradientReduction* reduction) {
  EngineCall call(this, lifecycle_, closed_);
  TORCH_CHECK(!step.backward_ran,
              "shardpipe: the pipeline's backward already ran for this forward");
  step.backward_ran = true;
  step.tls = at::ThreadLocalState();
  step.tls_thread = std::this_thread::get_id();
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
  // The caller's gradients are the last stage's output gradients.
  for (int i = 0; i < m; ++i) {
    Activations g(grads.size());
    for (size_t k = 0; k < grads.size(); ++k) {
      if (!parts[k].empty()) g[k] = parts[k][i];
    }
    Slot& slot = step.at(S - 1, i);
    slot.grad = transfer(g, placement_.stage_devices[S - 1], streams_[S - 1]);
    slot.has_grad = true;
  }
  const Schedule& schedule = schedule_for(m, Phase::kBackward);
  if (reduction) reduction->arm(step, schedule);
  // The step outlives the reduction (its autograd node holds it): unhook it on the way out.
  struct Unhook {
    Step& step;
    ~Unhook() { step.gradients_ready = nullptr; }
  } unhook{step};
  executor_->execute(step, schedule, inline_device);
  caller_waits_for_stages();
  return input_gradients(step, placement_.stage_devices[0]);
}

at::Tensor Engine::train_step(const Values& values, const std::vector<bool>& batched,
                              const Activations& targets, const LossFn& loss, bool sum_reduction,
                              bool training, std::exception_ptr refused) {
  return with_reduction(reducer_.get(), [&](GradientReduction* reduction) {
    return run_train_step(values, batched, targets, loss, sum_reduction, training, refused,
                          reduction);
  });
}

at::Tensor Engine::run_train_step(const Values& values, const std::vector<bool>& batched,
                                  const Activations& targets, const LossFn& loss,
                                  bool sum_reduction, bool training, std::exception_ptr refused,
                                  GradientReduction* reduction) {
  TORCH_CHECK(at::GradMode::is_enabled(),
              "shardpipe: train_step needs grad mode; it was called under torch.no_grad() or "
              "torch.inference_mode()");
  EngineCall call(this, lifecycle_, closed_);
  auto step = make_step(values, batched, training, refused);
  const Activations& inputs = values.tensors;
  const int S = stages(), m = step->micro_batches;
  step->fused = true;
  step->loss = &loss;
  const at::Device last = placement_.stage_devices[S - 1];
  auto split_targets = [&] {
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
    }
  };
  if (!ranks_) {
    split_targets();
  } else if (runs_stage(S - 1)) {
    // The peers are already waiting for this phase: a bad target fails it on every rank.
    try {
      split_targets();
    } catch (...) {
      step->fail(std::current_exception(), ranks_->place() + "reading the targets");
    }
  }
  for (int i = 0; i < m; ++i) {
    step->weights.push_back(sum_reduction ? 1.0
                                          : static_cast<double>(step->sizes[i]) / step->batch);
  }
  step->losses.resize(m);
  const Schedule& schedule = schedule_for(m, std::nullopt);
  if (reduction) reduction->arm(*step, schedule);
  executor_->execute(*step, schedule, std::nullopt);

  caller_waits_for_stages();
  at::Tensor total;
  if (ranks_) {
    // On this rank's device, as one process gives it on the last stage's.
    total = step->shared_loss.to(last);
  } else {
    record_on(step->losses, current_stream(last));
    total = at::stack(step->losses).sum();
  }

  // Gradients of the inputs travel on into whatever produced them.
  auto input_grads = input_gradients(*step, placement_.stage_devices[0]);
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
