#pragma once

#include <ATen/ATen.h>

#include <functional>

namespace shardpipe {

// Runs body(i) for every shard i in [0, n) at the same time: shard 0 on the calling thread,
// shard i > 0 on worker thread i. The workers are long-lived, one per shard index, shared by
// every sharded operator of the process, so that shards on repeated CPU "devices" really
// compute concurrently and CUDA shards launch their kernels from separate host threads.
//
// Each body sees the caller's thread-local state (grad mode, dispatch keys, profiler) and the
// caller's current stream on every device of `devices`, so work it queues is ordered exactly
// as if the caller had queued it. Returns when every body has finished; if any threw, the
// exception of the lowest shard index is rethrown. Called from a worker thread (a sharded
// operator nested in a shard body), the bodies run one after another on that thread instead.
void run_on_shards(int64_t n, at::ArrayRef<at::Device> devices,
                   const std::function<void(int64_t)>& body);

}  // namespace shardpipe
