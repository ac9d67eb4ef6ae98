#pragma once

#include <memory>
#include <vector>

#include "shardpipe/pipeline/step.h"

namespace shardpipe {

class Engine;

// A stage sees each input that wants a gradient as a tensor whose grad_fn is a sink node
// (not as a leaf), so a first layer may work in place on it as it may in the unsplit model;
// the sink keeps what flows into it instead of passing it on. Returns the sink.
NodePtr attach_gradient_sink(at::Tensor& input);
// What has flowed into a sink since the last call (undefined if nothing did).
at::Tensor take_sink_gradient(const NodePtr& sink);

// Makes `engine`'s backward schedule for `step` the grad_fn of `outputs[k]` for every k in
// `differentiable`, with `inputs` as its next edges; autograd calls it with their gradients.
void attach_pipeline_backward(std::shared_ptr<Engine> engine, std::shared_ptr<Step> step,
                              const Activations& inputs, Activations& outputs,
                              const std::vector<size_t>& differentiable);

}  // namespace shardpipe
