#pragma once

#include <ATen/ATen.h>

#include <array>
#include <vector>

namespace shardpipe {

// The arithmetic and the argument checks every sharded linear kernel shares, whichever way
// its shards are placed (local_linear.cpp: devices of one process; group_linear.cpp: ranks of
// a process group).

// Sizes of `shards` pieces of `total` features: the first total % shards pieces are one
// larger. Needs 1 <= shards <= total. The Python layer asks this one (_C.shard_sizes).
std::vector<int64_t> shard_sizes(int64_t total, int64_t shards);
// Start of every piece: the exclusive prefix sums of `sizes`.
std::vector<int64_t> shard_offsets(at::IntArrayRef sizes);
// The sum of `sizes`: the full width.
int64_t total_of(at::IntArrayRef sizes);

// The gradients of one shard's y = linear(x, weight, bias), with the same aten calls
// nn.Linear's autograd makes, so that a single shard matches nn.Linear bit for bit.
at::Tensor linear_input_grad(const at::Tensor& grad, const at::Tensor& weight);
at::Tensor linear_weight_grad(const at::Tensor& grad, const at::Tensor& input);
at::Tensor linear_bias_grad(const at::Tensor& grad);

// Which of the (input, weight, bias) gradients a backward computes: the `bool[3]
// output_mask` of the backward operators.
using GradMask = std::array<bool, 3>;

// Every weight shard is 2-D, with shard 0's dtype; there is at least one. `op` names the
// operator in the message.
void check_weights(const char* op, at::TensorList weights);
// `x` (called `what` in the message) has at least one dim, last dim `width` and the
// weight's dtype.
void check_input(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t width,
                 const char* what);

}  // namespace shardpipe
