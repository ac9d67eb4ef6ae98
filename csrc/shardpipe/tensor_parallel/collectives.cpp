#include "shardpipe/tensor_parallel/collectives.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <numeric>

namespace shardpipe {
namespace {

c10::OperatorHandle functional_op(const char* name) {
  // Looked up once per operator (function-local statics below); the ops live in libtorch.
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// Boxed calls: the group argument is `str` in older torch and `Any` in newer, and an IValue
// string fits both.
at::Tensor call_boxed(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(&stack);
  return stack.at(0).toTensor();
}

at::Tensor wait_tensor(const at::Tensor& t) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("_c10d_functional::wait_tensor", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op.call(t);
}

}  // namespace

PendingCollective::PendingCollective(at::Tensor in_flight,
                                     std::function<at::Tensor(const at::Tensor&)> finish)
    : in_flight_(std::move(in_flight)), finish_(std::move(finish)) {}

PendingCollective PendingCollective::ready(at::Tensor result) {
  PendingCollective done;
  done.result_ = std::move(result);
  return done;
}

at::Tensor PendingCollective::wait() {
  if (!result_.defined() && in_flight_.defined()) {
    auto done = wait_tensor(in_flight_);
    result_ = finish_ ? finish_(done) : done;
    in_flight_ = at::Tensor();
  }
  return result_;
}

PendingCollective all_reduce_sum(at::Tensor x, const std::string& group_name) {
  static const auto op = functional_op("_c10d_functional::all_reduce_");
  TORCH_CHECK(x.is_contiguous(), "all_reduce_sum: expects a contiguous tensor it may overwrite");
  // Empty tensors (an empty batch, the same on every rank) have nothing to send.
  if (x.numel() == 0) return PendingCollective::ready(x);
  auto out = call_boxed(op, {x, std::string("sum"), group_name});
  return PendingCollective(out, nullptr);
}

PendingCollective all_gather_last_dim(const at::Tensor& x, std::vector<int64_t> sizes,
                                      const std::string& group_name) {
  static const auto op = functional_op("_c10d_functional::all_gather_into_tensor");
  const int64_t world = static_cast<int64_t>(sizes.size());
  TORCH_CHECK(x.dim() >= 1, "all_gather_last_dim: expects at least one dim, got a scalar");
  const int64_t widest = *std::max_element(sizes.begin(), sizes.end());
  const int64_t total = std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
  auto out_shape = x.sizes().vec();
  out_shape.back() = total;
  if (x.numel() == 0) return PendingCollective::ready(x.new_empty(out_shape));
  auto rows = x.reshape({-1, x.size(-1)});
  const int64_t batch = rows.size(0);
  if (x.size(-1) < widest) rows = at::constant_pad_nd(rows, {0, widest - x.size(-1)});
  rows = rows.contiguous();
  auto gathered = call_boxed(op, {rows, world, group_name});
  auto finish = [world, batch, widest, sizes = std::move(sizes),
                 out_shape = std::move(out_shape)](const at::Tensor& all) {
    auto blocks = all.view({world, batch, widest});
    std::vector<at::Tensor> pieces;
    pieces.reserve(world);
    for (int64_t r = 0; r < world; ++r) pieces.push_back(blocks[r].narrow(-1, 0, sizes[r]));
    return at::cat(pieces, -1).view(out_shape);
  };
  return PendingCollective(gathered, finish);
}

at::Tensor gather_shards(const at::Tensor& piece, int64_t dim, std::vector<int64_t> sizes,
                         const std::string& group_name) {
  TORCH_CHECK(piece.dim() >= 1, "gather_shards: expects at least one dim, got a scalar");
  TORCH_CHECK(!sizes.empty(), "gather_shards: sizes must list one size per rank");
  if (sizes.size() == 1) return piece.clone(at::MemoryFormat::Contiguous);
  auto full = all_gather_last_dim(piece.movedim(dim, -1), std::move(sizes), group_name).wait();
  return full.movedim(-1, dim).contiguous();
}

}  // namespace shardpipe
