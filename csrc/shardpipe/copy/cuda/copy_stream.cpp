#include "shardpipe/copy/cuda/copy_stream.h"

#include <c10/core/Event.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <map>
#include <mutex>
#include <optional>

namespace shardpipe::cuda {
namespace {

using DeviceKey = std::pair<int, int>;  // (type, index)

DeviceKey key_of(at::Device d) { return {static_cast<int>(d.type()), d.index()}; }

at::Device normalized(at::Device d) {
  if (d.is_cuda() && !d.has_index()) return at::Device(at::kCUDA, c10::cuda::current_device());
  return d;
}

constexpr int64_t kAlign = 16;

int64_t aligned(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

int64_t nbytes(const at::Tensor& x) { return x.numel() * static_cast<int64_t>(x.element_size()); }

// Result tensors are views of one flat byte buffer on the destination: one allocation and
// one transfer for the whole group.
std::vector<at::Tensor> unflatten(const at::Tensor& flat, const std::vector<at::Tensor>& like,
                                  const std::vector<int64_t>& offsets) {
  std::vector<at::Tensor> out;
  out.reserve(like.size());
  for (size_t k = 0; k < like.size(); ++k) {
    auto bytes = flat.narrow(0, offsets[k], nbytes(like[k]));
    out.push_back(bytes.view(like[k].scalar_type()).view(like[k].sizes()));
  }
  return out;
}

at::Tensor empty_result(const at::Tensor& x, at::Device dst, bool pinned) {
  auto options = x.options().device(dst).pinned_memory(pinned);
  return at::empty_like(x, options, at::MemoryFormat::Preserve);
}

// One (source, destination) group; every tensor of `xs` is on `src`.
std::vector<at::Tensor> copy_group(const std::vector<at::Tensor>& xs, at::Device src,
                                   at::Device dst, bool non_blocking) {
  auto stream = copy_stream(src, dst);
  const bool pinned_result = dst.is_cpu() && non_blocking;

  // The copy may start only once the producer of the source and the last user of the
  // destination memory are done with it.
  for (const auto& device : {src, dst}) {
    if (!device.is_cuda()) continue;
    c10::Event ready(at::kCUDA);
    ready.record(c10::cuda::getCurrentCUDAStream(device.index()));
    ready.block(stream);
  }

  // Packing host sources is a memcpy on the host, which no stream orders: a pinned source
  // may still be the target of an earlier asynchronous copy, so those go one by one.
  bool batch = xs.size() > 1;
  for (const auto& x : xs) {
    batch = batch && x.is_contiguous() && x.numel() > 0 && !(x.is_cpu() && x.is_pinned());
  }

  std::vector<at::Tensor> out;
  std::vector<at::Tensor> keep;  // every tensor the copy stream touches
  if (batch) {
    std::vector<int64_t> offsets;
    int64_t total = 0;
    for (const auto& x : xs) {
      offsets.push_back(total);
      total += aligned(nbytes(x));
    }
    auto byte_options = at::TensorOptions().dtype(at::kByte);
    // Allocated on the destination's current stream, like a plain result would be.
    auto dst_flat = at::empty({total}, byte_options.device(dst).pinned_memory(pinned_result));
    at::Tensor src_flat;
    {
      c10::cuda::CUDAStreamGuard on_copy(stream);
      if (src.is_cuda()) {
        src_flat = at::empty({total}, byte_options.device(src));
        pack_bytes(xs, offsets, src_flat);
      } else {
        // Packing pageable host memory into a pinned buffer is the staging copy anyway.
        src_flat = at::empty({total}, byte_options.pinned_memory(true));
        auto* base = static_cast<uint8_t*>(src_flat.data_ptr());
        for (size_t k = 0; k < xs.size(); ++k)
          std::memcpy(base + offsets[k], xs[k].data_ptr(), nbytes(xs[k]));
      }
      dst_flat.copy_(src_flat, /*non_blocking=*/true);
    }
    keep = {src_flat, dst_flat};
    out = unflatten(dst_flat, xs, offsets);
  } else {
    // Results are allocated on the destination's current stream, before the copy stream
    // becomes current (for host-to-device both streams live on the same device).
    for (const auto& x : xs) out.push_back(empty_result(x, dst, pinned_result));
    c10::cuda::CUDAStreamGuard on_copy(stream);
    for (size_t k = 0; k < xs.size(); ++k) {
      at::Tensor source = xs[k];
      if (src.is_cpu() && !source.is_pinned() && source.numel() > 0) {
        // Pageable memory cannot be copied asynchronously: stage it through pinned memory.
        source = at::empty_like(source, source.options().pinned_memory(true),
                                at::MemoryFormat::Preserve);
        source.copy_(xs[k]);
      }
      out[k].copy_(source, /*non_blocking=*/true);
      keep.push_back(source);
      keep.push_back(out[k]);
    }
  }
  for (const auto& x : xs) {
    if (x.is_cuda()) x.record_stream(stream);
  }
  for (const auto& t : keep) {
    if (t.is_cuda()) t.record_stream(stream);
  }

  c10::Event done(at::kCUDA);
  done.record(stream);
  if (dst.is_cuda()) {
    done.block(c10::cuda::getCurrentCUDAStream(dst.index()));
  } else {
    done.block(c10::cuda::getCurrentCUDAStream(src.index()));
  }
  if (!non_blocking) stream.synchronize();
  return out;
}

}  // namespace

c10::cuda::CUDAStream copy_stream(at::Device src, at::Device dst) {
  static std::mutex mutex;
  static std::map<std::pair<DeviceKey, DeviceKey>, c10::cuda::CUDAStream> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto key = std::make_pair(key_of(src), key_of(dst));
  auto it = streams.find(key);
  if (it == streams.end()) {
    auto driver = src.is_cuda() ? src.index() : dst.index();
    it = streams.emplace(key, c10::cuda::getStreamFromPool(/*isHighPriority=*/false, driver)).first;
  }
  return it->second;
}

std::vector<at::Tensor> copy_to_cuda(at::TensorList xs, at::Device dst, bool non_blocking) {
  dst = normalized(dst);
  std::vector<at::Tensor> out(xs.size());
  std::map<DeviceKey, std::vector<size_t>> groups;
  for (size_t i = 0; i < xs.size(); ++i) {
    if (xs[i].defined()) groups[key_of(xs[i].device())].push_back(i);
  }
  for (const auto& [key, indices] : groups) {
    at::Device src = xs[indices.front()].device();
    std::vector<at::Tensor> group;
    for (auto i : indices) group.push_back(xs[i]);
    std::vector<at::Tensor> moved;
    if (src.is_cpu() && dst.is_cpu()) {
      for (const auto& x : group) {
        auto r = at::empty_like(x, at::MemoryFormat::Preserve);
        moved.push_back(r.copy_(x));
      }
    } else {
      moved = copy_group(group, src, dst, non_blocking);
    }
    for (size_t k = 0; k < indices.size(); ++k) out[indices[k]] = moved[k];
  }
  return out;
}

}  // namespace shardpipe::cuda
