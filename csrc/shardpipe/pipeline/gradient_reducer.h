#pragma once

#include <c10/core/Stream.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <chrono>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "shardpipe/pipeline/schedule.h"
#include "shardpipe/pipeline/stage_worker.h"
#include "shardpipe/pipeline/step.h"

namespace shardpipe {

class GradientReducer;

// When a stage's gradient reduction ran, for the trace: issued (its buckets handed to the
// process group) and done (seen complete by the caller's wait), in the executor's clock.
struct ReductionTimes {
  int stage;
  double issued_us;
  double done_us;
};

// One step's reduction. Made by `GradientReducer::begin` on the caller's thread before the
// phase; `arm` hooks it to the step, whose workers call `stage_ready` as each stage's last
// gradient task ends; `finish` (same caller thread, after the phase) waits and writes back.
// A bucket may go out earlier: during a stage's last gradient task, a hook on each of its
// parameters' gradient accumulators (as DDP's) marks the parameter done, and a bucket whose
// parameters are all done goes out while the task computes the rest.
class GradientReduction {
 public:
  ~GradientReduction();
  GradientReduction(const GradientReduction&) = delete;
  GradientReduction& operator=(const GradientReduction&) = delete;

  // Counts each local stage's gradient tasks in `schedule` (W when it splits the backward,
  // else B) and has the step's workers report when a stage has run its last one.
  void arm(Step& step, const Schedule& schedule);
  // A stage's gradients are final: its buckets go out as soon as every bucket before them in
  // the reduction order (last stage first, alike on every data-parallel rank) has gone.
  void stage_ready(int stage);
  // Issues what has not gone yet (zeros when `failure`), exchanges every data-parallel rank's
  // outcome, waits for all of it (bounded by the timeout) and, when every rank succeeded,
  // writes the averaged gradients back. Rethrows `failure`; raises when a peer failed.
  void finish(std::exception_ptr failure);

 private:
  friend class GradientReducer;
  struct Bucket {
    std::vector<at::Tensor> params;
    at::Tensor flat;  // the gradients, then one presence flag per parameter
    c10::intrusive_ptr<c10d::Work> work;
    // Parameters whose accumulator has not yet fired in the stage's last gradient task; the
    // bucket waits for the stage's end instead when one of them is used by another stage.
    int waiting = 0;
    bool early = true;
    bool issued = false;
  };
  struct StageBuckets {
    int stage;
    std::vector<Bucket> buckets;
    bool ready = false;
    bool issued = false;    // every bucket
    double issued_us = -1;  // the first bucket's start
  };
  using NodeRef = decltype(torch::autograd::impl::grad_accumulator(std::declval<at::Tensor>()));

  explicit GradientReduction(GradientReducer& reducer);
  // A hooked parameter of bucket `b` of `order_[k]` got its gradient.
  void accumulated(size_t k, size_t b);
  void issue(StageBuckets& stage, Bucket& bucket, bool zeros);
  void issue_ready_locked();
  void remove_hooks();

  GradientReducer& reducer_;
  std::unique_lock<std::mutex> step_lock_;  // one step reduces at a time
  std::mutex mutex_;
  std::vector<StageBuckets> order_;  // the reduction order
  Step* step_ = nullptr;             // once armed
  std::vector<std::pair<NodeRef, uintptr_t>> hooks_;
};

// Averages a pipeline's parameter gradients over a data-parallel process group: each of this
// process's stages is reduced as soon as its last gradient task of the step is done, in
// buckets of flattened gradients, asynchronously (c10d all-reduce; on CUDA, NCCL's own
// stream), so the reduction of later stages overlaps the drain of earlier ones; the caller's
// phase waits for all of it. Every data-parallel rank must hold the same stages with the same
// parameters and run the same steps.
//
// Faults: a rank whose step failed still issues every bucket (zeros), so the collectives stay
// matched, and after the buckets every rank's outcome goes round: either every rank writes
// the averaged gradients back, or every rank raises (the peers naming the failed rank).
class GradientReducer {
 public:
  // `parameters[s]`: stage s's parameters (empty: the stage is not in this process).
  // `device`: where the outcome round's tensor lives (a CPU tensor for gloo).
  GradientReducer(const std::string& group_name, std::vector<TensorsFn> parameters,
                  std::vector<std::optional<c10::Stream>> streams, at::Device device,
                  std::chrono::milliseconds timeout, std::function<double()> clock);

  // Off: gradients accumulate locally (`no_sync`); the next step with it on reduces them.
  void set_enabled(bool on) { enabled_ = on; }
  bool enabled() const { return enabled_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }

  // Takes the stages' parameters as they are now and lays out the buckets; holds every other
  // step off until the reduction is finished or destroyed.
  std::unique_ptr<GradientReduction> begin();

  // Recording on: each step's stage reductions (and, as stage -1, the caller's wait for
  // them) are kept for `take_times`, which hands over what was kept since its last call.
  void set_recording(bool on);
  std::vector<ReductionTimes> take_times();

  // Smaller than DDP's 25 MiB: the last layers' bucket should go out while the stage's last
  // backward still computes the first layers'.
  static constexpr size_t kBucketBytes = 4u << 20;

 private:
  friend class GradientReduction;
  void wait(c10d::Work& work, const std::string& what);

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  int rank_ = 0;
  int ranks_ = 1;
  std::vector<TensorsFn> parameters_;
  std::vector<std::optional<c10::Stream>> streams_;
  at::Device device_;
  std::chrono::milliseconds timeout_;
  std::function<double()> clock_;
  std::atomic<bool> enabled_{true};
  bool broken_ = false;  // a wait expired: the collectives may be out of step
  std::string broken_reason_;
  std::mutex step_mutex_;
  std::mutex times_mutex_;
  bool recording_ = false;
  std::vector<ReductionTimes> times_;
  // The buckets' flat tensors, kept from step to step while the layout stays the same.
  std::map<std::pair<int, size_t>, at::Tensor> flats_;
};

}  // namespace shardpipe
