// run_on_shards (shard_threads.cpp): concurrency, error order, the caller's thread state.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>

#include "shardpipe/tensor_parallel/shard_threads.h"

namespace {

TEST(RunOnShards, ShardsRunAtTheSameTime) {
  // Every body waits until all have started: this only finishes if they run concurrently.
  constexpr int64_t n = 3;
  std::atomic<int64_t> started{0};
  std::mutex mutex;
  std::set<std::thread::id> threads;
  shardpipe::run_on_shards(n, {}, [&](int64_t) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      threads.insert(std::this_thread::get_id());
    }
    ++started;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (started.load() < n && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
    if (started.load() < n) throw std::runtime_error("shards did not run concurrently");
  });
  EXPECT_EQ(threads.size(), static_cast<size_t>(n));
}

TEST(RunOnShards, RethrowsTheFirstErrorAfterAllFinish) {
  std::atomic<int64_t> finished{0};
  try {
    shardpipe::run_on_shards(3, {}, [&](int64_t i) {
      if (i > 0) {
        ++finished;
        throw std::runtime_error("shard " + std::to_string(i));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      ++finished;
    });
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), "shard 1");
  }
  EXPECT_EQ(finished.load(), 3);
}

TEST(RunOnShards, BodiesSeeTheCallersGradMode) {
  std::atomic<int64_t> enabled{0};
  {
    c10::NoGradGuard no_grad;
    shardpipe::run_on_shards(3, {}, [&](int64_t) {
      if (c10::GradMode::is_enabled()) ++enabled;
    });
  }
  EXPECT_EQ(enabled.load(), 0);
}

}  // namespace
