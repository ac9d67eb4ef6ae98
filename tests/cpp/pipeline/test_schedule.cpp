// Schedules are data: checked exhaustively on paper, without a tensor.
#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <string>
#include <tuple>
#include <vector>

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
  // F and B for every (stage, micro-batch), and W too when the schedule splits the backward.
  const int phases = splits_backward(s.kind) ? 3 : 2;
  EXPECT_EQ(tasks.size(), static_cast<size_t>(phases * s.stages * s.micro_batches));
  // On a worker's list every forward comes before its backward, every backward before its W.
  for (const auto& list : s.per_worker) {
    std::set<std::pair<int, int>> forwarded, backwarded;
    for (const auto& t : list) {
      if (t.phase == Phase::kForward) {
        forwarded.insert({t.stage, t.micro_batch});
      } else if (t.phase == Phase::kBackward) {
        EXPECT_TRUE(forwarded.count({t.stage, t.micro_batch}));
        backwarded.insert({t.stage, t.micro_batch});
      } else {
        EXPECT_TRUE(backwarded.count({t.stage, t.micro_batch}));
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

// The schedule's length on paper with the given costs.
double makespan(const Schedule& s, const TaskCosts& costs) {
  double end = 0;
  for (const auto& t : timeline(s, costs)) end = std::max(end, t.end);
  return end;
}

// Per worker, the most micro-batch activations (F done, W not yet) held at once, walking its
// list: what the worker's memory must hold, whichever of its stages they belong to.
std::vector<int> worker_peaks(const Schedule& s) {
  std::vector<int> peaks;
  for (const auto& list : s.per_worker) {
    int alive = 0, peak = 0;
    for (const auto& t : list) {
      if (t.phase == Phase::kForward) peak = std::max(peak, ++alive);
      if (t.phase == Phase::kWeight) --alive;
    }
    peaks.push_back(peak);
  }
  return peaks;
}

TEST(Schedule, ZeroBubbleH1RunsToCompletionWithOneFOneBsPeakAndAThirdOfItsBubble) {
  for (int stages = 1; stages <= 8; ++stages) {
    for (int m = 1; m <= 32; ++m) {
      auto zb = make_schedule(ScheduleKind::kZeroBubbleH1, stages, m, stages);
      expect_valid(zb);
      auto check = simulate(zb);
      auto onefb = simulate(make_schedule(ScheduleKind::kOneFOneB, stages, m, stages));
      // 1F1B's peak is its first stage's; ZB-H1 lets every stage hold that many (and no more)
      // to delay its weight gradients into the drain (Qi et al.: the same peak memory).
      const int peak = *std::max_element(onefb.peak_alive.begin(), onefb.peak_alive.end());
      EXPECT_EQ(peak, std::min(stages, m));
      EXPECT_EQ(*std::max_element(check.peak_alive.begin(), check.peak_alive.end()), peak);
      for (int s = 0; s < stages; ++s) EXPECT_LE(check.peak_alive[s], peak) << "stage " << s;
      EXPECT_EQ(worker_peaks(zb), check.peak_alive);
      // F = B = W = 1: 1F1B's bubble is (stages - 1) * 3, ZB-H1's (stages - 1) * (F + B - W).
      const double f1b = makespan(make_schedule(ScheduleKind::kOneFOneB, stages, m, stages), {});
      EXPECT_EQ(f1b, 3 * (m + stages - 1));
      if (m >= stages) EXPECT_EQ(makespan(zb, {}), 3 * m + stages - 1) << stages << " " << m;
      EXPECT_LE(makespan(zb, {}), f1b);
    }
  }
}

TEST(Schedule, ZeroBubbleVRunsToCompletionInAVWithOneFOneBsPeak) {
  for (int workers = 1; workers <= 4; ++workers) {
    const int stages = 2 * workers;
    for (int m = 1; m <= 32; ++m) {
      auto zb = make_schedule(ScheduleKind::kZeroBubbleV, stages, m, workers);
      expect_valid(zb);
      for (int w = 0; w < workers; ++w) {
        EXPECT_EQ(zb.worker_of(w), w);
        EXPECT_EQ(zb.worker_of(stages - 1 - w), w);
      }
      // Stages half the size of 1F1B's over the same workers: 1F1B's first worker holds
      // min(workers, m) whole-stage activations, so 2 * min(workers, m) of these.
      for (int peak : worker_peaks(zb)) EXPECT_LE(peak, 2 * std::min(workers, m));
      // Near zero bubble: every worker busy but while the first forwards reach it (unit
      // costs per half-size stage; 1F1B with whole stages costs twice as much per task).
      const double onefb =
          makespan(make_schedule(ScheduleKind::kOneFOneB, workers, m, workers), {2.0, 2.0, 2.0});
      EXPECT_EQ(onefb, 6 * (m + workers - 1));
      if (m >= 2 * workers) EXPECT_LE(makespan(zb, {}), 6 * m + workers - 1) << workers << " " << m;
      EXPECT_LE(makespan(zb, {}), onefb);
    }
  }
}

TEST(Schedule, OnlyTheZeroBubbleSchedulesSplitTheBackward) {
  for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB}) {
    auto s = make_schedule(kind, 3, 5, 3);
    EXPECT_FALSE(splits_backward(kind));
    EXPECT_EQ(s.only(Phase::kWeight).per_worker, std::vector<std::vector<Task>>(3));
  }
  EXPECT_TRUE(splits_backward(ScheduleKind::kZeroBubbleH1));
  EXPECT_TRUE(splits_backward(ScheduleKind::kZeroBubbleV));
}

TEST(Schedule, SimulateHoldsWeightGradientsToTheirBackward) {
  // W before its own B never runs.
  Schedule s{ScheduleKind::kZeroBubbleH1, 1, 1, 1, {}};
  s.per_worker = {{{0, 0, Phase::kForward}, {0, 0, Phase::kWeight}, {0, 0, Phase::kBackward}}};
  auto check = simulate(s);
  EXPECT_FALSE(check.complete);
  EXPECT_NE(check.problem.find("deadlock"), std::string::npos);
  // A W waits for its B on another worker's list too (the rule, not the list order).
  Schedule two{ScheduleKind::kZeroBubbleH1, 2, 1, 2, {}};
  two.per_worker = {{{0, 0, Phase::kForward}, {1, 0, Phase::kWeight}, {0, 0, Phase::kBackward}},
                    {{1, 0, Phase::kForward}, {1, 0, Phase::kBackward}}};
  double b_end = -1, w_start = -1;
  for (const auto& t : timeline(two, {})) {
    if (t.task == Task{1, 0, Phase::kBackward}) b_end = t.end;
    if (t.task == Task{1, 0, Phase::kWeight}) w_start = t.start;
  }
  EXPECT_GE(w_start, b_end);
  EXPECT_GE(b_end, 0);
  // Activations stay alive until W: two forwards before the first W hold two.
  Schedule held{ScheduleKind::kZeroBubbleH1, 1, 2, 1, {}};
  held.per_worker = {{{0, 0, Phase::kForward},
                      {0, 0, Phase::kBackward},
                      {0, 1, Phase::kForward},
                      {0, 1, Phase::kBackward},
                      {0, 0, Phase::kWeight},
                      {0, 1, Phase::kWeight}}};
  EXPECT_EQ(simulate(held).peak_alive, std::vector<int>{2});
  // A schedule that does not split the backward has no W to run.
  Schedule unsplit{ScheduleKind::kOneFOneB, 1, 1, 1, {}};
  unsplit.per_worker = {
      {{0, 0, Phase::kForward}, {0, 0, Phase::kBackward}, {0, 0, Phase::kWeight}}};
  EXPECT_FALSE(simulate(unsplit).complete);
}

TEST(Schedule, TimelineGivesOneFOneBsBubble) {
  for (int stages = 1; stages <= 6; ++stages) {
    for (int m = 1; m <= 12; ++m) {
      auto events = timeline(make_schedule(ScheduleKind::kOneFOneB, stages, m, stages), {});
      ASSERT_EQ(events.size(), static_cast<size_t>(2 * stages * m));
      double end = 0, busy = 0;
      for (const auto& e : events) {
        end = std::max(end, e.end);
        busy += e.end - e.start;
        EXPECT_EQ(e.worker, e.task.stage);
      }
      const double bubble = 1.0 - busy / (end * stages);
      EXPECT_NEAR(bubble, static_cast<double>(stages - 1) / (m + stages - 1), 1e-12);
    }
  }
  Schedule dead{ScheduleKind::kGPipe, 1, 1, 1, {{{0, 0, Phase::kBackward}}}};
  EXPECT_THROW(timeline(dead, {}), std::invalid_argument);
}

TEST(Schedule, WithoutDropsOnePhaseInOrder) {
  auto s = make_schedule(ScheduleKind::kZeroBubbleH1, 3, 5, 3);
  auto backward = s.without(Phase::kForward);
  for (int w = 0; w < 3; ++w) {
    ASSERT_EQ(backward.per_worker[w].size(), 10u);
    std::vector<Task> kept;
    for (const auto& t : s.per_worker[w]) {
      if (t.phase != Phase::kForward) kept.push_back(t);
    }
    EXPECT_EQ(backward.per_worker[w], kept);
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

// Every shape each kind allows with one worker (rank) per list: stages 1..8, m 1..32.
template <typename Body>
void for_every_rank_layout(Body&& body) {
  int shapes = 0;
  auto count = [&](const Schedule& s) {
    ++shapes;
    body(s);
  };
  for (int stages = 1; stages <= 8; ++stages) {
    for (int m = 1; m <= 32; ++m) {
      for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB, ScheduleKind::kZeroBubbleH1})
        count(make_schedule(kind, stages, m, stages));
      for (int workers = 1; workers <= stages; ++workers) {
        if (stages % workers == 0)
          count(make_schedule(ScheduleKind::kInterleaved, stages, m, workers));
      }
      if (stages % 2 == 0) count(make_schedule(ScheduleKind::kZeroBubbleV, stages, m, stages / 2));
    }
  }
  // 3 kinds x 8 x 32, interleaved over every divisor (20 pairs) x 32, zbv 4 x 32.
  EXPECT_EQ(shapes, (3 * 8 + 20 + 4) * 32);
}

std::string shape_of(const Schedule& s) {
  return schedule_name(s.kind) + " stages=" + std::to_string(s.stages) +
         " workers=" + std::to_string(s.workers) + " m=" + std::to_string(s.micro_batches);
}

TEST(ChannelPlan, EveryHandOffBetweenRanksIsOneMessageInTheSendersOrder) {
  for_every_rank_layout([](const Schedule& s) {
    const ChannelPlan plan = channel_plan(s);
    std::set<std::tuple<int, int, int>> seen;  // (phase, from stage, micro-batch)
    for (const auto& [channel, messages] : plan) {
      EXPECT_NE(channel.first, channel.second) << shape_of(s);
      // The sender's list, restricted to what it sends on this channel, is the plan's order.
      std::vector<Message> sent;
      for (const Task& t : s.per_worker[channel.first]) {
        const bool f = t.phase == Phase::kForward && t.stage + 1 < s.stages &&
                       s.worker_of(t.stage + 1) == channel.second;
        const bool b = t.phase == Phase::kBackward && t.stage > 0 &&
                       s.worker_of(t.stage - 1) == channel.second;
        if (f) sent.push_back({t.phase, t.stage, t.stage + 1, t.micro_batch});
        if (b) sent.push_back({t.phase, t.stage, t.stage - 1, t.micro_batch});
      }
      EXPECT_EQ(sent, messages) << shape_of(s);
      for (const auto& msg : messages) {
        EXPECT_EQ(s.worker_of(msg.from_stage), channel.first);
        EXPECT_EQ(s.worker_of(msg.to_stage), channel.second);
        EXPECT_TRUE(
            seen.insert({static_cast<int>(msg.phase), msg.from_stage, msg.micro_batch}).second);
      }
    }
    // Every hand-off between stages on different workers, forward and backward.
    size_t crossing = 0;
    for (int st = 0; st + 1 < s.stages; ++st)
      crossing += s.worker_of(st) != s.worker_of(st + 1) ? 2 * s.micro_batches : 0;
    EXPECT_EQ(seen.size(), crossing) << shape_of(s);
  });
}

TEST(ChannelPlan, RanksRunEverySchedulePhaseToTheEndTakingEveryMessage) {
  for_every_rank_layout([](const Schedule& s) {
    for (const Schedule& phase : {s, s.only(Phase::kForward)}) {
      const std::string problem = check_channels(phase, channel_plan(phase));
      EXPECT_EQ(problem, "") << shape_of(s);
    }
  });
}

TEST(ChannelPlan, CheckFindsMessagesOutOfOrderOrMissing) {
  const Schedule s = make_schedule(ScheduleKind::kOneFOneB, 2, 4, 2);
  ChannelPlan swapped = channel_plan(s);
  auto& down = swapped.at({0, 1});
  std::swap(down[0], down[1]);
  EXPECT_NE(check_channels(s, swapped).find("out of the order"), std::string::npos);
  ChannelPlan longer = channel_plan(s);
  longer.at({1, 0}).push_back(longer.at({1, 0}).back());
  EXPECT_NE(check_channels(s, longer).find("never sent"), std::string::npos);
}

TEST(Schedule, RejectsImpossibleShapes) {
  EXPECT_THROW(make_schedule(ScheduleKind::kGPipe, 0, 4, 1), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::kGPipe, 2, 0, 2), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::kGPipe, 4, 4, 2), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::kInterleaved, 5, 4, 2), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::kZeroBubbleH1, 4, 4, 2), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::kZeroBubbleV, 2, 4, 2), std::invalid_argument);
  EXPECT_THROW(make_schedule(ScheduleKind::kZeroBubbleV, 6, 4, 2), std::invalid_argument);
  EXPECT_THROW(parse_schedule("zigzag"), std::invalid_argument);
  EXPECT_EQ(parse_schedule("1f1b"), ScheduleKind::kOneFOneB);
  for (const auto& name : schedule_names()) EXPECT_EQ(schedule_name(parse_schedule(name)), name);
}

}  // namespace
}  // namespace shardpipe
