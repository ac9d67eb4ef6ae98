#include "shardpipe/tensor_parallel/sharded_linear.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <functional>
#include <numeric>
#include <tuple>

#include "shardpipe/copy/copy.h"
#include "shardpipe/tensor_parallel/collectives.h"
#include "shardpipe/tensor_parallel/shard_threads.h"

namespace shardpipe {

namespace {
// Atomic: backwards read it on whichever thread autograd runs them.
std::atomic<bool> overlap_backward_collectives{true};
}  // namespace

void set_collective_overlap(bool on) { overlap_backward_collectives.store(on); }

bool collective_overlap() { return overlap_backward_collectives.load(); }

std::vector<int64_t> shard_sizes(int64_t total, int64_t shards) {
  TORCH_CHECK(shards >= 1 && shards <= total, "shard_sizes: cannot split ", total,
              " features into ", shards, " shards (need 1 <= shards <= features)");
  std::vector<int64_t> sizes(shards, total / shards);
  for (int64_t i = 0; i < total % shards; ++i) ++sizes[i];
  return sizes;
}

std::vector<int64_t> shard_offsets(at::IntArrayRef sizes) {
  std::vector<int64_t> offsets(sizes.size(), 0);
  for (size_t i = 1; i < sizes.size(); ++i) offsets[i] = offsets[i - 1] + sizes[i - 1];
  return offsets;
}

at::Tensor linear_input_grad(const at::Tensor& grad, const at::Tensor& weight) {
  return grad.matmul(weight);
}

at::Tensor linear_weight_grad(const at::Tensor& grad, const at::Tensor& input) {
  return grad.reshape({-1, grad.size(-1)}).t().mm(input.reshape({-1, input.size(-1)}));
}

at::Tensor linear_bias_grad(const at::Tensor& grad) {
  return grad.reshape({-1, grad.size(-1)}).sum(0);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Mask = std::array<bool, 3>;  // which of (input, weight, bias) gradients to compute

// --- helpers --------------------------------------------------------------------------------

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

void check_weights(const char* op, at::TensorList weights) {
  TORCH_CHECK(!weights.empty(), op, ": needs at least one weight shard");
  for (size_t i = 0; i < weights.size(); ++i) {
    TORCH_CHECK(weights[i].dim() == 2, op, ": weight shard ", i, " must be 2-D, got shape ",
                weights[i].sizes());
    TORCH_CHECK(weights[i].scalar_type() == weights[0].scalar_type(), op, ": weight shard ", i,
                " has dtype ", weights[i].scalar_type(), ", shard 0 has ",
                weights[0].scalar_type());
  }
}

void check_input(const char* op, const at::Tensor& x, const at::Tensor& weight, int64_t width,
                 const char* what) {
  TORCH_CHECK(x.dim() >= 1, op, ": input must have at least one dim, got a scalar");
  TORCH_CHECK(x.size(-1) == width, op, ": ", what, " has last dim ", x.size(-1), ", expected ",
              width);
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": input has dtype ", x.scalar_type(),
              " but the weight has ", weight.scalar_type());
}

void check_group(const char* op, at::IntArrayRef sizes, int64_t rank) {
  TORCH_CHECK(!sizes.empty(), op, ": shard_sizes must list one size per rank");
  TORCH_CHECK(rank >= 0 && rank < static_cast<int64_t>(sizes.size()), op, ": rank ", rank,
              " is outside the group of ", sizes.size());
}

int64_t total_of(at::IntArrayRef sizes) {
  return std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
}

// --- one process, several devices -----------------------------------------------------------

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
                                       Mask mask) {
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
                                    Mask mask) {
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

// --- process group ---------------------------------------------------------------------------

// The forward's communication in `chunks` pieces of the flattened batch: the collective of
// piece k (started by `communicate`) runs in the group's background while piece k + 1 is
// computed. One piece is the plain compute-then-communicate.
at::Tensor in_chunks(const at::Tensor& x, int64_t chunks, int64_t out_width,
                     const std::function<at::Tensor(const at::Tensor&)>& compute,
                     const std::function<PendingCollective(at::Tensor)>& communicate) {
  TORCH_CHECK(chunks >= 1, "chunks must be at least 1, got ", chunks);
  auto rows = x.reshape({-1, x.size(-1)});
  const int64_t n = rows.size(0);
  const int64_t pieces = std::max<int64_t>(1, std::min(chunks, n));
  if (pieces == 1) return communicate(compute(x)).wait();
  std::vector<PendingCollective> pending;
  int64_t start = 0;
  for (int64_t k = 0; k < pieces; ++k) {
    const int64_t len = n / pieces + (k < n % pieces ? 1 : 0);
    pending.push_back(communicate(compute(rows.narrow(0, start, len))));
    start += len;
  }
  std::vector<at::Tensor> done;
  done.reserve(pieces);
  for (auto& p : pending) done.push_back(p.wait());
  auto out_shape = x.sizes().vec();
  out_shape.back() = out_width;
  return at::cat(done, 0).view(out_shape);
}

at::Tensor column_parallel_linear_group_kernel(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               bool gather_output, at::IntArrayRef shard_sizes,
                                               int64_t rank, c10::string_view group_name,
                                               int64_t chunks) {
  const char* op = "column_parallel_linear_group";
  check_group(op, shard_sizes, rank);
  check_weights(op, weight);
  TORCH_CHECK(weight.size(0) == shard_sizes[rank], op, ": rank ", rank, " holds ", weight.size(0),
              " output features, shard_sizes says ", shard_sizes[rank]);
  check_input(op, x, weight, weight.size(1), "x");
  if (!gather_output || shard_sizes.size() == 1) return at::linear(x, weight, bias);
  const auto sizes = shard_sizes.vec();
  const std::string group(group_name);
  return in_chunks(
      x, chunks, total_of(shard_sizes),
      [&](const at::Tensor& piece) { return at::linear(piece, weight, bias); },
      [&](at::Tensor y) { return all_gather_last_dim(y, sizes, group); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> column_parallel_linear_group_backward_kernel(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, bool has_bias,
    bool gather_output, at::IntArrayRef shard_sizes, int64_t rank, c10::string_view group_name,
    Mask mask) {
  const char* op = "_column_parallel_linear_group_backward";
  check_group(op, shard_sizes, rank);
  const bool distributed = shard_sizes.size() > 1;
  auto g = grad;
  if (gather_output && distributed) {
    g = grad.narrow(-1, shard_offsets(shard_sizes)[rank], shard_sizes[rank]);
  }
  // Every rank's input gradient is partial (it saw only its output features): sum them. The
  // reduction runs in the group's background while the weight gradient is computed here.
  PendingCollective input_grad;
  if (mask[0]) {
    auto partial = linear_input_grad(g, weight);
    input_grad = distributed ? all_reduce_sum(partial, std::string(group_name))
                             : PendingCollective::ready(partial);
    if (!collective_overlap()) input_grad.wait();
  }
  at::Tensor weight_grad = mask[1] ? linear_weight_grad(g, x) : at::Tensor();
  at::Tensor bias_grad = mask[2] && has_bias ? linear_bias_grad(g) : at::Tensor();
  return {input_grad.wait(), weight_grad, bias_grad};
}

at::Tensor row_local_input(const at::Tensor& x, bool input_is_parallel, at::IntArrayRef shard_sizes,
                           int64_t rank) {
  if (input_is_parallel || shard_sizes.size() == 1) return x;
  return x.narrow(-1, shard_offsets(shard_sizes)[rank], shard_sizes[rank]);
}

at::Tensor row_parallel_linear_group_kernel(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            bool input_is_parallel, at::IntArrayRef shard_sizes,
                                            int64_t rank, c10::string_view group_name,
                                            int64_t chunks) {
  const char* op = "row_parallel_linear_group";
  check_group(op, shard_sizes, rank);
  check_weights(op, weight);
  TORCH_CHECK(weight.size(1) == shard_sizes[rank], op, ": rank ", rank, " holds ", weight.size(1),
              " input features, shard_sizes says ", shard_sizes[rank]);
  if (input_is_parallel) {
    check_input(op, x, weight, shard_sizes[rank], "the input shard");
  } else {
    check_input(op, x, weight, total_of(shard_sizes), "x");
  }
  auto local = row_local_input(x, input_is_parallel, shard_sizes, rank);
  if (shard_sizes.size() == 1) return at::linear(local, weight, bias);
  const std::string group(group_name);
  auto y = in_chunks(
      local, chunks, weight.size(0),
      [&](const at::Tensor& piece) { return at::linear(piece, weight); },
      [&](at::Tensor partial) { return all_reduce_sum(std::move(partial), group); });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_parallel_linear_group_backward_kernel(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, bool has_bias,
    bool input_is_parallel, at::IntArrayRef shard_sizes, int64_t rank, c10::string_view group_name,
    Mask mask) {
  const char* op = "_row_parallel_linear_group_backward";
  check_group(op, shard_sizes, rank);
  const bool distributed = shard_sizes.size() > 1;
  auto local = row_local_input(x, input_is_parallel, shard_sizes, rank);
  // A whole input needs the other ranks' slices of its gradient: gather them while the
  // weight gradient is computed here.
  PendingCollective input_grad;
  if (mask[0]) {
    auto mine = linear_input_grad(grad, weight);
    input_grad = distributed && !input_is_parallel
                     ? all_gather_last_dim(mine, shard_sizes.vec(), std::string(group_name))
                     : PendingCollective::ready(mine);
    if (!collective_overlap()) input_grad.wait();
  }
  at::Tensor weight_grad = mask[1] ? linear_weight_grad(grad, local) : at::Tensor();
  at::Tensor bias_grad = mask[2] && has_bias ? linear_bias_grad(grad) : at::Tensor();
  return {input_grad.wait(), weight_grad, bias_grad};
}

// --- operator handles ------------------------------------------------------------------------

c10::OperatorHandle find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

const auto& column_op() {
  static const auto op = find_op("shardpipe::column_parallel_linear")
                             .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList,
                                                            at::TensorList, bool)>();
  return op;
}

const auto& column_backward_op() {
  static const auto op =
      find_op("shardpipe::_column_parallel_linear_backward")
          .typed<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
              at::TensorList, const at::Tensor&, at::TensorList, bool, bool, Mask)>();
  return op;
}

const auto& row_op() {
  static const auto op =
      find_op("shardpipe::row_parallel_linear")
          .typed<at::Tensor(at::TensorList, at::TensorList, const std::optional<at::Tensor>&, bool,
                            at::Device)>();
  return op;
}

const auto& row_backward_op() {
  static const auto op =
      find_op("shardpipe::_row_parallel_linear_backward")
          .typed<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>(
              const at::Tensor&, at::TensorList, at::TensorList, bool, bool, Mask)>();
  return op;
}

using GroupForward = at::Tensor(const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, bool, at::IntArrayRef, int64_t,
                                c10::string_view, int64_t);
using GroupBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                     const at::Tensor&,
                                                                     const at::Tensor&, bool, bool,
                                                                     at::IntArrayRef, int64_t,
                                                                     c10::string_view, Mask);

const auto& column_group_op() {
  static const auto op = find_op("shardpipe::column_parallel_linear_group").typed<GroupForward>();
  return op;
}

const auto& column_group_backward_op() {
  static const auto op =
      find_op("shardpipe::_column_parallel_linear_group_backward").typed<GroupBackward>();
  return op;
}

const auto& row_group_op() {
  static const auto op = find_op("shardpipe::row_parallel_linear_group").typed<GroupForward>();
  return op;
}

const auto& row_group_backward_op() {
  static const auto op =
      find_op("shardpipe::_row_parallel_linear_group_backward").typed<GroupBackward>();
  return op;
}

// --- autograd --------------------------------------------------------------------------------

bool any_needed(AutogradContext* ctx, size_t begin, size_t end) {
  for (size_t i = begin; i < end; ++i) {
    if (ctx->needs_input_grad(i)) return true;
  }
  return false;
}

// The group layers' autograd, shared: input edges x, weight, bias (when given).
at::Tensor group_forward(const c10::TypedOperatorHandle<GroupForward>& op, AutogradContext* ctx,
                         const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, bool flag,
                         at::IntArrayRef shard_sizes, int64_t rank, c10::string_view group_name,
                         int64_t chunks) {
  ctx->save_for_backward({x, weight});
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  ctx->saved_data["flag"] = flag;
  ctx->saved_data["shard_sizes"] = shard_sizes.vec();
  ctx->saved_data["rank"] = rank;
  ctx->saved_data["group_name"] = std::string(group_name);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(x, weight, bias, flag, shard_sizes, rank, group_name, chunks);
}

variable_list group_backward(const c10::TypedOperatorHandle<GroupBackward>& op,
                             AutogradContext* ctx, const variable_list& grads) {
  auto saved = ctx->get_saved_variables();
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  const Mask mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                  has_bias && ctx->needs_input_grad(2)};
  const auto sizes = ctx->saved_data["shard_sizes"].toIntVector();
  const auto group_name = ctx->saved_data["group_name"].toStringRef();
  auto [input_grad, weight_grad, bias_grad] =
      op.call(grads[0], saved[0], saved[1], has_bias, ctx->saved_data["flag"].toBool(), sizes,
              ctx->saved_data["rank"].toInt(), group_name, mask);
  // x, weight, bias, flag, shard_sizes, rank, group_name, chunks
  return {input_grad, weight_grad, bias_grad, {}, {}, {}, {}, {}};
}

}  // namespace

// Outside the anonymous namespace: autograd names a node after its class (grad_fn shows it).
// Input edges: x, weights[0..n), biases[0..n) (when given).
class ColumnParallelLinearFunction
    : public torch::autograd::Function<ColumnParallelLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, bool gather_output) {
    variable_list to_save{x};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["has_bias"] = !biases.empty();
    ctx->saved_data["gather_output"] = gather_output;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return column_op().call(x, weights, biases, gather_output);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto x = saved[0];
    const std::vector<at::Tensor> weights(saved.begin() + 1, saved.end());
    const size_t n = weights.size();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const Mask mask{ctx->needs_input_grad(0), any_needed(ctx, 1, 1 + n),
                    has_bias && any_needed(ctx, 1 + n, 1 + 2 * n)};
    auto [input_grad, weight_grads, bias_grads] = column_backward_op().call(
        grads, x, weights, has_bias, ctx->saved_data["gather_output"].toBool(), mask);
    variable_list result{input_grad};
    for (size_t i = 0; i < n; ++i) result.push_back(mask[1] ? weight_grads[i] : at::Tensor());
    if (has_bias) {
      for (size_t i = 0; i < n; ++i) result.push_back(mask[2] ? bias_grads[i] : at::Tensor());
    }
    result.emplace_back();  // gather_output
    return result;
  }
};

// Input edges: xs[0..k), weights[0..n), bias (when given).
class RowParallelLinearFunction : public torch::autograd::Function<RowParallelLinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList xs, at::TensorList weights,
                               const std::optional<at::Tensor>& bias, bool input_is_parallel,
                               at::Device output_device) {
    variable_list to_save(xs.begin(), xs.end());
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    ctx->save_for_backward(to_save);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->saved_data["num_inputs"] = static_cast<int64_t>(xs.size());
    ctx->saved_data["has_bias"] = has_bias;
    if (has_bias) ctx->saved_data["bias_device"] = bias->device();
    ctx->saved_data["input_is_parallel"] = input_is_parallel;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {row_op().call(xs, weights, bias, input_is_parallel, output_device)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto k = static_cast<size_t>(ctx->saved_data["num_inputs"].toInt());
    const std::vector<at::Tensor> xs(saved.begin(), saved.begin() + k);
    const std::vector<at::Tensor> weights(saved.begin() + k, saved.end());
    const size_t n = weights.size();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const Mask mask{any_needed(ctx, 0, k), any_needed(ctx, k, k + n),
                    has_bias && ctx->needs_input_grad(k + n)};
    auto [input_grads, weight_grads, bias_grad] = row_backward_op().call(
        grads[0], xs, weights, has_bias, ctx->saved_data["input_is_parallel"].toBool(), mask);
    variable_list result;
    for (size_t i = 0; i < k; ++i) result.push_back(mask[0] ? input_grads[i] : at::Tensor());
    for (size_t i = 0; i < n; ++i) result.push_back(mask[1] ? weight_grads[i] : at::Tensor());
    if (bias_grad.defined()) {
      // The bias lives on one device; the output (and so its gradient) may be elsewhere.
      const auto device = ctx->saved_data["bias_device"].toDevice();
      if (bias_grad.device() != device) {
        bias_grad = copy_to({bias_grad}, device, /*non_blocking=*/!device.is_cpu())[0];
      }
    }
    result.push_back(bias_grad);
    result.emplace_back();  // input_is_parallel
    result.emplace_back();  // output_device
    return result;
  }
};

class ColumnParallelLinearGroupFunction
    : public torch::autograd::Function<ColumnParallelLinearGroupFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool gather_output,
                            at::IntArrayRef shard_sizes, int64_t rank, c10::string_view group_name,
                            int64_t chunks) {
    return group_forward(column_group_op(), ctx, x, weight, bias, gather_output, shard_sizes, rank,
                         group_name, chunks);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return group_backward(column_group_backward_op(), ctx, grads);
  }
};

class RowParallelLinearGroupFunction
    : public torch::autograd::Function<RowParallelLinearGroupFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool input_is_parallel,
                            at::IntArrayRef shard_sizes, int64_t rank, c10::string_view group_name,
                            int64_t chunks) {
    return group_forward(row_group_op(), ctx, x, weight, bias, input_is_parallel, shard_sizes, rank,
                         group_name, chunks);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return group_backward(row_group_backward_op(), ctx, grads);
  }
};

namespace {

std::vector<at::Tensor> column_parallel_linear_autograd(const at::Tensor& x, at::TensorList weights,
                                                        at::TensorList biases, bool gather_output) {
  return ColumnParallelLinearFunction::apply(x, weights, biases, gather_output);
}

at::Tensor row_parallel_linear_autograd(at::TensorList xs, at::TensorList weights,
                                        const std::optional<at::Tensor>& bias,
                                        bool input_is_parallel, at::Device output_device) {
  return RowParallelLinearFunction::apply(xs, weights, bias, input_is_parallel, output_device)[0];
}

at::Tensor column_parallel_linear_group_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias,
                                                 bool gather_output, at::IntArrayRef shard_sizes,
                                                 int64_t rank, c10::string_view group_name,
                                                 int64_t chunks) {
  return ColumnParallelLinearGroupFunction::apply(x, weight, bias, gather_output, shard_sizes, rank,
                                                  group_name, chunks);
}

at::Tensor row_parallel_linear_group_autograd(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias,
                                              bool input_is_parallel, at::IntArrayRef shard_sizes,
                                              int64_t rank, c10::string_view group_name,
                                              int64_t chunks) {
  return RowParallelLinearGroupFunction::apply(x, weight, bias, input_is_parallel, shard_sizes,
                                               rank, group_name, chunks);
}

}  // namespace

// --- public entry points (through the dispatcher) -------------------------------------------

std::vector<at::Tensor> column_parallel_linear(const at::Tensor& x, at::TensorList weights,
                                               at::TensorList biases, bool gather_output) {
  return column_op().call(x, weights, biases, gather_output);
}

at::Tensor row_parallel_linear(at::TensorList xs, at::TensorList weights,
                               const std::optional<at::Tensor>& bias, bool input_is_parallel,
                               at::Device output_device) {
  return row_op().call(xs, weights, bias, input_is_parallel, output_device);
}

at::Tensor column_parallel_linear_group(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, bool gather_output,
                                        at::IntArrayRef shard_sizes, int64_t rank,
                                        const std::string& group_name, int64_t chunks) {
  return column_group_op().call(x, weight, bias, gather_output, shard_sizes, rank, group_name,
                                chunks);
}

at::Tensor row_parallel_linear_group(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, bool input_is_parallel,
                                     at::IntArrayRef shard_sizes, int64_t rank,
                                     const std::string& group_name, int64_t chunks) {
  return row_group_op().call(x, weight, bias, input_is_parallel, shard_sizes, rank, group_name,
                             chunks);
}

TORCH_LIBRARY_IMPL(shardpipe, CompositeExplicitAutograd, m) {
  m.impl("column_parallel_linear", &column_parallel_linear_kernel);
  m.impl("_column_parallel_linear_backward", &column_parallel_linear_backward_kernel);
  m.impl("row_parallel_linear", &row_parallel_linear_kernel);
  m.impl("_row_parallel_linear_backward", &row_parallel_linear_backward_kernel);
  m.impl("column_parallel_linear_group", &column_parallel_linear_group_kernel);
  m.impl("_column_parallel_linear_group_backward", &column_parallel_linear_group_backward_kernel);
  m.impl("row_parallel_linear_group", &row_parallel_linear_group_kernel);
  m.impl("_row_parallel_linear_group_backward", &row_parallel_linear_group_backward_kernel);
}

TORCH_LIBRARY_IMPL(shardpipe, Autograd, m) {
  m.impl("column_parallel_linear", &column_parallel_linear_autograd);
  m.impl("row_parallel_linear", &row_parallel_linear_autograd);
  m.impl("column_parallel_linear_group", &column_parallel_linear_group_autograd);
  m.impl("row_parallel_linear_group", &row_parallel_linear_group_autograd);
}

}  // namespace shardpipe
