#pragma once

#include <string>
#include <vector>

#include "shardpipe/pipeline/schedule.h"
#include "shardpipe/pipeline/step.h"

namespace shardpipe {

// How what a finished task made reaches the task that consumes it: a forward's outputs go to
// the next stage's forward, a backward's input gradients to the previous stage's backward.
// The executor never reads another stage's slot itself; it asks the transport whether what a
// task consumes has arrived, and the stage worker takes it from the transport.
//
// `LocalTransport` serves the stages of one process. A transport whose peers are other
// processes fits the same calls: `begin` posts, ahead of the tasks and in their order, the
// receives this process's task lists will need (the others' lists say what they send); an arrival
// (or a failed peer) changes the step, which wakes the executor (Step::notify_locked / Step::fail);
// `finish` waits for sends still in flight.
class Transport {
 public:
  virtual ~Transport() = default;

  // Whether worker `w`'s task list runs in this process (with ranks: whether it is this rank's).
  virtual bool runs_here(int worker) const { return true; }
  // Where this process is, for error messages ("rank 1, "; empty for one process).
  virtual std::string place() const { return ""; }

  // Before a phase's tasks run here; `schedule` is the phase's, every process's lists.
  virtual void begin(Step& step, const Schedule& schedule) {}

  // F(stage, i) finished: `outputs` (nested as `structure` says) go to stage + 1.
  // `needs_grad[k]`: whether output k will want a gradient back (the consumer then collects
  // one for it).
  virtual void send_activations(Step& step, int stage, int i, const Activations& outputs,
                                StructurePtr structure, std::vector<bool> needs_grad) = 0;
  // B(stage, i) finished: the gradients of its inputs go to stage - 1.
  virtual void send_gradients(Step& step, int stage, int i, const Activations& grads) = 0;

  // Whether what `task` consumes from another stage (a forward's input, a backward's output
  // gradient) has arrived; called with step.mutex held.
  virtual bool arrived(Step& step, const Task& task) = 0;
  // The input of forward (stage, i), its structure and, per input, whether its producer
  // wants a gradient, once arrived; moved out of the transport.
  virtual Activations take_input(Step& step, int stage, int i, StructurePtr* structure,
                                 std::vector<bool>* needs_grad) = 0;
  // The gradient of the outputs of backward `task`, once arrived; moved out.
  virtual Activations take_gradient(Step& step, int stage, int i) = 0;

  // After the phase ran here (also when it failed): nothing may be left in flight.
  virtual void finish(Step& step) {}
};

}  // namespace shardpipe
