#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "shardpipe/tensor_parallel/group_watch.h"

namespace shardpipe {

// Collectives over a torch.distributed process group, named as Python names it
// (`group.group_name`). They call the group's c10d operations (which the profiler records),
// so the same code serves gloo and NCCL. Each call starts the collective and returns at once;
// `wait()` blocks until it has finished, which lets the caller compute in between. Every wait
// is bounded by the group's timeout and a peer's fault names that peer (group_watch.h).
class PendingCollective {
 public:
  PendingCollective() = default;
  // `result`: the tensor the collective fills; `finish` turns it into what wait() returns.
  PendingCollective(at::Tensor result, c10::intrusive_ptr<c10d::Work> work,
                    std::shared_ptr<GroupWatch> watch, uint64_t number, std::string what,
                    std::function<at::Tensor(const at::Tensor&)> finish);

  // A collective with nothing to send, already finished.
  static PendingCollective ready(at::Tensor result);

  // The result; the first call waits for the collective. Calling it again returns the result.
  at::Tensor wait();

 private:
  at::Tensor in_flight_;
  c10::intrusive_ptr<c10d::Work> work_;
  std::shared_ptr<GroupWatch> watch_;
  uint64_t number_ = 0;
  std::string what_;
  std::function<at::Tensor(const at::Tensor&)> finish_;
  at::Tensor result_;
};

// `op` (the operator calling them, for errors) comes first in each.

// Sums `x` over the group, in place: `x` must be a tensor the caller owns and does not read
// before wait() (a fresh partial result).
PendingCollective all_reduce_sum(const char* op, at::Tensor x, const std::string& group_name);

// Concatenates every rank's `x` along the last dim, in rank order. Rank r's `x` has last dim
// sizes[r] and the other dims equal on all ranks; sizes may differ (uneven shards): every
// piece is padded to the largest, gathered into one buffer and the padding is dropped.
PendingCollective all_gather_last_dim(const char* op, const at::Tensor& x,
                                      std::vector<int64_t> sizes, const std::string& group_name);

// The whole tensor from every rank's piece of it along `dim`, rank r's piece being sizes[r]
// wide there (all_gather_last_dim along any dim): a new contiguous tensor, on return. A
// group of one rank copies without communicating. What a layer's state_dict gathers its
// shards with.
at::Tensor gather_shards(const char* op, const at::Tensor& piece, int64_t dim,
                         std::vector<int64_t> sizes, const std::string& group_name);

}  // namespace shardpipe
