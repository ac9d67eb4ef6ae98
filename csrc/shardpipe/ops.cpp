// The whole operator surface of shardpipe, declared once. Implementations register
// per dispatch key next to their code (copy.cpp, sharded_linear.cpp, ...). This file
// has no Python in it, so GoogleTest reaches the same operators through the dispatcher.
#include <torch/library.h>

TORCH_LIBRARY(shardpipe, m) {
  // Value semantics of Tensor::to(device) for every tensor of the list; on CUDA the copies
  // run on a copy stream and the destination's current stream waits on them.
  m.def("copy_to(Tensor[] xs, Device device, bool non_blocking=True) -> Tensor[]");

  // Tensor-parallel linear layers (sharded_linear.h). One process, several devices: shard i
  // is weights[i] (and biases[i]) on its own device; the shards run on their own threads.
  // Column-parallel: weights split by output rows; gather_output=True gives one tensor on x's
  // device, False gives shard i's output on shard i's device.
  m.def(
      "column_parallel_linear(Tensor x, Tensor[] weights, Tensor[] biases, bool gather_output)"
      " -> Tensor[]");
  m.def(
      "_column_parallel_linear_backward(Tensor[] grads, Tensor x, Tensor[] weights, bool has_bias,"
      " bool gather_output, bool[3] output_mask) -> (Tensor, Tensor[], Tensor[])");
  // Row-parallel: weights split by input columns; xs is the whole input (input_is_parallel
  // False) or one input shard per weight; partial outputs are summed on output_device, where
  // the bias is added once.
  m.def(
      "row_parallel_linear(Tensor[] xs, Tensor[] weights, Tensor? bias, bool input_is_parallel,"
      " Device output_device) -> Tensor");
  m.def(
      "_row_parallel_linear_backward(Tensor grad, Tensor[] xs, Tensor[] weights, bool has_bias,"
      " bool input_is_parallel, bool[3] output_mask) -> (Tensor[], Tensor[], Tensor)");
  // Over a torch.distributed process group (group_name as Python's `group.group_name`): this
  // rank holds shard `rank` of shard_sizes. The backward starts its collective before the
  // weight-gradient matmul and waits for it last. chunks > 1 splits the flattened batch so
  // the forward collective of one piece runs while the next piece is multiplied.
  m.def(
      "column_parallel_linear_group(Tensor x, Tensor weight, Tensor? bias, bool gather_output,"
      " int[] shard_sizes, int rank, str group_name, int chunks=1) -> Tensor");
  m.def(
      "_column_parallel_linear_group_backward(Tensor grad, Tensor x, Tensor weight, bool has_bias,"
      " bool gather_output, int[] shard_sizes, int rank, str group_name,"
      " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "row_parallel_linear_group(Tensor x, Tensor weight, Tensor? bias, bool input_is_parallel,"
      " int[] shard_sizes, int rank, str group_name, int chunks=1) -> Tensor");
  m.def(
      "_row_parallel_linear_group_backward(Tensor grad, Tensor x, Tensor weight, bool has_bias,"
      " bool input_is_parallel, int[] shard_sizes, int rank, str group_name,"
      " bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
