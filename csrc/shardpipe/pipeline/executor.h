#pragma once

#include <chrono>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "shardpipe/common/worker_thread.h"
#include "shardpipe/pipeline/placement.h"
#include "shardpipe/pipeline/schedule.h"
#include "shardpipe/pipeline/stage_worker.h"
#include "shardpipe/pipeline/step.h"
#include "shardpipe/pipeline/transport.h"

namespace shardpipe {

// Turns a failed task's exception and where it happened ("stage 1, micro-batch 2 (forward)")
// into the exception to rethrow, keeping its type; returns null for an exception it does not
// handle. The executor itself adds the place to a c10::Error's context; the Python bindings
// install one that edits a Python exception's message.
using ErrorAnnotator = std::function<std::exception_ptr(std::exception_ptr, const std::string&)>;

struct TraceEvent {
  int stage;
  int micro_batch;
  Phase phase;
  int worker;
  double start_us;  // since the executor was made
  double end_us;
};

// Which threads run the tasks of a phase.
enum class Threads {
  kWorkers,  // one thread per worker slot: CPU stages compute at the same time
  kCaller,   // the calling thread, interleaving the lists in a ready order: no hand-off costs
  kAuto,     // measured: the first runs of each phase try both, then the faster one runs
             // (and the other is tried again now and then, in case the costs changed)
};

// Parses "auto", "workers" or "caller"; throws std::invalid_argument otherwise.
Threads parse_threads(const std::string& name);
std::string threads_name(Threads threads);

// Runs a schedule's task lists over a step: each list in its order, each task once what it
// consumes has arrived (the rule `may_start` in schedule.h, asked of the transport), the task
// itself by its stage's StageWorker. The first error cancels the step; `execute` rethrows it
// in the caller's thread with its original type, annotated with where it happened. A stage
// never runs twice at once: on the workers each stage has one thread, and a phase on the
// caller's thread excludes every other phase of the executor.
class Executor {
 public:
  Executor(const Placement& placement, Transport& transport, std::vector<StageWorker>& stages);
  // Joins the worker threads.
  ~Executor();

  // Runs `schedule` over `step`. `inline_device`: the lists of that device's workers run on
  // the calling thread whatever `threads` says (autograd runs a CUDA backward on that device's
  // own thread, which the stages' autograd calls need).
  void execute(Step& step, const Schedule& schedule, std::optional<at::Device> inline_device);

  void set_threads(Threads threads);
  Threads threads() const;
  // Which threads ran the last phase (kWorkers or kCaller).
  Threads last_threads() const;

  void set_tracing(bool on);
  std::vector<TraceEvent> take_trace();
  // Microseconds since the executor was made: the clock of the trace.
  double now_us() const { return us_since_epoch(std::chrono::steady_clock::now()); }

  // Joins the workers; the executor must not be used afterwards.
  void stop();
  bool is_worker_thread() const;
  int workers() const { return static_cast<int>(workers_.size()); }

  static void set_error_annotator(ErrorAnnotator annotator);
  // Asked every few milliseconds while the caller's thread waits for the workers; an
  // exception it returns (a KeyboardInterrupt the caller's signal handler raised) cancels
  // the step and reaches the caller. The Python bindings install one.
  using InterruptCheck = std::function<std::exception_ptr()>;
  static void set_interrupt_check(InterruptCheck check);

 private:
  // What kAuto measured for one kind of phase: a schedule run with or without grad.
  struct Timings {
    int64_t runs = 0;
    double caller_us = -1;  // per task, smoothed over the runs on each (negative: none yet)
    double workers_us = -1;
  };
  void run_lists(Step& step, const std::vector<const std::vector<Task>*>& lists);
  double us_since_epoch(std::chrono::steady_clock::time_point t) const {
    return std::chrono::duration<double, std::micro>(t - epoch_).count();
  }
  bool use_caller_thread(const Timings& timings);

  const Placement& placement_;
  Transport& transport_;
  std::vector<StageWorker>& stages_;
  std::vector<std::unique_ptr<WorkerThread>> workers_;
  // Posting a step's task lists is serialised, so that every worker queues the steps of
  // concurrent calls in one order: a step never waits on one queued behind another.
  std::mutex post_mutex_;
  // Phases on the workers hold it shared, phases on a caller's thread exclusively.
  std::shared_mutex phases_;

  mutable std::mutex mode_mutex_;
  Threads threads_ = Threads::kAuto;
  Threads last_ = Threads::kWorkers;
  std::map<std::pair<const Schedule*, bool>, Timings> timings_;

  bool tracing_ = false;
  std::mutex trace_mutex_;
  std::vector<TraceEvent> trace_;
  std::chrono::steady_clock::time_point epoch_;
};

}  // namespace shardpipe
