// B then W against one whole backward of the same graph, with libtorch alone.
#include <ATen/record_function.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <functional>

#include "shardpipe/pipeline/autograd.h"
#include "shardpipe/pipeline/backward_split.h"

namespace shardpipe {
namespace {

using Stage = std::function<torch::Tensor(torch::Tensor)>;

struct Result {
  torch::Tensor input_grad;
  std::vector<torch::Tensor> param_grads;
};

std::vector<torch::Tensor> take_grads(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> out;
  for (auto p : params) {
    out.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
    p.mutable_grad().reset();
  }
  return out;
}

// One whole backward, as the unsplit schedules run it.
Result whole(const Stage& stage, const std::vector<torch::Tensor>& params, torch::Tensor x,
             torch::Tensor grad) {
  auto input = x.detach().requires_grad_(true);
  auto out = stage(input);
  out.backward(grad);
  return {input.grad(), take_grads(params)};
}

// B, then W; `between` runs in between, after the stage's own references are gone.
Result split(
    const Stage& stage, const std::vector<torch::Tensor>& params, torch::Tensor x,
    torch::Tensor grad, bool input_wants_grad = true,
    const std::function<void()>& between = [] {}) {
  WeightGradients later;
  std::vector<torch::Tensor> input_grads;
  {
    auto input = x.detach();
    std::vector<NodePtr> sinks{nullptr};
    if (input_wants_grad) sinks[0] = attach_gradient_sink(input);
    auto out = stage(input);
    input_grads = backward_inputs({out}, {grad}, sinks, later);
  }
  for (const auto& p : params) EXPECT_FALSE(p.grad().defined()) << "B accumulated a weight";
  between();
  backward_weights(later);
  EXPECT_TRUE(later.roots.empty());
  return {input_grads[0], take_grads(params)};
}

void expect_same(const Result& got, const Result& want) {
  ASSERT_EQ(got.input_grad.defined(), want.input_grad.defined());
  if (want.input_grad.defined()) EXPECT_TRUE(torch::allclose(got.input_grad, want.input_grad));
  ASSERT_EQ(got.param_grads.size(), want.param_grads.size());
  for (size_t k = 0; k < want.param_grads.size(); ++k) {
    ASSERT_EQ(got.param_grads[k].defined(), want.param_grads[k].defined()) << "parameter " << k;
    if (want.param_grads[k].defined())
      EXPECT_TRUE(torch::allclose(got.param_grads[k], want.param_grads[k], 1e-5, 1e-6))
          << "parameter " << k;
  }
}

std::vector<torch::Tensor> params_of(const std::vector<torch::nn::Module*>& modules) {
  std::vector<torch::Tensor> out;
  for (auto* m : modules) {
    for (auto& p : m->parameters()) out.push_back(p);
  }
  return out;
}

TEST(BackwardSplit, EqualsOneBackwardWithAWeightUsedTwice) {
  torch::manual_seed(0);
  torch::nn::Linear shared(6, 6), head(6, 3);
  auto params = params_of({shared.get(), head.get()});
  Stage stage = [&](torch::Tensor x) { return head(torch::tanh(shared(torch::tanh(shared(x))))); };
  auto x = torch::randn({5, 6}), grad = torch::randn({5, 3});
  expect_same(split(stage, params, x, grad), whole(stage, params, x, grad));
}

TEST(BackwardSplit, EqualsOneBackwardWithSeveralOutputsAndBatchNorm) {
  torch::manual_seed(1);
  torch::nn::Linear wide(4, 8);
  torch::nn::BatchNorm1d norm(4);
  auto params = params_of({wide.get(), norm.get()});
  Stage stage = [&](torch::Tensor x) {
    auto halves = wide(x).chunk(2, 1);  // one node, two outputs, both behind a weight
    auto w = wide->weight.t();          // a weight's view used directly, and in the Linear
    return norm(halves[0] * torch::sigmoid(halves[1])) + x.mm(w.narrow(1, 0, 4));
  };
  auto x = torch::randn({7, 4}), grad = torch::randn({7, 4});
  expect_same(split(stage, params, x, grad), whole(stage, params, x, grad));
}

TEST(BackwardSplit, AStageWhoseInputWantsNoGradientIsAllWeight) {
  torch::manual_seed(2);
  torch::nn::Linear a(4, 4), b(4, 2);
  auto params = params_of({a.get(), b.get()});
  Stage stage = [&](torch::Tensor x) { return b(torch::relu(a(x))); };
  auto x = torch::randn({3, 4}), grad = torch::randn({3, 2});
  auto got = split(stage, params, x, grad, /*input_wants_grad=*/false);
  EXPECT_FALSE(got.input_grad.defined());
  got.input_grad = torch::Tensor();
  auto want = whole(stage, params, x, grad);
  want.input_grad = torch::Tensor();
  expect_same(got, want);
  // An output made of parameters alone goes to W whole.
  auto w = a->weight;
  auto g = torch::randn({4});
  auto only_weights = split([&](torch::Tensor) { return (w * w).sum(1); }, {w}, x, g);
  EXPECT_TRUE(torch::allclose(only_weights.param_grads[0], 2 * w * g.unsqueeze(1)));
}

// Matrix products run in each half: B only the input gradients', W only the weights'.
TEST(BackwardSplit, NoWeightGradientMatmulRunsInB) {
  torch::manual_seed(3);
  torch::nn::Linear a(16, 16), b(16, 16);
  auto params = params_of({a.get(), b.get()});
  static std::atomic<int> matmuls{0};
  auto handle =
      at::addGlobalCallback(at::RecordFunctionCallback([](const at::RecordFunction& fn)
                                                           -> std::unique_ptr<at::ObserverContext> {
                              const std::string name = fn.name();
                              if (name == "aten::mm" || name == "aten::addmm") matmuls++;
                              return nullptr;
                            }).scopes({at::RecordScope::FUNCTION}));
  auto x = torch::randn({4, 16}), grad = torch::randn({4, 16});
  int in_b = -1;
  auto input = x.detach();
  std::vector<NodePtr> sinks{attach_gradient_sink(input)};
  auto out = b(torch::tanh(a(input)));
  WeightGradients later;
  matmuls = 0;
  backward_inputs({out}, {grad}, sinks, later);
  in_b = matmuls.exchange(0);
  backward_weights(later);
  const int in_w = matmuls.exchange(0);
  at::removeCallback(handle);
  EXPECT_EQ(in_b, 2);  // dL/dx through b, then through a
  EXPECT_EQ(in_w, 2);  // dL/dW of a and of b
  for (const auto& p : params) EXPECT_TRUE(p.grad().defined());
}

// What only B needed is freed when B ends; what W needs (a Linear's input) lives until W.
TEST(BackwardSplit, KeepsOnlyWhatWNeedsBetweenBAndW) {
  torch::manual_seed(4);
  torch::nn::Linear a(8, 8), b(8, 8);
  auto params = params_of({a.get(), b.get()});
  c10::weak_intrusive_ptr<c10::StorageImpl> gelu_input(c10::intrusive_ptr<c10::StorageImpl>{});
  c10::weak_intrusive_ptr<c10::StorageImpl> b_input(c10::intrusive_ptr<c10::StorageImpl>{});
  Stage stage = [&](torch::Tensor x) {
    auto h = a(x);            // saved only by GELU's node: needed by B alone
    auto g = torch::gelu(h);  // saved by b's AddmmBackward: W needs it for b's weight
    gelu_input = h.storage().getWeakStorageImpl();
    b_input = g.storage().getWeakStorageImpl();
    return b(g);
  };
  auto x = torch::randn({4, 8}), grad = torch::randn({4, 8});
  auto got = split(stage, params, x, grad, true, [&] {
    EXPECT_TRUE(gelu_input.expired()) << "B kept what only B needed";
    EXPECT_FALSE(b_input.expired()) << "B freed what W needs";
  });
  EXPECT_TRUE(b_input.expired()) << "W kept the graph";
  expect_same(got, whole(stage, params, x, grad));
}

}  // namespace
}  // namespace shardpipe
