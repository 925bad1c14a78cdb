// A small cache of large CPU output buffers.
//
// A fresh large CPU tensor is mmap'ed by malloc and its first write page-faults on every page,
// which costs more than the kernel itself at the largest reference shape (figures: "Sizes and
// figures of the kernels" in benchmarks/README.md). The cache hands out a buffer again once nobody
// else holds its storage (storage use count 1: only the cache), so a gradient that autograd still
// keeps, or that a caller saved, is never overwritten. Only buffers of at least kMinCachedBytes
// are kept, and one is reused only for a tensor of at least 1 / kMaxOversize of its size: a small
// gradient on a large buffer would pin all of it (and torch.save would write all of it).
#pragma once

#include <ATen/ATen.h>

#include <mutex>
#include <vector>

namespace ofakd {

class ReusableBuffers {
 public:
  static constexpr int64_t kMinCachedBytes = 1 << 20;
  static constexpr size_t kMaxCached = 4;
  static constexpr int64_t kMaxOversize = 2;  // a reused buffer is at most this many times the tensor

  // An uninitialised contiguous CPU tensor of `sizes` and `dtype`, possibly reused.
  static at::Tensor empty(at::IntArrayRef sizes, at::ScalarType dtype) {
    auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
    const int64_t nbytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
    if (nbytes < kMinCachedBytes) return at::empty(sizes, options);
    auto& self = instance();
    std::lock_guard<std::mutex> lock(self.mutex_);
    for (auto& cached : self.buffers_) {
      if (cached.storage().use_count() == 1 && fits(static_cast<int64_t>(cached.storage().nbytes()), nbytes)) {
        // A new tensor on the cached storage: its own version counter, no autograd history.
        return at::empty({0}, options).set_(cached.storage(), 0, sizes);
      }
    }
    auto fresh = at::empty({nbytes}, options.dtype(at::kByte));
    if (self.buffers_.size() >= kMaxCached) self.evict_one_idle();
    if (self.buffers_.size() < kMaxCached) self.buffers_.push_back(fresh);
    return at::empty({0}, options).set_(fresh.storage(), 0, sizes);
  }

  // Frees every buffer that is not in use; returns how many bytes were released.
  static int64_t release() {
    auto& self = instance();
    std::lock_guard<std::mutex> lock(self.mutex_);
    int64_t released = 0;
    std::vector<at::Tensor> kept;
    for (auto& cached : self.buffers_) {
      if (cached.storage().use_count() == 1) {
        released += static_cast<int64_t>(cached.storage().nbytes());
      } else {
        kept.push_back(cached);
      }
    }
    self.buffers_ = std::move(kept);
    return released;
  }

 private:
  // A buffer of `buffer_bytes` can hold a tensor of `nbytes` without pinning much more than it.
  static bool fits(int64_t buffer_bytes, int64_t nbytes) {
    return buffer_bytes >= nbytes && buffer_bytes <= kMaxOversize * nbytes;
  }

  static ReusableBuffers& instance() {
    static ReusableBuffers buffers;
    return buffers;
  }

  void evict_one_idle() {
    for (auto it = buffers_.begin(); it != buffers_.end(); ++it) {
      if (it->storage().use_count() == 1) {
        buffers_.erase(it);
        return;
      }
    }
  }

  std::mutex mutex_;
  std::vector<at::Tensor> buffers_;
};

}  // namespace ofakd
