#include "shardpipe/pipeline/local_transport.h"

#include "shardpipe/copy/copy.h"
#include "shardpipe/pipeline/stage_stream.h"

namespace shardpipe {

Activations transfer(const Activations& xs, at::Device to,
                     const std::optional<c10::Stream>& consumer) {
  Activations detached;
  detached.reserve(xs.size());
  bool local = true;
  for (const auto& x : xs) {
    // Only a tensor with autograd history needs a fresh alias to leave the producer's graph.
    detached.push_back(x.defined() && x.requires_grad() ? x.detach() : x);
    local = local && (!x.defined() || x.device() == to);
  }
  // The inputs already on `to` were made on the producer's stream there: the consumer waits
  // on it first. (With the consumer's stream current on `to`, copy_to makes it wait on the
  // copy; the guard hides the producer's stream from copy_to.)
  wait_stream(consumer, current_stream(to));
  if (local) {
    record_on(detached, consumer);
    return detached;
  }
  StreamsGuard guard({consumer});
  return copy_to_kernel(detached, to, /*non_blocking=*/!to.is_cpu());
}

void LocalTransport::send_activations(Step& step, int stage, int i, const Activations& outputs,
                                      StructurePtr structure, std::vector<bool> needs_grad) {
  const int to = stage + 1;
  Activations moved = transfer(outputs, placement_.stage_devices[to], streams_[to]);
  std::lock_guard<std::mutex> lock(step.mutex);
  Slot& slot = step.at(to, i);
  slot.input = std::move(moved);
  slot.input_structure = std::move(structure);
  slot.input_has_grad = std::move(needs_grad);
  slot.has_input = true;
  step.notify_locked();
}

void LocalTransport::send_gradients(Step& step, int stage, int i, const Activations& grads) {
  const int to = stage - 1;
  Activations moved = transfer(grads, placement_.stage_devices[to], streams_[to]);
  std::lock_guard<std::mutex> lock(step.mutex);
  Slot& slot = step.at(to, i);
  slot.grad = std::move(moved);
  slot.has_grad = true;
  step.notify_locked();
}

bool LocalTransport::arrived(Step& step, const Task& task) {
  const Slot& slot = step.at(task.stage, task.micro_batch);
  return task.phase == Phase::kForward ? slot.has_input : slot.has_grad;
}

Activations LocalTransport::take_input(Step& step, int stage, int i, StructurePtr* structure,
                                       std::vector<bool>* needs_grad) {
  std::lock_guard<std::mutex> lock(step.mutex);
  Slot& slot = step.at(stage, i);
  *structure = std::move(slot.input_structure);
  *needs_grad = std::move(slot.input_has_grad);
  return std::move(slot.input);
}

Activations LocalTransport::take_gradient(Step& step, int stage, int i) {
  std::lock_guard<std::mutex> lock(step.mutex);
  return std::move(step.at(stage, i).grad);
}

}  // namespace shardpipe
