// Placement: the one rule for which stage runs where, and its validation.
#include <gtest/gtest.h>

#include <stdexcept>

#include "shardpipe/pipeline/placement.h"

namespace shardpipe {
namespace {

TEST(Placement, OneStagePerDeviceExceptInterleavedRoundRobin) {
  std::vector<at::Device> devices = {at::kCPU, at::kCPU, at::kCPU};
  auto plain = Placement::make(ScheduleKind::kOneFOneB, 3, devices);
  EXPECT_EQ(plain.workers, 3);
  EXPECT_EQ(plain.stages(), 3);
  auto interleaved = Placement::make(ScheduleKind::kInterleaved, 6, devices);
  EXPECT_EQ(interleaved.workers, 3);
  for (int s = 0; s < 6; ++s) EXPECT_EQ(interleaved.worker_of(s), s % 3);
  EXPECT_NO_THROW(interleaved.validate());
  Placement shared{interleaved.stage_devices, 3, ScheduleKind::kGPipe};
  EXPECT_THROW(shared.validate(), std::invalid_argument);
}

TEST(Placement, RefusesShapesThatDoNotFit) {
  std::vector<at::Device> two = {at::kCPU, at::kCPU};
  EXPECT_THROW(Placement::make(ScheduleKind::kGPipe, 3, two), std::invalid_argument);
  EXPECT_THROW(Placement::make(ScheduleKind::kInterleaved, 3, two), std::invalid_argument);
  EXPECT_THROW(Placement::make(ScheduleKind::kGPipe, 1, {}), std::invalid_argument);
}

TEST(Placement, DefaultStageCount) {
  EXPECT_EQ(default_stage_count(ScheduleKind::kGPipe, 2, 6, "children"), 2);
  EXPECT_EQ(default_stage_count(ScheduleKind::kInterleaved, 2, 6, "children"), 4);
  EXPECT_EQ(default_stage_count(ScheduleKind::kInterleaved, 2, 3, "children"), 2);
  try {
    default_stage_count(ScheduleKind::kGPipe, 4, 3, "children");
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("only 3 children"), std::string::npos) << e.what();
  }
}

TEST(Placement, CheckBalanceNamesTheEntry) {
  EXPECT_NO_THROW(check_balance({3, 3}, 6, "children", 2, ScheduleKind::kGPipe));
  try {
    check_balance({6, 0}, 6, "children", 2, ScheduleKind::kGPipe);
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("balance[1]"), std::string::npos) << e.what();
  }
  EXPECT_THROW(check_balance({3, 2}, 6, "children", 2, ScheduleKind::kGPipe),
               std::invalid_argument);
  EXPECT_THROW(check_balance({2, 2, 2}, 6, "children", 2, ScheduleKind::kGPipe),
               std::invalid_argument);
  EXPECT_NO_THROW(check_balance({2, 1, 2, 1}, 6, "children", 2, ScheduleKind::kInterleaved));
}

const std::vector<at::Device> kTwoGpus = {at::Device(at::kCUDA, 0), at::Device(at::kCUDA, 1)};

TEST(Placement, InterleavedGoesRoundRobinAndZbvInAV) {
  auto interleaved = Placement::make(ScheduleKind::kInterleaved, 4, kTwoGpus);
  EXPECT_EQ(interleaved.stage_devices,
            (std::vector<at::Device>{kTwoGpus[0], kTwoGpus[1], kTwoGpus[0], kTwoGpus[1]}));
  auto v = Placement::make(ScheduleKind::kZeroBubbleV, 4, kTwoGpus);
  // Stages d and 2D - 1 - d on device d: the first and the last stage share device 0.
  EXPECT_EQ(v.stage_devices,
            (std::vector<at::Device>{kTwoGpus[0], kTwoGpus[1], kTwoGpus[1], kTwoGpus[0]}));
  EXPECT_EQ(v.workers, 2);
  for (int s = 0; s < 4; ++s) EXPECT_EQ(v.device_of_worker(v.worker_of(s)), v.stage_devices[s]);
  v.validate();
  auto h1 = Placement::make(ScheduleKind::kZeroBubbleH1, 2, kTwoGpus);
  EXPECT_EQ(h1.stage_devices, kTwoGpus);
}

TEST(Placement, RefusesWhatDoesNotFit) {
  EXPECT_THROW(Placement::make(ScheduleKind::kZeroBubbleV, 2, kTwoGpus), std::invalid_argument);
  EXPECT_THROW(Placement::make(ScheduleKind::kZeroBubbleV, 6, kTwoGpus), std::invalid_argument);
  EXPECT_THROW(Placement::make(ScheduleKind::kZeroBubbleH1, 4, kTwoGpus), std::invalid_argument);
  // Round-robin devices do not fit the V: stage 2 would share worker 1 on device 0.
  Placement crossed{
      {kTwoGpus[0], kTwoGpus[1], kTwoGpus[0], kTwoGpus[1]}, 2, ScheduleKind::kZeroBubbleV};
  EXPECT_THROW(crossed.validate(), std::invalid_argument);
  try {
    check_balance({1, 1, 1}, 3, "children", 2, ScheduleKind::kZeroBubbleV);
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("balance needs two stages per device"), std::string::npos)
        << e.what();
  }
}

TEST(Placement, ZbvDefaultsToTwoStagesPerDevice) {
  EXPECT_EQ(default_stage_count(ScheduleKind::kZeroBubbleV, 2, 8, "children"), 4);
  EXPECT_EQ(default_stage_count(ScheduleKind::kZeroBubbleH1, 2, 8, "children"), 2);
  EXPECT_EQ(default_stage_count(ScheduleKind::kInterleaved, 2, 3, "children"), 2);
  EXPECT_THROW(default_stage_count(ScheduleKind::kZeroBubbleV, 2, 3, "children"),
               std::invalid_argument);
}

}  // namespace
}  // namespace shardpipe
