// The kernels over devices of one process (local_linear.cpp) on CPU "devices": what their
// forward computes and where their checks stop bad input; the backward operator on its own,
// below autograd, honours its output mask.
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <string>
#include <tuple>

#include "linear_reference.h"
#include "shardpipe/tensor_parallel/linear_math.h"
#include "shardpipe/tensor_parallel/sharded_linear.h"

namespace {

using shardpipe::shard_offsets;
using shardpipe::shard_sizes;
using shardpipe_test::make_reference;
using shardpipe_test::split_leaves;

class LocalShards : public ::testing::TestWithParam<int64_t> {};

TEST_P(LocalShards, ColumnShardedOutputIsSlices) {
  const int64_t n = GetParam();
  auto ref = make_reference({6, 5}, 7);
  auto ys = shardpipe::column_parallel_linear(ref.x, split_leaves(ref.weight, 0, n), {}, false);
  ASSERT_EQ(static_cast<int64_t>(ys.size()), n);
  auto expected = at::linear(ref.x, ref.weight);
  auto sizes = shard_sizes(7, n);
  auto offsets = shard_offsets(sizes);
  for (int64_t i = 0; i < n; ++i) {
    EXPECT_TRUE(at::allclose(ys[i], expected.narrow(-1, offsets[i], sizes[i])));
  }
}

TEST_P(LocalShards, RowOutputIsLinearForWholeAndShardedInput) {
  const int64_t n = GetParam();
  auto ref = make_reference({4, 7}, 5);
  auto weights = split_leaves(ref.weight, 1, n);
  auto expected = at::linear(ref.x, ref.weight, ref.bias);
  auto whole = shardpipe::row_parallel_linear({ref.x}, weights, ref.bias, false, at::kCPU);
  EXPECT_TRUE(at::allclose(whole, expected));
  auto sharded =
      shardpipe::row_parallel_linear(split_leaves(ref.x, 1, n), weights, ref.bias, true, at::kCPU);
  EXPECT_TRUE(at::allclose(sharded, expected));
}

INSTANTIATE_TEST_SUITE_P(Shards, LocalShards, ::testing::Values(1, 2, 3));

TEST(LocalLinear, WrongInputWidthIsAnError) {
  auto ref = make_reference({4, 6}, 3);
  auto wide = at::randn({4, 7}, at::kDouble);
  try {
    shardpipe::column_parallel_linear(wide, split_leaves(ref.weight, 0, 2), {}, true);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected 6"), std::string::npos) << e.what();
  }
  EXPECT_THROW(shardpipe::row_parallel_linear({wide}, split_leaves(ref.weight, 1, 2), std::nullopt,
                                              false, at::kCPU),
               c10::Error);
}

TEST(LocalLinear, ColumnNeedsOneBiasPerShardOrNone) {
  auto ref = make_reference({4, 6}, 3);
  EXPECT_THROW(shardpipe::column_parallel_linear(ref.x, split_leaves(ref.weight, 0, 2),
                                                 split_leaves(ref.bias, 0, 1), true),
               c10::Error);
}

TEST(LocalLinear, BackwardComputesOnlyWhatTheMaskAsks) {
  using Result = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("shardpipe::_column_parallel_linear_backward", "")
                             .typed<Result(at::TensorList, const at::Tensor&, at::TensorList, bool,
                                           bool, std::array<bool, 3>)>();
  auto ref = make_reference({4, 6}, 3);
  auto weights = split_leaves(ref.weight, 0, 2);
  auto grad = at::randn({4, 3}, at::kDouble);
  auto [input_grad, weight_grads, bias_grads] =
      op.call({grad}, ref.x.detach(), weights, true, true, {true, false, false});
  EXPECT_TRUE(at::allclose(input_grad, grad.matmul(ref.weight.detach())));
  EXPECT_TRUE(weight_grads.empty());
  EXPECT_TRUE(bias_grads.empty());
}

}  // namespace
