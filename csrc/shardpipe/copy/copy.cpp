#include "shardpipe/copy/copy.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <map>

#ifdef SHARDPIPE_WITH_CUDA
#include "shardpipe/copy/cuda/copy_stream.h"
#endif

namespace shardpipe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor copy_one_host(const at::Tensor& x, at::Device device) {
  auto out = at::empty_like(x, x.options().device(device), at::MemoryFormat::Preserve);
  out.copy_(x);
  return out;
}

const auto& copy_to_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("shardpipe::copy_to", "")
                       .typed<std::vector<at::Tensor>(at::TensorList, at::Device, bool)>();
  return op;
}

// Autograd for the list operator: the gradient of each output goes back to the device its
// input came from, again as one batched copy per device.
class CopyToFunction : public torch::autograd::Function<CopyToFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList xs, at::Device device,
                               bool non_blocking) {
    // Source devices as (type, index) pairs: IValue has no list-of-devices form.
    std::vector<int64_t> types, indices;
    for (const auto& x : xs) {
      types.push_back(x.defined() ? static_cast<int64_t>(x.device().type()) : -1);
      indices.push_back(x.defined() ? x.device().index() : -1);
    }
    ctx->saved_data["source_types"] = types;
    ctx->saved_data["source_indices"] = indices;
    ctx->saved_data["non_blocking"] = non_blocking;
    // Like Tensor::to: an unused output sends no gradient back (no zeros to copy), and an
    // output whose input needs no gradient does not require one either.
    ctx->set_materialize_grads(false);
    variable_list out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = copy_to_op().call(xs, device, non_blocking);
    }
    variable_list no_grad;  // one call: each mark_non_differentiable replaces the last
    for (size_t i = 0; i < xs.size(); ++i) {
      if (!xs[i].requires_grad()) no_grad.push_back(out[i]);
    }
    ctx->mark_non_differentiable(no_grad);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto types = ctx->saved_data["source_types"].toIntVector();
    auto indices = ctx->saved_data["source_indices"].toIntVector();
    bool non_blocking = ctx->saved_data["non_blocking"].toBool();
    variable_list result(grads.size() + 2);
    // One batched copy per source device.
    std::map<std::pair<int64_t, int64_t>, std::vector<size_t>> by_source;
    for (size_t i = 0; i < grads.size(); ++i) {
      if (grads[i].defined()) by_source[{types[i], indices[i]}].push_back(i);
    }
    for (const auto& [source, members] : by_source) {
      std::vector<at::Tensor> group;
      for (auto i : members) group.push_back(grads[i]);
      at::Device device(static_cast<at::DeviceType>(source.first),
                        static_cast<at::DeviceIndex>(source.second));
      // The caller may read a CPU tensor's .grad as soon as backward() returns, and no
      // stream orders the host: a gradient going back to the CPU is copied blocking, as
      // Tensor::to's backward does.
      auto moved = copy_to_op().call(group, device, non_blocking && !device.is_cpu());
      for (size_t k = 0; k < members.size(); ++k) result[members[k]] = moved[k];
    }
    return result;
  }
};

std::vector<at::Tensor> copy_to_autograd(at::TensorList xs, at::Device device, bool non_blocking) {
  // autograd::Function cannot take undefined inputs, so only the defined tensors go
  // through it; the undefined ones stay undefined in their places.
  std::vector<at::Tensor> defined;
  std::vector<size_t> where;
  for (size_t i = 0; i < xs.size(); ++i) {
    if (xs[i].defined()) {
      defined.push_back(xs[i]);
      where.push_back(i);
    }
  }
  // A TensorList (not a vector) is what autograd::Function counts as differentiable inputs.
  auto moved = CopyToFunction::apply(at::TensorList(defined), device, non_blocking);
  std::vector<at::Tensor> out(xs.size());
  for (size_t k = 0; k < where.size(); ++k) out[where[k]] = moved[k];
  return out;
}

}  // namespace

std::vector<at::Tensor> copy_to(at::TensorList xs, at::Device device, bool non_blocking) {
  return copy_to_op().call(xs, device, non_blocking);
}

std::vector<at::Tensor> copy_to_kernel(at::TensorList xs, at::Device device, bool non_blocking) {
  TORCH_CHECK(device.is_cpu() || device.is_cuda(),
              "copy_to: device must be a CPU or CUDA device, got ", device);
  std::vector<at::Tensor> out(xs.size());
  bool any_cuda = device.is_cuda();
  for (size_t i = 0; i < xs.size(); ++i) {
    if (!xs[i].defined()) continue;
    TORCH_CHECK(xs[i].device().is_cpu() || xs[i].device().is_cuda(), "copy_to: tensor ", i,
                " is on ", xs[i].device(), "; only CPU and CUDA tensors can be copied");
    any_cuda = any_cuda || xs[i].is_cuda();
  }
  if (!any_cuda) {
    for (size_t i = 0; i < xs.size(); ++i) {
      if (xs[i].defined()) out[i] = copy_one_host(xs[i], device);
    }
    return out;
  }
#ifdef SHARDPIPE_WITH_CUDA
  return cuda::copy_to_cuda(xs, device, non_blocking);
#else
  TORCH_CHECK(false, "copy_to: shardpipe was built without CUDA support, so it cannot copy to ",
              device, "; rebuild with SHARDPIPE_WITH_CUDA=1");
#endif
}

TORCH_LIBRARY_IMPL(shardpipe, CompositeExplicitAutograd, m) { m.impl("copy_to", &copy_to_kernel); }

TORCH_LIBRARY_IMPL(shardpipe, Autograd, m) { m.impl("copy_to", &copy_to_autograd); }

}  // namespace shardpipe
