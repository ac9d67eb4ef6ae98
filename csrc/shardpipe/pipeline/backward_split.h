#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/edge.h>

#include <vector>

namespace shardpipe {

// The zero-bubble schedules split a stage's backward in two: B, the gradient of the stage's
// inputs, which the previous stage waits for, now; W, the gradient of its parameters, which
// nobody waits for, later. The split is made on the stage's autograd graph as it is, by the
// autograd engine itself, so it holds for whatever the stage does (a weight used twice, an op
// with several outputs, batch norm, a custom autograd.Function):
//
// - Parameter-only nodes: AccumulateGrad (of a parameter, or any leaf that wants a gradient)
//   and every node all of whose paths end in one (TBackward of `weight.t()`, a whole stage
//   whose inputs want no gradient). Weight nodes: the other nodes with at least one next edge
//   into a parameter-only node (AddmmBackward of a Linear, NativeBatchNormBackward).
// - B runs the engine from the stage's outputs with the stage inputs and every input slot of
//   every weight node as the wanted outputs, without accumulating: it captures the gradient
//   flowing into each weight node (every contribution summed, so a weight used twice or a node
//   with several outputs is no special case), and runs a weight node with the outputs needed
//   on the way to the stage inputs only, so no weight-gradient matmul runs in B. It then cuts
//   each weight node's edges that do not lead into parameter-only nodes: the rest of the graph
//   (what only the input gradients needed) is freed at once.
// - W runs the engine from the weight nodes, with the captured gradients, accumulating: only
//   the parameter gradients are computed, nothing flows back into the graph B already went
//   through. It frees the graph.
//
// What B leaves for W: the weight nodes (with what they saved: mostly their inputs) and the
// gradient that flowed into each; outputs whose whole graph is parameter-only with their
// gradient. Undefined gradients stay undefined, as in one whole backward.
struct WeightGradients {
  std::vector<torch::autograd::Edge> roots;  // (weight node, input slot), or an output
  std::vector<at::Tensor> grads;             // what flows into each root
};

// B: backward from `outputs` with `grads` (each output requires grad) into the stage inputs
// behind `sinks` (null: an input that wants no gradient). Returns each sink's gradient
// (undefined where none flowed or the sink is null) and fills `later`.
std::vector<at::Tensor> backward_inputs(
    const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& grads,
    const std::vector<decltype(torch::autograd::Edge::function)>& sinks, WeightGradients& later);

// W: accumulates the parameter gradients from what B left, and empties `later`.
void backward_weights(WeightGradients& later);

}  // namespace shardpipe
