// The process-group kernels (group_linear.cpp) in a group of one rank, which needs no
// communication (the group name is never looked up): exactly at::linear, forward and
// backward, with the collective-overlap switch on and off. Over several ranks they run in
// tests/python/test_sharded_linear_dist.py (gloo).
#include <gtest/gtest.h>

#include <string>

#include "linear_reference.h"
#include "shardpipe/tensor_parallel/sharded_linear.h"

namespace {

using shardpipe_test::leaf;
using shardpipe_test::make_reference;

// Restores the process-wide switch whatever a test does with it.
class GroupLinear : public ::testing::Test {
 protected:
  void TearDown() override { shardpipe::set_collective_overlap(true); }
};

TEST_F(GroupLinear, GroupOfOneIsLinear) {
  auto ref = make_reference({3, 5}, 4);
  auto expected = at::linear(ref.x, ref.weight, ref.bias);
  for (bool gather_output : {true, false}) {
    auto col = shardpipe::column_parallel_linear_group(ref.x, ref.weight, ref.bias, gather_output,
                                                       {4}, 0, "unused");
    EXPECT_TRUE(at::equal(col, expected));
  }
  for (bool input_is_parallel : {true, false}) {
    auto row = shardpipe::row_parallel_linear_group(ref.x, ref.weight, ref.bias, input_is_parallel,
                                                    {5}, 0, "unused");
    EXPECT_TRUE(at::equal(row, expected));
  }
}

TEST_F(GroupLinear, GroupOfOneBackwardIsLinearsWithOverlapOnAndOff) {
  EXPECT_TRUE(shardpipe::collective_overlap());  // the default
  auto ref = make_reference({2, 3, 5}, 4);
  auto expected = at::linear(ref.x, ref.weight, ref.bias);
  auto g = at::randn_like(expected);
  expected.backward(g);
  for (bool overlap : {true, false}) {
    shardpipe::set_collective_overlap(overlap);
    EXPECT_EQ(shardpipe::collective_overlap(), overlap);
    for (bool column : {true, false}) {
      auto x = leaf(ref.x), w = leaf(ref.weight), b = leaf(ref.bias);
      auto y = column ? shardpipe::column_parallel_linear_group(x, w, b, true, {4}, 0, "unused")
                      : shardpipe::row_parallel_linear_group(x, w, b, false, {5}, 0, "unused");
      y.backward(g);
      EXPECT_TRUE(at::equal(x.grad(), ref.x.grad()));
      EXPECT_TRUE(at::equal(w.grad(), ref.weight.grad()));
      EXPECT_TRUE(at::equal(b.grad(), ref.bias.grad()));
    }
  }
}

TEST_F(GroupLinear, ChecksNameTheMismatch) {
  auto ref = make_reference({3, 5}, 4);
  try {
    shardpipe::column_parallel_linear_group(ref.x, ref.weight, ref.bias, true, {3, 1}, 0, "g");
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank 0 holds 4 output features, shard_sizes says 3"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(
      shardpipe::row_parallel_linear_group(ref.x, ref.weight, ref.bias, false, {5}, 1, "g"),
      c10::Error);
}

}  // namespace
