// ReceivePool: tensors like at::empty's, whose blocks come back for reuse once they die,
// never shared by two live tensors, and never more kept than was once out at the same time.
#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "shardpipe/pipeline/receive_pool.h"

namespace shardpipe {
namespace {

constexpr int64_t kBig = 64 * 1024;  // floats: 256 KiB, above the pool's threshold

TEST(ReceivePool, TensorsAreLikeAtEmpty) {
  ReceivePool pool;
  for (auto dtype : {at::kFloat, at::kDouble, at::kHalf, at::kLong, at::kBool}) {
    at::Tensor got = pool.empty({4, kBig / 4}, dtype);
    at::Tensor want = at::empty({4, kBig / 4}, at::TensorOptions().dtype(dtype));
    EXPECT_EQ(got.sizes(), want.sizes());
    EXPECT_EQ(got.strides(), want.strides());
    EXPECT_EQ(got.scalar_type(), want.scalar_type());
    EXPECT_TRUE(got.device().is_cpu());
    EXPECT_TRUE(got.is_contiguous());
  }
  // Below the threshold and empty shapes: at::empty's own tensors.
  EXPECT_EQ(pool.empty({3, 5}, at::kFloat).sizes(), at::IntArrayRef({3, 5}));
  EXPECT_EQ(pool.empty({0, 7}, at::kFloat).numel(), 0);
}

TEST(ReceivePool, ADeadTensorsBlockIsReusedAndHoldsWhatIsWritten) {
  ReceivePool pool;
  void* first = nullptr;
  {
    at::Tensor t = pool.empty({kBig}, at::kFloat);
    first = t.data_ptr();
  }
  EXPECT_EQ(pool.cached_bytes(), kBig * sizeof(float));
  at::Tensor again = pool.empty({kBig}, at::kFloat);
  EXPECT_EQ(again.data_ptr(), first);
  EXPECT_EQ(pool.cached_bytes(), 0u);
  at::Tensor values = at::arange(kBig, at::kFloat);
  again.copy_(values);
  EXPECT_TRUE(at::equal(again, values));
  // A slightly smaller shape (a shorter sequence) takes the same block back.
  again = at::Tensor();
  at::Tensor shorter = pool.empty({kBig - kBig / 8}, at::kFloat);
  EXPECT_EQ(shorter.data_ptr(), first);
}

TEST(ReceivePool, LiveTensorsNeverShareABlock) {
  ReceivePool pool;
  for (int round = 0; round < 3; ++round) {
    std::vector<at::Tensor> live;
    std::set<void*> blocks;
    for (int i = 0; i < 8; ++i) {
      live.push_back(pool.empty({kBig + i * 1024}, at::kFloat));
      live.back().fill_(static_cast<float>(i));
      EXPECT_TRUE(blocks.insert(live.back().data_ptr()).second) << "round " << round;
    }
    for (int i = 0; i < 8; ++i) {
      EXPECT_TRUE(at::all(live[i] == static_cast<float>(i)).item<bool>()) << "round " << round;
    }
  }
}

TEST(ReceivePool, KeepsNoMoreThanWasOutAtOnce) {
  ReceivePool pool;
  {
    std::vector<at::Tensor> live;
    for (int i = 0; i < 4; ++i) live.push_back(pool.empty({kBig}, at::kFloat));
  }
  const size_t four = 4 * kBig * sizeof(float);
  EXPECT_EQ(pool.high_water_bytes(), four);
  EXPECT_EQ(pool.cached_bytes(), four);
  // Blocks of another size come and go: what is kept stays within the high-water mark.
  for (int i = 0; i < 10; ++i) {
    at::Tensor other = pool.empty({3 * kBig}, at::kFloat);
    EXPECT_LE(pool.cached_bytes(), pool.high_water_bytes());
  }
  EXPECT_LE(pool.cached_bytes(), pool.high_water_bytes());
  EXPECT_GE(pool.high_water_bytes(), four);
}

TEST(ReceivePool, CloseFreesWhatIsKeptAndLetsLiveTensorsOutliveIt) {
  at::Tensor survivor;
  {
    ReceivePool pool;
    {
      at::Tensor gone = pool.empty({kBig}, at::kFloat);
    }
    survivor = pool.empty({2 * kBig}, at::kFloat);
    pool.close();
    EXPECT_EQ(pool.cached_bytes(), 0u);
    {
      at::Tensor after = pool.empty({kBig}, at::kFloat);
    }
    EXPECT_EQ(pool.cached_bytes(), 0u);  // closed: nothing more is kept
  }
  survivor.fill_(2.0f);  // the pool is gone; its block is still this tensor's
  EXPECT_EQ(survivor.sum().item<float>(), 2.0f * 2 * kBig);
}

}  // namespace
}  // namespace shardpipe
