#include "shardpipe/pipeline/stage_stream.h"

#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

namespace shardpipe {

std::optional<c10::Stream> pool_stream(at::Device device) {
  if (device.is_cpu()) return std::nullopt;
  c10::impl::VirtualGuardImpl impl(device.type());
  return impl.getStreamFromGlobalPool(device, /*isHighPriority=*/false);
}

std::optional<c10::Stream> current_stream(at::Device device) {
  if (device.is_cpu()) return std::nullopt;
  c10::impl::VirtualGuardImpl impl(device.type());
  if (!device.has_index()) device = impl.getDevice();
  return impl.getStream(device);
}

void wait_stream(const std::optional<c10::Stream>& consumer,
                 const std::optional<c10::Stream>& producer) {
  if (!consumer || !producer || *consumer == *producer) return;
  c10::Event event(producer->device_type());
  event.record(*producer);
  event.block(*consumer);
}

void record_on(const std::vector<at::Tensor>& tensors, const std::optional<c10::Stream>& stream) {
  if (!stream) return;
  for (const auto& t : tensors) {
    if (t.defined() && t.device() == stream->device()) t.record_stream(*stream);
  }
}

StreamsGuard::StreamsGuard(std::initializer_list<std::optional<c10::Stream>> streams) {
  for (const auto& s : streams) {
    if (!s) continue;
    c10::impl::VirtualGuardImpl impl(s->device_type());
    previous_.push_back(impl.exchangeStream(*s));
  }
}

StreamsGuard::~StreamsGuard() {
  for (auto it = previous_.rbegin(); it != previous_.rend(); ++it) {
    c10::impl::VirtualGuardImpl impl(it->device_type());
    impl.exchangeStream(*it);
  }
}

}  // namespace shardpipe
