#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

namespace shardpipe {

// Host memory for the tensors a rank receives from its peers, kept for reuse once they die.
//
// A received activation or gradient is a fresh tensor handed to autograd, so it cannot be one
// buffer reused by every hand-off as a hand-written send/recv loop would. With plain
// `at::empty`, every large receive is a new mapping whose pages fault in as gloo writes them:
// on a 2-core VM that cost more than the transfer itself (8 micro-batches of 4 MiB: 22 ms of
// page faults a step). The pool gives back the blocks of last step's receives instead, whose
// pages are resident.
//
// What it keeps is bounded by the most it ever had out at once (one step's receives), so it
// never holds more than the pipeline already needed; `close` (the transport's end) frees it,
// and blocks still out are freed when their tensors die. Small receives use `at::empty`:
// malloc reuses those cheaply already. Thread-safe: tensors die on any thread.
class ReceivePool {
 public:
  // Receives smaller than this come from at::empty.
  static constexpr size_t kMinBytes = 64 * 1024;

  ReceivePool();
  ~ReceivePool();
  ReceivePool(const ReceivePool&) = delete;
  ReceivePool& operator=(const ReceivePool&) = delete;

  // A contiguous CPU tensor of `shape` and `dtype`, its contents undefined, as at::empty gives.
  at::Tensor empty(at::IntArrayRef shape, at::ScalarType dtype);
  // Frees what is kept; blocks out now are freed when their tensors die.
  void close();

  // For tests and benchmarks: bytes kept for reuse, and the most bytes out at once.
  size_t cached_bytes() const;
  size_t high_water_bytes() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace shardpipe
