// The sharded linear operators' autograd: a torch::autograd::Function per operator, registered
// for the Autograd key, whose forward calls the kernel below autograd (local_linear.cpp,
// group_linear.cpp) and whose backward calls the matching `_..._backward` operator. The public
// entry points of sharded_linear.h call the operators through the dispatcher.
#include "shardpipe/tensor_parallel/sharded_linear.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "shardpipe/copy/copy.h"
#include "shardpipe/tensor_parallel/linear_math.h"

namespace shardpipe {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

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
              at::TensorList, const at::Tensor&, at::TensorList, bool, bool, GradMask)>();
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
              const at::Tensor&, at::TensorList, at::TensorList, bool, bool, GradMask)>();
  return op;
}

using GroupForward = at::Tensor(const at::Tensor&, const at::Tensor&,
                                const std::optional<at::Tensor>&, bool, at::IntArrayRef, int64_t,
                                c10::string_view, int64_t);
using GroupBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                     const at::Tensor&,
                                                                     const at::Tensor&, bool, bool,
                                                                     at::IntArrayRef, int64_t,
                                                                     c10::string_view, GradMask);

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
  const GradMask mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
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
    const GradMask mask{ctx->needs_input_grad(0), any_needed(ctx, 1, 1 + n),
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
    const GradMask mask{any_needed(ctx, 0, k), any_needed(ctx, k, k + n),
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

TORCH_LIBRARY_IMPL(shardpipe, Autograd, m) {
  m.impl("column_parallel_linear", &column_parallel_linear_autograd);
  m.impl("row_parallel_linear", &row_parallel_linear_autograd);
  m.impl("column_parallel_linear_group", &column_parallel_linear_group_autograd);
  m.impl("row_parallel_linear_group", &row_parallel_linear_group_autograd);
}

}  // namespace shardpipe
