#pragma once

#include <c10/core/Stream.h>

#include <optional>

#include "shardpipe/pipeline/checkpoint.h"
#include "shardpipe/pipeline/schedule.h"
#include "shardpipe/pipeline/step.h"
#include "shardpipe/pipeline/transport.h"

namespace shardpipe {

// What the core asks of a stage's module besides calling it: its buffers (running
// statistics...), when a forward is checkpointed; its parameters, when checking that
// gradients are finite. Either may be empty (a stage without them).
using TensorsFn = std::function<std::vector<at::Tensor>()>;
struct StageTensors {
  TensorsFn buffers;
  TensorsFn parameters;
};

// Runs the tasks of one stage: takes what a task consumes from the transport, calls the stage
// (on its device, with its stream current, replaying the random state when it recomputes a
// checkpointed forward), runs autograd from the stage's outputs into its parameters and
// inputs (or, when the schedule splits the backward, into its inputs in B and its parameters
// in W: backward_split.h), and hands what the task made to the transport. Which thread calls it,
// and when, is the executor's business.
class StageWorker {
 public:
  StageWorker(int stage, int stages, StageFn fn, StageTensors tensors, at::Device device,
              std::optional<c10::Stream> stream, CheckpointMode checkpoint, bool check_finite,
              Transport& transport)
      : stage_(stage),
        last_(stage == stages - 1),
        fn_(std::move(fn)),
        tensors_(std::move(tensors)),
        device_(device),
        stream_(stream),
        checkpoint_(checkpoint),
        check_finite_(check_finite),
        transport_(transport) {}

  // Runs `task` (of this stage) for `step`; throws what the stage threw.
  void run(Step& step, const Task& task);

  at::Device device() const { return device_; }
  const std::optional<c10::Stream>& stream() const { return stream_; }

 private:
  void forward(Step& step, int i);
  void backward(Step& step, int i);
  void weight(Step& step, int i);
  // Calls the stage on `input`, each input that wants a gradient behind a sink (kept in the
  // slot); `structure` goes in as the input's and comes out as the output's. On the last
  // stage of a train_step, returns the weighted loss instead.
  Activations call(Step& step, int i, const Activations& input,
                   const std::vector<bool>& input_has_grad, StructurePtr& structure);
  // With check_finite: throws naming `what` unless every floating tensor of `xs` is finite.
  void expect_finite(const Activations& xs, const char* what) const;
  // A checkpointed forward's graph, made again.
  Activations recompute(Step& step, int i, Slot& slot);
  // Generator locks serialise forwards that draw random numbers; a stage learns whether it
  // draws (under the lock, exactly) and, if it does not, runs unlocked, each recomputation
  // checking that it still draws nothing.
  enum class Draws { kUnknown, kYes, kNo };

  int stage_;
  bool last_;
  StageFn fn_;
  StageTensors tensors_;
  Draws draws_ = Draws::kUnknown;  // only this stage's tasks touch it, never two at once
  at::Device device_;
  std::optional<c10::Stream> stream_;
  CheckpointMode checkpoint_;
  bool check_finite_;
  Transport& transport_;
};

}  // namespace shardpipe
