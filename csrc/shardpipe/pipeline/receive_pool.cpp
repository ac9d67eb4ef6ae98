#include "shardpipe/pipeline/receive_pool.h"

#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <utility>

namespace shardpipe {

struct ReceivePool::State {
  mutable std::mutex mutex;
  std::multimap<size_t, c10::DataPtr> cached;  // by block size
  size_t cached_bytes = 0;
  size_t out_bytes = 0;
  size_t high_water = 0;
  bool closed = false;

  // A tensor's block comes back: kept while what is kept stays within the high-water mark.
  void put_back(c10::DataPtr block, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    out_bytes -= bytes;
    if (closed || cached_bytes + bytes > high_water) return;  // `block` frees on return
    cached_bytes += bytes;
    cached.emplace(bytes, std::move(block));
  }
};

namespace {

// A block lent to one tensor; its deleter brings it back.
struct Lease {
  std::shared_ptr<ReceivePool::State> state;
  c10::DataPtr block;
  size_t bytes;
};

}  // namespace

ReceivePool::ReceivePool() : state_(std::make_shared<State>()) {}

ReceivePool::~ReceivePool() { close(); }

at::Tensor ReceivePool::empty(at::IntArrayRef shape, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype);
  const size_t wanted = static_cast<size_t>(c10::multiply_integers(shape)) * at::elementSize(dtype);
  if (wanted < kMinBytes) return at::empty(shape, options);
  auto lease = std::make_shared<Lease>();
  lease->state = state_;
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    // The smallest kept block that fits, unless it would waste over a quarter of itself:
    // shapes that shrink a little (a shorter sequence) still reuse last step's blocks.
    auto found = state_->cached.lower_bound(wanted);
    if (found != state_->cached.end() && found->first - wanted <= found->first / 4) {
      lease->bytes = found->first;
      lease->block = std::move(found->second);
      state_->cached_bytes -= found->first;
      state_->cached.erase(found);
    }
  }
  if (!lease->block) {
    lease->bytes = wanted;
    lease->block = c10::GetCPUAllocator()->allocate(wanted);
  }
  {
    std::lock_guard<std::mutex> lock(state_->mutex);
    state_->out_bytes += lease->bytes;
    state_->high_water = std::max(state_->high_water, state_->out_bytes);
  }
  void* data = lease->block.get();
  return at::from_blob(
      data, shape,
      [lease](void*) { lease->state->put_back(std::move(lease->block), lease->bytes); }, options);
}

void ReceivePool::close() {
  std::multimap<size_t, c10::DataPtr> freed;
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->closed = true;
  state_->cached_bytes = 0;
  freed.swap(state_->cached);
}

size_t ReceivePool::cached_bytes() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->cached_bytes;
}

size_t ReceivePool::high_water_bytes() const {
  std::lock_guard<std::mutex> lock(state_->mutex);
  return state_->high_water;
}

}  // namespace shardpipe
