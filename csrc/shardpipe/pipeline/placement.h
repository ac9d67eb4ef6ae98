#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "shardpipe/pipeline/schedule.h"

namespace shardpipe {

// Where each stage runs: its device, and the worker (a thread of the executor) that runs its
// tasks, one worker per device. One stage per device, except with the interleaved schedule,
// whose virtual stages go round-robin over the devices (stage s on devices[s % D]), and with
// zbv, whose V puts stages d and 2 * D - 1 - d on devices[d]. Stage s runs on worker
// worker_of_stage(kind, s, workers) (schedule.h). The one home of this rule; the Python layer
// asks for it.
struct Placement {
  std::vector<at::Device> stage_devices;  // one per stage
  int workers = 0;
  ScheduleKind kind = ScheduleKind::kGPipe;

  int stages() const { return static_cast<int>(stage_devices.size()); }
  int worker_of(int stage) const { return worker_of_stage(kind, stage, workers); }
  // Stage w runs on worker w for every kind.
  at::Device device_of_worker(int worker) const { return stage_devices[worker]; }

  // Throws std::invalid_argument unless every stage's worker runs on that stage's device and
  // the stages per worker fit `kind` (several only for interleaved, exactly two for zbv).
  void validate() const;

  // Places `stages` stages on `devices` for `kind`; throws std::invalid_argument when the
  // shapes do not fit (the interleaved schedule needs a multiple of the devices in stages,
  // zbv twice the devices, the others one device per stage).
  static Placement make(ScheduleKind kind, int stages, const std::vector<at::Device>& devices);
};

// How many stages a pipeline gets when no balance is given: one per device, two per device
// with the interleaved schedule when the blocks allow it, always two with zbv. Throws
// std::invalid_argument when there are fewer blocks (`what` names them in the message) than
// stages.
int default_stage_count(ScheduleKind kind, int devices, int64_t blocks, const std::string& what);

// Checks a balance (blocks per stage) against the blocks and the devices; throws
// std::invalid_argument naming the offending entry or the rule it breaks.
void check_balance(const std::vector<int64_t>& balance, int64_t blocks, const std::string& what,
                   int devices, ScheduleKind kind);

}  // namespace shardpipe
