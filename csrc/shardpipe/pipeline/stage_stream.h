#pragma once

#include <ATen/ATen.h>
#include <c10/core/Stream.h>

#include <optional>
#include <vector>

namespace shardpipe {

// Stream plumbing that works for any device type through c10's virtual guard, so the engine
// compiles without CUDA headers. On the CPU there are no streams: every call is a no-op.

// A fresh stream from the device's pool (std::nullopt on the CPU).
std::optional<c10::Stream> pool_stream(at::Device device);

// The calling thread's current stream on `device` (std::nullopt on the CPU).
std::optional<c10::Stream> current_stream(at::Device device);

// Makes `consumer` wait for the work queued so far on `producer` without blocking the host.
void wait_stream(const std::optional<c10::Stream>& consumer,
                 const std::optional<c10::Stream>& producer);

// Tells the caching allocator that `tensors` are used on `stream`, so their memory is not
// handed out again before that stream is done with them.
void record_on(const std::vector<at::Tensor>& tensors, const std::optional<c10::Stream>& stream);

// Makes the given streams current on their devices for the guard's lifetime.
class StreamsGuard {
 public:
  explicit StreamsGuard(std::initializer_list<std::optional<c10::Stream>> streams);
  ~StreamsGuard();
  StreamsGuard(const StreamsGuard&) = delete;
  StreamsGuard& operator=(const StreamsGuard&) = delete;

 private:
  std::vector<c10::Stream> previous_;
};

}  // namespace shardpipe
