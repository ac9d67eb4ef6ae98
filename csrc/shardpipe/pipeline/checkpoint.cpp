#include "shardpipe/pipeline/checkpoint.h"

#include <ATen/Context.h>

#include <algorithm>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>

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

const std::vector<std::string>& checkpoint_names() {
  static const std::vector<std::string> names = {"never", "except_last", "always"};
  return names;
}

CheckpointMode parse_checkpoint(const std::string& name) {
  if (name == "never") return CheckpointMode::kNever;
  if (name == "except_last") return CheckpointMode::kExceptLast;
  if (name == "always") return CheckpointMode::kAlways;
  std::string allowed;
  for (const auto& n : checkpoint_names()) allowed += (allowed.empty() ? "'" : ", '") + n + "'";
  throw std::invalid_argument("checkpoint must be one of " + allowed + ", got '" + name + "'");
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

bool RngState::same_as(const RngState& other) const {
  auto equal = [](const at::Tensor& a, const at::Tensor& b) {
    return a.defined() == b.defined() && (!a.defined() || at::equal(a, b));
  };
  return where == other.where && equal(cpu, other.cpu) && equal(device, other.device);
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

namespace {

std::mutex* generator_mutex(at::Device device) {
  static std::mutex registry_mutex;
  static std::map<std::pair<int, int>, std::unique_ptr<std::mutex>> mutexes;
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto& slot = mutexes[{static_cast<int>(device.type()), device.index()}];
  if (!slot) slot = std::make_unique<std::mutex>();
  return slot.get();
}

thread_local std::vector<std::mutex*> held_by_thread;  // taken here, in order
// Held by the callers of the step this thread serves (the step owns the list).
thread_local const std::vector<std::mutex*>* inherited = nullptr;

}  // namespace

std::vector<std::mutex*> generator_locks_held_here() {
  std::vector<std::mutex*> all = inherited ? *inherited : std::vector<std::mutex*>{};
  all.insert(all.end(), held_by_thread.begin(), held_by_thread.end());
  return all;
}

GeneratorLock::GeneratorLock(at::Device device, const std::vector<std::mutex*>& held_by_caller,
                             std::mutex& own) {
  std::mutex* m = generator_mutex(device);
  if (std::find(held_by_caller.begin(), held_by_caller.end(), m) != held_by_caller.end()) m = &own;
  lock_ = std::unique_lock<std::mutex>(*m);
  mutex_ = m;
  held_by_thread.push_back(m);
}

GeneratorLock::~GeneratorLock() { release(); }

GeneratorLock::GeneratorLock(GeneratorLock&& other) noexcept
    : mutex_(std::exchange(other.mutex_, nullptr)), lock_(std::move(other.lock_)) {}

GeneratorLock& GeneratorLock::operator=(GeneratorLock&& other) noexcept {
  if (this != &other) {
    release();
    mutex_ = std::exchange(other.mutex_, nullptr);
    lock_ = std::move(other.lock_);
  }
  return *this;
}

void GeneratorLock::release() {
  if (!mutex_) return;
  auto it = std::find(held_by_thread.rbegin(), held_by_thread.rend(), mutex_);
  if (it != held_by_thread.rend()) held_by_thread.erase(std::next(it).base());
  lock_.unlock();
  mutex_ = nullptr;
}

GeneratorLocksInherited::GeneratorLocksInherited(const std::vector<std::mutex*>& held)
    : previous_(std::exchange(inherited, &held)) {}

GeneratorLocksInherited::~GeneratorLocksInherited() { inherited = previous_; }

bool is_recomputing() { return recomputing; }

RecomputeGuard::RecomputeGuard() : previous_(recomputing) { recomputing = true; }
RecomputeGuard::~RecomputeGuard() { recomputing = previous_; }

}  // namespace shardpipe
