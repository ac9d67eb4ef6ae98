#include "shardpipe/pipeline/cost_model.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>

namespace shardpipe {
namespace {

double on_line(double small, double large, int64_t small_rows, int64_t large_rows, int64_t rows) {
  if (small_rows == large_rows) return large * static_cast<double>(rows) / large_rows;
  const double slope = (large - small) / static_cast<double>(large_rows - small_rows);
  return std::max(0.0, small + slope * static_cast<double>(rows - small_rows));
}

// One stage's work on one micro-batch, summed over its blocks.
struct StageWork {
  double forward = 0, backward = 0, weight = 0;
  double input_bytes = 0, output_bytes = 0, activation_bytes = 0;
};

void check_shape(const std::vector<BlockProfile>& blocks, const PlanShape& shape) {
  const Schedule& s = shape.schedule;
  auto fail = [](const std::string& what) { throw std::invalid_argument("predict: " + what); };
  if (static_cast<int>(shape.balance.size()) != s.stages)
    fail("balance has " + std::to_string(shape.balance.size()) + " stages, the schedule " +
         std::to_string(s.stages));
  if (std::accumulate(shape.balance.begin(), shape.balance.end(), int64_t{0}) !=
          static_cast<int64_t>(blocks.size()) ||
      std::any_of(shape.balance.begin(), shape.balance.end(), [](int64_t b) { return b < 1; }))
    fail("balance must give every stage a block and sum to the " + std::to_string(blocks.size()) +
         " blocks");
  if (static_cast<int>(shape.stage_device.size()) != s.stages)
    fail("stage_device must name a device for each of the " + std::to_string(s.stages) + " stages");
  if (std::any_of(shape.stage_device.begin(), shape.stage_device.end(),
                  [](int d) { return d < 0; }))
    fail("device indices must be non-negative");
  if (static_cast<int>(shape.micro_batch_rows.size()) != s.micro_batches ||
      static_cast<int>(shape.checkpointed.size()) != s.micro_batches)
    fail("micro_batch_rows and checkpointed must have one entry per micro-batch (" +
         std::to_string(s.micro_batches) + ")");
  for (const auto& b : blocks)
    if (b.small.rows < 1 || b.large.rows < 1) fail("a block sample must have at least one row");
}

}  // namespace

BlockSample BlockProfile::at(int64_t rows) const {
  auto line = [&](double BlockSample::* field) {
    return on_line(small.*field, large.*field, small.rows, large.rows, rows);
  };
  BlockSample out;
  out.rows = rows;
  out.forward = line(&BlockSample::forward);
  out.backward = line(&BlockSample::backward);
  out.weight = line(&BlockSample::weight);
  out.input_bytes = line(&BlockSample::input_bytes);
  out.output_bytes = line(&BlockSample::output_bytes);
  out.saved_bytes = line(&BlockSample::saved_bytes);
  return out;
}

Prediction predict(const std::vector<BlockProfile>& blocks, const PlanShape& shape,
                   const MachineCosts& machine) {
  check_shape(blocks, shape);
  const Schedule& schedule = shape.schedule;
  const int S = schedule.stages, m = schedule.micro_batches;
  const bool split = splits_backward(schedule.kind);

  // Per (stage, micro-batch): the stage's work at that micro-batch's rows.
  std::vector<StageWork> work(static_cast<size_t>(S) * m);
  auto at = [m](int s, int i) { return static_cast<size_t>(s) * m + i; };
  std::vector<double> resident(S, 0.0);
  for (int s = 0, first = 0; s < S; first += static_cast<int>(shape.balance[s]), ++s) {
    const int last = first + static_cast<int>(shape.balance[s]);
    for (int k = first; k < last; ++k) resident[s] += blocks[k].resident_bytes;
    for (int i = 0; i < m; ++i) {
      StageWork& w = work[at(s, i)];
      for (int k = first; k < last; ++k) {
        const BlockSample b = blocks[k].at(shape.micro_batch_rows[i]);
        w.forward += b.forward;
        w.weight += b.weight;
        // The first stage's input wants no gradient: none is computed for its first block,
        // and its other blocks' input gradients only serve its weights (W, in a split).
        if (s > 0) {
          w.backward += b.backward;
        } else if (k > first) {
          w.weight += b.backward;
        }
        w.activation_bytes += b.saved_bytes;
        if (k == first) w.input_bytes = b.input_bytes;
        if (k == last - 1) w.output_bytes = b.output_bytes;
      }
      w.activation_bytes += w.input_bytes;
      w.forward *= machine.compute_scale;
      w.backward *= machine.compute_scale;
      w.weight *= machine.compute_scale;
    }
  }

  PaperCosts costs;
  costs.duration = [&](const Task& t) {
    const StageWork& w = work[at(t.stage, t.micro_batch)];
    const double recompute = shape.checkpointed[t.micro_batch] ? w.forward : 0.0;
    switch (t.phase) {
      case Phase::kForward:
        return machine.task_overhead + w.forward;
      case Phase::kBackward:
        return machine.task_overhead + recompute + w.backward + (split ? 0.0 : w.weight);
      case Phase::kWeight:
        return machine.task_overhead + w.weight;
    }
    return 0.0;
  };
  costs.hand_off = [&](int from, int to, int i) {
    if (shape.stage_device[from] == shape.stage_device[to]) return 0.0;
    // What crosses is the lower stage's output going down, or its gradient coming back up.
    const double bytes = work[at(std::min(from, to), i)].output_bytes;
    return machine.link_latency +
           (machine.link_bandwidth > 0 ? bytes / machine.link_bandwidth : 0.0);
  };
  const auto tasks = costed_timeline(schedule, costs);

  Prediction out;
  double first_start = tasks.empty() ? 0.0 : tasks.front().start, last_end = first_start;
  double busy = 0.0;
  for (const auto& t : tasks) {
    first_start = std::min(first_start, t.start);
    last_end = std::max(last_end, t.end);
    busy += t.end - t.start;
  }
  out.step_time = last_end - first_start;
  const double capacity = out.step_time * schedule.workers;
  out.bubble = capacity > 0 ? std::max(0.0, 1.0 - busy / capacity) : 0.0;

  // Memory over time, per device: (time, change, device), frees before allocations at equal
  // times (a task that ends hands its memory to the next one starting then).
  const int devices = *std::max_element(shape.stage_device.begin(), shape.stage_device.end()) + 1;
  std::vector<std::tuple<double, double, int>> changes;
  const Phase frees = split ? Phase::kWeight : Phase::kBackward;
  for (const auto& t : tasks) {
    const StageWork& w = work[at(t.task.stage, t.task.micro_batch)];
    const int device = shape.stage_device[t.task.stage];
    const bool checkpointed = shape.checkpointed[t.task.micro_batch];
    if (t.task.phase == Phase::kForward) {
      changes.emplace_back(t.start, checkpointed ? w.input_bytes : w.activation_bytes, device);
    }
    if (t.task.phase == Phase::kBackward && checkpointed) {
      changes.emplace_back(t.start, w.activation_bytes - w.input_bytes, device);
    }
    if (t.task.phase == frees) changes.emplace_back(t.end, -w.activation_bytes, device);
  }
  std::sort(changes.begin(), changes.end());
  std::vector<double> held(devices, 0.0);
  out.peak_memory.assign(devices, 0.0);
  for (const auto& [time, change, device] : changes) {
    held[device] += change;
    out.peak_memory[device] = std::max(out.peak_memory[device], held[device]);
  }
  for (int s = 0; s < S; ++s) out.peak_memory[shape.stage_device[s]] += resident[s];
  return out;
}

}  // namespace shardpipe
