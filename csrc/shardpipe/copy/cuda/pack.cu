#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "shardpipe/copy/cuda/copy_stream.h"

namespace shardpipe::cuda {
namespace {

constexpr int kMaxTensorsPerLaunch = 64;

// Passed by value as a kernel parameter (about 1.5 KiB, well under the 4 KiB limit), so a
// launch needs no table upload of its own.
struct PackTable {
  const uint8_t* src[kMaxTensorsPerLaunch];
  int64_t offset[kMaxTensorsPerLaunch];
  int64_t nbytes[kMaxTensorsPerLaunch];
};

__global__ void pack_kernel(PackTable table, uint8_t* flat) {
  const int t = blockIdx.y;
  const uint8_t* src = table.src[t];
  uint8_t* dst = flat + table.offset[t];
  const int64_t n = table.nbytes[t];
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Offsets in `flat` are 16-byte aligned; the source usually is too (allocator blocks are),
  // then whole 16-byte words move at once and only the tail goes byte by byte.
  int64_t vec_bytes = 0;
  if (reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    vec_bytes = n / 16 * 16;
    const int4* s = reinterpret_cast<const int4*>(src);
    int4* d = reinterpret_cast<int4*>(dst);
    for (int64_t i = first; i < vec_bytes / 16; i += stride) d[i] = s[i];
  }
  for (int64_t i = vec_bytes + first; i < n; i += stride) dst[i] = src[i];
}

}  // namespace

void pack_bytes(const std::vector<at::Tensor>& srcs, const std::vector<int64_t>& offsets,
                at::Tensor& flat) {
  TORCH_CHECK(srcs.size() == offsets.size(), "pack_bytes: ", srcs.size(), " tensors but ",
              offsets.size(), " offsets");
  c10::cuda::CUDAGuard guard(flat.device());
  auto stream = c10::cuda::getCurrentCUDAStream(flat.device().index());
  auto* base = static_cast<uint8_t*>(flat.data_ptr());
  for (size_t first = 0; first < srcs.size(); first += kMaxTensorsPerLaunch) {
    size_t count = std::min<size_t>(kMaxTensorsPerLaunch, srcs.size() - first);
    PackTable table{};
    int64_t largest = 0;
    for (size_t k = 0; k < count; ++k) {
      const auto& x = srcs[first + k];
      TORCH_CHECK(x.is_cuda() && x.device() == flat.device() && x.is_contiguous(),
                  "pack_bytes: tensor ", first + k, " must be contiguous on ", flat.device());
      table.src[k] = static_cast<const uint8_t*>(x.data_ptr());
      table.offset[k] = offsets[first + k];
      table.nbytes[k] = x.numel() * static_cast<int64_t>(x.element_size());
      largest = std::max(largest, table.nbytes[k]);
    }
    if (largest == 0) continue;
    constexpr int kThreads = 256;
    int64_t words = (largest + 15) / 16;
    int blocks = static_cast<int>(std::min<int64_t>((words + kThreads - 1) / kThreads, 1024));
    dim3 grid(blocks, static_cast<unsigned>(count));
    pack_kernel<<<grid, kThreads, 0, stream.stream()>>>(table, base);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace shardpipe::cuda
