#include "shardpipe/pipeline/gradient_reducer.h"

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <algorithm>
#include <map>
#include <set>
#include <unordered_map>

#include "shardpipe/pipeline/stage_stream.h"

namespace shardpipe {

GradientReducer::GradientReducer(const std::string& group_name, std::vector<TensorsFn> parameters,
                                 std::vector<std::optional<c10::Stream>> streams, at::Device device,
                                 std::chrono::milliseconds timeout, std::function<double()> clock)
    : parameters_(std::move(parameters)),
      streams_(std::move(streams)),
      device_(device),
      timeout_(timeout),
      clock_(std::move(clock)) {
  try {
    group_ = c10d::resolve_process_group(group_name);
  } catch (const std::exception& e) {
    TORCH_CHECK_VALUE(false, "shardpipe: data_parallel_group: no process group named '", group_name,
                      "' (", e.what(), ")");
  }
  rank_ = group_->getRank();
  ranks_ = group_->getSize();
  TORCH_CHECK_VALUE(timeout.count() > 0, "shardpipe: timeout must be positive");
}

void GradientReducer::set_recording(bool on) {
  std::lock_guard<std::mutex> lock(times_mutex_);
  recording_ = on;
}

std::vector<ReductionTimes> GradientReducer::take_times() {
  std::lock_guard<std::mutex> lock(times_mutex_);
  return std::exchange(times_, {});
}

void GradientReducer::wait(c10d::Work& work, const std::string& what) {
  try {
    work.wait(timeout_);
  } catch (const std::exception& e) {
    broken_reason_ = what;
    broken_ = true;
    // A collective cannot say which peer is missing: name them all.
    std::string peers;
    for (int r = 0; r < ranks_; ++r) {
      if (r == rank_) continue;
      peers += (peers.empty() ? "" : ", ") + std::to_string(r);
    }
    TORCH_CHECK(false, "shardpipe: data-parallel rank ", rank_, " ", what, " within ",
                static_cast<double>(timeout_.count()) / 1000.0,
                " s: ", ranks_ == 2 ? "data-parallel rank " : "one of data-parallel ranks ", peers,
                " died, hangs, or did not run the same step (every rank must call "
                "train_step/backward alike, and no_sync alike): ",
                e.what());
  }
}

std::unique_ptr<GradientReduction> GradientReducer::begin() {
  TORCH_CHECK(!broken_, "shardpipe: data-parallel rank ", rank_, " can no longer reduce ",
              "gradients (it ", broken_reason_, "); make a new process group and pipeline");
  std::unique_ptr<GradientReduction> reduction(new GradientReduction(*this));
  // A parameter that several of this process's stages use is reduced with the lowest of
  // them, which goes last: by then every stage using it has added its share.
  std::vector<std::vector<at::Tensor>> params(parameters_.size());
  std::unordered_map<const c10::TensorImpl*, int> owner;
  std::unordered_map<const c10::TensorImpl*, int> users;
  for (size_t s = 0; s < parameters_.size(); ++s) {
    if (!parameters_[s]) continue;
    params[s] = parameters_[s]();
    std::set<const c10::TensorImpl*> here;
    for (const auto& p : params[s]) {
      owner.emplace(p.unsafeGetTensorImpl(), static_cast<int>(s));
      if (here.insert(p.unsafeGetTensorImpl()).second) users[p.unsafeGetTensorImpl()]++;
    }
  }
  for (int s = static_cast<int>(parameters_.size()) - 1; s >= 0; --s) {
    if (!parameters_[s]) continue;
    GradientReduction::StageBuckets stage{s, {}};
    // Grouped by dtype and device (one flat tensor each), in reverse order as DDP does (the
    // order the backward makes them), a bucket closed once it holds kBucketBytes.
    std::map<std::pair<int, std::string>, std::vector<at::Tensor>> groups;
    std::set<const c10::TensorImpl*> seen;
    for (auto it = params[s].rbegin(); it != params[s].rend(); ++it) {
      const auto* impl = it->unsafeGetTensorImpl();
      if (!it->requires_grad() || owner.at(impl) != s || !seen.insert(impl).second) continue;
      groups[{static_cast<int>(it->scalar_type()), it->device().str()}].push_back(*it);
    }
    for (auto& [key, members] : groups) {
      GradientReduction::Bucket bucket;
      size_t bytes = 0;
      for (auto& p : members) {
        if (!bucket.params.empty() && bytes >= kBucketBytes) {
          stage.buckets.push_back(std::move(bucket));
          bucket = {};
          bytes = 0;
        }
        bucket.params.push_back(p);
        bytes += static_cast<size_t>(p.numel()) * p.element_size();
      }
      if (!bucket.params.empty()) stage.buckets.push_back(std::move(bucket));
    }
    for (size_t b = 0; b < stage.buckets.size(); ++b) {
      auto& bucket = stage.buckets[b];
      int64_t numel = static_cast<int64_t>(bucket.params.size());
      for (const auto& p : bucket.params) {
        numel += p.numel();
        if (users.at(p.unsafeGetTensorImpl()) > 1) bucket.early = false;
      }
      at::Tensor& flat = flats_[{s, b}];
      const auto& first = bucket.params.front();
      if (!flat.defined() || flat.numel() != numel || flat.scalar_type() != first.scalar_type() ||
          flat.device() != first.device()) {
        flat = at::empty({numel}, first.options().requires_grad(false));
      }
      bucket.flat = flat;
    }
    reduction->order_.push_back(std::move(stage));
  }
  // The hooks, on the accumulators the step's graphs use (a forward already made keeps them).
  for (size_t k = 0; k < reduction->order_.size(); ++k) {
    auto& buckets = reduction->order_[k].buckets;
    for (size_t b = 0; b < buckets.size(); ++b) {
      if (!buckets[b].early) continue;
      for (const auto& p : buckets[b].params) {
        auto accumulator = torch::autograd::impl::grad_accumulator(p);
        if (!accumulator) continue;
        GradientReduction* self = reduction.get();
        const uintptr_t key =
            accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
                [self, k, b](const torch::autograd::variable_list& outputs,
                             const torch::autograd::variable_list&) {
                  self->accumulated(k, b);
                  return outputs;
                }));
        reduction->hooks_.emplace_back(std::move(accumulator), key);
        buckets[b].waiting++;
      }
    }
  }
  return reduction;
}

GradientReduction::GradientReduction(GradientReducer& reducer)
    : reducer_(reducer), step_lock_(reducer.step_mutex_) {}

GradientReduction::~GradientReduction() { remove_hooks(); }

void GradientReduction::remove_hooks() {
  for (auto& [accumulator, key] : hooks_) accumulator->del_post_hook(key);
  hooks_.clear();
}

void GradientReduction::arm(Step& step, const Schedule& schedule) {
  const Phase last = step.split_backward ? Phase::kWeight : Phase::kBackward;
  step.gradient_tasks_left.assign(static_cast<size_t>(step.stages), 0);
  for (const auto& list : schedule.per_worker) {
    for (const auto& task : list) {
      if (task.phase == last) step.gradient_tasks_left[task.stage]++;
    }
  }
  step.gradients_ready = [this](int stage) { stage_ready(stage); };
  std::lock_guard<std::mutex> lock(mutex_);
  step_ = &step;
}

void GradientReduction::accumulated(size_t k, size_t b) {
  Step* step;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    step = step_;
  }
  if (!step) return;
  {
    // Only the stage's last gradient task makes final gradients; its tasks never overlap,
    // so while it runs its count is one.
    std::lock_guard<std::mutex> lock(step->mutex);
    if (step->gradient_tasks_left[order_[k].stage] != 1) return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  Bucket& bucket = order_[k].buckets[b];
  if (--bucket.waiting == 0) issue_ready_locked();
}

void GradientReduction::stage_ready(int stage) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& s : order_) {
    if (s.stage == stage) s.ready = true;
  }
  issue_ready_locked();
}

void GradientReduction::issue_ready_locked() {
  for (auto& s : order_) {
    if (s.issued) continue;
    for (auto& bucket : s.buckets) {
      if (bucket.issued) continue;
      if (!s.ready && (!bucket.early || bucket.waiting > 0)) return;
      issue(s, bucket, false);
    }
    if (!s.ready) return;
    s.issued = true;
  }
}

void GradientReduction::issue(StageBuckets& stage, Bucket& bucket, bool zeros) {
  at::NoGradGuard no_grad;
  StreamsGuard on_stage({reducer_.streams_[stage.stage]});
  bucket.issued = true;
  if (stage.issued_us < 0) stage.issued_us = reducer_.clock_();
  at::Tensor& flat = bucket.flat;
  if (zeros) {
    flat.zero_();
  } else {
    const int64_t count = static_cast<int64_t>(bucket.params.size());
    std::vector<float> present(static_cast<size_t>(count), 0.0f);
    int64_t offset = 0;
    for (int64_t k = 0; k < count; ++k) {
      const at::Tensor& p = bucket.params[k];
      at::Tensor slice = flat.narrow(0, offset, p.numel());
      const at::Tensor& g = p.grad();
      if (g.defined()) {
        TORCH_CHECK(g.layout() == at::kStrided, "shardpipe: data_parallel_group: sparse ",
                    "gradients are not supported (stage ", stage.stage, ")");
        slice.view(g.sizes()).copy_(g);
        present[k] = 1.0f;
      } else {
        slice.zero_();
      }
      offset += p.numel();
    }
    flat.narrow(0, offset, count).copy_(at::tensor(present).to(flat.options()));
  }
  std::vector<at::Tensor> tensors{flat};
  bucket.work = reducer_.group_->allreduce(tensors);
}

void GradientReduction::finish(std::exception_ptr failure) {
  remove_hooks();
  try {
    std::lock_guard<std::mutex> lock(mutex_);
    step_ = nullptr;
    for (auto& s : order_) {
      for (auto& bucket : s.buckets) {
        if (!bucket.issued) issue(s, bucket, failure != nullptr);
      }
      s.issued = true;
    }
  } catch (...) {
    reducer_.broken_reason_ = "could not start a gradient reduction";
    reducer_.broken_ = true;
    if (failure) std::rethrow_exception(failure);
    throw;
  }
  const double wait_from = reducer_.clock_();
  // Every rank's outcome, after the buckets: a rank that failed has sent zeros.
  at::Tensor outcome =
      at::zeros({reducer_.ranks_}, at::TensorOptions().dtype(at::kLong).device(reducer_.device_));
  if (failure) outcome[reducer_.rank_].fill_(1);
  std::vector<at::Tensor> tensors{outcome};
  auto outcome_work = reducer_.group_->allreduce(tensors);
  std::vector<ReductionTimes> times;
  try {
    for (auto& s : order_) {
      for (auto& bucket : s.buckets) {
        TORCH_CHECK(bucket.work, "shardpipe: data-parallel rank ", reducer_.rank_,
                    ": a gradient bucket of stage ", s.stage, " was never sent");
        reducer_.wait(*bucket.work, "did not receive every data-parallel gradient");
      }
      times.push_back({s.stage, s.issued_us, reducer_.clock_()});
    }
    reducer_.wait(*outcome_work, "did not hear every data-parallel rank's outcome");
  } catch (...) {
    if (failure) std::rethrow_exception(failure);
    throw;
  }
  times.push_back({-1, wait_from, reducer_.clock_()});
  {
    std::lock_guard<std::mutex> lock(reducer_.times_mutex_);
    if (reducer_.recording_) {
      reducer_.times_.insert(reducer_.times_.end(), times.begin(), times.end());
    }
  }
  if (failure) std::rethrow_exception(failure);
  const at::Tensor failed = outcome.cpu();
  for (int r = 0; r < reducer_.ranks_; ++r) {
    TORCH_CHECK(failed[r].item<int64_t>() == 0, "shardpipe: data-parallel rank ", r,
                " failed in this step (its own error says where and why); the gradients on "
                "this rank were not averaged");
  }
  at::NoGradGuard no_grad;
  const double scale = 1.0 / static_cast<double>(reducer_.ranks_);
  for (auto& s : order_) {
    for (auto& bucket : s.buckets) {
      at::Tensor& flat = bucket.flat;
      flat.mul_(scale);
      const int64_t count = static_cast<int64_t>(bucket.params.size());
      int64_t offset = 0;
      for (const auto& p : bucket.params) offset += p.numel();
      const at::Tensor present = flat.narrow(0, offset, count).to(at::kCPU, at::kDouble);
      const double* flags = present.const_data_ptr<double>();
      offset = 0;
      for (int64_t k = 0; k < count; ++k) {
        at::Tensor p = bucket.params[k];
        at::Tensor slice = flat.narrow(0, offset, p.numel()).view(p.sizes());
        offset += p.numel();
        // Still no gradient when no rank had one (a parameter the step did not use).
        if (flags[k] <= 0) continue;
        if (p.grad().defined()) {
          p.mutable_grad().copy_(slice);
        } else {
          p.mutable_grad() = at::empty_like(p, at::MemoryFormat::Preserve).copy_(slice);
        }
      }
    }
  }
}

}  // namespace shardpipe
