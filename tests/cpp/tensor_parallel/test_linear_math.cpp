// The arithmetic and checks the sharded linear kernels share (linear_math.h).
#include <gtest/gtest.h>

#include <string>

#include "../common/error_of.h"
#include "linear_reference.h"
#include "shardpipe/tensor_parallel/linear_math.h"

namespace {

using shardpipe::shard_offsets;
using shardpipe::shard_sizes;
using shardpipe_test::error_of;

TEST(ShardSizes, DifferByAtMostOneLargerFirst) {
  EXPECT_EQ(shard_sizes(7, 3), (std::vector<int64_t>{3, 2, 2}));
  EXPECT_EQ(shard_sizes(8, 4), (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(shard_sizes(5, 1), (std::vector<int64_t>{5}));
  EXPECT_EQ(shard_offsets({3, 2, 2}), (std::vector<int64_t>{0, 3, 5}));
  EXPECT_EQ(shardpipe::total_of({3, 2, 2}), 7);
  EXPECT_THROW(shard_sizes(2, 3), c10::Error);
  EXPECT_THROW(shard_sizes(2, 0), c10::Error);
}

TEST(LinearGrads, EqualAutogradOfLinearBitForBit) {
  for (const auto& shape : {std::vector<int64_t>{4, 6}, std::vector<int64_t>{2, 3, 6}}) {
    auto ref = shardpipe_test::make_reference(shape, 5);
    auto y = at::linear(ref.x, ref.weight, ref.bias);
    auto g = at::randn_like(y);
    y.backward(g);
    const auto x = ref.x.detach(), w = ref.weight.detach();
    EXPECT_TRUE(at::equal(shardpipe::linear_input_grad(g, w), ref.x.grad()));
    EXPECT_TRUE(at::equal(shardpipe::linear_weight_grad(g, x), ref.weight.grad()));
    EXPECT_TRUE(at::equal(shardpipe::linear_bias_grad(g), ref.bias.grad()));
  }
}

TEST(Checks, NameTheOperatorAndWhatIsWrong) {
  const auto w = at::zeros({3, 4});
  EXPECT_EQ(error_of([&] { shardpipe::check_weights("op", {}); }),
            "op: needs at least one weight shard");
  EXPECT_NE(error_of([&] {
              shardpipe::check_weights("op", {w, at::zeros({3})});
            }).find("op: weight shard 1 must be 2-D"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              shardpipe::check_weights("op", {w, w.to(at::kDouble)});
            }).find("weight shard 1 has dtype Double, shard 0 has Float"),
            std::string::npos);
  EXPECT_EQ(error_of([&] { shardpipe::check_input("op", at::zeros({2, 5}), w, 4, "x"); }),
            "op: x has last dim 5, expected 4");
  EXPECT_NE(error_of([&] {
              shardpipe::check_input("op", at::zeros({}), w, 4, "x");
            }).find("at least one dim"),
            std::string::npos);
  EXPECT_EQ(error_of([&] { shardpipe::check_input("op", at::zeros({2, 4}), w, 4, "x"); }), "");
}

}  // namespace
