// The executor driven with torch::nn modules, against the same modules run sequentially.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <stdexcept>

#include "shardpipe/pipeline/engine.h"

namespace shardpipe {
namespace {

struct Model {
  std::vector<torch::nn::Sequential> parts;
  explicit Model(int stages) {
    torch::manual_seed(0);
    for (int s = 0; s < stages; ++s) {
      parts.push_back(torch::nn::Sequential(torch::nn::Linear(8, 8), torch::nn::Tanh()));
    }
  }
  torch::Tensor operator()(torch::Tensor x) {
    for (auto& p : parts) x = p->forward(x);
    return x;
  }
  std::vector<StageFn> stages() {
    std::vector<StageFn> fns;
    for (auto& p : parts) {
      fns.push_back([p](const Activations& in, StructurePtr&) mutable -> Activations {
        return {p->forward(in[0])};
      });
    }
    return fns;
  }
  std::vector<torch::Tensor> grads() {
    std::vector<torch::Tensor> out;
    for (auto& p : parts) {
      for (auto& param : p->parameters()) {
        out.push_back(param.grad().clone());
        param.mutable_grad().reset();
      }
    }
    return out;
  }
};

std::shared_ptr<Engine> make_engine(Model& model, int chunks, ScheduleKind kind,
                                    CheckpointMode checkpoint = CheckpointMode::kNever) {
  EngineOptions options;
  options.devices.assign(model.parts.size(), at::kCPU);
  options.chunks = chunks;
  options.schedule = kind;
  options.checkpoint = checkpoint;
  if (kind == ScheduleKind::kInterleaved)
    options.workers = static_cast<int>(model.parts.size()) / 2;
  return Engine::create(model.stages(), options);
}

TEST(Engine, ForwardAndBackwardEqualSequentialExecution) {
  for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB, ScheduleKind::kInterleaved}) {
    for (auto checkpoint :
         {CheckpointMode::kNever, CheckpointMode::kExceptLast, CheckpointMode::kAlways}) {
      Model model(4);
      auto x = torch::randn({10, 8}).requires_grad_(true);
      auto want = model(x);
      want.pow(2).sum().backward();
      auto want_grads = model.grads();
      auto want_x = x.grad().clone();
      x.mutable_grad().reset();

      auto engine = make_engine(model, 3, kind, checkpoint);
      auto out = engine->forward({{x}}, {true}).tensors;
      ASSERT_EQ(out.size(), 1u);
      EXPECT_TRUE(torch::allclose(out[0], want, 1e-5, 1e-6));
      out[0].pow(2).sum().backward();
      auto got = model.grads();
      for (size_t k = 0; k < got.size(); ++k)
        EXPECT_TRUE(torch::allclose(got[k], want_grads[k], 1e-4, 1e-6));
      EXPECT_TRUE(torch::allclose(x.grad(), want_x, 1e-4, 1e-6));
    }
  }
}

TEST(Engine, CallerThreadAndWorkersGiveTheSameBits) {
  // Each stage runs its tasks in its own list's order on either threads, so gradients are
  // accumulated in the same order: bit for bit equal.
  for (auto kind : {ScheduleKind::kGPipe, ScheduleKind::kOneFOneB, ScheduleKind::kInterleaved}) {
    std::vector<torch::Tensor> first;
    for (auto threads : {Threads::kWorkers, Threads::kCaller, Threads::kAuto}) {
      Model model(4);
      auto engine = make_engine(model, 5, kind, CheckpointMode::kExceptLast);
      engine->executor().set_threads(threads);
      torch::manual_seed(1);
      auto x = torch::randn({9, 8});
      for (int step = 0; step < 6; ++step) {  // auto tries both, then keeps one
        engine->forward({{x}}, {true}).tensors[0].pow(2).sum().backward();
      }
      auto got = model.grads();
      if (first.empty()) {
        first = got;
      } else {
        for (size_t k = 0; k < got.size(); ++k) EXPECT_TRUE(torch::equal(got[k], first[k]));
      }
    }
  }
}

TEST(Engine, ForcedThreadsAreTheOnesThatRun) {
  Model model(2);
  auto engine = make_engine(model, 2, ScheduleKind::kGPipe);
  for (auto threads : {Threads::kWorkers, Threads::kCaller}) {
    engine->executor().set_threads(threads);
    torch::NoGradGuard no_grad;
    engine->forward({{torch::randn({4, 8})}}, {true});
    EXPECT_EQ(engine->executor().last_threads(), threads);
  }
  EXPECT_THROW(parse_threads("many"), std::invalid_argument);
}

TEST(Engine, TrainStepWeighsMicroBatchesByTheirShare) {
  Model model(3);
  auto x = torch::randn({7, 8});
  auto target = torch::randn({7, 8});
  auto want = torch::mse_loss(model(x), target);
  want.backward();
  auto want_grads = model.grads();
  auto engine = make_engine(model, 3, ScheduleKind::kOneFOneB);
  LossFn loss = [](const Activations& out, const StructurePtr&, const Activations& t) {
    return torch::mse_loss(out[0], t[0]);
  };
  auto got = engine->train_step({{x}}, {true}, {target}, loss, /*sum_reduction=*/false);
  EXPECT_TRUE(torch::allclose(got, want.detach(), 1e-5, 1e-6));
  auto got_grads = model.grads();
  for (size_t k = 0; k < got_grads.size(); ++k)
    EXPECT_TRUE(torch::allclose(got_grads[k], want_grads[k], 1e-4, 1e-6));
}

TEST(Engine, NoGradKeepsNoGraph) {
  Model model(2);
  auto engine = make_engine(model, 2, ScheduleKind::kGPipe);
  torch::NoGradGuard no_grad;
  auto out = engine->forward({{torch::randn({4, 8})}}, {true}).tensors;
  EXPECT_FALSE(out[0].requires_grad());
}

TEST(Engine, ErrorsReachTheCallerWithTheirTypeAndThePlace) {
  Model model(3);
  auto stages = model.stages();
  int calls = 0;
  stages[1] = [&calls](const Activations& in, StructurePtr&) -> Activations {
    if (++calls == 2) throw std::out_of_range("stage 1 failed");
    return in;
  };
  EngineOptions options;
  options.devices.assign(3, at::kCPU);
  options.chunks = 4;
  auto engine = Engine::create(stages, options);
  EXPECT_THROW(engine->forward({{torch::randn({8, 8})}}, {true}), std::out_of_range);

  stages[1] = [](const Activations& in, StructurePtr&) -> Activations {
    TORCH_CHECK(false, "checked failure");
    return in;
  };
  auto failing = Engine::create(stages, options);
  try {
    failing->forward({{torch::randn({8, 8})}}, {true});
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("stage 1, micro-batch 0 (forward)"), std::string::npos)
        << e.what();
  }
  // The first engine is still usable after its failure.
  calls = 100;
  EXPECT_EQ(engine->forward({{torch::randn({8, 8})}}, {true}).tensors[0].size(0), 8);
}

TEST(Engine, RejectsBadOptions) {
  Model model(2);
  EngineOptions options;
  options.devices.assign(1, at::kCPU);
  EXPECT_THROW(Engine::create(model.stages(), options), c10::ValueError);
  options.devices.assign(2, at::kCPU);
  options.chunks = 0;
  EXPECT_THROW(Engine::create(model.stages(), options), c10::ValueError);
}

}  // namespace
}  // namespace shardpipe
