#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace shardpipe {

// Copies every tensor of `xs` to `device` through the dispatcher (differentiable: the
// gradient is moved back to each tensor's own device). Undefined tensors stay undefined.
// Equal bit for bit to `x.to(device)`; a tensor already on `device` is still copied, so the
// result never aliases the input.
std::vector<at::Tensor> copy_to(at::TensorList xs, at::Device device, bool non_blocking = true);

// The copy itself, below autograd. Tensors that share a (source, destination) pair of CUDA
// devices travel as one packed transfer.
std::vector<at::Tensor> copy_to_kernel(at::TensorList xs, at::Device device, bool non_blocking);

}  // namespace shardpipe
