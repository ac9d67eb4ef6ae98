#include "shardpipe/tensor_parallel/shard_threads.h"

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <vector>

#include "shardpipe/common/worker_thread.h"

#ifndef _WIN32
#include <pthread.h>
#endif

namespace shardpipe {
namespace {

thread_local bool on_shard_worker = false;

struct WorkerRegistry {
  std::mutex mutex;
  std::vector<WorkerThread*> workers;  // index i serves shard i + 1
};

// Leaked on purpose, workers included: a worker blocked on its queue at exit must not be
// destroyed (joined) under it.
WorkerRegistry*& registry() {
  static WorkerRegistry* instance = [] {
#ifndef _WIN32
    // A forked child has none of the parent's threads: start over with fresh workers.
    pthread_atfork(nullptr, nullptr, [] { registry() = new WorkerRegistry(); });
#endif
    return new WorkerRegistry();
  }();
  return instance;
}

WorkerThread& worker_for(int64_t shard) {
  auto* reg = registry();
  std::lock_guard<std::mutex> lock(reg->mutex);
  while (static_cast<int64_t>(reg->workers.size()) < shard) {
    auto index = static_cast<int64_t>(reg->workers.size()) + 1;
    auto* worker = new WorkerThread("shardpipe_shard" + std::to_string(index));
    worker->post([] {
      at::init_num_threads();
      on_shard_worker = true;
    });
    reg->workers.push_back(worker);
  }
  return *reg->workers[shard - 1];
}

// Completion count of one run_on_shards call.
struct Latch {
  std::mutex mutex;
  std::condition_variable done;
  int64_t pending;
  explicit Latch(int64_t n) : pending(n) {}
  void count_down() {
    std::lock_guard<std::mutex> lock(mutex);
    if (--pending == 0) done.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex);
    done.wait(lock, [this] { return pending == 0; });
  }
};

std::vector<c10::Stream> current_streams(at::ArrayRef<at::Device> devices) {
  std::vector<c10::Stream> streams;
  for (const auto& device : devices) {
    if (device.is_cpu()) continue;
    bool seen = false;
    for (const auto& s : streams) seen = seen || s.device() == device;
    if (!seen) streams.push_back(c10::impl::getDeviceGuardImpl(device.type())->getStream(device));
  }
  return streams;
}

}  // namespace

void run_on_shards(int64_t n, at::ArrayRef<at::Device> devices,
                   const std::function<void(int64_t)>& body) {
  if (n <= 0) return;
  if (n == 1 || on_shard_worker) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  std::vector<std::exception_ptr> errors(n);
  const at::ThreadLocalState caller_state;
  const auto streams = current_streams(devices);
  auto latch = std::make_shared<Latch>(n - 1);
  for (int64_t i = 1; i < n; ++i) {
    worker_for(i).post([&, i, latch] {
      try {
        at::ThreadLocalStateGuard state_guard(caller_state);
        c10::MultiStreamGuard stream_guard(streams);
        body(i);
      } catch (...) {
        errors[i] = std::current_exception();
      }
      latch->count_down();
    });
  }
  try {
    body(0);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  // The workers reference this frame (body, errors): wait for all of them even on error.
  latch->wait();
  for (const auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

}  // namespace shardpipe
