#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

namespace shardpipe::cuda {

// The stream that carries copies from `src` to `dst` (one per ordered device pair, taken
// once from c10's pool). It lives on the CUDA device of the pair that drives the copy: the
// source for device-to-device and device-to-host, the destination for host-to-device.
c10::cuda::CUDAStream copy_stream(at::Device src, at::Device dst);

// copy_to for lists that involve a CUDA device. Ordering: the copy stream waits on the
// source's and the destination's current streams; the destination's current stream (the
// source's, for a copy to the host) waits on the copy. Sources and results are recorded on
// the copy stream so the caching allocator does not reuse them while the copy runs.
std::vector<at::Tensor> copy_to_cuda(at::TensorList xs, at::Device dst, bool non_blocking);

// Packs the bytes of contiguous CUDA tensors (all on flat's device) into `flat` at
// `offsets`, in one kernel launch per 64 tensors, on the current stream. Defined in pack.cu.
void pack_bytes(const std::vector<at::Tensor>& srcs, const std::vector<int64_t>& offsets,
                at::Tensor& flat);

}  // namespace shardpipe::cuda
