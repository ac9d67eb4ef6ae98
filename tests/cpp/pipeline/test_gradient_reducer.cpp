// GradientReducer over an in-process "process group": each rank is a thread, and the
// group's all-reduce sums the tensors the ranks give it in their n-th call. It refuses calls
// whose n-th tensors differ in size or dtype, which is what a real backend would turn into a
// hang or garbage: so these tests also check that every rank issues its buckets in one order.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "shardpipe/pipeline/gradient_reducer.h"

namespace shardpipe {
namespace {

struct Rendezvous {
  explicit Rendezvous(int size) : size(size) {}
  struct Call {
    std::vector<at::Tensor> parts;
    bool done = false;
    std::string error;
  };
  const int size;
  std::mutex mutex;
  std::condition_variable changed;
  std::map<int64_t, Call> calls;
};

class SumWork : public c10d::Work {
 public:
  SumWork(std::shared_ptr<Rendezvous> rv, int64_t call) : rv_(std::move(rv)), call_(call) {}
  bool isCompleted() override {
    std::lock_guard<std::mutex> lock(rv_->mutex);
    return rv_->calls[call_].done;
  }
  bool wait(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(rv_->mutex);
    const auto limit = timeout == kNoTimeout ? std::chrono::milliseconds(10000) : timeout;
    auto& call = rv_->calls[call_];
    TORCH_CHECK(rv_->changed.wait_for(lock, limit, [&] { return call.done; }), "all-reduce ", call_,
                " timed out");
    TORCH_CHECK(call.error.empty(), call.error);
    return true;
  }

 private:
  std::shared_ptr<Rendezvous> rv_;
  int64_t call_;
};

class SumBackend : public c10d::Backend {
 public:
  SumBackend(std::shared_ptr<Rendezvous> rv, int rank)
      : c10d::Backend(rank, rv->size), rv_(std::move(rv)) {}
  const std::string getBackendName() const override { return "test_sum"; }
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions&) override {
    const int64_t n = next_++;
    std::lock_guard<std::mutex> lock(rv_->mutex);
    auto& call = rv_->calls[n];
    call.parts.push_back(tensors.at(0));
    if (static_cast<int>(call.parts.size()) == rv_->size) {
      const auto& first = call.parts.front();
      for (const auto& p : call.parts) {
        if (p.numel() != first.numel() || p.scalar_type() != first.scalar_type()) {
          call.error = "all-reduce " + std::to_string(n) + ": the ranks gave different tensors";
        }
      }
      if (call.error.empty()) {
        at::Tensor sum = at::zeros_like(first);
        for (const auto& p : call.parts) sum += p;
        for (auto& p : call.parts) p.copy_(sum);
      }
      call.done = true;
      rv_->changed.notify_all();
    }
    return c10::make_intrusive<SumWork>(rv_, n);
  }

 private:
  std::shared_ptr<Rendezvous> rv_;
  int64_t next_ = 0;
};

// The group named `name + rank` for each rank of `size`, registered for resolve_process_group
// (which holds them weakly: the caller keeps them).
std::vector<c10::intrusive_ptr<c10d::ProcessGroup>> make_group(const std::string& name, int size) {
  auto rv = std::make_shared<Rendezvous>(size);
  std::vector<c10::intrusive_ptr<c10d::ProcessGroup>> groups;
  for (int r = 0; r < size; ++r) {
    auto group = c10::make_intrusive<c10d::ProcessGroup>(r, size);
    auto backend = c10::make_intrusive<SumBackend>(rv, r);
    group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM, backend);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
    c10d::register_process_group(name + std::to_string(r), group);
    groups.push_back(group);
  }
  return groups;
}

GradientReducer reducer_for(const std::string& group, int rank,
                            std::vector<std::vector<at::Tensor>> stages) {
  std::vector<TensorsFn> fns;
  for (auto& params : stages) {
    fns.push_back([params] { return params; });
  }
  return GradientReducer(group + std::to_string(rank), std::move(fns),
                         std::vector<std::optional<c10::Stream>>(stages.size()), at::kCPU,
                         std::chrono::milliseconds(5000), [] { return 0.0; });
}

at::Tensor param(std::vector<int64_t> shape) { return torch::zeros(shape).requires_grad_(); }

// Runs `body(rank)` on one thread per rank; the messages of what each raised, "" if nothing.
std::vector<std::string> on_ranks(int size, const std::function<void(int)>& body) {
  std::vector<std::string> errors(static_cast<size_t>(size));
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (const std::exception& e) {
        errors[r] = e.what();
        if (errors[r].empty()) errors[r] = "(empty message)";
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

TEST(GradientReducer, AveragesInOneOrderWhateverOrderTheStagesFinishIn) {
  auto groups = make_group("order", 2);
  // Stages of different sizes: buckets issued out of order would not match.
  std::vector<std::vector<std::vector<at::Tensor>>> params(2);
  for (int r = 0; r < 2; ++r) {
    params[r] = {{param({3, 2}), param({2})}, {param({5})}, {param({4, 4})}};
    for (auto& stage : params[r]) {
      for (auto& p : stage) p.mutable_grad() = torch::full(p.sizes(), r == 0 ? 1.0 : 3.0);
    }
  }
  auto errors = on_ranks(2, [&](int r) {
    auto reducer = reducer_for("order", r, params[r]);
    auto reduction = reducer.begin();
    const std::vector<int> finished =
        r == 0 ? std::vector<int>{0, 1, 2} : std::vector<int>{2, 0, 1};
    for (int s : finished) reduction->stage_ready(s);
    reduction->finish(nullptr);
  });
  EXPECT_EQ(errors, std::vector<std::string>(2));
  for (int r = 0; r < 2; ++r) {
    for (auto& stage : params[r]) {
      for (auto& p : stage) EXPECT_TRUE(p.grad().eq(2.0).all().item<bool>());
    }
  }
}

TEST(GradientReducer, AParameterWithoutGradientOnEveryRankKeepsNone) {
  auto groups = make_group("presence", 2);
  std::vector<std::vector<at::Tensor>> params(2);
  for (int r = 0; r < 2; ++r) params[r] = {param({2}), param({2}), param({2})};
  params[0][0].mutable_grad() = torch::full({2}, 4.0);  // rank 0 only
  params[0][1].mutable_grad() = torch::full({2}, 1.0);
  params[1][1].mutable_grad() = torch::full({2}, 3.0);  // both
  auto errors = on_ranks(2, [&](int r) {
    auto reducer = reducer_for("presence", r, {params[r]});
    reducer.begin()->finish(nullptr);
  });
  EXPECT_EQ(errors, std::vector<std::string>(2));
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(params[r][0].grad().defined());
    EXPECT_TRUE(params[r][0].grad().eq(2.0).all().item<bool>());
    EXPECT_TRUE(params[r][1].grad().eq(2.0).all().item<bool>());
    EXPECT_FALSE(params[r][2].grad().defined());
  }
}

TEST(GradientReducer, AParameterSharedByTwoStagesIsReducedOnce) {
  auto groups = make_group("shared", 2);
  std::vector<at::Tensor> shared(2);
  auto errors = on_ranks(2, [&](int r) {
    shared[r] = param({3});
    shared[r].mutable_grad() = torch::full({3}, r == 0 ? 2.0 : 4.0);
    auto reducer = reducer_for("shared", r, {{shared[r]}, {shared[r]}});
    auto reduction = reducer.begin();
    reduction->stage_ready(1);
    reduction->stage_ready(0);
    reduction->finish(nullptr);
  });
  EXPECT_EQ(errors, std::vector<std::string>(2));
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(shared[r].grad().eq(3.0).all().item<bool>());
}

TEST(GradientReducer, AFailedRankMakesEveryRankRaiseAndTheNextStepIsRight) {
  auto groups = make_group("failure", 2);
  std::vector<at::Tensor> p(2);
  for (int r = 0; r < 2; ++r) p[r] = param({2});
  auto errors = on_ranks(2, [&](int r) {
    auto reducer = reducer_for("failure", r, {{p[r]}, {}});
    p[r].mutable_grad() = torch::full({2}, r == 0 ? 1.0 : 5.0);
    auto reduction = reducer.begin();
    if (r == 0) reduction->stage_ready(1);  // the failed rank never gets that far
    bool raised = false;
    try {
      reduction->finish(r == 1 ? std::make_exception_ptr(std::runtime_error("boom on rank 1"))
                               : nullptr);
    } catch (const std::exception& e) {
      raised = true;
      // Not averaged: the gradient is still this rank's own.
      EXPECT_TRUE(p[r].grad().eq(r == 0 ? 1.0 : 5.0).all().item<bool>());
      if (r == 0)
        EXPECT_NE(std::string(e.what()).find("data-parallel rank 1 failed"), std::string::npos)
            << e.what();
      if (r == 1) EXPECT_EQ(std::string(e.what()), "boom on rank 1");
    }
    EXPECT_TRUE(raised) << "rank " << r;
    reduction.reset();  // holds the next step off while it lives
    // The collectives stayed matched: the next step averages.
    reducer.begin()->finish(nullptr);
  });
  EXPECT_EQ(errors, std::vector<std::string>(2));
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(p[r].grad().eq(3.0).all().item<bool>());
}

}  // namespace
}  // namespace shardpipe
