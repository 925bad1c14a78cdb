// Fused multi-branch OFA loss on CUDA: the CUDA implementation of ofakd_fast_C::fused_forward.
//
// Contract (identical to the CPU kernel in ofa_loss_cpu.cpp, which defines the op's schema):
//   fused_forward(Tensor[] branches, Tensor teacher, Tensor target, Tensor eps, float temperature,
//                 Tensor? grad_scale, bool teacher_grad) -> (loss_rows, grad_branches, grad_teacher)
//   branches: entries [B, C] or [k, B, C] (K matrices in all), any row stride, stride(-1) == 1;
//   teacher [B, C] of the same dtype (float, double, bfloat16, half); target int64 [B]; eps float64
//   CPU [K] (read on the host into the kernel arguments: no host-to-device copy, no sync);
//   loss_rows [K, B] in float (double for double); grad_scale None -> both gradients empty, else
//   broadcastable to [K, B]: grad_branches [K, B, C] = grad_scale[k, b] * dl_kb/ds (input dtype) and,
//   if teacher_grad, grad_teacher [B, C] = sum_k grad_scale[k, b] * dl_kb/dt.
//   A target outside [0, C) is not checked on the host (that would synchronise with the GPU): the
//   row's loss (and its gradients) come out NaN instead. C == 0 gives NaN losses for that reason.
//
// Files: this one launches the kernel (compiled by nvcc with no ATen header, so a build takes seconds
// of device compilation, not minutes); ofa_loss_cuda_op.cpp (g++) has the op's input checks, output
// allocation and registration; ofa_loss_cuda_kernel.cuh the __global__ kernel and block reduction;
// ofa_loss_cuda_row.cuh the row program, its algorithm and the launch plan.
//
// Design:
//   * one thread block per batch row, 32 .. 512 threads: the smallest power of two >= the row's
//     16-byte slots, so a row of up to 512 * 16 bytes is held in registers (one slot per thread);
//   * 128-bit loads and stores (4 float, 8 bf16/half, 2 double per access) for every slot inside a
//     row, the slot grid aligned to 16 bytes per row (rows of odd C are not aligned alike); element
//     accesses at the row's two ends and for a row whose alignment differs from its row-mates';
//   * per row and branch two block reductions (warp shuffles, then one shared-memory step across
//     warps): the row max (exact), then the sums (exp, weighted gap, weights) each thread rebased
//     to it once, added in fp64: every term is >= 0, nothing cancels, the loss is within ~2 ulps;
//   * all K branches of a row in one block, one after the other (up to 32 per launch; more take
//     ceil(K / 32) launches with the teacher gradient summed in a workspace): registers and code do
//     not grow with K (~2 s of ptxas per dtype and architecture);
//   * fp32 math (fp64 for fp64 inputs), values converted right after the load; ~2 exp per element
//     and branch (a row held in registers keeps its weights while consecutive branches share eps);
//   * <= 64 registers per thread (2 blocks of 512 or 4 of 256 per SM); 2 * threads * W * 4 bytes of
//     dynamic shared memory (8 KB at 256 threads, fp32) for a resident row's weights and teacher
//     gradient;
//   * loads that will not be needed again are evict-first (ld.global.cs), gradient stores are
//     streaming (st.global.cs), so they do not push the rows still to be re-read out of L2.
//
// Launch shapes and bytes moved for the reference problems (K = 5 branches, fp32, forward with the
// student gradients; the floor is reading (K + 1) B C logits and writing K B C gradients):
//   * 256 x 1000 x 5: 251 slots per row -> 256 threads per block, 256 blocks, 1 chunk: every row is
//     held in registers (4 blocks per SM fit, so all 256 rows run at once on an A100/H100); each
//     logit is read once, each gradient written once: 6 * 256 * 1000 * 4 B = 6.1 MB read + 5.1 MB
//     written (+ 5 KB of losses, 2 KB of targets) = 11.3 MB, the floor. bf16: 128 threads, 5.6 MB.
//   * 256 x 21841 x 5: 5461 slots per row -> 512 threads per block, 256 blocks, 11 chunks per row
//     (bf16: 2731 slots, 6 chunks): the row is streamed. DRAM: the 6 logit rows are read once from
//     DRAM (134.2 MB) and 111.8 MB of gradients are written, 246 MB, if the re-reads hit L2: the
//     teacher row is re-read for each branch's statistics and gradient passes, each branch row once
//     more for its gradient pass (in reverse chunk order). A block re-reads bytes it read ~2 rows
//     (175 KB) earlier on average; with ~216 blocks in flight that is ~38 MB: L2 hits on an H100 (50 MB),
//     partly misses on an A100 (40 MB): expect 246 MB to ~380 MB of DRAM traffic there. L2 serves
//     21 row reads per row (0.47 GB). Without gradients: 134 MB, the floor.
#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ofa_loss_cuda_kernel.cuh"

namespace ofakd {
namespace cuda_kernel {

template <typename scalar_t>
cudaError_t launch_rows(const LaunchParams<scalar_t>& params, const LaunchShape& shape, cudaStream_t stream) {
  ofa_rows_kernel<scalar_t><<<static_cast<unsigned>(shape.blocks), shape.threads, shape.shared_bytes, stream>>>(params);
  return cudaGetLastError();
}

// One kernel per dtype (c10::Half and c10::BFloat16 convert to and from float with the CUDA
// intrinsics; their arithmetic is never used).
template cudaError_t launch_rows<float>(const LaunchParams<float>&, const LaunchShape&, cudaStream_t);
template cudaError_t launch_rows<double>(const LaunchParams<double>&, const LaunchShape&, cudaStream_t);
template cudaError_t launch_rows<c10::BFloat16>(const LaunchParams<c10::BFloat16>&, const LaunchShape&, cudaStream_t);
template cudaError_t launch_rows<c10::Half>(const LaunchParams<c10::Half>&, const LaunchShape&, cudaStream_t);

}  // namespace cuda_kernel
}  // namespace ofakd
