// The sharded linear operators' C++ autograd (sharded_linear.cpp), through the dispatcher on
// CPU "devices": gradients against at::linear's with the same weights.
#include <gtest/gtest.h>

#include "linear_reference.h"
#include "shardpipe/tensor_parallel/sharded_linear.h"

namespace {

using shardpipe_test::grads_cat;
using shardpipe_test::leaf;
using shardpipe_test::make_reference;
using shardpipe_test::split_leaves;

class ShardCount : public ::testing::TestWithParam<int64_t> {};

TEST_P(ShardCount, ColumnParallelMatchesLinear) {
  const int64_t n = GetParam();
  auto ref = make_reference({3, 4, 5}, 7);
  auto weights = split_leaves(ref.weight, 0, n);
  auto biases = split_leaves(ref.bias, 0, n);
  auto x = leaf(ref.x);

  auto y = shardpipe::column_parallel_linear(x, weights, biases, /*gather_output=*/true);
  ASSERT_EQ(y.size(), 1u);
  auto expected = at::linear(ref.x, ref.weight, ref.bias);
  EXPECT_TRUE(at::allclose(y[0], expected));

  auto g = at::randn_like(expected);
  y[0].backward(g);
  expected.backward(g);
  EXPECT_TRUE(at::allclose(x.grad(), ref.x.grad()));
  EXPECT_TRUE(at::allclose(grads_cat(weights, 0), ref.weight.grad()));
  EXPECT_TRUE(at::allclose(grads_cat(biases, 0), ref.bias.grad()));
}

TEST_P(ShardCount, RowParallelMatchesLinear) {
  const int64_t n = GetParam();
  for (bool input_is_parallel : {false, true}) {
    auto ref = make_reference({4, 7}, 5);
    auto weights = split_leaves(ref.weight, 1, n);
    auto bias = leaf(ref.bias);
    std::vector<at::Tensor> xs =
        input_is_parallel ? split_leaves(ref.x, 1, n) : std::vector<at::Tensor>{leaf(ref.x)};
    auto y = shardpipe::row_parallel_linear(xs, weights, bias, input_is_parallel, at::kCPU);
    auto expected = at::linear(ref.x, ref.weight, ref.bias);
    EXPECT_TRUE(at::allclose(y, expected));

    auto g = at::randn_like(expected);
    y.backward(g);
    expected.backward(g);
    EXPECT_TRUE(at::allclose(grads_cat(xs, 1), ref.x.grad()));
    EXPECT_TRUE(at::allclose(grads_cat(weights, 1), ref.weight.grad()));
    EXPECT_TRUE(at::allclose(bias.grad(), ref.bias.grad()));
  }
}

TEST_P(ShardCount, ColumnThenRowIsTheMlp) {
  const int64_t n = GetParam();
  at::manual_seed(1);
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  auto x = at::randn({5, 6}, f64);
  auto w1 = at::randn({9, 6}, f64), b1 = at::randn({9}, f64);
  auto w2 = at::randn({4, 9}, f64), b2 = at::randn({4}, f64);
  auto expected = at::linear(at::relu(at::linear(x, w1, b1)), w2, b2);

  auto w1s = split_leaves(w1, 0, n), b1s = split_leaves(b1, 0, n), w2s = split_leaves(w2, 1, n);
  auto hidden = shardpipe::column_parallel_linear(x, w1s, b1s, /*gather_output=*/false);
  for (auto& h : hidden) h = at::relu(h);
  auto y = shardpipe::row_parallel_linear(hidden, w2s, b2, /*input_is_parallel=*/true, at::kCPU);
  EXPECT_TRUE(at::allclose(y, expected));
  y.sum().backward();
  for (const auto& w : w1s) EXPECT_TRUE(w.grad().defined());
}

INSTANTIATE_TEST_SUITE_P(Shards, ShardCount, ::testing::Values(1, 2, 3));

TEST(ShardedLinear, OneShardIsExactlyLinear) {
  auto ref = make_reference({4, 6}, 3);
  std::vector<at::Tensor> weights{leaf(ref.weight)};
  std::vector<at::Tensor> biases{leaf(ref.bias)};
  auto x = leaf(ref.x);
  auto y = shardpipe::column_parallel_linear(x, weights, biases, true)[0];
  auto expected = at::linear(ref.x, ref.weight, ref.bias);
  EXPECT_TRUE(at::equal(y, expected));
  auto g = at::randn_like(y);
  y.backward(g);
  expected.backward(g);
  EXPECT_TRUE(at::equal(x.grad(), ref.x.grad()));
  EXPECT_TRUE(at::equal(weights[0].grad(), ref.weight.grad()));
  EXPECT_TRUE(at::equal(biases[0].grad(), ref.bias.grad()));
}

TEST(ShardedLinear, AnInputWithoutGradStillGivesWeightGrads) {
  auto ref = make_reference({4, 6}, 3);
  auto weights = split_leaves(ref.weight, 0, 2);
  auto y = shardpipe::column_parallel_linear(ref.x.detach(), weights, {}, true)[0];
  y.sum().backward();
  auto expected = at::linear(ref.x, ref.weight);
  expected.sum().backward();
  EXPECT_TRUE(at::allclose(grads_cat(weights, 0), ref.weight.grad()));
}

}  // namespace
