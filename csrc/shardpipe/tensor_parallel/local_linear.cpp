// The sharded linear kernels over devices of one process (devices=): shard i is weights[i]
// on its own device, every shard runs on its own thread (run_on_shards) and the shards meet
// through copy_to onto the output's device. Registered below autograd; their autograd is in
// sharded_linear.cpp.
#include <torch/library.h>

#include <tuple>

#include "shardpipe/copy/copy.h"
#include "shardpipe/tensor_parallel/linear_math.h"
#include "shardpipe/tensor_parallel/shard_threads.h"

namespace shardpipe {
namespace {

// `t` on `device`: itself when it is there already, otherwise a copy (below autograd). A
// copy to the host is blocking: the host reads it next, and no stream would wait for it.
at::Tensor on_device(const at::Tensor& t, at::Device device) {
  if (!t.defined() || t.device() == device) return t;
  return copy_to_kernel({t}, device, /*non_blocking=*/!device.is_cpu())[0];
}

// The sum of fresh tensors, in index order (deterministic).
at::Tensor sum_in_order(const std::vector<at::Tensor>& parts) {
  if (parts.size() == 1) return parts[0];
  auto total = parts[0] + parts[1];
  for (size_t i = 2; i < parts.size(); ++i) total.add_(parts[i]);
  return total;
}

std::vector<at::Device> devices_of(at::TensorList tensors, std::initializer_list<at::Device> more) {
  std::vector<at::Device> devices(more);
  for (const auto& t : tensors) devices.push_back(t.device());
  return devices;
}

std::vector<at::Tensor> column_parallel_linear_kernel(const at::Tensor& x, at::TensorList weights,
                                                      at::TensorList biases, bool gather_output) {
  const char* op = "column_parallel_linear";
  check_weights(op, weights);
  const auto n = static_cast<int64_t>(weights.size());
  check_input(op, x, weights[0], weights[0].size(1), "x");
  TORCH_CHECK(biases.empty() || static_cast<int64_t>(biases.size()) == n, op,
              ": needs one bias per weight shard or none, got ", biases.size(), " for ", n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(weights[i].size(1) == weights[0].size(1), op, ": weight shard ", i, " has ",
                weights[i].size(1), " input features, shard 0 has ", weights[0].size(1));
  }
  std::vector<at::Tensor> outs(n);
  run_on_shards(n, devices_of(weights, {x.device()}), [&](int64_t i) {
    const auto device = weights[i].device();
    auto y = at::linear(on_device(x, device), weights[i],
                        biases.empty() ? std::optional<at::Tensor>() : biases[i]);
    outs[i] = gather_output ? on_device(y, x.device()) : y;
  });
  if (gather_output && n > 1) return {at::cat(outs, -1)};
  return outs;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>
column_parallel_linear_backward_kernel(at::TensorList grads, const at::Tensor& x,
                                       at::TensorList weights, bool has_bias, bool gather_output,
                                       GradMask mask) {
  const char* op = "_column_parallel_linear_backward";
  check_weights(op, weights);
  const auto n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == (gather_output ? 1 : n), op, ": expected ",
              gather_output ? 1 : n, " output gradients, got ", grads.size());
  std::vector<int64_t> sizes;
  for (const auto& w : weights) sizes.push_back(w.size(0));
  const auto offsets = shard_offsets(sizes);
  std::vector<at::Tensor> input_parts(n);
  std::vector<at::Tensor> weight_grads(mask[1] ? n : 0);
  std::vector<at::Tensor> bias_grads(mask[2] && has_bias ? n : 0);
  run_on_shards(n, devices_of(weights, {x.device(), grads[0].device()}), [&](int64_t i) {
    const auto device = weights[i].device();
    auto g =
        on_device(gather_output ? grads[0].narrow(-1, offsets[i], sizes[i]) : grads[i], device);
    // The input gradient first, so that (on CUDA) its copy to x's device runs on the copy
    // stream while this shard computes its weight gradient.
    if (mask[0]) input_parts[i] = on_device(linear_input_grad(g, weights[i]), x.device());
    if (mask[1]) weight_grads[i] = linear_weight_grad(g, on_device(x, device));
    if (!bias_grads.empty()) bias_grads[i] = linear_bias_grad(g);
  });
  at::Tensor input_grad = mask[0] ? sum_in_order(input_parts) : at::Tensor();
  return {input_grad, weight_grads, bias_grads};
}

// Shard i's input: the given shard, or its slice of the whole input; on `device`.
at::Tensor row_input(at::TensorList xs, bool input_is_parallel, at::IntArrayRef offsets,
                     at::IntArrayRef sizes, int64_t i, at::Device device) {
  return on_device(input_is_parallel ? xs[i] : xs[0].narrow(-1, offsets[i], sizes[i]), device);
}

void check_row_inputs(const char* op, at::TensorList xs, at::TensorList weights,
                      bool input_is_parallel) {
  check_weights(op, weights);
  const auto n = weights.size();
  for (size_t i = 1; i < n; ++i) {
    TORCH_CHECK(weights[i].size(0) == weights[0].size(0), op, ": weight shard ", i, " has ",
                weights[i].size(0), " output features, shard 0 has ", weights[0].size(0));
  }
  if (input_is_parallel) {
    TORCH_CHECK(xs.size() == n, op,
                ": input_is_parallel needs one input shard per weight shard, got ", xs.size(),
                " for ", n);
    for (size_t i = 0; i < n; ++i) {
      check_input(op, xs[i], weights[i], weights[i].size(1), "input shard");
    }
  } else {
    TORCH_CHECK(xs.size() == 1, op, ": expects the whole input as one tensor, got ", xs.size());
    int64_t in_features = 0;
    for (const auto& w : weights) in_features += w.size(1);
    check_input(op, xs[0], weights[0], in_features, "x");
  }
}

at::Tensor row_parallel_linear_kernel(at::TensorList xs, at::TensorList weights,
                                      const std::optional<at::Tensor>& bias, bool input_is_parallel,
                                      at::Device output_device) {
  check_row_inputs("row_parallel_linear", xs, weights, input_is_parallel);
  const auto n = static_cast<int64_t>(weights.size());
  std::vector<int64_t> sizes;
  for (const auto& w : weights) sizes.push_back(w.size(1));
  const auto offsets = shard_offsets(sizes);
  const bool has_bias = bias.has_value() && bias->defined();
  if (n == 1 && weights[0].device() == output_device &&
      (!has_bias || bias->device() == output_device)) {
    // One shard where the output goes: exactly nn.Linear.
    return at::linear(row_input(xs, input_is_parallel, offsets, sizes, 0, output_device),
                      weights[0], bias);
  }
  std::vector<at::Tensor> parts(n);
  run_on_shards(n, devices_of(weights, {output_device, xs[0].device()}), [&](int64_t i) {
    const auto device = weights[i].device();
    auto x = row_input(xs, input_is_parallel, offsets, sizes, i, device);
    parts[i] = on_device(at::linear(x, weights[i]), output_device);
  });
  auto y = sum_in_order(parts);
  if (has_bias) y.add_(on_device(*bias, output_device));
  return y;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
row_parallel_linear_backward_kernel(const at::Tensor& grad, at::TensorList xs,
                                    at::TensorList weights, bool has_bias, bool input_is_parallel,
                                    GradMask mask) {
  const char* op = "_row_parallel_linear_backward";
  check_row_inputs(op, xs, weights, input_is_parallel);
  const auto n = static_cast<int64_t>(weights.size());
  std::vector<int64_t> sizes;
  for (const auto& w : weights) sizes.push_back(w.size(1));
  const auto offsets = shard_offsets(sizes);
  std::vector<at::Tensor> input_parts(mask[0] ? n : 0);
  std::vector<at::Tensor> weight_grads(mask[1] ? n : 0);
  run_on_shards(n, devices_of(weights, {grad.device(), xs[0].device()}), [&](int64_t i) {
    const auto device = weights[i].device();
    auto g = on_device(grad, device);
    if (mask[0]) {
      const auto home = input_is_parallel ? xs[i].device() : xs[0].device();
      input_parts[i] = on_device(linear_input_grad(g, weights[i]), home);
    }
    if (mask[1]) {
      weight_grads[i] =
          linear_weight_grad(g, row_input(xs, input_is_parallel, offsets, sizes, i, device));
    }
  });
  std::vector<at::Tensor> input_grads;
  if (mask[0]) {
    input_grads = input_is_parallel
                      ? input_parts
                      : std::vector<at::Tensor>{n == 1 ? input_parts[0] : at::cat(input_parts, -1)};
  }
  at::Tensor bias_grad = mask[2] && has_bias ? linear_bias_grad(grad) : at::Tensor();
  return {input_grads, weight_grads, bias_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(shardpipe, CompositeExplicitAutograd, m) {
  m.impl("column_parallel_linear", &column_parallel_linear_kernel);
  m.impl("_column_parallel_linear_backward", &column_parallel_linear_backward_kernel);
  m.impl("row_parallel_linear", &row_parallel_linear_kernel);
  m.impl("_row_parallel_linear_backward", &row_parallel_linear_backward_kernel);
}

}  // namespace shardpipe
