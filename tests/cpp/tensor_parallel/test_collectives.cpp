// collectives.cpp without a process group: what finishes without communicating. Over gloo
// ranks they run in tests/python/test_sharded_linear_dist.py.
#include <gtest/gtest.h>

#include "shardpipe/tensor_parallel/collectives.h"

namespace {

TEST(PendingCollective, ReadyGivesItsResultEveryTime) {
  auto t = at::arange(4);
  auto done = shardpipe::PendingCollective::ready(t);
  EXPECT_TRUE(done.wait().is_same(t));
  EXPECT_TRUE(done.wait().is_same(t));
  EXPECT_FALSE(shardpipe::PendingCollective().wait().defined());
}

TEST(Collectives, EmptyTensorsNeedNoGroup) {
  // The group name is never looked up: nothing is sent.
  auto gathered =
      shardpipe::all_gather_last_dim("test", at::zeros({0, 2}), {2, 1}, "no such group");
  EXPECT_EQ(gathered.wait().sizes(), (at::IntArrayRef{0, 3}));
  auto reduced = shardpipe::all_reduce_sum("test", at::zeros({0, 2}), "no such group");
  EXPECT_EQ(reduced.wait().sizes(), (at::IntArrayRef{0, 2}));
}

TEST(Collectives, GatherShardsOfOneRankIsAContiguousCopy) {
  auto piece = at::arange(6.0).view({2, 3}).t();  // not contiguous
  auto full = shardpipe::gather_shards("test", piece, 0, {3}, "no such group");
  EXPECT_TRUE(at::equal(full, piece));
  EXPECT_TRUE(full.is_contiguous());
  EXPECT_NE(full.data_ptr(), piece.data_ptr());
}

}  // namespace
