#pragma once

#include <cstdint>
#include <vector>

#include "shardpipe/pipeline/microbatch.h"
#include "shardpipe/pipeline/schedule.h"

namespace shardpipe {

// The cost model behind sp.autotune: a schedule (the same data the executor runs) replayed on
// paper with measured costs, predicting a training step's time, bubble and peak memory.

// One block (a child of the sequentialized model) measured on a micro-batch of `rows` rows.
struct BlockSample {
  int64_t rows = 1;
  double forward = 0;       // seconds
  double backward = 0;      // seconds: the gradient of the block's input
  double weight = 0;        // seconds: the gradient of its parameters
  double input_bytes = 0;   // what it takes in (a checkpointed stage keeps its first block's)
  double output_bytes = 0;  // what it hands on; the gradient coming back is as large
  double saved_bytes = 0;   // what its forward keeps for backward, its input excluded
};

// A block measured at two micro-batch sizes. Costs at other sizes lie on the line through
// both (a fixed part per call, such as dispatch and Python, plus a part growing with the
// rows), never below zero; with one size (equal rows) they are proportional to the rows.
struct BlockProfile {
  BlockSample small, large;
  double resident_bytes = 0;  // held for the whole step: parameters, their gradients, buffers
  BlockSample at(int64_t rows) const;
};

// What the machine adds to the blocks' own work.
struct MachineCosts {
  double task_overhead = 0;   // seconds the engine adds to every task (hand-offs, wake-ups)
  double link_bandwidth = 0;  // bytes per second between two devices; 0: copies cost nothing
  double link_latency = 0;    // seconds per copy between two devices
  double compute_scale = 1;   // multiplies every block's measured time (a projection)
};

// One configuration: what sp.Pipeline(model, devices, balance=, chunks=, schedule=,
// checkpoint=) would run.
struct PlanShape {
  Schedule schedule;                      // make_schedule(kind, stages, rows.size(), workers)
  std::vector<int64_t> balance;           // blocks per stage
  std::vector<int> stage_device;          // device index of each stage: different ones copy
  std::vector<int64_t> micro_batch_rows;  // rows of each micro-batch, in order
  std::vector<char> checkpointed;         // per micro-batch: recomputed in its backward
};

struct Prediction {
  double step_time = 0;             // seconds from the first task's start to the last one's end
  double bubble = 0;                // the share of the workers' time in the step that they are idle
  std::vector<double> peak_memory;  // bytes per device index: resident + activations at peak
};

// Replays `shape.schedule` with the dependency rule of the executor (`costed_timeline`,
// schedule.h). A stage's task costs the sum of its blocks' at the micro-batch's rows, plus the
// engine's task overhead; the first stage computes no input gradient (its input wants none), so its
// blocks' input gradients after the first run in its weight task (its backward, when the
// schedule does not split it); a checkpointed micro-batch's backward first recomputes the
// forward. A hand-off between stages on different devices waits bytes / bandwidth + latency.
// Memory: a micro-batch's activations (its stage input plus what its blocks save) are held
// from its forward's start until the task that last needs the graph ends (B, or W when the
// backward is split); checkpointed, only the stage input is held until its backward starts,
// which recomputes the rest. Throws std::invalid_argument for shapes that do not fit.
Prediction predict(const std::vector<BlockProfile>& blocks, const PlanShape& shape,
                   const MachineCosts& machine);

}  // namespace shardpipe
