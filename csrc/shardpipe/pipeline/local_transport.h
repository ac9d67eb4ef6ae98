#pragma once

#include <c10/core/Stream.h>

#include <optional>
#include <vector>

#include "shardpipe/pipeline/placement.h"
#include "shardpipe/pipeline/transport.h"

namespace shardpipe {

// Moves `xs` (without their autograd history) to `to`, where `consumer` will use them. The producer
// is whatever stream is current on the tensors' devices in the calling thread: between devices a
// copy_to that `consumer` waits on, on one device an event wait between the two streams. A CPU
// consumer has no stream to wait with, so its copy finishes before the host goes on.
Activations transfer(const Activations& xs, at::Device to,
                     const std::optional<c10::Stream>& consumer);

// The stages of one process: a hand-off is a `transfer` into the consumer's slot and a
// notification of the step.
class LocalTransport : public Transport {
 public:
  // `streams[s]`: stage s's compute stream (none on the CPU).
  LocalTransport(const Placement& placement, const std::vector<std::optional<c10::Stream>>& streams)
      : placement_(placement), streams_(streams) {}

  void send_activations(Step& step, int stage, int i, const Activations& outputs,
                        StructurePtr structure, std::vector<bool> needs_grad) override;
  void send_gradients(Step& step, int stage, int i, const Activations& grads) override;
  bool arrived(Step& step, const Task& task) override;
  Activations take_input(Step& step, int stage, int i, StructurePtr* structure,
                         std::vector<bool>* needs_grad) override;
  Activations take_gradient(Step& step, int stage, int i) override;

 protected:
  const Placement& placement_;
  const std::vector<std::optional<c10::Stream>>& streams_;
};

}  // namespace shardpipe
