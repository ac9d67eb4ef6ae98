#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace shardpipe {

// kBackward is the whole backward of a stage, except in the zero-bubble schedules, which
// split it: kBackward is then the gradient of the stage's inputs (what the previous stage
// waits for) and kWeight the gradient of its parameters (what nobody waits for).
enum class Phase : uint8_t { kForward, kBackward, kWeight };

// One unit of pipeline work: a stage's forward, backward or weight gradient for one
// micro-batch.
struct Task {
  int stage;
  int micro_batch;
  Phase phase;
  bool operator==(const Task& o) const {
    return stage == o.stage && micro_batch == o.micro_batch && phase == o.phase;
  }
};

enum class ScheduleKind {
  kGPipe,         // fill-drain: every forward, then every backward
  kOneFOneB,      // one forward one backward: at most `stages` micro-batches alive per stage
  kInterleaved,   // 1F1B over several virtual stages per worker (Megatron-LM style)
  kZeroBubbleH1,  // ZB-H1 (Qi et al. 2024): 1F1B with the weight gradients moved into its bubbles
  kZeroBubbleV,   // ZB-V: two stages per worker in a V, weight gradients filling the bubbles
};

// Parses a name of schedule_names(); throws std::invalid_argument otherwise.
ScheduleKind parse_schedule(const std::string& name);
std::string schedule_name(ScheduleKind kind);

// Every name parse_schedule accepts, in the order the docs list them.
const std::vector<std::string>& schedule_names();

// Whether the schedule splits each backward into B (input gradient) and W (weight gradient).
bool splits_backward(ScheduleKind kind);

// The worker that runs `stage`: stage % workers, except for kZeroBubbleV, whose V puts stages
// w and 2 * workers - 1 - w on worker w (the first and the last stage share worker 0). The one
// home of this rule: schedules and placements both ask it.
int worker_of_stage(ScheduleKind kind, int stage, int workers);

// The one rule for when a task may start, shared by `simulate` (on paper) and the executor
// (with tensors): F(s, i) once its input has arrived (the caller's micro-batch on stage 0,
// F(s-1, i)'s output elsewhere); B(s, i) once F(s, i) is done and the gradient of its outputs
// has arrived (B(s+1, i)'s; on the last stage the loss's or the caller's gradient); W(s, i)
// once B(s, i) is done (it takes the gradients B left behind). `State` answers
// has_input(s, i), forward_done(s, i), has_grad(s, i) and backward_done(s, i).
template <typename State>
bool may_start(const Task& t, const State& state) {
  switch (t.phase) {
    case Phase::kForward:
      return state.has_input(t.stage, t.micro_batch);
    case Phase::kBackward:
      return state.forward_done(t.stage, t.micro_batch) && state.has_grad(t.stage, t.micro_batch);
    case Phase::kWeight:
      return state.backward_done(t.stage, t.micro_batch);
  }
  return false;
}

// A schedule is data: for every worker, the order in which it runs its tasks. Stage s runs on
// worker worker_of_stage(kind, s, workers), so virtual stages share a worker when interleaving
// (and in the V of kZeroBubbleV).
struct Schedule {
  ScheduleKind kind;
  int stages;
  int micro_batches;
  int workers;
  std::vector<std::vector<Task>> per_worker;

  int worker_of(int stage) const { return worker_of_stage(kind, stage, workers); }
  // The same order restricted to one phase (the forward of `pipe(x)`).
  Schedule only(Phase phase) const;
  // The same order without one phase (the backward of `pipe(x)`: B, and W when split).
  Schedule without(Phase phase) const;
};

// Builds the schedule; `workers` must divide `stages` and equal it, except for kInterleaved
// (any divisor) and kZeroBubbleV (stages = 2 * workers). Throws std::invalid_argument for
// impossible shapes.
Schedule make_schedule(ScheduleKind kind, int stages, int micro_batches, int workers);

// Runs the schedule on paper: every worker takes its tasks in order, each once its
// dependencies are done. Reports whether everything ran and, per stage, the largest number
// of micro-batches whose activations were alive: forward done and backward not yet, or, when
// the schedule splits the backward, forward done and weight gradient not yet (W still needs
// the stage's graph).
struct ScheduleCheck {
  bool complete = false;
  std::string problem;  // empty when complete
  std::vector<int> peak_alive;
};
ScheduleCheck simulate(const Schedule& schedule);

// What a task costs on paper. B costs `backward` and W `weight` when the schedule splits the
// backward; an unsplit B costs both.
struct TaskCosts {
  double forward = 1.0;
  double backward = 1.0;
  double weight = 1.0;
};

// When each task runs if every worker takes its tasks in order, each as soon as its
// dependencies are done and the worker is free (the schedule's theory: its bubble, its
// length). Throws std::invalid_argument if the schedule deadlocks.
struct TimedTask {
  Task task;
  int worker;
  double start;
  double end;
};
std::vector<TimedTask> timeline(const Schedule& schedule, const TaskCosts& costs);

// The general form, for the cost model (cost_model.h): each task's own duration, and the delay
// a hand-off adds (a copy between devices) before a task that waits for another stage's work:
// F(s, i) after F(s - 1, i), B(s, i) after B(s + 1, i). `hand_off` may be empty (no delay).
struct PaperCosts {
  std::function<double(const Task&)> duration;
  std::function<double(int from_stage, int to_stage, int micro_batch)> hand_off;
};
std::vector<TimedTask> costed_timeline(const Schedule& schedule, const PaperCosts& costs);

// What crosses between processes when a pipeline's stages live on several ranks (one worker
// per rank): the activations F(from, i) makes for F(from + 1, i), or the input gradients
// B(from, i) makes for B(from - 1, i). Each channel (sending rank, receiving rank) carries
// its messages in the order the sender's task list makes them; the receiver takes them in
// that same order, so both ends read their order from the same Schedule.
struct Message {
  Phase phase;  // kForward: activations; kBackward: input gradients
  int from_stage;
  int to_stage;
  int micro_batch;
  bool operator==(const Message& o) const {
    return phase == o.phase && from_stage == o.from_stage && to_stage == o.to_stage &&
           micro_batch == o.micro_batch;
  }
};
using Channel = std::pair<int, int>;  // (sending rank, receiving rank)
using ChannelPlan = std::map<Channel, std::vector<Message>>;

// The messages between ranks, per channel, in the order the sender makes them; worker w of
// the schedule is rank w. Hand-offs between stages of one rank are not messages.
ChannelPlan channel_plan(const Schedule& schedule);

// Runs the ranks on paper, each its own task list, messages delivered in their channel's
// order: checks that every send is the receiver's next expected message on its channel and
// that everything runs and every message is taken (no rank left waiting). Empty when it
// holds; otherwise what went wrong.
std::string check_channels(const Schedule& schedule, const ChannelPlan& plan);

}  // namespace shardpipe
