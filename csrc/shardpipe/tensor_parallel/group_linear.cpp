// The sharded linear kernels over a torch.distributed process group (group=): this rank holds
// shard `rank` of shard_sizes and the shards meet through the group's collectives
// (collectives.h), started before the work they can overlap and waited for last. Registered
// below autograd; their autograd is in sharded_linear.cpp.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <string>
#include <tuple>

#include "shardpipe/tensor_parallel/collectives.h"
#include "shardpipe/tensor_parallel/group_watch.h"
#include "shardpipe/tensor_parallel/linear_math.h"
#include "shardpipe/tensor_parallel/sharded_linear.h"

namespace shardpipe {
namespace {

// Atomic: backwards read it on whichever thread autograd runs them.
std::atomic<bool> overlap_backward_collectives{true};

}  // namespace

void set_collective_overlap(bool on) { overlap_backward_collectives.store(on); }

bool collective_overlap() { return overlap_backward_collectives.load(); }

namespace {

void check_group(const char* op, at::IntArrayRef sizes, int64_t rank) {
  TORCH_CHECK(!sizes.empty(), op, ": shard_sizes must list one size per rank");
  TORCH_CHECK(rank >= 0 && rank < static_cast<int64_t>(sizes.size()), op, ": rank ", rank,
              " is outside the group of ", sizes.size());
}

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
  for (const int64_t len : shard_sizes(n, pieces)) {
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

at::Tensor column_parallel_linear_group_compute(const at::Tensor& x, const at::Tensor& weight,
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
      [&](at::Tensor y) { return all_gather_last_dim(op, y, sizes, group); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> column_parallel_linear_group_backward_compute(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, bool has_bias,
    bool gather_output, at::IntArrayRef shard_sizes, int64_t rank, c10::string_view group_name,
    GradMask mask) {
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
    input_grad = distributed ? all_reduce_sum(op, partial, std::string(group_name))
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

at::Tensor row_parallel_linear_group_compute(const at::Tensor& x, const at::Tensor& weight,
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
      [&](at::Tensor partial) { return all_reduce_sum(op, std::move(partial), group); });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_parallel_linear_group_backward_compute(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, bool has_bias,
    bool input_is_parallel, at::IntArrayRef shard_sizes, int64_t rank, c10::string_view group_name,
    GradMask mask) {
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
                     ? all_gather_last_dim(op, mine, shard_sizes.vec(), std::string(group_name))
                     : PendingCollective::ready(mine);
    if (!collective_overlap()) input_grad.wait();
  }
  at::Tensor weight_grad = mask[1] ? linear_weight_grad(grad, local) : at::Tensor();
  at::Tensor bias_grad = mask[2] && has_bias ? linear_bias_grad(grad) : at::Tensor();
  return {input_grad.wait(), weight_grad, bias_grad};
}

// The peers of a rank whose operator failed may wait in the collective this rank will now
// not start: tell them (group_watch.h), then let the error go on to the caller.
void tell_peers(c10::string_view group_name, size_t ranks, const std::string& text) {
  if (ranks < 2) return;
  try {
    GroupWatch::of(std::string(group_name))->note_failure(text);
  } catch (...) {
    // No such group, or no store: the peers' timeout still ends their wait.
  }
}

std::string error_text(const c10::Error& e) {
  const char* kind = dynamic_cast<const c10::ValueError*>(&e)   ? "ValueError: "
                     : dynamic_cast<const c10::TypeError*>(&e)  ? "TypeError: "
                     : dynamic_cast<const c10::IndexError*>(&e) ? "IndexError: "
                                                                : "RuntimeError: ";
  return std::string(kind) + e.what_without_backtrace();
}

template <class Compute, class... Args>
auto noting_failure(Compute compute, c10::string_view group_name, at::IntArrayRef shard_sizes,
                    const Args&... args) {
  try {
    return compute(args...);
  } catch (const c10::Error& e) {
    tell_peers(group_name, shard_sizes.size(), error_text(e));
    throw;
  } catch (const std::exception& e) {
    tell_peers(group_name, shard_sizes.size(), e.what());
    throw;
  }
}

at::Tensor column_parallel_linear_group_kernel(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               bool gather_output, at::IntArrayRef shard_sizes,
                                               int64_t rank, c10::string_view group_name,
                                               int64_t chunks) {
  return noting_failure(column_parallel_linear_group_compute, group_name, shard_sizes, x, weight,
                        bias, gather_output, shard_sizes, rank, group_name, chunks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> column_parallel_linear_group_backward_kernel(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, bool has_bias,
    bool gather_output, at::IntArrayRef shard_sizes, int64_t rank, c10::string_view group_name,
    GradMask mask) {
  return noting_failure(column_parallel_linear_group_backward_compute, group_name, shard_sizes,
                        grad, x, weight, has_bias, gather_output, shard_sizes, rank, group_name,
                        mask);
}

at::Tensor row_parallel_linear_group_kernel(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            bool input_is_parallel, at::IntArrayRef shard_sizes,
                                            int64_t rank, c10::string_view group_name,
                                            int64_t chunks) {
  return noting_failure(row_parallel_linear_group_compute, group_name, shard_sizes, x, weight, bias,
                        input_is_parallel, shard_sizes, rank, group_name, chunks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> row_parallel_linear_group_backward_kernel(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, bool has_bias,
    bool input_is_parallel, at::IntArrayRef shard_sizes, int64_t rank, c10::string_view group_name,
    GradMask mask) {
  return noting_failure(row_parallel_linear_group_backward_compute, group_name, shard_sizes, grad,
                        x, weight, has_bias, input_is_parallel, shard_sizes, rank, group_name,
                        mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(shardpipe, CompositeExplicitAutograd, m) {
  m.impl("column_parallel_linear_group", &column_parallel_linear_group_kernel);
  m.impl("_column_parallel_linear_group_backward", &column_parallel_linear_group_backward_kernel);
  m.impl("row_parallel_linear_group", &row_parallel_linear_group_kernel);
  m.impl("_row_parallel_linear_group_backward", &row_parallel_linear_group_backward_kernel);
}

}  // namespace shardpipe
