// GoogleTest of shardpipe's copy entry points (csrc/shardpipe/copy.h) on the CPU, through
// the dispatcher, against Tensor::to computed in the same test.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "../common/error_of.h"
#include "shardpipe/copy/copy.h"

namespace {

using shardpipe_test::error_of;

const at::Device kCpu(at::kCPU);

// What x.to(device) gives when a copy is forced: the reference for values and strides.
at::Tensor reference(const at::Tensor& x, at::Device device) {
  return x.to(x.options().device(device), /*non_blocking=*/false, /*copy=*/true);
}

void expect_same_copy(const at::Tensor& got, const at::Tensor& x, at::Device device) {
  auto want = reference(x, device);
  ASSERT_TRUE(got.defined());
  EXPECT_EQ(got.device(), want.device());
  EXPECT_EQ(got.scalar_type(), want.scalar_type());
  EXPECT_EQ(got.sizes(), want.sizes());
  EXPECT_EQ(got.strides(), want.strides());
  EXPECT_TRUE(torch::equal(got, want));
  if (x.numel() > 0) {
    // A copy, never a view of the input, even when the device does not change.
    EXPECT_NE(got.data_ptr(), x.data_ptr());
  }
}

TEST(CopyTo, IsRegisteredWithTheDispatcher) {
  auto op = c10::Dispatcher::singleton().findSchema({"shardpipe::copy_to", ""});
  ASSERT_TRUE(op.has_value());
  EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::CPU) ||
              op->hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd));
  EXPECT_TRUE(op->hasKernelForDispatchKey(c10::DispatchKey::Autograd));
}

TEST(CopyTo, ValuesEqualToForEveryDtype) {
  torch::manual_seed(0);
  auto base = torch::randn({5, 7}) * 100;
  std::vector<at::Tensor> xs = {base, base.to(torch::kDouble), base.to(torch::kBFloat16),
                                base.to(torch::kLong), base > 0};
  auto out = shardpipe::copy_to(xs, kCpu);
  ASSERT_EQ(out.size(), xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    SCOPED_TRACE(c10::toString(xs[i].scalar_type()));
    expect_same_copy(out[i], xs[i], kCpu);
  }
}

TEST(CopyTo, KernelBelowAutogradGivesTheSameValues) {
  torch::manual_seed(1);
  std::vector<at::Tensor> xs = {torch::randn({3, 4}), torch::randint(0, 9, {6}, torch::kLong)};
  auto out = shardpipe::copy_to_kernel(xs, kCpu, /*non_blocking=*/true);
  ASSERT_EQ(out.size(), xs.size());
  for (size_t i = 0; i < xs.size(); ++i) expect_same_copy(out[i], xs[i], kCpu);
}

TEST(CopyTo, NonContiguousInputsKeepTheirLayoutLikeTo) {
  torch::manual_seed(2);
  auto x = torch::randn({4, 6, 5});
  std::vector<at::Tensor> xs = {
      x.transpose(0, 2),                                         // dense, permuted
      x.slice(/*dim=*/1, /*start=*/0, /*end=*/6, /*step=*/2),    // strided gaps
      x.select(2, 3),                                            // a view with an offset
      torch::randn({3, 1}).expand({3, 4}),                       // stride 0
      x.contiguous(at::MemoryFormat::Contiguous).unsqueeze(0)};  // plain, for comparison
  auto out = shardpipe::copy_to(xs, kCpu);
  for (size_t i = 0; i < xs.size(); ++i) {
    SCOPED_TRACE(i);
    expect_same_copy(out[i], xs[i], kCpu);
  }
}

TEST(CopyTo, EmptyTensors) {
  std::vector<at::Tensor> xs = {torch::empty({0}), torch::empty({3, 0, 2}, torch::kLong),
                                torch::empty({0}, torch::kBool)};
  auto out = shardpipe::copy_to(xs, kCpu);
  ASSERT_EQ(out.size(), xs.size());
  for (size_t i = 0; i < xs.size(); ++i) expect_same_copy(out[i], xs[i], kCpu);
  EXPECT_TRUE(shardpipe::copy_to({}, kCpu).empty());
}

TEST(CopyTo, UndefinedStaysUndefined) {
  auto x = torch::arange(6);
  auto out = shardpipe::copy_to({at::Tensor(), x, at::Tensor()}, kCpu);
  ASSERT_EQ(out.size(), 3u);
  EXPECT_FALSE(out[0].defined());
  expect_same_copy(out[1], x, kCpu);
  EXPECT_FALSE(out[2].defined());
}

TEST(CopyTo, GradientIsMovedBack) {
  torch::manual_seed(3);
  auto a = torch::randn({4, 3}, torch::requires_grad());
  auto b = torch::randn({5}, torch::dtype(torch::kDouble).requires_grad(true));
  // Without grad: they stay out of the graph, like with Tensor::to.
  auto c = torch::randn({2});
  auto d = torch::arange(3);
  auto out = shardpipe::copy_to({a, c, b, d}, kCpu);
  EXPECT_FALSE(out[1].requires_grad());
  EXPECT_FALSE(out[3].requires_grad());
  out = {out[0], out[2]};
  ASSERT_TRUE(out[0].requires_grad());
  ASSERT_TRUE(out[1].requires_grad());

  auto wa = torch::randn({4, 3});
  auto wb = torch::randn({5}, torch::kDouble);
  ((out[0] * wa).sum() + (out[1] * wb).sum()).backward();

  // The baseline: the same loss through Tensor::to.
  auto a2 = a.detach().clone().requires_grad_(true);
  auto b2 = b.detach().clone().requires_grad_(true);
  ((reference(a2, kCpu) * wa).sum() + (reference(b2, kCpu) * wb).sum()).backward();
  EXPECT_TRUE(torch::equal(a.grad(), a2.grad()));
  EXPECT_TRUE(torch::equal(b.grad(), b2.grad()));
  EXPECT_EQ(b.grad().scalar_type(), torch::kDouble);
}

TEST(CopyTo, UnusedOutputGivesNoGradient) {
  auto a = torch::randn({3}, torch::requires_grad());
  auto b = torch::randn({3}, torch::requires_grad());
  auto out = shardpipe::copy_to({a, b}, kCpu);
  out[0].sum().backward();
  EXPECT_TRUE(torch::equal(a.grad(), torch::ones({3})));
  EXPECT_FALSE(b.grad().defined());
}

TEST(CopyTo, RejectsDevicesOtherThanCpuAndCuda) {
  auto x = torch::randn({3});
  auto to_meta = error_of([&] { shardpipe::copy_to({x}, at::Device(at::kMeta)); });
  EXPECT_NE(to_meta.find("device must be a CPU or CUDA device"), std::string::npos) << to_meta;

  auto from_meta = error_of([&] {
    shardpipe::copy_to_kernel({torch::empty({3}, torch::kMeta)}, kCpu, /*non_blocking=*/true);
  });
  EXPECT_NE(from_meta.find("only CPU and CUDA tensors"), std::string::npos) << from_meta;
}

TEST(CopyTo, ToCudaEqualsTo) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(4);
  std::vector<at::Tensor> xs = {torch::randn({64, 33}), torch::arange(100),
                                torch::randn({8, 9}).t()};
  at::Device cuda(at::kCUDA, 0);
  auto there = shardpipe::copy_to(xs, cuda, /*non_blocking=*/false);
  auto back = shardpipe::copy_to(there, kCpu, /*non_blocking=*/false);
  for (size_t i = 0; i < xs.size(); ++i) {
    EXPECT_EQ(there[i].device(), cuda);
    EXPECT_TRUE(torch::equal(there[i].cpu(), xs[i]));
    EXPECT_TRUE(torch::equal(back[i], xs[i]));
  }
}

}  // namespace
