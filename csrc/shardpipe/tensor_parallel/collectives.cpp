#include "shardpipe/tensor_parallel/collectives.h"

#include <algorithm>
#include <numeric>

namespace shardpipe {

PendingCollective::PendingCollective(at::Tensor result, c10::intrusive_ptr<c10d::Work> work,
                                     std::shared_ptr<GroupWatch> watch, uint64_t number,
                                     std::string what,
                                     std::function<at::Tensor(const at::Tensor&)> finish)
    : in_flight_(std::move(result)),
      work_(std::move(work)),
      watch_(std::move(watch)),
      number_(number),
      what_(std::move(what)),
      finish_(std::move(finish)) {}

PendingCollective PendingCollective::ready(at::Tensor result) {
  PendingCollective done;
  done.result_ = std::move(result);
  return done;
}

at::Tensor PendingCollective::wait() {
  if (!result_.defined() && in_flight_.defined()) {
    watch_->wait(*work_, number_, what_);
    result_ = finish_ ? finish_(in_flight_) : in_flight_;
    in_flight_ = at::Tensor();
    work_.reset();
  }
  return result_;
}

PendingCollective all_reduce_sum(const char* op, at::Tensor x, const std::string& group_name) {
  TORCH_CHECK(x.is_contiguous(), op,
              ": all_reduce_sum expects a contiguous tensor it may "
              "overwrite");
  // Empty tensors (an empty batch, the same on every rank) have nothing to send.
  if (x.numel() == 0) return PendingCollective::ready(x);
  auto watch = GroupWatch::of(group_name);
  const uint64_t number = watch->start();
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::SUM;
  options.timeout = watch->timeout();
  std::vector<at::Tensor> tensors{x};
  auto work = watch->group().allreduce(tensors, options);
  return PendingCollective(x, std::move(work), std::move(watch), number,
                           std::string("the all-reduce in ") + op, nullptr);
}

PendingCollective all_gather_last_dim(const char* op, const at::Tensor& x,
                                      std::vector<int64_t> sizes, const std::string& group_name) {
  const int64_t world = static_cast<int64_t>(sizes.size());
  TORCH_CHECK(x.dim() >= 1, op, ": all_gather_last_dim expects at least one dim, got a scalar");
  const int64_t widest = *std::max_element(sizes.begin(), sizes.end());
  const int64_t total = std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
  auto out_shape = x.sizes().vec();
  out_shape.back() = total;
  if (x.numel() == 0) return PendingCollective::ready(x.new_empty(out_shape));
  auto rows = x.reshape({-1, x.size(-1)});
  const int64_t batch = rows.size(0);
  if (x.size(-1) < widest) rows = at::constant_pad_nd(rows, {0, widest - x.size(-1)});
  rows = rows.contiguous();
  auto watch = GroupWatch::of(group_name);
  const uint64_t number = watch->start();
  // Every rank's block lands in one buffer: the list all-gather (which gloo and NCCL both
  // have) writes into views of it.
  auto blocks = at::empty({world, batch, widest}, rows.options());
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < world; ++r) outputs[0].push_back(blocks[r]);
  std::vector<at::Tensor> inputs{rows};
  c10d::AllgatherOptions options;
  options.timeout = watch->timeout();
  auto work = watch->group().allgather(outputs, inputs, options);
  auto finish = [world, sizes = std::move(sizes),
                 out_shape = std::move(out_shape)](const at::Tensor& all) {
    std::vector<at::Tensor> pieces;
    pieces.reserve(world);
    for (int64_t r = 0; r < world; ++r) pieces.push_back(all[r].narrow(-1, 0, sizes[r]));
    return at::cat(pieces, -1).view(out_shape);
  };
  return PendingCollective(blocks, std::move(work), std::move(watch), number,
                           std::string("the all-gather in ") + op, finish);
}

at::Tensor gather_shards(const char* op, const at::Tensor& piece, int64_t dim,
                         std::vector<int64_t> sizes, const std::string& group_name) {
  TORCH_CHECK(piece.dim() >= 1, op, ": gather_shards expects at least one dim, got a scalar");
  TORCH_CHECK(!sizes.empty(), op, ": gather_shards needs one size per rank");
  if (sizes.size() == 1) return piece.clone(at::MemoryFormat::Contiguous);
  auto full = all_gather_last_dim(op, piece.movedim(dim, -1), std::move(sizes), group_name).wait();
  return full.movedim(-1, dim).contiguous();
}

}  // namespace shardpipe
