// The CPU op's large outputs in buffers reused from call to call: the training forward's kept
// messages (B*L*F*D values: 30 MB at B=4096, F=39, D=16, L=3), h0 from the field mixing, the
// states, DAGFM+'s z, and the backward's gradients. A training step frees them, and glibc gives a
// block that large back to the system, so that the next step's first writes fault in every page
// again: 7,500 page faults for the messages alone, 10-18 ms on one thread on the VMs we measure,
// several times the forward itself. Here a freed buffer waits for the next request of its size.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace dagfm {

class BufferPool {
 public:
  // Freed buffers kept at most: a training step frees one of each of its sizes (five or six),
  // gradient accumulation or a second model a few more; past this the oldest goes back to the system.
  static constexpr size_t kMaxFreeBuffers = 8;
  // Smaller blocks glibc keeps in its heap, which costs no page faults: they take at::empty.
  static constexpr size_t kMinPooledBytes = size_t(256) << 10;

  // Never destroyed: a tensor released during interpreter shutdown still finds its pool.
  static BufferPool& instance() {
    static BufferPool* pool = new BufferPool();
    return *pool;
  }

  // An uninitialised contiguous CPU tensor; from kMinPooledBytes on, its memory returns here when it
  // is freed.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = size_t(c10::multiply_integers(sizes)) * options.dtype().itemsize();
    if (bytes < kMinPooledBytes) return at::empty(sizes, options.device(at::kCPU));
    auto owner = std::make_shared<c10::DataPtr>(take(bytes));
    if (owner->get() == nullptr) *owner = c10::GetCPUAllocator()->allocate(bytes);
    return at::from_blob(
        owner->get(), sizes, [owner, bytes](void*) { instance().give_back(std::move(*owner), bytes); },
        options.device(at::kCPU));
  }

 private:
  // The most recently freed buffer of exactly this size, or an empty pointer.
  c10::DataPtr take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t k = free_.size(); k-- > 0;) {
      if (free_[k].second != bytes) continue;
      c10::DataPtr data = std::move(free_[k].first);
      free_.erase(free_.begin() + int64_t(k));
      return data;
    }
    return c10::DataPtr();
  }

  void give_back(c10::DataPtr data, size_t bytes) {
    c10::DataPtr evicted;  // freed after the lock is released
    std::lock_guard<std::mutex> lock(mutex_);
    free_.emplace_back(std::move(data), bytes);
    if (free_.size() > kMaxFreeBuffers) {
      evicted = std::move(free_.front().first);
      free_.erase(free_.begin());
    }
  }

  std::mutex mutex_;
  std::vector<std::pair<c10::DataPtr, size_t>> free_;  // oldest first
};

inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return BufferPool::instance().empty(sizes, options);
}

}  // namespace dagfm
