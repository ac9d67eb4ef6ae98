#include "shardpipe/pipeline/schedule.h"

#include <algorithm>
#include <stdexcept>

namespace shardpipe {
namespace {

Task forward(int s, int i) { return {s, i, Phase::kForward}; }
Task backward(int s, int i) { return {s, i, Phase::kBackward}; }

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

}  // namespace

const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> names = {"gpipe", "1f1b", "interleaved"};
  return names;
}

ScheduleKind parse_schedule(const std::string& name) {
  if (name == "gpipe") return ScheduleKind::kGPipe;
  if (name == "1f1b") return ScheduleKind::kOneFOneB;
  if (name == "interleaved") return ScheduleKind::kInterleaved;
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
  }
  return "?";
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

Schedule make_schedule(ScheduleKind kind, int stages, int micro_batches, int workers) {
  if (stages < 1) throw std::invalid_argument("a schedule needs at least one stage");
  if (micro_batches < 1) throw std::invalid_argument("a schedule needs at least one micro-batch");
  if (workers < 1 || stages % workers != 0)
    throw std::invalid_argument("workers (" + std::to_string(workers) + ") must divide stages (" +
                                std::to_string(stages) + ")");
  if (kind != ScheduleKind::kInterleaved && workers != stages)
    throw std::invalid_argument("only the interleaved schedule puts several stages on a worker");

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
  }
  return schedule;
}

ScheduleCheck simulate(const Schedule& schedule) {
  const int S = schedule.stages, m = schedule.micro_batches;
  std::vector<char> done_f(static_cast<size_t>(S) * m, 0), done_b(done_f.size(), 0);
  auto at = [m](int s, int i) { return static_cast<size_t>(s) * m + i; };
  std::vector<int> alive(S, 0);
  ScheduleCheck check;
  check.peak_alive.assign(S, 0);
  std::vector<size_t> next(schedule.per_worker.size(), 0);
  size_t remaining = 0;
  for (const auto& tasks : schedule.per_worker) remaining += tasks.size();

  // On paper the caller's inputs and gradients are always there; everything else arrives
  // when the task that makes it is done.
  struct Paper {
    const std::vector<char>& done_f;
    const std::vector<char>& done_b;
    int S, m;
    size_t at(int s, int i) const { return static_cast<size_t>(s) * m + i; }
    bool has_input(int s, int i) const { return s == 0 || done_f[at(s - 1, i)]; }
    bool forward_done(int s, int i) const { return done_f[at(s, i)]; }
    bool has_grad(int s, int i) const { return s == S - 1 || done_b[at(s + 1, i)]; }
  } paper{done_f, done_b, S, m};
  auto ready = [&](const Task& t) {
    if (t.stage < 0 || t.stage >= S || t.micro_batch < 0 || t.micro_batch >= m) return false;
    return may_start(t, paper);
  };
  while (remaining > 0) {
    bool progressed = false;
    for (size_t w = 0; w < schedule.per_worker.size(); ++w) {
      const auto& tasks = schedule.per_worker[w];
      // A worker runs everything that is ready, in its own order.
      while (next[w] < tasks.size() && ready(tasks[next[w]])) {
        const Task& t = tasks[next[w]++];
        auto& done = t.phase == Phase::kForward ? done_f : done_b;
        if (done[at(t.stage, t.micro_batch)]) {
          check.problem = "a task appears twice";
          return check;
        }
        done[at(t.stage, t.micro_batch)] = 1;
        if (t.phase == Phase::kForward) {
          check.peak_alive[t.stage] = std::max(check.peak_alive[t.stage], ++alive[t.stage]);
        } else if (alive[t.stage] > 0) {
          --alive[t.stage];
        }
        --remaining;
        progressed = true;
      }
    }
    if (!progressed) {
      check.problem = "deadlock: every worker waits on a task that never runs";
      return check;
    }
  }
  check.complete = true;
  return check;
}

}  // namespace shardpipe
