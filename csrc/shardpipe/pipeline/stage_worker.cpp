#include "shardpipe/pipeline/stage_worker.h"

#include <c10/core/DeviceGuard.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "shardpipe/pipeline/autograd.h"
#include "shardpipe/pipeline/backward_split.h"
#include "shardpipe/pipeline/stage_stream.h"

namespace shardpipe {
namespace {

bool differentiable(const at::Tensor& t) {
  return t.defined() && (t.is_floating_point() || t.is_complex());
}

// The gradients accumulated so far: a NaN or Inf shows where it first enters.
Activations parameter_grads(const std::vector<at::Tensor>& parameters) {
  Activations grads;
  for (const auto& p : parameters) grads.push_back(p.grad());
  return grads;
}

Activations detached(const Activations& xs) {
  Activations out;
  out.reserve(xs.size());
  for (const auto& t : xs) out.push_back(t.defined() && t.requires_grad() ? t.detach() : t);
  return out;
}

}  // namespace

void StageWorker::expect_finite(const Activations& xs, const char* what) const {
  if (!check_finite_) return;
  for (size_t k = 0; k < xs.size(); ++k) {
    const auto& t = xs[k];
    if (!t.defined() || !(t.is_floating_point() || t.is_complex()) || t.numel() == 0) continue;
    TORCH_CHECK(at::isfinite(t).all().item<bool>(), "shardpipe: check_finite: the ", what, " ", k,
                " of stage ", stage_, " holds NaN or Inf");
  }
}

void StageWorker::run(Step& step, const Task& task) {
  c10::OptionalDeviceGuard device_guard;
  if (!device_.is_cpu()) device_guard.reset_device(device_);
  StreamsGuard stream_guard({stream_});
  GeneratorLocksInherited serving(step.generators_held_by_caller);
  switch (task.phase) {
    case Phase::kForward:
      forward(step, task.micro_batch);
      break;
    case Phase::kBackward:
      backward(step, task.micro_batch);
      break;
    case Phase::kWeight:
      weight(step, task.micro_batch);
      break;
  }
}

Activations StageWorker::call(Step& step, int i, const Activations& input,
                              const std::vector<bool>& input_has_grad, StructurePtr& structure) {
  std::vector<NodePtr> sinks(input.size());
  Activations stage_input;
  stage_input.reserve(input.size());
  for (size_t k = 0; k < input.size(); ++k) {
    // Inputs of the first stage need a gradient only where the caller's do; later stages'
    // where the previous stage's output needed one (a frozen stage's output does not).
    const bool upstream =
        stage_ == 0 ? step.input_requires_grad[k] : k < input_has_grad.size() && input_has_grad[k];
    const bool wanted =
        step.grad_enabled && at::GradMode::is_enabled() && differentiable(input[k]) && upstream;
    // A sink goes on a fresh alias (the input may be the caller's own tensor); an input with
    // history is cut from it.
    at::Tensor x =
        wanted || (input[k].defined() && input[k].requires_grad()) ? input[k].detach() : input[k];
    if (wanted) sinks[k] = attach_gradient_sink(x);
    stage_input.push_back(std::move(x));
  }
  Activations out = fn_(stage_input, structure);
  if (step.fused && last_) {
    at::Tensor loss = (*step.loss)(out, structure, step.targets[i]);
    TORCH_CHECK_VALUE(loss.defined() && loss.numel() == 1,
                      "shardpipe: loss_fn must return a scalar tensor, got shape ", loss.sizes());
    out = {loss.reshape({}) * step.weights[i]};
  }
  step.at(stage_, i).sinks = std::move(sinks);
  return out;
}

void StageWorker::forward(Step& step, int i) {
  Slot& slot = step.at(stage_, i);
  std::vector<bool> input_has_grad;
  StructurePtr structure;
  Activations input = transport_.take_input(step, stage_, i, &structure, &input_has_grad);
  // Recomputation trades compute for memory during training; in eval mode a forward with
  // autograd on keeps its graph.
  const bool checkpointed =
      step.grad_enabled && step.training && is_checkpointed(checkpoint_, i, step.micro_batches);
  Activations out;
  {
    // While any stage checkpoints, forwards that may draw random numbers hold their
    // generator's lock, so that a checkpointed one draws an uninterrupted stretch to replay.
    GeneratorLock generator;
    if (step.grad_enabled && step.training && checkpoint_ != CheckpointMode::kNever &&
        draws_ != Draws::kNo) {
      generator = GeneratorLock(device_, step.generators_held_by_caller, step.own_generator);
    }
    if (checkpointed) {
      slot.rng = RngState::capture(device_);
      // The recomputation needs the input as it was: a first layer working in place would
      // otherwise hand it a modified one.
      slot.input.clear();
      for (const auto& t : input) slot.input.push_back(t.defined() ? t.clone() : t);
      slot.input_structure = structure;
      slot.input_has_grad = input_has_grad;
      slot.buffers_seen.clear();
      if (tensors_.buffers) {
        for (auto& b : tensors_.buffers()) slot.buffers_seen.emplace_back(b, b.clone());
      }
    }
    at::AutoGradMode grad_mode(step.grad_enabled && !checkpointed);
    out = call(step, i, input, input_has_grad, structure);
    if (checkpointed) {
      slot.rng_after = RngState::capture(device_);
      if (draws_ == Draws::kUnknown) {
        draws_ = slot.rng.same_as(slot.rng_after) ? Draws::kNo : Draws::kYes;
      }
      // Only what the forward changed needs to be seen again. (Kernels such as batch norm's
      // update their buffers without bumping the version counter: compare the values.)
      std::vector<std::pair<at::Tensor, at::Tensor>> changed;
      for (auto& seen : slot.buffers_seen) {
        if (!at::equal(seen.first, seen.second)) changed.push_back(std::move(seen));
      }
      slot.buffers_seen = std::move(changed);
    }
  }
  slot.checkpointed = checkpointed;
  if (!step.grad_enabled || checkpointed) {
    slot.sinks.clear();
  } else {
    slot.output = out;
  }
  if (last_) {
    expect_finite(out, step.fused ? "loss" : "output");
    Activations outputs = detached(out);
    if (step.fused) step.losses[i] = outputs[0];
    step.outputs[i] = std::move(outputs);
    if (i == 0) step.output_structure = std::move(structure);
    return;
  }
  expect_finite(out, "output");
  // A checkpointed forward ran without a graph: whether its output needs a gradient is
  // known only when it is recomputed, so the next stage assumes it does.
  std::vector<bool> needs_grad;
  needs_grad.reserve(out.size());
  for (const auto& t : out)
    needs_grad.push_back(checkpointed || (t.defined() && t.requires_grad()));
  transport_.send_activations(step, stage_, i, out, std::move(structure), std::move(needs_grad));
}

Activations StageWorker::recompute(Step& step, int i, Slot& slot) {
  RecomputeGuard recomputing;
  at::AutoGradMode grad_mode(true);
  auto run = [&] {
    StructurePtr structure = slot.input_structure;
    return call(step, i, slot.input, slot.input_has_grad, structure);
  };
  auto replay_locked = [&] {
    GeneratorLock generator(device_, step.generators_held_by_caller, step.own_generator);
    RngFork replay(slot.rng);
    Activations out = run();
    const RngState end = RngState::capture(device_);
    const bool drew = !end.same_as(slot.rng);
    if (drew) draws_ = Draws::kYes;
    // The forward's draws are replayed exactly only if nothing else drew from the generator
    // while it ran: it then ended where the replay ends.
    TORCH_CHECK(!drew || end.same_as(slot.rng_after), "shardpipe: stage ", stage_,
                " drew random numbers in the checkpointed forward of micro-batch ", i,
                " while another thread drew from the same generator, so its recomputation "
                "cannot replay them and its gradients would be wrong; run the step again");
    return out;
  };
  if (draws_ != Draws::kNo) return replay_locked();
  // A stage that drew nothing so far runs unlocked; an unchanged generator proves it still
  // draws nothing. Otherwise someone drew: make sure, under the lock.
  const RngState start = RngState::capture(device_);
  Activations out = run();
  if (RngState::capture(device_).same_as(start)) return out;
  out.clear();
  return replay_locked();
}

void StageWorker::backward(Step& step, int i) {
  Slot& slot = step.at(stage_, i);
  std::shared_ptr<BuffersAsSeen> buffers;
  if (slot.checkpointed) buffers = std::make_shared<BuffersAsSeen>(std::move(slot.buffers_seen));
  Activations outputs = slot.checkpointed ? recompute(step, i, slot) : std::move(slot.output);
  std::vector<at::Tensor> roots, grads;
  if (step.fused && last_) {
    // As loss.backward() would: a loss without a graph leaves every gradient unset.
    TORCH_CHECK(outputs[0].requires_grad(), "shardpipe: the loss of micro-batch ", i,
                " does not require grad (loss_fn ",
                "returned a detached loss, or nothing before it requires grad)");
    roots.push_back(outputs[0]);
    grads.push_back(at::ones_like(outputs[0]));
  } else {
    Activations grad = transport_.take_gradient(step, stage_, i);
    for (size_t k = 0; k < outputs.size() && k < grad.size(); ++k) {
      if (outputs[k].defined() && outputs[k].requires_grad() && grad[k].defined()) {
        roots.push_back(outputs[k]);
        grads.push_back(grad[k]);
      }
    }
  }
  Activations input_grads(slot.sinks.size());
  if (step.split_backward) {
    // The recomputed graph of a checkpointed micro-batch serves W too.
    auto later = std::make_shared<WeightGradients>();
    if (!roots.empty()) input_grads = backward_inputs(roots, grads, slot.sinks, *later);
    slot.weights = std::move(later);
    slot.buffers_as_seen = std::move(buffers);  // W may read what the recomputation saved
  } else {
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    for (size_t k = 0; k < slot.sinks.size(); ++k) {
      if (slot.sinks[k]) input_grads[k] = take_sink_gradient(slot.sinks[k]);
    }
  }
  slot.sinks.clear();
  slot.input.clear();
  slot.input_structure.reset();
  slot.input_has_grad.clear();
  buffers.reset();
  slot.rng = RngState();
  slot.rng_after = RngState();
  roots.clear();
  grads.clear();
  outputs.clear();
  expect_finite(input_grads, "input gradient");
  if (!step.split_backward && check_finite_ && tensors_.parameters) {
    expect_finite(parameter_grads(tensors_.parameters()), "parameter gradient");
  }
  if (stage_ > 0) {
    transport_.send_gradients(step, stage_, i, input_grads);
  } else {
    step.input_grads[i] = std::move(input_grads);
  }
}

void StageWorker::weight(Step& step, int i) {
  Slot& slot = step.at(stage_, i);
  std::shared_ptr<WeightGradients> later = std::move(slot.weights);
  if (later) backward_weights(*later);
  if (check_finite_ && tensors_.parameters) {
    expect_finite(parameter_grads(tensors_.parameters()), "parameter gradient");
  }
  slot.buffers_as_seen.reset();
}

}  // namespace shardpipe
