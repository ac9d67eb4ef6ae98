#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace shardpipe {

// Tensor-parallel linear layers, y = x W^T + b with W split over shards.
//
// Column-parallel: W (out_f x in_f) is split by rows, so shard i computes the output features
// [offset_i, offset_i + size_i) from the whole input; the outputs are concatenated (gathered)
// or left sharded for a following row-parallel layer. Row-parallel: W is split by columns, so
// shard i reads input features [offset_i, offset_i + size_i) and produces a partial output;
// the partial outputs are summed (reduced) and the bias is added once.
//
// Two ways to place the shards:
// - one process, several devices: `weights[i]` lives on its own device (devices may repeat);
//   every shard runs on its own thread (run_on_shards) and communication is copy_to onto the
//   output device, then cat or sum there (local_linear.cpp).
// - one shard per rank of a torch.distributed process group (`group_name`); communication is
//   the group's all-gather / all-reduce (collectives.h, group_linear.cpp).
// Sizes of shards differ by at most one (shard_sizes, linear_math.h). The autograd of every
// operator is C++ (sharded_linear.cpp).

// --- Operators (through the dispatcher; differentiable) ------------------------------------

// One process: shard i is weights[i] (size_i x in_f) with biases[i] (empty list: no bias).
// gather_output: one tensor on x's device; otherwise shard i's output, on shard i's device.
std::vector<at::Tensor> column_parallel_linear(const at::Tensor& x, at::TensorList weights,
                                               at::TensorList biases, bool gather_output);

// One process: shard i is weights[i] (out_f x size_i). `xs` is the whole input (one tensor,
// input_is_parallel false) or one input shard per weight. The result lands on output_device.
at::Tensor row_parallel_linear(at::TensorList xs, at::TensorList weights,
                               const std::optional<at::Tensor>& bias, bool input_is_parallel,
                               at::Device output_device);

// Process group: this rank (`rank` of shard_sizes.size()) holds `weight`, rows
// [offset_rank, offset_rank + shard_sizes[rank]) of the full weight, and the matching bias.
// In backward the input-gradient all-reduce runs while the weight gradient is computed.
// chunks: with gather_output, split the flattened batch into this many pieces so that the
// all-gather of one piece runs while the next is multiplied.
at::Tensor column_parallel_linear_group(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, bool gather_output,
                                        at::IntArrayRef shard_sizes, int64_t rank,
                                        const std::string& group_name, int64_t chunks = 1);

// Process group: this rank holds columns [offset_rank, ...) of the full weight; the bias is
// whole on every rank. In backward (input_is_parallel false) the all-gather of the input
// gradient runs while the weight gradient is computed. chunks: split the flattened batch
// into this many pieces so that the all-reduce of one piece runs while the next is multiplied.
at::Tensor row_parallel_linear_group(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, bool input_is_parallel,
                                     at::IntArrayRef shard_sizes, int64_t rank,
                                     const std::string& group_name, int64_t chunks = 1);

// A measurement switch, private to benchmarks and tests, for the whole process: whether the
// process-group layers' backward starts its collective before the weight-gradient matmul and
// waits for it last (true, the default) or waits for it at once (false, to measure what the
// overlap gains). Read when a backward runs; the gradients are the same either way.
void set_collective_overlap(bool on);
bool collective_overlap();

}  // namespace shardpipe
