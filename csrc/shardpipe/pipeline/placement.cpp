#include "shardpipe/pipeline/placement.h"

#include <numeric>
#include <stdexcept>

namespace shardpipe {
namespace {

std::string list(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t k = 0; k < values.size(); ++k) out += (k ? ", " : "") + std::to_string(values[k]);
  return out + "]";
}

}  // namespace

Placement Placement::make(ScheduleKind kind, int stages, const std::vector<at::Device>& devices) {
  const int d = static_cast<int>(devices.size());
  if (d < 1) throw std::invalid_argument("devices must list at least one device");
  if (kind == ScheduleKind::kInterleaved) {
    if (stages < 1 || stages % d != 0) {
      throw std::invalid_argument("with schedule='interleaved', balance needs a multiple of the " +
                                  std::to_string(d) + " devices in stages, got " +
                                  std::to_string(stages));
    }
  } else if (kind == ScheduleKind::kZeroBubbleV) {
    if (stages != 2 * d) {
      throw std::invalid_argument("with schedule='zbv', balance needs two stages per device (" +
                                  std::to_string(2 * d) + " for the " + std::to_string(d) +
                                  " devices), got " + std::to_string(stages));
    }
  } else if (stages != d) {
    throw std::invalid_argument("balance has " + std::to_string(stages) +
                                " stages but devices lists " + std::to_string(d) +
                                "; give one device per stage");
  }
  Placement placement;
  placement.workers = d;
  placement.kind = kind;
  for (int s = 0; s < stages; ++s) {
    placement.stage_devices.push_back(devices[worker_of_stage(kind, s, d)]);
  }
  return placement;
}

void Placement::validate() const {
  const int S = stages(), W = workers;
  if (S < 1) throw std::invalid_argument("a pipeline needs at least one stage");
  if (W < 1 || S % W != 0) {
    throw std::invalid_argument("workers (" + std::to_string(W) + ") must divide stages (" +
                                std::to_string(S) + ")");
  }
  if (kind == ScheduleKind::kZeroBubbleV && S != 2 * W) {
    throw std::invalid_argument("the zbv schedule runs exactly two stages per worker");
  }
  if (W != S && kind != ScheduleKind::kInterleaved && kind != ScheduleKind::kZeroBubbleV) {
    throw std::invalid_argument(
        "only the interleaved and zbv schedules run several stages per worker");
  }
  for (int s = 0; s < S; ++s) {
    if (stage_devices[s] != stage_devices[worker_of(s)]) {
      throw std::invalid_argument(
          "stage " + std::to_string(s) + " is on " + stage_devices[s].str() +
          " but shares worker " + std::to_string(worker_of(s)) + " with stage " +
          std::to_string(worker_of(s)) + " on " + stage_devices[worker_of(s)].str());
    }
  }
}

int default_stage_count(ScheduleKind kind, int devices, int64_t blocks, const std::string& what) {
  int stages = devices;
  if (kind == ScheduleKind::kInterleaved && 2 * static_cast<int64_t>(devices) <= blocks) {
    stages = 2 * devices;
  }
  if (kind == ScheduleKind::kZeroBubbleV) {
    stages = 2 * devices;
    if (stages > blocks) {
      throw std::invalid_argument("schedule='zbv' runs two stages per device: devices lists " +
                                  std::to_string(devices) + " devices, so the module needs " +
                                  std::to_string(stages) + " " + what + ", but it has only " +
                                  std::to_string(blocks));
    }
  }
  if (stages > blocks) {
    throw std::invalid_argument("devices lists " + std::to_string(devices) +
                                " devices, but the module has only " + std::to_string(blocks) +
                                " " + what + " to split into stages");
  }
  return stages;
}

void check_balance(const std::vector<int64_t>& balance, int64_t blocks, const std::string& what,
                   int devices, ScheduleKind kind) {
  for (size_t i = 0; i < balance.size(); ++i) {
    if (balance[i] < 1) {
      throw std::invalid_argument("balance[" + std::to_string(i) +
                                  "] must be at least 1 (no empty stages), got " +
                                  std::to_string(balance[i]));
    }
  }
  const int64_t total = std::accumulate(balance.begin(), balance.end(), int64_t{0});
  if (total != blocks) {
    throw std::invalid_argument("balance must sum to the module's " + std::to_string(blocks) + " " +
                                what + ", got " + list(balance) + " (sum " + std::to_string(total) +
                                ")");
  }
  std::vector<at::Device> cpus(static_cast<size_t>(devices), at::kCPU);
  Placement::make(kind, static_cast<int>(balance.size()), cpus);  // throws when it cannot fit
}

}  // namespace shardpipe
