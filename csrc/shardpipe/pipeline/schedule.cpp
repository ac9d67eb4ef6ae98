#include "shardpipe/pipeline/schedule.h"

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <tuple>

namespace shardpipe {
namespace {

Task forward(int s, int i) { return {s, i, Phase::kForward}; }
Task backward(int s, int i) { return {s, i, Phase::kBackward}; }
Task weight(int s, int i) { return {s, i, Phase::kWeight}; }

// Warm-up forwards, then alternate one forward and one backward, then drain the backwards.
std::vector<Task> one_f_one_b(const std::vector<Task>& forwards, const std::vector<Task>& backwards,
                              size_t warmup) {
  warmup = std::min(warmup, forwards.size());
  std::vector<Task> order(forwards.begin(), forwards.begin() + warmup);
  size_t f = warmup, b = 0;
  while (f < forwards.size()) {
    order.push_back(forwards[f++]);
    order.push_back(backwards[b++]);
  }
  while (b < backwards.size()) order.push_back(backwards[b++]);
  return order;
}

// Megatron-LM's order for worker w of `workers`, each holding `chunks` virtual stages
// (stage c * workers + w): micro-batches go in groups of `workers`; a group runs through
// every chunk before the next group starts, backwards through the chunks in reverse.
std::vector<Task> interleaved(int w, int workers, int chunks, int micro_batches, size_t warmup) {
  std::vector<Task> forwards, backwards;
  for (int first = 0; first < micro_batches; first += workers) {
    int last = std::min(first + workers, micro_batches);
    for (int c = 0; c < chunks; ++c)
      for (int i = first; i < last; ++i) forwards.push_back(forward(c * workers + w, i));
    for (int c = chunks - 1; c >= 0; --c)
      for (int i = first; i < last; ++i) backwards.push_back(backward(c * workers + w, i));
  }
  return one_f_one_b(forwards, backwards, warmup);
}

// ZB-H1 (Qi et al. 2024, section 3.1) for stage s of `stages`: 1F1B's order of forwards and
// input gradients; the weight gradient of a micro-batch follows its B, except that stage s
// holds back its first s weight gradients and runs them at the very end, where 1F1B's drain
// leaves that worker idle. Stage s then keeps up to `stages` micro-batches alive (1F1B's
// stage 0 does too), and the bubble shrinks to (stages - 1) * (F + B - W).
std::vector<Task> zero_bubble_h1(int s, int stages, int m) {
  const int warmup = std::min(stages - s - 1, m);
  std::vector<Task> order;
  int f = 0, b = 0, w = 0;
  while (f < warmup) order.push_back(forward(s, f++));
  for (int k = 0; f < m; ++k) {
    order.push_back(forward(s, f++));
    order.push_back(backward(s, b++));
    if (k >= s) order.push_back(weight(s, w++));
  }
  while (b < m) {
    order.push_back(backward(s, b++));
    order.push_back(weight(s, w++));
  }
  while (w < m) order.push_back(weight(s, w++));
  return order;
}

// ZB-V: worker w holds stages w and 2 * workers - 1 - w. The order comes from list scheduling
// on paper with unit costs: at every step each worker runs the most urgent task it can, an
// input gradient before a forward before a weight gradient (the weight gradients fill what
// would be bubbles), the earliest micro-batch first, then the later stage (nearer the loss, or
// further along its backward). A forward waits while the worker holds 2 * workers stage
// activations: half-size stages, so 1F1B's peak on its first worker.
std::vector<std::vector<Task>> zero_bubble_v(int workers, int m) {
  const int S = 2 * workers, limit = 2 * workers;
  auto at = [m](int s, int i) { return static_cast<size_t>(s) * m + i; };
  std::vector<char> done_f(static_cast<size_t>(S) * m, 0), done_b(done_f.size(), 0);
  std::vector<int> next_f(S, 0), next_b(S, 0), next_w(S, 0), alive(workers, 0);
  std::vector<std::vector<Task>> lists(workers);
  size_t remaining = static_cast<size_t>(3) * S * m;
  while (remaining > 0) {
    std::vector<Task> step;
    for (int w = 0; w < workers; ++w) {
      std::tuple<int, int, int> best{3, 0, 0};
      Task chosen{};
      for (int s : {w, S - 1 - w}) {
        auto offer = [&](int rank, Task t) {
          std::tuple<int, int, int> key{rank, t.micro_batch, -t.stage};
          if (key < best) best = key, chosen = t;
        };
        if (int i = next_b[s]; i < m && done_f[at(s, i)] && (s == S - 1 || done_b[at(s + 1, i)]))
          offer(0, backward(s, i));
        if (int i = next_f[s]; i < m && alive[w] < limit && (s == 0 || done_f[at(s - 1, i)]))
          offer(1, forward(s, i));
        if (int i = next_w[s]; i < m && done_b[at(s, i)]) offer(2, weight(s, i));
      }
      if (std::get<0>(best) == 3) continue;
      lists[w].push_back(chosen);
      step.push_back(chosen);
      switch (chosen.phase) {
        case Phase::kForward:
          next_f[chosen.stage]++;
          alive[w]++;
          break;
        case Phase::kBackward:
          next_b[chosen.stage]++;
          break;
        case Phase::kWeight:
          next_w[chosen.stage]++;
          break;
      }
    }
    // Never taken for 1-12 workers x 1-64 micro-batches (tests check up to 8 stages).
    if (step.empty()) throw std::logic_error("zbv: list scheduling found no task to run");
    for (const Task& t : step) {
      if (t.phase == Phase::kForward) done_f[at(t.stage, t.micro_batch)] = 1;
      if (t.phase == Phase::kBackward) done_b[at(t.stage, t.micro_batch)] = 1;
      if (t.phase == Phase::kWeight)
        alive[worker_of_stage(ScheduleKind::kZeroBubbleV, t.stage, workers)]--;
    }
    remaining -= step.size();
  }
  return lists;
}

// The schedule on paper, as when every task is done the moment its worker has run it; the one
// loop behind `simulate` and `timeline`. `run(task, worker, start, end)` is called for every
// task in its worker's order. Returns what went wrong (empty when everything ran).
template <typename Run>
std::string run_on_paper(const Schedule& schedule, const PaperCosts& costs, Run&& run) {
  const int S = schedule.stages, m = schedule.micro_batches;
  const bool split = splits_backward(schedule.kind);
  // Per (stage, micro-batch) and phase: when it ended (negative: not yet).
  std::vector<double> end_f(static_cast<size_t>(S) * m, -1.0), end_b(end_f), end_w(end_f);
  // The dependency rule sees the caller's inputs and gradients as always there, everything
  // else as arrived when the task that makes it is done; it notes the latest end it relied on.
  // What crosses from one stage to another arrives `hand_off` after the task that made it.
  struct Paper {
    const std::vector<double>& end_f;
    const std::vector<double>& end_b;
    const PaperCosts& costs;
    int S, m;
    mutable double ready = 0.0;  // the rule takes its state const; this only takes notes
    size_t at(int s, int i) const { return static_cast<size_t>(s) * m + i; }
    bool seen(double end, double delay = 0.0) const {
      if (end < 0) return false;
      ready = std::max(ready, end + delay);
      return true;
    }
    double delay(int from, int to, int i) const {
      return costs.hand_off ? costs.hand_off(from, to, i) : 0.0;
    }
    bool has_input(int s, int i) const {
      return s == 0 || seen(end_f[at(s - 1, i)], delay(s - 1, s, i));
    }
    bool forward_done(int s, int i) const { return seen(end_f[at(s, i)]); }
    bool has_grad(int s, int i) const {
      return s == S - 1 || seen(end_b[at(s + 1, i)], delay(s + 1, s, i));
    }
    bool backward_done(int s, int i) const { return seen(end_b[at(s, i)]); }
  } paper{end_f, end_b, costs, S, m};

  std::vector<size_t> next(schedule.per_worker.size(), 0);
  std::vector<double> free(schedule.per_worker.size(), 0.0);
  size_t remaining = 0;
  for (const auto& tasks : schedule.per_worker) remaining += tasks.size();
  while (remaining > 0) {
    bool progressed = false;
    for (size_t w = 0; w < schedule.per_worker.size(); ++w) {
      const auto& tasks = schedule.per_worker[w];
      // A worker runs everything that is ready, in its own order.
      while (next[w] < tasks.size()) {
        const Task& t = tasks[next[w]];
        if (t.stage < 0 || t.stage >= S || t.micro_batch < 0 || t.micro_batch >= m)
          return "a task names a stage or micro-batch outside the schedule";
        if (t.phase == Phase::kWeight && !split)
          return "a weight-gradient task in a schedule that does not split the backward";
        paper.ready = 0.0;
        if (!may_start(t, paper)) break;
        auto& end = t.phase == Phase::kForward    ? end_f
                    : t.phase == Phase::kBackward ? end_b
                                                  : end_w;
        const size_t k = paper.at(t.stage, t.micro_batch);
        if (end[k] >= 0) return "a task appears twice";
        const double cost = costs.duration(t);
        const double start = std::max(paper.ready, free[w]);
        end[k] = free[w] = start + cost;
        run(t, static_cast<int>(w), start, end[k]);
        ++next[w];
        --remaining;
        progressed = true;
      }
    }
    if (!progressed) return "deadlock: every worker waits on a task that never runs";
  }
  return "";
}

// The uniform costs of TaskCosts as per-task durations.
PaperCosts uniform(const Schedule& schedule, const TaskCosts& costs) {
  const bool split = splits_backward(schedule.kind);
  return {[costs, split](const Task& t) {
            return t.phase == Phase::kForward  ? costs.forward
                   : t.phase == Phase::kWeight ? costs.weight
                   : split                     ? costs.backward
                                               : costs.backward + costs.weight;
          },
          {}};
}

}  // namespace

const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> names = {"gpipe", "1f1b", "interleaved", "zb1p", "zbv"};
  return names;
}

ScheduleKind parse_schedule(const std::string& name) {
  if (name == "gpipe") return ScheduleKind::kGPipe;
  if (name == "1f1b") return ScheduleKind::kOneFOneB;
  if (name == "interleaved") return ScheduleKind::kInterleaved;
  if (name == "zb1p") return ScheduleKind::kZeroBubbleH1;
  if (name == "zbv") return ScheduleKind::kZeroBubbleV;
  std::string allowed;
  for (const auto& n : schedule_names()) allowed += (allowed.empty() ? "'" : ", '") + n + "'";
  throw std::invalid_argument("schedule must be one of " + allowed + ", got '" + name + "'");
}

std::string schedule_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kGPipe:
      return "gpipe";
    case ScheduleKind::kOneFOneB:
      return "1f1b";
    case ScheduleKind::kInterleaved:
      return "interleaved";
    case ScheduleKind::kZeroBubbleH1:
      return "zb1p";
    case ScheduleKind::kZeroBubbleV:
      return "zbv";
  }
  return "?";
}

bool splits_backward(ScheduleKind kind) {
  return kind == ScheduleKind::kZeroBubbleH1 || kind == ScheduleKind::kZeroBubbleV;
}

int worker_of_stage(ScheduleKind kind, int stage, int workers) {
  if (kind == ScheduleKind::kZeroBubbleV) return stage < workers ? stage : 2 * workers - 1 - stage;
  return stage % workers;
}

Schedule Schedule::only(Phase phase) const {
  Schedule out = *this;
  for (auto& tasks : out.per_worker) {
    tasks.erase(
        std::remove_if(tasks.begin(), tasks.end(), [&](const Task& t) { return t.phase != phase; }),
        tasks.end());
  }
  return out;
}

Schedule Schedule::without(Phase phase) const {
  Schedule out = *this;
  for (auto& tasks : out.per_worker) {
    tasks.erase(
        std::remove_if(tasks.begin(), tasks.end(), [&](const Task& t) { return t.phase == phase; }),
        tasks.end());
  }
  return out;
}

Schedule make_schedule(ScheduleKind kind, int stages, int micro_batches, int workers) {
  if (stages < 1) throw std::invalid_argument("a schedule needs at least one stage");
  if (micro_batches < 1) throw std::invalid_argument("a schedule needs at least one micro-batch");
  if (workers < 1 || stages % workers != 0)
    throw std::invalid_argument("workers (" + std::to_string(workers) + ") must divide stages (" +
                                std::to_string(stages) + ")");
  if (kind == ScheduleKind::kZeroBubbleV) {
    if (stages != 2 * workers)
      throw std::invalid_argument("the zbv schedule puts two stages on every worker: stages (" +
                                  std::to_string(stages) + ") must be twice the workers (" +
                                  std::to_string(workers) + ")");
  } else if (kind != ScheduleKind::kInterleaved && workers != stages) {
    throw std::invalid_argument(
        "only the interleaved and zbv schedules put several stages on a worker");
  }

  Schedule schedule{kind, stages, micro_batches, workers, {}};
  schedule.per_worker.resize(workers);
  const int m = micro_batches;
  switch (kind) {
    case ScheduleKind::kGPipe:
      for (int s = 0; s < stages; ++s) {
        auto& tasks = schedule.per_worker[s];
        for (int i = 0; i < m; ++i) tasks.push_back(forward(s, i));
        for (int i = 0; i < m; ++i) tasks.push_back(backward(s, i));
      }
      break;
    case ScheduleKind::kOneFOneB:
      for (int s = 0; s < stages; ++s) {
        std::vector<Task> forwards, backwards;
        for (int i = 0; i < m; ++i) {
          forwards.push_back(forward(s, i));
          backwards.push_back(backward(s, i));
        }
        schedule.per_worker[s] = one_f_one_b(forwards, backwards, stages - s - 1);
      }
      break;
    case ScheduleKind::kInterleaved: {
      const int chunks = stages / workers;
      // Megatron's warm-up assumes micro-batches divide into groups of `workers`; with a
      // ragged last group a worker may need a few more warm-up forwards, so the smallest
      // warm-up that runs to completion is taken (all forwards first always does).
      for (int w = 0; w < workers; ++w) {
        size_t warmup = static_cast<size_t>((workers - w - 1) * 2 + (chunks - 1) * workers);
        schedule.per_worker[w] = interleaved(w, workers, chunks, m, warmup);
      }
      for (size_t extra = 1; !simulate(schedule).complete; ++extra) {
        for (int w = 0; w < workers; ++w) {
          size_t warmup = static_cast<size_t>((workers - w - 1) * 2 + (chunks - 1) * workers);
          schedule.per_worker[w] = interleaved(w, workers, chunks, m, warmup + extra);
        }
      }
      break;
    }
    case ScheduleKind::kZeroBubbleH1:
      for (int s = 0; s < stages; ++s) schedule.per_worker[s] = zero_bubble_h1(s, stages, m);
      break;
    case ScheduleKind::kZeroBubbleV:
      schedule.per_worker = zero_bubble_v(workers, m);
      break;
  }
  return schedule;
}

ScheduleCheck simulate(const Schedule& schedule) {
  const bool split = splits_backward(schedule.kind);
  // Activations are alive from the forward until the task that last needs the graph.
  const Phase frees = split ? Phase::kWeight : Phase::kBackward;
  ScheduleCheck check;
  check.peak_alive.assign(schedule.stages, 0);
  std::vector<int> alive(schedule.stages, 0);
  check.problem = run_on_paper(
      schedule, uniform(schedule, TaskCosts{}), [&](const Task& t, int, double, double) {
        if (t.phase == Phase::kForward) {
          check.peak_alive[t.stage] = std::max(check.peak_alive[t.stage], ++alive[t.stage]);
        } else if (t.phase == frees && alive[t.stage] > 0) {
          --alive[t.stage];
        }
      });
  check.complete = check.problem.empty();
  return check;
}

std::vector<TimedTask> timeline(const Schedule& schedule, const TaskCosts& costs) {
  return costed_timeline(schedule, uniform(schedule, costs));
}

std::vector<TimedTask> costed_timeline(const Schedule& schedule, const PaperCosts& costs) {
  std::vector<TimedTask> out;
  auto problem = run_on_paper(schedule, costs, [&](const Task& t, int w, double start, double end) {
    out.push_back({t, w, start, end});
  });
  if (!problem.empty()) throw std::invalid_argument("timeline: " + problem);
  return out;
}

namespace {

// The message a finished task sends to another rank, if any.
std::optional<Message> message_of(const Schedule& schedule, const Task& t) {
  if (t.phase == Phase::kForward && t.stage + 1 < schedule.stages) {
    return Message{Phase::kForward, t.stage, t.stage + 1, t.micro_batch};
  }
  if (t.phase == Phase::kBackward && t.stage > 0) {
    return Message{Phase::kBackward, t.stage, t.stage - 1, t.micro_batch};
  }
  return std::nullopt;
}

}  // namespace

ChannelPlan channel_plan(const Schedule& schedule) {
  ChannelPlan plan;
  for (int w = 0; w < static_cast<int>(schedule.per_worker.size()); ++w) {
    for (const Task& t : schedule.per_worker[w]) {
      auto message = message_of(schedule, t);
      if (!message) continue;
      const int to = schedule.worker_of(message->to_stage);
      if (to != w) plan[{w, to}].push_back(*message);
    }
  }
  return plan;
}

std::string check_channels(const Schedule& schedule, const ChannelPlan& plan) {
  const int S = schedule.stages, m = schedule.micro_batches;
  const auto at = [m](int s, int i) { return static_cast<size_t>(s) * m + i; };
  std::vector<char> done_f(static_cast<size_t>(S) * m, 0), done_b(done_f), got_f(done_f),
      got_b(done_f);
  std::map<Channel, size_t> sent, taken;
  // A stage's input (gradient) is there once the receiver took its message, or, between
  // stages of one rank, once the producing task is done; the caller's are always there.
  struct Paper {
    const Schedule& schedule;
    const std::vector<char>& done_f;
    const std::vector<char>& done_b;
    const std::vector<char>& got_f;
    const std::vector<char>& got_b;
    int S, m;
    size_t at(int s, int i) const { return static_cast<size_t>(s) * m + i; }
    bool local(int a, int b) const { return schedule.worker_of(a) == schedule.worker_of(b); }
    bool has_input(int s, int i) const {
      return s == 0 || (local(s - 1, s) ? done_f[at(s - 1, i)] : got_f[at(s, i)]);
    }
    bool forward_done(int s, int i) const { return done_f[at(s, i)]; }
    bool has_grad(int s, int i) const {
      return s == S - 1 || (local(s + 1, s) ? done_b[at(s + 1, i)] : got_b[at(s, i)]);
    }
    bool backward_done(int s, int i) const { return done_b[at(s, i)]; }
  } paper{schedule, done_f, done_b, got_f, got_b, S, m};

  std::vector<size_t> next(schedule.per_worker.size(), 0);
  for (bool progressed = true; progressed;) {
    progressed = false;
    for (size_t w = 0; w < schedule.per_worker.size(); ++w) {
      const auto& tasks = schedule.per_worker[w];
      while (next[w] < tasks.size() && may_start(tasks[next[w]], paper)) {
        const Task& t = tasks[next[w]++];
        if (t.phase == Phase::kForward) done_f[at(t.stage, t.micro_batch)] = 1;
        if (t.phase == Phase::kBackward) done_b[at(t.stage, t.micro_batch)] = 1;
        progressed = true;
        auto message = message_of(schedule, t);
        if (!message) continue;
        const int to = schedule.worker_of(message->to_stage);
        if (to == static_cast<int>(w)) continue;
        const Channel channel{static_cast<int>(w), to};
        auto found = plan.find(channel);
        const size_t k = sent[channel]++;
        if (found == plan.end() || k >= found->second.size() || !(found->second[k] == *message)) {
          return "rank " + std::to_string(w) + " sends stage " +
                 std::to_string(message->from_stage) + "'s micro-batch " +
                 std::to_string(message->micro_batch) + " to rank " + std::to_string(to) +
                 " out of the order its receiver expects";
        }
      }
    }
    // Each channel's receiver takes what was sent, in order.
    for (const auto& [channel, messages] : plan) {
      size_t& k = taken[channel];
      for (; k < sent[channel]; ++k) {
        const Message& msg = messages[k];
        (msg.phase == Phase::kForward ? got_f : got_b)[at(msg.to_stage, msg.micro_batch)] = 1;
        progressed = true;
      }
    }
  }
  for (size_t w = 0; w < schedule.per_worker.size(); ++w) {
    if (next[w] < schedule.per_worker[w].size()) {
      const Task& t = schedule.per_worker[w][next[w]];
      return "rank " + std::to_string(w) + " waits forever before stage " +
             std::to_string(t.stage) + ", micro-batch " + std::to_string(t.micro_batch);
    }
  }
  for (const auto& [channel, messages] : plan) {
    if (taken[channel] != messages.size()) {
      return "rank " + std::to_string(channel.second) + " expects messages from rank " +
             std::to_string(channel.first) + " that are never sent";
    }
  }
  return "";
}

}  // namespace shardpipe
