#include "shardpipe/tensor_parallel/linear_math.h"

#include <numeric>

namespace shardpipe {

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

int64_t total_of(at::IntArrayRef sizes) {
  return std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
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

}  // namespace shardpipe
