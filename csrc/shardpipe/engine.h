#pragma once

#include <ATen/ATen.h>

#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "shardpipe/checkpoint.h"
#include "shardpipe/schedule.h"
#include "shardpipe/stage_worker.h"

namespace shardpipe {

// What flows between stages: the tensors of one micro-batch (one, or a tuple's worth).
using Activations = std::vector<at::Tensor>;
// A stage: a callable over tensors (a torch::nn module, or a Python module through the
// bindings). It runs on its stage's worker thread, with the stage's stream current.
using StageFn = std::function<Activations(const Activations&)>;
// Loss of one micro-batch from the last stage's outputs and that micro-batch's targets.
using LossFn = std::function<at::Tensor(const Activations& outputs, const Activations& targets)>;

// Turns a failed task's exception and where it happened ("stage 1, micro-batch 2, forward")
// into the exception to rethrow, keeping its type. The default adds the place to c10::Error's
// context; the Python bindings install one that edits the Python exception's message.
using ErrorAnnotator = std::function<std::exception_ptr(std::exception_ptr, const std::string&)>;

struct TraceEvent {
  int stage;
  int micro_batch;
  Phase phase;
  int worker;
  double start_us;  // since the engine was made
  double end_us;
};

struct EngineOptions {
  std::vector<at::Device> devices;  // one per stage
  int workers = 0;                  // 0: one per stage; else stage s runs on worker s % workers
  int64_t chunks = 1;
  ScheduleKind schedule = ScheduleKind::kGPipe;
  CheckpointMode checkpoint = CheckpointMode::kNever;
};

struct Step;

// Runs stages over micro-batches under a schedule, one worker thread per worker slot.
// Forward and backward are both pipelined: `forward` returns outputs whose autograd node runs
// the backward schedule, calling autograd per stage and micro-batch; `train_step` runs both
// phases in one schedule (needed for 1F1B's memory bound).
class Engine : public std::enable_shared_from_this<Engine> {
 public:
  static std::shared_ptr<Engine> create(std::vector<StageFn> stages, EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Splits the `batched` inputs along dim 0 into micro-batches (like at::chunk; the others
  // go whole to every micro-batch), runs the forward schedule and returns the last stage's
  // outputs concatenated, on its device. With grad mode on they are differentiable.
  Activations forward(const Activations& inputs, const std::vector<bool>& batched);

  // Forward and backward of `loss(outputs, targets)` for every micro-batch under the
  // schedule. Returns the loss (detached): the micro-batch losses weighted by their share of
  // the batch (or summed when `sum_reduction`); parameter gradients are those of that value.
  at::Tensor train_step(const Activations& inputs, const std::vector<bool>& batched,
                        const Activations& targets, const LossFn& loss, bool sum_reduction);

  // Joins the workers; later calls fail. Also done by the destructor.
  void shutdown();

  void set_tracing(bool on);
  std::vector<TraceEvent> take_trace();

  int stages() const { return static_cast<int>(stages_.size()); }
  int workers() const { return static_cast<int>(workers_.size()); }
  const EngineOptions& options() const { return options_; }

  static void set_error_annotator(ErrorAnnotator annotator);

  // The backward schedule for a step made by `forward`; called by its autograd node.
  std::vector<at::Tensor> backward(Step& step, const std::vector<at::Tensor>& grads);

 private:
  Engine(std::vector<StageFn> stages, EngineOptions options);

  std::shared_ptr<Step> scatter(const Activations& inputs, const std::vector<bool>& batched);
  // Orders every stage's stream after the calling thread's stream on the stage's device
  // (`stages_wait`), or the other way round (`caller_waits`), without blocking the host.
  void stages_wait_for_caller();
  void caller_waits_for_stages();
  void execute(Step& step, const Schedule& schedule, std::optional<at::Device> inline_device);
  void run_lists(Step& step, const std::vector<const std::vector<Task>*>& lists);
  void run_task(Step& step, const Task& task);
  void run_forward(Step& step, int s, int i);
  void run_backward(Step& step, int s, int i);
  Activations call_stage(Step& step, int s, int i, const Activations& leaves);
  // The gradient of each input of `forward`/`train_step` (undefined where none arrived), on
  // the input's own device, from the first stage's micro-batches.
  std::vector<at::Tensor> input_gradients(Step& step);
  // Hands a stage's outputs (or input gradients) to `to_stage`; `checkpointed` says the
  // outputs were made without a graph.
  void send(Step& step, const Activations& xs, int to_stage, int i, bool grads,
            bool checkpointed = false);
  // The schedule for a micro-batch count (one phase, or both), made once and kept: the
  // interleaved one is searched for by simulation.
  const Schedule& schedule_for(int micro_batches, std::optional<Phase> phase);
  at::Device worker_device(int w) const;

  std::vector<StageFn> stages_;
  EngineOptions options_;
  std::vector<std::optional<c10::Stream>> streams_;  // per stage (none on the CPU)
  std::vector<std::unique_ptr<StageWorker>> workers_;
  // Calls hold it shared and `shutdown` exclusively, so workers never go away under a
  // running step; `closed_` is read and written under it.
  std::shared_mutex lifecycle_;
  bool closed_ = false;
  // Posting a step's task lists is serialised, so that every worker queues the steps of
  // concurrent calls in one order: a step never waits on one queued behind another.
  std::mutex post_mutex_;
  std::mutex schedules_mutex_;
  std::map<std::pair<int, int>, Schedule> schedules_;
  bool tracing_ = false;
  std::mutex trace_mutex_;
  std::vector<TraceEvent> trace_;
  std::chrono::steady_clock::time_point epoch_;
};

}  // namespace shardpipe
