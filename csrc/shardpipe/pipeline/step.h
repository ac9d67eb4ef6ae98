#pragma once

#include <ATen/ATen.h>
#include <ATen/ThreadLocalState.h>
#include <torch/csrc/autograd/function.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "shardpipe/pipeline/checkpoint.h"
#include "shardpipe/pipeline/schedule.h"

namespace shardpipe {

struct WeightGradients;  // backward_split.h

// What flows between stages: the tensors of one micro-batch (one, or a tuple's worth).
using Activations = std::vector<at::Tensor>;

// What flows between stages besides tensors: how they nest (tuples, lists, dicts) and the
// values that are not tensors (a flag, an absent mask). Opaque to the core, which only
// hands it on: the Python bindings keep Python objects in it. Null: one bare tensor, or a
// flat tuple when there are several.
struct Structure {
  virtual ~Structure() = default;
};
using StructurePtr = std::shared_ptr<const Structure>;

// The structure of a flat tuple of tensors: besides a bare tensor's (null) the one the core
// itself makes, for what arrives from another rank.
struct FlatTuple : Structure {};
inline const StructurePtr& flat_tuple() {
  static const StructurePtr instance = std::make_shared<FlatTuple>();
  return instance;
}

// Tensors and their structure: what a phase takes from the caller or gives back.
struct Values {
  Activations tensors;
  StructurePtr structure;
};

// A stage: a callable over tensors (a torch::nn module, or a Python module through the
// bindings). It runs on its worker's thread, with the stage's stream current. `structure`
// says how `inputs` nest; the stage replaces it by its outputs' structure.
using StageFn = std::function<Activations(const Activations& inputs, StructurePtr& structure)>;
// Loss of one micro-batch from the last stage's outputs and that micro-batch's targets.
using LossFn = std::function<at::Tensor(const Activations& outputs, const StructurePtr& structure,
                                        const Activations& targets)>;

// Older PyTorch releases hold autograd nodes by std::shared_ptr, newer ones by
// c10::intrusive_ptr; the edge type says which this build has.
using NodePtr = decltype(torch::autograd::Edge::function);

// Gives a recomputation the buffers its checkpointed forward found (batch-norm statistics,
// counters: `seen`, pairs of buffer and value) and puts the present values back when
// destroyed, once the recomputed graph has been used up: its backward (and weight gradient)
// may read a buffer it saved, which must then hold what the recomputation made of it. Both
// writes go through an alias with a version counter of its own: the other micro-batches'
// graphs, which may have saved these buffers too, find them unchanged in value and version.
class BuffersAsSeen {
 public:
  explicit BuffersAsSeen(std::vector<std::pair<at::Tensor, at::Tensor>> seen)
      : seen_(std::move(seen)) {
    at::NoGradGuard no_grad;
    for (auto& [buffer, value] : seen_) {
      now_.push_back(buffer.clone());
      buffer.variable_data().copy_(value);
    }
  }
  ~BuffersAsSeen() {
    at::NoGradGuard no_grad;
    for (size_t k = 0; k < now_.size(); ++k) seen_[k].first.variable_data().copy_(now_[k]);
  }
  BuffersAsSeen(const BuffersAsSeen&) = delete;
  BuffersAsSeen& operator=(const BuffersAsSeen&) = delete;

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> seen_;
  std::vector<at::Tensor> now_;
};

// What one (stage, micro-batch) keeps between its forward and its backward. Its `input` and
// `grad` are also the mailbox a transport delivers into.
struct Slot {
  Activations input;  // on the stage's device, detached from the producer's graph
  StructurePtr input_structure;
  std::vector<bool> input_has_grad;  // per input: its producer's output needed a gradient
  std::vector<NodePtr> sinks;        // per input: collects its gradient (null: none wanted)
  Activations output;                // with the stage's graph, unless the forward was checkpointed
  Activations grad;                  // gradient of `output`, sent by the next stage (or the caller)
  RngState rng;                      // for recomputation: the random state the forward began
  RngState rng_after;                //   with, and the one it left
  // Buffers the checkpointed forward changed (batch-norm statistics...) with the values it
  // found: the recomputation sees them too and leaves every buffer as it was.
  std::vector<std::pair<at::Tensor, at::Tensor>> buffers_seen;
  // What B left for W when the schedule splits the backward (the graph, its gradients).
  std::shared_ptr<WeightGradients> weights;
  std::shared_ptr<BuffersAsSeen> buffers_as_seen;  // until W has used the recomputed graph
  bool checkpointed = false;
  bool has_input = false;
  bool forward_done = false;
  bool has_grad = false;
  bool backward_done = false;
};

// One mini-batch on its way through the pipeline. Shared by the caller, the executor's
// threads, the transport and (for `forward` with grad) the autograd node that later runs the
// backward schedule.
struct Step {
  int stages = 0;
  int micro_batches = 0;
  int64_t batch = 0;
  std::vector<int64_t> sizes;  // of the micro-batches
  std::vector<Slot> slots;
  Slot& at(int s, int i) { return slots[static_cast<size_t>(s) * micro_batches + i]; }

  bool grad_enabled = false;
  // The schedule splits each backward into B (input gradients) and W (weight gradients).
  bool split_backward = false;
  // Generator locks the caller's thread holds; the workers then serialise on `own_generator`.
  std::vector<std::mutex*> generators_held_by_caller;
  std::mutex own_generator;
  std::vector<bool> batched;
  std::vector<bool> input_requires_grad;
  std::vector<at::Device> input_devices;
  std::vector<Activations> outputs;      // last stage, per micro-batch, detached
  StructurePtr output_structure;         // of the last stage's outputs (micro-batch 0's)
  std::vector<Activations> input_grads;  // first stage, per micro-batch

  // train_step only
  bool fused = false;
  const LossFn* loss = nullptr;
  std::vector<Activations> targets;  // per micro-batch, on the last stage's device
  std::vector<double> weights;
  std::vector<at::Tensor> losses;
  // Over ranks: the step's loss as the last stage's rank computed it, known on every rank.
  at::Tensor shared_loss;
  bool backward_ran = false;
  // Data parallel (gradient_reducer.h): told, on the worker's thread, when stage s has run
  // its last gradient task of the phase (W when the backward is split, else B), counted down
  // in `gradient_tasks_left` under `mutex`.
  std::function<void(int stage)> gradients_ready;
  std::vector<int> gradient_tasks_left;
  bool training = true;  // the module's mode: checkpointing trades memory in training only

  // Grad mode, autocast, ... of the thread that started the phase, which has them already.
  at::ThreadLocalState tls;
  std::thread::id tls_thread = std::this_thread::get_id();

  // --- synchronisation -------------------------------------------------------------------
  std::mutex mutex;
  std::condition_variable changed;
  // Bumped (under `mutex`) at every change a waiting thread may care about; lets a waiter
  // spin briefly for its next task before paying for a sleep and a wake-up.
  std::atomic<uint64_t> generation{0};
  int pending = 0;  // executor threads still running the phase
  bool cancelled = false;
  std::exception_ptr error;
  std::string where;
  std::optional<Task> failed_task;  // the task that raised `error`, when one did

  // Wakes every thread waiting on the step; `mutex` must be held.
  void notify_locked() {
    generation++;
    changed.notify_all();
  }
  // Records the first error (and where it happened) and cancels the step: every thread
  // waiting on it wakes and stops. A transport whose peer failed calls it too.
  void fail(std::exception_ptr e, std::string place, std::optional<Task> task = std::nullopt) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!error) {
      error = std::move(e);
      where = std::move(place);
      failed_task = task;
    }
    cancelled = true;
    notify_locked();
  }
  // Waits, `lock` holding `mutex`, until the step changes. Hand-offs between stages are
  // frequent and a thread's sleep and wake-up cost tens of microseconds, so it first spins
  // (lock released) for a few.
  void wait_for_change(std::unique_lock<std::mutex>& lock) {
    const uint64_t seen = generation.load();
    lock.unlock();
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    while (generation.load() == seen && std::chrono::steady_clock::now() < until) {
      std::this_thread::yield();
    }
    lock.lock();
    changed.wait(lock, [&] { return generation.load() != seen; });
  }
};

}  // namespace shardpipe
