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
  EXPECT_NO_THROW(interleaved.validate(ScheduleKind::kInterleaved));
  EXPECT_THROW(interleaved.validate(ScheduleKind::kGPipe), std::invalid_argument);
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

}  // namespace
}  // namespace shardpipe
