// The sharded linear math on CPU, against at::linear with the same weights, through the
// dispatcher (so the C++ autograd is what is tested), plus the shard threads.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>

#include "shardpipe/tensor_parallel/shard_threads.h"
#include "shardpipe/tensor_parallel/sharded_linear.h"

namespace {

using shardpipe::shard_offsets;
using shardpipe::shard_sizes;

struct Reference {
  torch::Tensor x, weight, bias;  // leaves of the plain computation
};

Reference make_reference(std::vector<int64_t> x_shape, int64_t out_f) {
  torch::manual_seed(0);
  const int64_t in_f = x_shape.back();
  return {torch::randn(x_shape, torch::kDouble).requires_grad_(),
          torch::randn({out_f, in_f}, torch::kDouble).requires_grad_(),
          torch::randn({out_f}, torch::kDouble).requires_grad_()};
}

// Pieces of `full` along `dim`, as fresh leaves.
std::vector<torch::Tensor> split_leaves(const torch::Tensor& full, int64_t dim, int64_t n) {
  auto sizes = shard_sizes(full.size(dim), n);
  auto offsets = shard_offsets(sizes);
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(full.detach().narrow(dim, offsets[i], sizes[i]).clone().requires_grad_());
  }
  return out;
}

torch::Tensor grads_cat(const std::vector<torch::Tensor>& leaves, int64_t dim) {
  std::vector<torch::Tensor> grads;
  for (const auto& t : leaves) grads.push_back(t.grad());
  return torch::cat(grads, dim);
}

TEST(ShardSizes, DifferByAtMostOneLargerFirst) {
  EXPECT_EQ(shard_sizes(7, 3), (std::vector<int64_t>{3, 2, 2}));
  EXPECT_EQ(shard_sizes(8, 4), (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(shard_sizes(5, 1), (std::vector<int64_t>{5}));
  EXPECT_EQ(shard_offsets({3, 2, 2}), (std::vector<int64_t>{0, 3, 5}));
  EXPECT_THROW(shard_sizes(2, 3), c10::Error);
  EXPECT_THROW(shard_sizes(2, 0), c10::Error);
}

class ShardCount : public ::testing::TestWithParam<int64_t> {};

TEST_P(ShardCount, ColumnParallelMatchesLinear) {
  const int64_t n = GetParam();
  auto ref = make_reference({3, 4, 5}, 7);
  auto weights = split_leaves(ref.weight, 0, n);
  auto biases = split_leaves(ref.bias, 0, n);
  auto x = ref.x.detach().clone().requires_grad_();

  auto y = shardpipe::column_parallel_linear(x, weights, biases, /*gather_output=*/true);
  ASSERT_EQ(y.size(), 1u);
  auto expected = torch::linear(ref.x, ref.weight, ref.bias);
  EXPECT_TRUE(torch::allclose(y[0], expected));

  auto g = torch::randn_like(expected);
  y[0].backward(g);
  expected.backward(g);
  EXPECT_TRUE(torch::allclose(x.grad(), ref.x.grad()));
  EXPECT_TRUE(torch::allclose(grads_cat(weights, 0), ref.weight.grad()));
  EXPECT_TRUE(torch::allclose(grads_cat(biases, 0), ref.bias.grad()));
}

TEST_P(ShardCount, ColumnParallelShardedOutputIsSlices) {
  const int64_t n = GetParam();
  auto ref = make_reference({6, 5}, 7);
  auto weights = split_leaves(ref.weight, 0, n);
  auto ys = shardpipe::column_parallel_linear(ref.x, weights, {}, /*gather_output=*/false);
  ASSERT_EQ(static_cast<int64_t>(ys.size()), n);
  auto expected = torch::linear(ref.x, ref.weight);
  auto sizes = shard_sizes(7, n);
  auto offsets = shard_offsets(sizes);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_TRUE(torch::allclose(ys[i], expected.narrow(-1, offsets[i], sizes[i])));
  }
}

TEST_P(ShardCount, RowParallelMatchesLinear) {
  const int64_t n = GetParam();
  for (bool input_is_parallel : {false, true}) {
    auto ref = make_reference({4, 7}, 5);
    auto weights = split_leaves(ref.weight, 1, n);
    auto bias = ref.bias.detach().clone().requires_grad_();
    std::vector<torch::Tensor> xs =
        input_is_parallel ? split_leaves(ref.x, 1, n)
                          : std::vector<torch::Tensor>{ref.x.detach().clone().requires_grad_()};
    auto y = shardpipe::row_parallel_linear(xs, weights, bias, input_is_parallel, torch::kCPU);
    auto expected = torch::linear(ref.x, ref.weight, ref.bias);
    EXPECT_TRUE(torch::allclose(y, expected));

    auto g = torch::randn_like(expected);
    y.backward(g);
    expected.backward(g);
    EXPECT_TRUE(torch::allclose(grads_cat(xs, 1), ref.x.grad()));
    EXPECT_TRUE(torch::allclose(grads_cat(weights, 1), ref.weight.grad()));
    EXPECT_TRUE(torch::allclose(bias.grad(), ref.bias.grad()));
  }
}

TEST_P(ShardCount, ColumnThenRowIsTheMlp) {
  const int64_t n = GetParam();
  torch::manual_seed(1);
  auto x = torch::randn({5, 6}, torch::kDouble);
  auto w1 = torch::randn({9, 6}, torch::kDouble), b1 = torch::randn({9}, torch::kDouble);
  auto w2 = torch::randn({4, 9}, torch::kDouble), b2 = torch::randn({4}, torch::kDouble);
  auto expected = torch::linear(torch::relu(torch::linear(x, w1, b1)), w2, b2);

  auto w1s = split_leaves(w1, 0, n), b1s = split_leaves(b1, 0, n), w2s = split_leaves(w2, 1, n);
  auto hidden = shardpipe::column_parallel_linear(x, w1s, b1s, /*gather_output=*/false);
  for (auto& h : hidden) h = torch::relu(h);
  auto y = shardpipe::row_parallel_linear(hidden, w2s, b2, /*input_is_parallel=*/true, torch::kCPU);
  EXPECT_TRUE(torch::allclose(y, expected));
  y.sum().backward();
  for (const auto& w : w1s) EXPECT_TRUE(w.grad().defined());
}

TEST(ShardedLinear, GroupOfOneIsLocal) {
  // A process group of one rank needs no communication: the group operators are at::linear.
  auto ref = make_reference({3, 5}, 4);
  const std::vector<int64_t> sizes{4};
  auto col = shardpipe::column_parallel_linear_group(ref.x, ref.weight, ref.bias, true, sizes, 0,
                                                     "unused");
  EXPECT_TRUE(torch::equal(col, torch::linear(ref.x, ref.weight, ref.bias)));
  const std::vector<int64_t> in_sizes{5};
  auto row = shardpipe::row_parallel_linear_group(ref.x, ref.weight, ref.bias, false, in_sizes, 0,
                                                  "unused");
  EXPECT_TRUE(torch::equal(row, torch::linear(ref.x, ref.weight, ref.bias)));
}

INSTANTIATE_TEST_SUITE_P(Shards, ShardCount, ::testing::Values(1, 2, 3));

TEST(ShardedLinear, OneShardIsExactlyLinear) {
  auto ref = make_reference({4, 6}, 3);
  std::vector<torch::Tensor> weights{ref.weight.detach().clone().requires_grad_()};
  std::vector<torch::Tensor> biases{ref.bias.detach().clone().requires_grad_()};
  auto x = ref.x.detach().clone().requires_grad_();
  auto y = shardpipe::column_parallel_linear(x, weights, biases, true)[0];
  auto expected = torch::linear(ref.x, ref.weight, ref.bias);
  EXPECT_TRUE(torch::equal(y, expected));
  auto g = torch::randn_like(y);
  y.backward(g);
  expected.backward(g);
  EXPECT_TRUE(torch::equal(x.grad(), ref.x.grad()));
  EXPECT_TRUE(torch::equal(weights[0].grad(), ref.weight.grad()));
  EXPECT_TRUE(torch::equal(biases[0].grad(), ref.bias.grad()));
}

TEST(ShardedLinear, WrongInputWidthIsAnError) {
  auto ref = make_reference({4, 6}, 3);
  auto weights = split_leaves(ref.weight, 0, 2);
  auto wide = torch::randn({4, 7}, torch::kDouble);
  try {
    shardpipe::column_parallel_linear(wide, weights, {}, true);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected 6"), std::string::npos) << e.what();
  }
  auto row_weights = split_leaves(ref.weight, 1, 2);
  EXPECT_THROW(
      shardpipe::row_parallel_linear({wide}, row_weights, std::nullopt, false, torch::kCPU),
      c10::Error);
}

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
    torch::NoGradGuard no_grad;
    shardpipe::run_on_shards(3, {}, [&](int64_t) {
      if (torch::GradMode::is_enabled()) ++enabled;
    });
  }
  EXPECT_EQ(enabled.load(), 0);
}

}  // namespace
