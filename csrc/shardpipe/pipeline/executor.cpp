#include "shardpipe/pipeline/executor.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <stdexcept>

namespace shardpipe {
namespace {

// kAuto: the first runs of a phase alternate between the caller's thread and the workers;
// afterwards the faster runs, and every kRetryEvery runs the other is tried once more.
constexpr int64_t kTrials = 4;
constexpr int64_t kRetryEvery = 64;

ErrorAnnotator& annotator_hook() {
  static ErrorAnnotator hook;
  return hook;
}

std::exception_ptr annotate(std::exception_ptr error, const std::string& where) {
  if (const auto& hook = annotator_hook()) {
    if (auto annotated = hook(error, where)) return annotated;
  }
  try {
    std::rethrow_exception(error);
  } catch (c10::Error& e) {
    e.add_context("shardpipe: raised in " + where);
    return std::current_exception();
  } catch (...) {
    return error;
  }
}

std::string describe(const Task& t) {
  const char* phase = t.phase == Phase::kForward    ? " (forward)"
                      : t.phase == Phase::kBackward ? " (backward)"
                                                    : " (weight)";
  return "stage " + std::to_string(t.stage) + ", micro-batch " + std::to_string(t.micro_batch) +
         phase;
}

// The step as the dependency rule sees it: a task's own forward is done when the step says
// so; what comes from another stage has arrived when the transport says so. On the last
// stage of a train_step the gradient comes from the loss, which the task computes itself.
struct Arrivals {
  Step& step;
  Transport& transport;
  bool has_input(int s, int i) const { return transport.arrived(step, {s, i, Phase::kForward}); }
  bool forward_done(int s, int i) const { return step.at(s, i).forward_done; }
  bool has_grad(int s, int i) const {
    return (step.fused && s == step.stages - 1) ||
           transport.arrived(step, {s, i, Phase::kBackward});
  }
  bool backward_done(int s, int i) const { return step.at(s, i).backward_done; }
};

}  // namespace

Threads parse_threads(const std::string& name) {
  if (name == "auto") return Threads::kAuto;
  if (name == "workers") return Threads::kWorkers;
  if (name == "caller") return Threads::kCaller;
  throw std::invalid_argument("threads must be 'auto', 'workers' or 'caller', got '" + name + "'");
}

std::string threads_name(Threads threads) {
  switch (threads) {
    case Threads::kWorkers:
      return "workers";
    case Threads::kCaller:
      return "caller";
    case Threads::kAuto:
      return "auto";
  }
  return "?";
}

void Executor::set_error_annotator(ErrorAnnotator a) { annotator_hook() = std::move(a); }

namespace {

Executor::InterruptCheck& interrupt_check() {
  static Executor::InterruptCheck check;
  return check;
}

}  // namespace

void Executor::set_interrupt_check(InterruptCheck check) { interrupt_check() = std::move(check); }

Executor::Executor(const Placement& placement, Transport& transport,
                   std::vector<StageWorker>& stages)
    : placement_(placement), transport_(transport), stages_(stages) {
  for (int w = 0; w < placement_.workers; ++w) {
    workers_.push_back(transport_.runs_here(w)
                           ? std::make_unique<WorkerThread>("shardpipe_w" + std::to_string(w))
                           : nullptr);
  }
  epoch_ = std::chrono::steady_clock::now();
}

Executor::~Executor() { stop(); }

void Executor::stop() { workers_.clear(); }

bool Executor::is_worker_thread() const {
  for (const auto& w : workers_) {
    if (w && w->is_current_thread()) return true;
  }
  return false;
}

void Executor::set_threads(Threads threads) {
  std::lock_guard<std::mutex> lock(mode_mutex_);
  threads_ = threads;
}

Threads Executor::threads() const {
  std::lock_guard<std::mutex> lock(mode_mutex_);
  return threads_;
}

Threads Executor::last_threads() const {
  std::lock_guard<std::mutex> lock(mode_mutex_);
  return last_;
}

bool Executor::use_caller_thread(const Timings& timings) {
  switch (threads_) {
    case Threads::kCaller:
      return true;
    case Threads::kWorkers:
      return false;
    case Threads::kAuto:
      break;
  }
  if (timings.runs < kTrials) return timings.runs % 2 == 0;
  const bool caller_wins = timings.caller_us <= timings.workers_us;
  const bool retry = timings.runs % kRetryEvery == 0;
  return caller_wins != retry;
}

void Executor::set_tracing(bool on) {
  std::lock_guard<std::mutex> lock(trace_mutex_);
  tracing_ = on;
}

std::vector<TraceEvent> Executor::take_trace() {
  std::lock_guard<std::mutex> lock(trace_mutex_);
  return std::exchange(trace_, {});
}

void Executor::execute(Step& step, const Schedule& schedule,
                       std::optional<at::Device> inline_device) {
  const std::pair<const Schedule*, bool> kind{&schedule, step.grad_enabled};
  bool caller;
  {
    std::lock_guard<std::mutex> lock(mode_mutex_);
    caller = use_caller_thread(timings_[kind]);
    last_ = caller ? Threads::kCaller : Threads::kWorkers;
  }
  std::vector<const std::vector<Task>*> inline_lists, all_lists;
  std::vector<int> posted;
  for (int w = 0; w < schedule.workers; ++w) {
    if (schedule.per_worker[w].empty() || !transport_.runs_here(w)) continue;
    all_lists.push_back(&schedule.per_worker[w]);
    if (caller || (inline_device && placement_.device_of_worker(w) == *inline_device)) {
      inline_lists.push_back(&schedule.per_worker[w]);
    } else {
      posted.push_back(w);
    }
  }
  {
    std::lock_guard<std::mutex> lock(step.mutex);
    step.pending = static_cast<int>(posted.size());
  }
  std::unique_lock<std::shared_mutex> alone(phases_, std::defer_lock);
  std::shared_lock<std::shared_mutex> shared(phases_, std::defer_lock);
  if (caller) {
    alone.lock();
  } else {
    shared.lock();
  }
  const auto started = std::chrono::steady_clock::now();
  transport_.begin(step, schedule);
  {
    std::lock_guard<std::mutex> posting(post_mutex_);
    for (int w : posted) {
      const auto* list = &schedule.per_worker[w];
      workers_[w]->post([this, &step, list] {
        run_lists(step, {list});
        // Notify under the lock: once `pending` reaches 0 the caller may free the step.
        std::lock_guard<std::mutex> lock(step.mutex);
        --step.pending;
        step.notify_locked();
      });
    }
  }
  if (!inline_lists.empty()) run_lists(step, inline_lists);
  std::unique_lock<std::mutex> lock(step.mutex);
  // Waiting for the workers, the caller still answers an interrupt (Ctrl-C) in good time.
  while (!step.changed.wait_for(lock, std::chrono::milliseconds(20),
                                [&] { return step.pending == 0; })) {
    if (!interrupt_check() || step.cancelled) continue;
    lock.unlock();
    auto interrupted = interrupt_check()();
    if (interrupted) step.fail(interrupted, "the caller's thread, waiting for the workers");
    lock.lock();
  }
  lock.unlock();
  transport_.finish(step);
  lock.lock();
  if (step.error) {
    auto error = annotate(std::exchange(step.error, nullptr), step.where);
    lock.unlock();
    std::rethrow_exception(error);
  }
  lock.unlock();
  // What the phase cost the caller, per task: the measure kAuto compares.
  size_t tasks = 0;
  for (const auto* list : all_lists) tasks += list->size();
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - started)
          .count() /
      static_cast<double>(std::max<size_t>(tasks, 1));
  std::lock_guard<std::mutex> mode(mode_mutex_);
  Timings& t = timings_[kind];
  double& mean = caller ? t.caller_us : t.workers_us;
  mean = mean < 0 ? us : 0.5 * mean + 0.5 * us;
  t.runs++;
}

void Executor::run_lists(Step& step, const std::vector<const std::vector<Task>*>& lists) {
  std::optional<at::ThreadLocalStateGuard> tls_guard;
  if (std::this_thread::get_id() != step.tls_thread) {
    tls_guard.emplace(step.tls);
    // OpenMP's thread count is per thread: take the process-wide torch.set_num_threads value
    // now, not the default this worker was born with.
    at::init_num_threads();
  }
  std::vector<size_t> next(lists.size(), 0);
  const Arrivals arrivals{step, transport_};
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
          if (may_start((*lists[k])[next[k]], arrivals)) task = &(*lists[k])[next[k]++];
        }
        if (task || finished) break;
        step.wait_for_change(lock);
      }
    }
    if (!task) return;
    const auto start =
        tracing_ ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
    try {
      stages_[task->stage].run(step, *task);
    } catch (...) {
      step.fail(std::current_exception(), transport_.place() + describe(*task), *task);
      return;
    }
    if (tracing_) {
      const auto end = std::chrono::steady_clock::now();
      std::lock_guard<std::mutex> lock(trace_mutex_);
      trace_.push_back({task->stage, task->micro_batch, task->phase,
                        placement_.worker_of(task->stage), us_since_epoch(start),
                        us_since_epoch(end)});
    }
    bool gradients_final = false;
    {
      std::lock_guard<std::mutex> lock(step.mutex);
      Slot& slot = step.at(task->stage, task->micro_batch);
      if (task->phase == Phase::kForward) slot.forward_done = true;
      if (task->phase == Phase::kBackward) slot.backward_done = true;
      const Phase last = step.split_backward ? Phase::kWeight : Phase::kBackward;
      if (step.gradients_ready && task->phase == last) {
        gradients_final = --step.gradient_tasks_left[task->stage] == 0;
      }
      step.notify_locked();
    }
    if (gradients_final) {
      try {
        step.gradients_ready(task->stage);
      } catch (...) {
        step.fail(std::current_exception(), transport_.place() + "reducing stage " +
                                                std::to_string(task->stage) +
                                                "'s gradients over the data-parallel group");
        return;
      }
    }
  }
}

}  // namespace shardpipe
