// The CUDA kernels of the fused OFA loss: device memory accesses, block reductions and the
// __global__ entries around the row programs of ofa_loss_cuda_row.cuh (dense teacher) and
// ofa_loss_cuda_sparse_row.cuh (sparse teacher); how they are launched: ofa_loss_cuda_launch.h. No ATen here, so the device code can be compiled (and its register use
// inspected with -Xptxas -v) on its own.
#pragma once

#include <cstring>

#include "ofa_loss_cuda_sparse_row.cuh"

namespace ofakd {
namespace cuda_kernel {

// 16-byte and element accesses of global memory, with cache hints for the streaming passes.
struct DeviceMemory {
  template <typename T>
  __device__ __forceinline__ Pack<T> load_pack(const T* ptr, bool last_use) const {
    const uint4* src = reinterpret_cast<const uint4*>(ptr);
    const uint4 bits = last_use ? __ldcs(src) : __ldg(src);
    Pack<T> pack;
    memcpy(&pack, &bits, sizeof(bits));
    return pack;
  }
  template <typename T>
  __device__ __forceinline__ T load_one(const T* ptr) const {
    return *ptr;
  }
  template <typename T>
  __device__ __forceinline__ void store_pack(T* ptr, const Pack<T>& pack) const {
    uint4 bits;
    memcpy(&bits, &pack, sizeof(bits));
    __stcs(reinterpret_cast<uint4*>(ptr), bits);
  }
  template <typename T>
  __device__ __forceinline__ void store_one(T* ptr, T value) const {
    *ptr = value;
  }
};

// The row group: the whole block (blockDim.x a multiple of 32, at most max_row_threads).
template <typename acc_t>
struct BlockOps : DeviceMemory {
  acc_t* max_scratch;  // [kMaxWarpsPerRow] in shared memory
  Sums* sum_scratch;   // [kMaxWarpsPerRow] in shared memory

  __device__ __forceinline__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ __forceinline__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ __forceinline__ void sync() const { __syncthreads(); }

  // The block's maximum, in every thread. The next write of max_scratch (the next reduce_max) comes
  // after a reduce_sum, whose barrier every thread reaches only after reading max_scratch here.
  __device__ __forceinline__ acc_t reduce_max(acc_t value) const {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      const acc_t other = __shfl_xor_sync(0xffffffffu, value, offset);
      value = other > value ? other : value;
    }
    const int warps = static_cast<int>(blockDim.x) / kWarpSize;
    if (warps == 1) return value;
    if (threadIdx.x % kWarpSize == 0) max_scratch[threadIdx.x / kWarpSize] = value;
    __syncthreads();
    value = max_scratch[0];
    for (int w = 1; w < warps; ++w) value = max_scratch[w] > value ? max_scratch[w] : value;
    return value;
  }

  // The block's sums, in thread 0 (the others hold partial sums). The caller's sync() after it orders
  // warp 0's reads of sum_scratch before the next reduce_sum's writes.
  __device__ __forceinline__ Sums reduce_sum(Sums sums) const {
    sums = warp_sum(sums);
    const int warps = static_cast<int>(blockDim.x) / kWarpSize;
    if (warps == 1) return sums;
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize, warp = static_cast<int>(threadIdx.x) / kWarpSize;
    if (lane == 0) sum_scratch[warp] = sums;
    __syncthreads();
    if (warp == 0) sums = warp_sum(lane < warps ? sum_scratch[lane] : Sums{0.0, 0.0, 0.0});
    return sums;
  }

 private:
  __device__ __forceinline__ static Sums warp_sum(Sums sums) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      sums.d += __shfl_down_sync(0xffffffffu, sums.d, offset);
      sums.gap += __shfl_down_sync(0xffffffffu, sums.gap, offset);
      sums.s += __shfl_down_sync(0xffffffffu, sums.s, offset);
    }
    return sums;
  }
};

// Register budget, per dtype: __launch_bounds__(max_row_threads, MinBlocksPerSM) caps a thread at
// 65536 / (max_row_threads * MinBlocksPerSM) registers. float32: two 512-thread blocks per SM, 64
// registers (left alone ptxas takes more and halves the occupancy). bfloat16/half: one, up to 128
// (at 64 they spill on sm_90). float64 (used for checking rather than training): one 256-thread
// block, up to 255 (at 128 it spills). ptxas's register and spill figures: "Sizes and figures of
// the kernels" in benchmarks/README.md.
template <typename scalar_t>
struct MinBlocksPerSM {
  static constexpr int value = sizeof(scalar_t) == 4 ? 2 : 1;
};

// One block per batch row; the row program is ofa_row (ofa_loss_cuda_row.cuh).
template <typename scalar_t>
__global__ void __launch_bounds__(max_row_threads(sizeof(scalar_t)), MinBlocksPerSM<scalar_t>::value) ofa_rows_kernel(const LaunchParams<scalar_t> P) {
  using acc_t = acc_of<scalar_t>;
  __shared__ RowShared<acc_t> shared_row;
  __shared__ acc_t max_scratch[kMaxWarpsPerRow];
  __shared__ Sums sum_scratch[kMaxWarpsPerRow];
  // row_scratch_bytes(blockDim.x, sizeof(scalar_t)), given at launch (one untyped array for all dtypes).
  extern __shared__ __align__(16) unsigned char row_scratch[];
  BlockOps<acc_t> ops;
  ops.max_scratch = max_scratch;
  ops.sum_scratch = sum_scratch;
  ofa_row<scalar_t>(ops, P, static_cast<int64_t>(blockIdx.x), shared_row, reinterpret_cast<acc_t*>(row_scratch));
}

// The sparse-teacher kernel: one block per batch row, the row program ofa_sparse_row
// (ofa_loss_cuda_sparse_row.cuh); the dense kernel's block sizes and register budget, no dynamic
// shared memory.
template <typename scalar_t>
__global__ void __launch_bounds__(max_row_threads(sizeof(scalar_t)), MinBlocksPerSM<scalar_t>::value)
    ofa_sparse_rows_kernel(const SparseLaunchParams<scalar_t> P) {
  using acc_t = acc_of<scalar_t>;
  __shared__ SparseRowShared<acc_t> shared_row;
  __shared__ acc_t max_scratch[kMaxWarpsPerRow];
  __shared__ Sums sum_scratch[kMaxWarpsPerRow];
  BlockOps<acc_t> ops;
  ops.max_scratch = max_scratch;
  ops.sum_scratch = sum_scratch;
  ofa_sparse_row<scalar_t>(ops, P, static_cast<int64_t>(blockIdx.x), shared_row);
}

}  // namespace cuda_kernel
}  // namespace ofakd
