#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

namespace shardpipe {

// Collectives over a torch.distributed process group, named as Python names it
// (`group.group_name`). They go through the dispatcher operators of `_c10d_functional`, so the
// same code serves gloo and NCCL, the profiler sees each collective, and FakeTensor tracing
// works. Each call starts the collective and returns at once; `wait()` blocks until it has
// finished, which lets the caller compute in between.
class PendingCollective {
 public:
  PendingCollective() = default;
  PendingCollective(at::Tensor in_flight, std::function<at::Tensor(const at::Tensor&)> finish);

  // A collective with nothing to send, already finished.
  static PendingCollective ready(at::Tensor result);

  // The result; the first call waits for the collective. Calling it again returns the result.
  at::Tensor wait();

 private:
  at::Tensor in_flight_;
  std::function<at::Tensor(const at::Tensor&)> finish_;
  at::Tensor result_;
};

// Sums `x` over the group, in place: `x` must be a tensor the caller owns and does not read
// before wait() (a fresh partial result).
PendingCollective all_reduce_sum(at::Tensor x, const std::string& group_name);

// Concatenates every rank's `x` along the last dim, in rank order. Rank r's `x` has last dim
// sizes[r] and the other dims equal on all ranks; sizes may differ (uneven shards): every
// piece is padded to the largest, gathered with all_gather_into_tensor (gloo implements it
// through its list all-gather) and the padding is dropped.
PendingCollective all_gather_last_dim(const at::Tensor& x, std::vector<int64_t> sizes,
                                      const std::string& group_name);

// The whole tensor from every rank's piece of it along `dim`, rank r's piece being sizes[r]
// wide there (all_gather_last_dim along any dim): a new contiguous tensor, on return. A
// group of one rank copies without communicating. What a layer's state_dict gathers its
// shards with.
at::Tensor gather_shards(const at::Tensor& piece, int64_t dim, std::vector<int64_t> sizes,
                         const std::string& group_name);

}  // namespace shardpipe
