#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "shardpipe/pipeline/checkpoint.h"
#include "shardpipe/pipeline/executor.h"
#include "shardpipe/pipeline/gradient_reducer.h"
#include "shardpipe/pipeline/local_transport.h"
#include "shardpipe/pipeline/placement.h"
#include "shardpipe/pipeline/schedule.h"
#include "shardpipe/pipeline/stage_worker.h"
#include "shardpipe/pipeline/step.h"

namespace shardpipe {

class ProcessGroupTransport;

struct EngineOptions {
  std::vector<at::Device> devices;  // one per stage
  int workers = 0;  // 0: one per stage (per two with zbv); stage s runs on worker_of_stage(...)
  int64_t chunks = 1;
  ScheduleKind schedule = ScheduleKind::kGPipe;
  CheckpointMode checkpoint = CheckpointMode::kNever;
  // Each stage's outputs, input gradients and parameter gradients are checked for NaN/Inf
  // after every task (a host sync on GPUs; off by default).
  bool check_finite = false;
  // Non-empty: the stages are spread over the ranks of this torch.distributed process group
  // (`group.group_name`), worker w on rank w, and this process runs only its rank's stages
  // (process_group_transport.h); every wait for a peer gives up after `timeout` seconds.
  std::string group_name;
  double timeout = 120.0;
  // Non-empty: after each phase that makes parameter gradients, they are averaged over this
  // data-parallel process group (gradient_reducer.h), each stage as soon as it is done.
  std::string data_parallel_group;
};

// The pipeline's phases: splits a mini-batch into micro-batches, has the executor run the
// schedule's tasks over them, and gathers what comes out. `forward` returns outputs whose
// autograd node runs the backward schedule; `train_step` runs both phases in one schedule
// (needed for 1F1B's memory bound). The rooms it composes: Placement (which stage where),
// StageWorker (one stage's tasks), a Transport (hand-offs: LocalTransport, or
// ProcessGroupTransport between ranks), Executor (threads and order).
class Engine : public std::enable_shared_from_this<Engine> {
 public:
  // `tensors[s]` (optional) gives stage s's buffers, which a recomputation leaves as it found
  // them, and its parameters, for check_finite.
  static std::shared_ptr<Engine> create(std::vector<StageFn> stages, EngineOptions options,
                                        std::vector<StageTensors> tensors = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Splits the `batched` inputs along dim 0 into micro-batches (like at::chunk; the others
  // go whole to every micro-batch), runs the forward schedule and returns the last stage's
  // outputs concatenated, on its device, with micro-batch 0's structure. With grad mode on
  // they are differentiable. `training`: the module's mode (checkpointing is for training).
  // Over ranks: without grad only; the first stage's rank reads the inputs, the last stage's
  // rank gets the outputs (the others get none), and `refused` (an error this rank met while
  // preparing its inputs) makes every rank raise.
  Values forward(const Values& inputs, const std::vector<bool>& batched, bool training = true,
                 std::exception_ptr refused = nullptr);

  // Forward and backward of `loss(outputs, targets)` for every micro-batch under the
  // schedule. Returns the loss (detached): the micro-batch losses weighted by their share of
  // the batch (or summed when `sum_reduction`); parameter gradients are those of that value.
  // Over ranks the targets are read on the last stage's rank and the loss comes back on every
  // rank; `refused` as for `forward`.
  at::Tensor train_step(const Values& inputs, const std::vector<bool>& batched,
                        const Activations& targets, const LossFn& loss, bool sum_reduction,
                        bool training = true, std::exception_ptr refused = nullptr);

  // The backward schedule for a step made by `forward`; called by its autograd node.
  std::vector<at::Tensor> backward(Step& step, const std::vector<at::Tensor>& grads);

  // Joins the workers; later calls fail. Also done by the destructor.
  void shutdown();

  Executor& executor() { return *executor_; }
  // Tracing on: the executor records its tasks and the reducer its reductions.
  void set_tracing(bool on);
  // With data_parallel_group: off accumulates gradients locally (`no_sync`).
  void set_gradient_sync(bool on);
  bool gradient_sync() const { return reducer_ && reducer_->enabled(); }
  GradientReducer* reducer() { return reducer_.get(); }
  int stages() const { return placement_.stages(); }
  // Whether stage s runs in this process (over ranks: on this rank).
  bool runs_stage(int s) const { return transport_->runs_here(placement_.worker_of(s)); }
  int workers() const { return placement_.workers; }
  // Over ranks: the bytes this rank has sent its peers (ProcessGroupTransport::bytes_sent);
  // 0 in one process.
  uint64_t bytes_sent() const;
  const EngineOptions& options() const { return options_; }

 private:
  Engine(std::vector<StageFn> stages, EngineOptions options, std::vector<StageTensors> tensors);

  std::shared_ptr<Step> make_step(const Values& inputs, const std::vector<bool>& batched,
                                  bool training, std::exception_ptr refused);
  // Orders every stage's stream after the calling thread's stream on the stage's device, or
  // the other way round, without blocking the host: stages must not read what the caller is
  // still writing (optimizer.step()), nor the caller what the stages wrote (gradients,
  // running statistics); with stages on several GPUs the inputs and outputs alone do not
  // order every device.
  void stages_wait_for_caller();
  void caller_waits_for_stages();
  // The schedule for a micro-batch count (the forward phase, the backward phase (B and W), or
  // all), made once and kept: the interleaved one is searched for by simulation.
  const Schedule& schedule_for(int micro_batches, std::optional<Phase> phase);
  at::Tensor run_train_step(const Values& inputs, const std::vector<bool>& batched,
                            const Activations& targets, const LossFn& loss, bool sum_reduction,
                            bool training, std::exception_ptr refused,
                            GradientReduction* reduction);
  std::vector<at::Tensor> run_backward(Step& step, const std::vector<at::Tensor>& grads,
                                       GradientReduction* reduction);

  EngineOptions options_;
  Placement placement_;
  std::vector<std::optional<c10::Stream>> streams_;  // per stage (none on the CPU)
  std::unique_ptr<LocalTransport> transport_;
  ProcessGroupTransport* ranks_ = nullptr;  // transport_, when the stages span ranks
  std::vector<StageWorker> stage_workers_;
  std::unique_ptr<Executor> executor_;
  std::unique_ptr<GradientReducer> reducer_;
  // Calls hold it shared and `shutdown` exclusively, so workers never go away under a
  // running step; `closed_` is read and written under it.
  std::shared_mutex lifecycle_;
  bool closed_ = false;
  std::mutex schedules_mutex_;
  std::map<std::pair<int, int>, Schedule> schedules_;
};

}  // namespace shardpipe
