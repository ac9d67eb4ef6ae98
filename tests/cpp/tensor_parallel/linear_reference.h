// What the sharded linear tests share: a plain linear layer's leaves in float64 and its
// weights split into shards as the layers split them.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "shardpipe/tensor_parallel/linear_math.h"

namespace shardpipe_test {

struct Reference {
  at::Tensor x, weight, bias;  // leaves of the plain computation
};

inline Reference make_reference(std::vector<int64_t> x_shape, int64_t out_f) {
  at::manual_seed(0);
  const int64_t in_f = x_shape.back();
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  return {at::randn(x_shape, f64).requires_grad_(), at::randn({out_f, in_f}, f64).requires_grad_(),
          at::randn({out_f}, f64).requires_grad_()};
}

// Pieces of `full` along `dim`, as fresh leaves.
inline std::vector<at::Tensor> split_leaves(const at::Tensor& full, int64_t dim, int64_t n) {
  auto sizes = shardpipe::shard_sizes(full.size(dim), n);
  auto offsets = shardpipe::shard_offsets(sizes);
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(full.detach().narrow(dim, offsets[i], sizes[i]).clone().requires_grad_());
  }
  return out;
}

inline at::Tensor leaf(const at::Tensor& t) { return t.detach().clone().requires_grad_(); }

inline at::Tensor grads_cat(const std::vector<at::Tensor>& leaves, int64_t dim) {
  std::vector<at::Tensor> grads;
  for (const auto& t : leaves) grads.push_back(t.grad());
  return at::cat(grads, dim);
}

}  // namespace shardpipe_test
