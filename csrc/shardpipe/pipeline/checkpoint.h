#pragma once

#include <ATen/ATen.h>

#include <mutex>
#include <string>
#include <vector>

namespace shardpipe {

// Activation recomputation per micro-batch: "never", "except_last" (every micro-batch but
// the last) or "always".
enum class CheckpointMode { kNever, kExceptLast, kAlways };

// Parses a mode name; throws std::invalid_argument otherwise.
CheckpointMode parse_checkpoint(const std::string& name);
// Every name parse_checkpoint accepts, in the order the docs list them.
const std::vector<std::string>& checkpoint_names();
bool is_checkpointed(CheckpointMode mode, int micro_batch, int micro_batches);

// The random-number state a stage's forward saw: the CPU generator's and, for a CUDA stage,
// its device's. Recomputation replays it so dropout masks agree with the first forward.
struct RngState {
  at::Tensor cpu;
  at::Tensor device;
  c10::Device where = at::kCPU;

  static RngState capture(at::Device device);
  // Whether both hold the same generator states (no draw happened between two captures).
  bool same_as(const RngState& other) const;
};

// Sets the generators to a saved state for the guard's lifetime and puts back what was there
// before, so recomputation leaves the random stream of the rest of the program untouched.
class RngFork {
 public:
  explicit RngFork(const RngState& replay);
  ~RngFork();
  RngFork(const RngFork&) = delete;
  RngFork& operator=(const RngFork&) = delete;

 private:
  RngState saved_;
};

// The generator locks held on this thread, by it or by the callers it works for (a pipeline
// run from a checkpointed stage of another: that stage's thread holds the lock and waits).
std::vector<std::mutex*> generator_locks_held_here();

// Serialises the forwards that draw from one device's generator while checkpointing. All CPU
// stages share the CPU generator (and stages on one GPU share its generator): a forward whose
// state is saved for replay must not interleave its draws with another stage's, or the
// replay would differ from what the forward used. When the step's caller holds that lock
// (`held_by_caller`), the step's own threads serialise on `own` instead: the caller draws
// nothing while it waits for them.
class GeneratorLock {
 public:
  GeneratorLock() = default;
  GeneratorLock(at::Device device, const std::vector<std::mutex*>& held_by_caller, std::mutex& own);
  ~GeneratorLock();
  GeneratorLock(GeneratorLock&& other) noexcept;
  GeneratorLock& operator=(GeneratorLock&& other) noexcept;

 private:
  void release();
  std::mutex* mutex_ = nullptr;
  std::unique_lock<std::mutex> lock_;
};

// While alive, the calling thread works for a step whose caller holds `held` (see above);
// `held` must outlive it.
class GeneratorLocksInherited {
 public:
  explicit GeneratorLocksInherited(const std::vector<std::mutex*>& held);
  ~GeneratorLocksInherited();
  GeneratorLocksInherited(const GeneratorLocksInherited&) = delete;
  GeneratorLocksInherited& operator=(const GeneratorLocksInherited&) = delete;

 private:
  const std::vector<std::mutex*>* previous_;
};

// True on a thread while it recomputes a checkpointed forward: layers that keep running
// statistics (deferred batch norm) must not count that forward twice.
bool is_recomputing();

class RecomputeGuard {
 public:
  RecomputeGuard();
  ~RecomputeGuard();
  RecomputeGuard(const RecomputeGuard&) = delete;
  RecomputeGuard& operator=(const RecomputeGuard&) = delete;

 private:
  bool previous_;
};

}  // namespace shardpipe
