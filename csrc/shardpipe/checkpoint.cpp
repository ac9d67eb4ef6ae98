#include "shardpipe/checkpoint.h"

#include <ATen/Context.h>

#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>

namespace shardpipe {
namespace {

thread_local bool recomputing = false;

at::Tensor get_state(at::Generator gen) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_state(at::Generator gen, const at::Tensor& state) {
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

}  // namespace

CheckpointMode parse_checkpoint(const std::string& name) {
  if (name == "never") return CheckpointMode::kNever;
  if (name == "except_last") return CheckpointMode::kExceptLast;
  if (name == "always") return CheckpointMode::kAlways;
  throw std::invalid_argument("checkpoint must be 'never', 'except_last' or 'always', got '" +
                              name + "'");
}

std::string checkpoint_name(CheckpointMode mode) {
  switch (mode) {
    case CheckpointMode::kNever:
      return "never";
    case CheckpointMode::kExceptLast:
      return "except_last";
    case CheckpointMode::kAlways:
      return "always";
  }
  return "?";
}

bool is_checkpointed(CheckpointMode mode, int micro_batch, int micro_batches) {
  switch (mode) {
    case CheckpointMode::kNever:
      return false;
    case CheckpointMode::kExceptLast:
      return micro_batch < micro_batches - 1;
    case CheckpointMode::kAlways:
      return true;
  }
  return false;
}

RngState RngState::capture(at::Device device) {
  RngState state;
  state.where = device;
  state.cpu = get_state(at::detail::getDefaultCPUGenerator());
  if (!device.is_cpu()) state.device = get_state(at::globalContext().defaultGenerator(device));
  return state;
}

RngFork::RngFork(const RngState& replay) : saved_(RngState::capture(replay.where)) {
  set_state(at::detail::getDefaultCPUGenerator(), replay.cpu);
  if (replay.device.defined())
    set_state(at::globalContext().defaultGenerator(replay.where), replay.device);
}

RngFork::~RngFork() {
  set_state(at::detail::getDefaultCPUGenerator(), saved_.cpu);
  if (saved_.device.defined())
    set_state(at::globalContext().defaultGenerator(saved_.where), saved_.device);
}

std::unique_lock<std::mutex> lock_generator(at::Device device) {
  static std::mutex registry_mutex;
  static std::map<std::pair<int, int>, std::unique_ptr<std::mutex>> mutexes;
  std::mutex* m;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto& slot = mutexes[{static_cast<int>(device.type()), device.index()}];
    if (!slot) slot = std::make_unique<std::mutex>();
    m = slot.get();
  }
  return std::unique_lock<std::mutex>(*m);
}

bool is_recomputing() { return recomputing; }

RecomputeGuard::RecomputeGuard() : previous_(recomputing) { recomputing = true; }
RecomputeGuard::~RecomputeGuard() { recomputing = previous_; }

}  // namespace shardpipe
