#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace shardpipe {

enum class Phase : uint8_t { kForward, kBackward };

// One unit of pipeline work: a stage's forward or backward for one micro-batch.
struct Task {
  int stage;
  int micro_batch;
  Phase phase;
  bool operator==(const Task& o) const {
    return stage == o.stage && micro_batch == o.micro_batch && phase == o.phase;
  }
};

enum class ScheduleKind {
  kGPipe,        // fill-drain: every forward, then every backward
  kOneFOneB,     // one forward one backward: at most `stages` micro-batches alive per stage
  kInterleaved,  // 1F1B over several virtual stages per worker (Megatron-LM style)
};

// Parses "gpipe", "1f1b" or "interleaved"; throws std::invalid_argument otherwise.
ScheduleKind parse_schedule(const std::string& name);
std::string schedule_name(ScheduleKind kind);

// Every name parse_schedule accepts, in the order the docs list them.
const std::vector<std::string>& schedule_names();

// The one rule for when a task may start, shared by `simulate` (on paper) and the executor
// (with tensors): F(s, i) once its input has arrived (the caller's micro-batch on stage 0,
// F(s-1, i)'s output elsewhere); B(s, i) once F(s, i) is done and the gradient of its outputs
// has arrived (B(s+1, i)'s; on the last stage the loss's or the caller's gradient). `State`
// answers has_input(s, i), forward_done(s, i) and has_grad(s, i).
template <typename State>
bool may_start(const Task& t, const State& state) {
  if (t.phase == Phase::kForward) return state.has_input(t.stage, t.micro_batch);
  return state.forward_done(t.stage, t.micro_batch) && state.has_grad(t.stage, t.micro_batch);
}

// A schedule is data: for every worker, the order in which it runs its tasks. Stage s runs on
// worker s % workers, so `stages / workers` virtual stages share a worker when interleaving.
struct Schedule {
  ScheduleKind kind;
  int stages;
  int micro_batches;
  int workers;
  std::vector<std::vector<Task>> per_worker;

  int worker_of(int stage) const { return stage % workers; }
  // The same order restricted to one phase (the forward of `pipe(x)`, the backward that
  // autograd later asks for).
  Schedule only(Phase phase) const;
};

// Builds the schedule; `workers` must divide `stages` (and equal it except for kInterleaved).
// Throws std::invalid_argument for impossible shapes.
Schedule make_schedule(ScheduleKind kind, int stages, int micro_batches, int workers);

// Runs the schedule on paper: every worker takes its tasks in order, each once its
// dependencies are done. Reports whether everything ran and, per stage, the largest number
// of micro-batches whose forward was done and backward not yet (the activations alive).
struct ScheduleCheck {
  bool complete = false;
  std::string problem;  // empty when complete
  std::vector<int> peak_alive;
};
ScheduleCheck simulate(const Schedule& schedule);

}  // namespace shardpipe
