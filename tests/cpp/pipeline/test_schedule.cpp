// Schedules are data: checked exhaustively on paper, without a tensor.
#include <gtest/gtest.h>

#include <set>
#include <tuple>

#include "shardpipe/pipeline/schedule.h"

namespace shardpipe {
namespace {

using Key = std::tuple<int, int, int>;

std::set<Key> all_tasks(const Schedule& s) {
  std::set<Key> seen;
  for (const auto& tasks : s.per_worker) {
    for (const auto& t : tasks) {
      EXPECT_TRUE(seen.insert({t.stage, t.micro_batch, static_cast<int>(t.phase)}).second);
      EXPECT_EQ(s.worker_of(t.stage), &tasks - s.per_worker.data());
    }
  }
  return seen;
}

void expect_valid(const Schedule& s) {
  auto tasks = all_tasks(s);
  EXPECT_EQ(tasks.size(), static_cast<size_t>(2 * s.stages * s.micro_batches));
  // Every forward comes before its backward on a worker's list.
  for (const auto& list : s.per_worker) {
    std::set<std::pair<int, int>> forwarded;
    for (const auto& t : list) {
      if (t.phase == Phase::kForward) {
        forwarded.insert({t.stage, t.micro_batch});
      } else {
        EXPECT_TRUE(forwarded.count({t.stage, t.micro_batch}));
      }
    }
  }
  auto check = simulate(s);
  EXPECT_TRUE(check.complete) << check.problem << " kind=" << schedule_name(s.kind)
                              << " stages=" << s.stages << " m=" << s.micro_batches;
}

TEST(Schedule, GPipeAndOneFOneBRunToCompletion) {
  for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB}) {
    for (int stages = 1; stages <= 8; ++stages) {
      for (int m = 1; m <= 32; ++m) expect_valid(make_schedule(kind, stages, m, stages));
    }
  }
}

TEST(Schedule, OneFOneBKeepsAtMostStagesMicroBatchesAlive) {
  for (int stages = 1; stages <= 8; ++stages) {
    for (int m = 1; m <= 32; ++m) {
      auto check = simulate(make_schedule(ScheduleKind::kOneFOneB, stages, m, stages));
      for (int s = 0; s < stages; ++s) {
        EXPECT_LE(check.peak_alive[s], std::min(stages - s, m));
      }
      auto gpipe = simulate(make_schedule(ScheduleKind::kGPipe, stages, m, stages));
      EXPECT_EQ(gpipe.peak_alive[0], m);  // fill-drain keeps every micro-batch
    }
  }
}

TEST(Schedule, InterleavedRunsToCompletionWithRaggedGroups) {
  for (int workers = 1; workers <= 4; ++workers) {
    for (int chunks = 1; chunks <= 4; ++chunks) {
      for (int m = 1; m <= 32; ++m) {
        expect_valid(make_schedule(ScheduleKind::kInterleaved, workers * chunks, m, workers));
      }
    }
  }
}

TEST(Schedule, OnlyKeepsOnePhaseInOrder) {
  auto s = make_schedule(ScheduleKind::kOneFOneB, 3, 5, 3);
  auto forward = s.only(Phase::kForward);
  for (int w = 0; w < 3; ++w) {
    ASSERT_EQ(forward.per_worker[w].size(), 5u);
    for (int i = 0; i < 5; ++i) EXPECT_EQ(forward.per_worker[w][i].micro_batch, i);
  }
  EXPECT_TRUE(simulate(forward).complete);
}

TEST(Schedule, SimulateFindsADeadlock) {
  Schedule s{ScheduleKind::kGPipe, 2, 1, 2, {}};
  s.per_worker = {{{0, 0, Phase::kBackward}, {0, 0, Phase::kForward}},
                  {{1, 0, Phase::kForward}, {1, 0, Phase::kBackward}}};
  auto check = simulate(s);
  EXPECT_FALSE(check.complete);
  EXPECT_NE(check.problem.find("deadlock"), std::string::npos);
}

TEST(Schedule, RejectsImpossibleShapes) {
  EXPECT_THROW(make_schedule(ScheduleKind::kGPipe, 0, 4, 1), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::kGPipe, 2, 0, 2), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::kGPipe, 4, 4, 2), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::kInterleaved, 5, 4, 2), std::invalid_argument);
  EXPECT_THROW(parse_schedule("zigzag"), std::invalid_argument);
  EXPECT_EQ(parse_schedule("1f1b"), ScheduleKind::kOneFOneB);
}

}  // namespace
}  // namespace shardpipe
