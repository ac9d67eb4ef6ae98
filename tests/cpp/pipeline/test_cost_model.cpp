// The cost model: closed forms of the schedules' theory, memory against `simulate`, and what
// copies, task overhead and checkpointing add.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <stdexcept>

#include "shardpipe/pipeline/cost_model.h"

namespace shardpipe {
namespace {

// `count` identical one-row blocks.
std::vector<BlockProfile> blocks(int count, double f, double b, double w, double saved = 0,
                                 double input = 0) {
  BlockSample one;
  one.forward = f, one.backward = b, one.weight = w;
  one.saved_bytes = saved, one.input_bytes = input, one.output_bytes = input;
  return std::vector<BlockProfile>(count, BlockProfile{one, one, 0.0});
}

// One block per stage (per stage of the schedule), one row per micro-batch, stage s on
// device worker_of(s), every micro-batch checkpointed or none.
PlanShape shape(ScheduleKind kind, int stages, int m, int workers, bool checkpoint = false) {
  PlanShape p{make_schedule(kind, stages, m, workers), {}, {}, {}, {}};
  p.balance.assign(stages, 1);
  for (int s = 0; s < stages; ++s) p.stage_device.push_back(p.schedule.worker_of(s));
  p.micro_batch_rows.assign(m, 1);
  p.checkpointed.assign(m, checkpoint ? 1 : 0);
  return p;
}

// The first stage computes no input gradient; with B = 0 every stage's backward is W alone,
// so all stages cost the same and the closed forms hold.
TEST(CostModel, GPipeAndOneFOneBWithEqualStagesTakeMPlusPMinusOneSteps) {
  for (int p = 1; p <= 6; ++p) {
    for (int m = 1; m <= 12; ++m) {
      const double f = 1.5, b = 2.25;
      for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB}) {
        auto pred = predict(blocks(p, f, 0, b), shape(kind, p, m, p), {});
        EXPECT_DOUBLE_EQ(pred.step_time, (m + p - 1) * (f + b)) << p << " " << m;
        EXPECT_NEAR(pred.bubble, (p - 1.0) / (m + p - 1.0), 1e-12);
      }
    }
  }
}

TEST(CostModel, ZeroBubbleH1BeatsOneFOneBAsOnPaper) {
  for (int p = 2; p <= 6; ++p) {
    for (int m = p; m <= 12; ++m) {
      // F = B = W = 1 on every stage but the first, whose backward is all W (2 per task).
      auto onefb = predict(blocks(p, 1, 1, 1), shape(ScheduleKind::kOneFOneB, p, m, p), {});
      auto zb = predict(blocks(p, 1, 1, 1), shape(ScheduleKind::kZeroBubbleH1, p, m, p), {});
      EXPECT_LT(zb.step_time, onefb.step_time) << p << " " << m;
      EXPECT_LT(zb.bubble, onefb.bubble);
      // 1F1B's closed form with the first stage's backward no shorter than the others'.
      EXPECT_LE(onefb.step_time, 3.0 * (m + p - 1));
    }
  }
}

TEST(CostModel, PeakActivationsMatchSimulate) {
  for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB, ScheduleKind::kZeroBubbleH1}) {
    for (int p = 1; p <= 5; ++p) {
      for (int m = 1; m <= 10; ++m) {
        auto s = shape(kind, p, m, p);
        auto pred = predict(blocks(p, 1, 1, 1, /*saved=*/3.0), s, {});
        auto check = simulate(s.schedule);
        ASSERT_EQ(pred.peak_memory.size(), static_cast<size_t>(p));
        for (int st = 0; st < p; ++st)
          EXPECT_DOUBLE_EQ(pred.peak_memory[st], 3.0 * check.peak_alive[st]);
      }
    }
  }
}

TEST(CostModel, StagesSharingADeviceAddUpOverTime) {
  // zbv: stages d and 2D-1-d on device d; the device's peak is at most the sum of the two
  // stages' own peaks and at least the larger of them.
  for (int workers = 1; workers <= 3; ++workers) {
    for (int m = 1; m <= 8; ++m) {
      auto s = shape(ScheduleKind::kZeroBubbleV, 2 * workers, m, workers);
      auto pred = predict(blocks(2 * workers, 1, 1, 1, 1.0), s, {});
      auto check = simulate(s.schedule);
      ASSERT_EQ(pred.peak_memory.size(), static_cast<size_t>(workers));
      for (int d = 0; d < workers; ++d) {
        const int a = check.peak_alive[d], b = check.peak_alive[2 * workers - 1 - d];
        EXPECT_LE(pred.peak_memory[d], a + b);
        EXPECT_GE(pred.peak_memory[d], std::max(a, b));
      }
    }
  }
}

TEST(CostModel, CopiesBetweenDevicesAndTaskOverheadAddTime) {
  // Two stages, one micro-batch: F0, copy, F1, B1, copy back, B0 (stage 0's backward is W).
  auto b = blocks(2, 1, 0.5, 0.25, 0, /*input/output bytes=*/1000);
  auto s = shape(ScheduleKind::kGPipe, 2, 1, 2);
  MachineCosts machine;
  machine.link_bandwidth = 1000, machine.link_latency = 0.125, machine.task_overhead = 0.0625;
  const double copy = 0.125 + 1000.0 / 1000;
  // Stage 1: F 1, B+W 0.75; stage 0: F 1, backward = its W only (0.25).
  const double expected =
      (1 + 0.0625) + copy + (1 + 0.0625) + (0.75 + 0.0625) + copy + (0.25 + 0.0625);
  EXPECT_DOUBLE_EQ(predict(b, s, machine).step_time, expected);
  // On one device (both CPU stages on "cpu") nothing is copied.
  s.stage_device = {0, 0};
  EXPECT_DOUBLE_EQ(predict(b, s, machine).step_time, expected - 2 * copy);
  EXPECT_EQ(predict(b, s, machine).peak_memory.size(), 1u);
}

TEST(CostModel, CheckpointingTradesARecomputedForwardForMemory) {
  // Saved 10 bytes per block, input 2 bytes: a micro-batch holds 12 without checkpointing;
  // checkpointed, its input (2) while it waits and 12 again while its backward runs.
  for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB, ScheduleKind::kZeroBubbleH1}) {
    const int p = 3, m = 6;
    auto plain = predict(blocks(p, 1, 0, 1, 10, 2), shape(kind, p, m, p), {});
    auto ckpt = predict(blocks(p, 1, 0, 1, 10, 2), shape(kind, p, m, p, true), {});
    auto check = simulate(make_schedule(kind, p, m, p));
    for (int s = 0; s < p; ++s) {
      EXPECT_DOUBLE_EQ(plain.peak_memory[s], 12.0 * check.peak_alive[s]);
      EXPECT_LT(ckpt.peak_memory[s], plain.peak_memory[s] + 1e-9);
      // One micro-batch recomputed at a time; in a split backward the recomputed graph
      // serves W too, so zb1p may hold several between their B and their W.
      if (!splits_backward(kind)) {
        EXPECT_DOUBLE_EQ(ckpt.peak_memory[s], 2.0 * check.peak_alive[s] + 10.0);
      }
    }
    EXPECT_GT(ckpt.step_time, plain.step_time);
  }
  // gpipe, equal stages: every backward recomputes its forward: (m + p - 1)(2F + W).
  auto g = predict(blocks(2, 1, 0, 1), shape(ScheduleKind::kGPipe, 2, 4, 2, true), {});
  EXPECT_DOUBLE_EQ(g.step_time, (4 + 2 - 1) * (1 + 2.0));
}

TEST(CostModel, ResidentBytesStayForTheWholeStep) {
  auto b = blocks(4, 1, 1, 1);
  for (int k = 0; k < 4; ++k) b[k].resident_bytes = 100.0 * (k + 1);
  auto s = shape(ScheduleKind::kOneFOneB, 2, 3, 2);
  s.balance = {3, 1};
  auto pred = predict(b, s, {});
  EXPECT_DOUBLE_EQ(pred.peak_memory[0], 600.0);
  EXPECT_DOUBLE_EQ(pred.peak_memory[1], 400.0);
}

TEST(CostModel, BlockCostsFollowTheLineThroughTwoSizes) {
  BlockProfile p;
  p.small.rows = 2, p.small.forward = 3, p.small.saved_bytes = 20;
  p.large.rows = 10, p.large.forward = 7, p.large.saved_bytes = 100;
  EXPECT_DOUBLE_EQ(p.at(6).forward, 5);
  EXPECT_DOUBLE_EQ(p.at(6).saved_bytes, 60);
  EXPECT_DOUBLE_EQ(p.at(1).forward, 2.5);
  p.large = p.small;  // one size: proportional
  EXPECT_DOUBLE_EQ(p.at(4).forward, 6);
  // Never below zero.
  p.small.forward = 5, p.large.forward = 1, p.large.rows = 10;
  EXPECT_DOUBLE_EQ(p.at(100).forward, 0);
}

TEST(CostModel, ChunkRowsCutAsAtChunk) {
  EXPECT_EQ(chunk_rows(10, 4), (std::vector<int64_t>{3, 3, 3, 1}));
  EXPECT_EQ(chunk_rows(10, 6), (std::vector<int64_t>{2, 2, 2, 2, 2}));
  EXPECT_EQ(chunk_rows(3, 8), (std::vector<int64_t>{1, 1, 1}));
  EXPECT_EQ(chunk_rows(8, 1), (std::vector<int64_t>{8}));
  EXPECT_THROW(chunk_rows(0, 1), std::invalid_argument);
}

TEST(CostModel, RefusesShapesThatDoNotFit) {
  auto s = shape(ScheduleKind::kGPipe, 2, 2, 2);
  EXPECT_THROW(predict(blocks(3, 1, 1, 1), s, {}), std::invalid_argument);  // balance sums to 2
  s.balance = {2};
  EXPECT_THROW(predict(blocks(2, 1, 1, 1), s, {}), std::invalid_argument);
  s = shape(ScheduleKind::kGPipe, 2, 2, 2);
  s.checkpointed = {0};
  EXPECT_THROW(predict(blocks(2, 1, 1, 1), s, {}), std::invalid_argument);
}

}  // namespace
}  // namespace shardpipe
