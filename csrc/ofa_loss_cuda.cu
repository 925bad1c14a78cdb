// Fused multi-branch OFA loss on CUDA: the CUDA implementations of ofakd_fast_C::fused_forward and
// ofakd_fast_C::fused_forward_sparse.
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
//   fused_forward_sparse(Tensor[] branches, Tensor teacher_logits, Tensor teacher_indices,
//                        Tensor teacher_lse, Tensor target, Tensor eps, float temperature,
//                        Tensor? grad_scale) -> (loss_rows, grad_branches)
//   the same branches, target, eps and grad_scale; the teacher as each row's k stored classes:
//   logits [B, k] and lse [B] = logsumexp(t / T) over all C classes in the loss dtype, indices [B, k]
//   int64 (distinct, in [0, C)); the rest's mass is spread evenly over the other C - k classes
//   (shared/docs/ofa-loss.md, "A sparse teacher"). No teacher gradient. A stored class outside
//   [0, C) makes its row NaN like a bad target (it is never read or written).
//
// Files: this one launches the kernels (compiled by nvcc with no ATen header, so a build takes seconds
// of device compilation, not minutes); ofa_loss_cuda_op.cpp (g++) has the op's input checks, output
// allocation and registration; ofa_loss_cuda_launch.h the launch plan (grid, block, shared memory,
// launches per branch group); ofa_loss_cuda_kernel.cuh the __global__ kernels and block reduction;
// ofa_loss_cuda_row.cuh the dense row program and its algorithm; ofa_loss_cuda_sparse_row.cuh the
// sparse-teacher row program (the same slot layout, loads, reductions and launch plan).
//
// Design:
//   * one thread block per batch row, 32 .. 512 threads (256 for double): the smallest power of two
//     >= the row's 16-byte slots, so a row of up to 512 * 16 bytes (256 * 16 for double) is held in
//     registers (one slot per thread);
//   * 128-bit loads and stores (4 float, 8 bf16/half, 2 double per access) for every slot inside a
//     row, the slot grid aligned to 16 bytes per row (rows of odd C are not aligned alike); element
//     accesses at the row's two ends and for a row whose alignment differs from its row-mates';
//   * per row and branch two block reductions (warp shuffles, then one shared-memory step across
//     warps): the row max (exact), then the sums (exp, weighted gap, weights) each thread rebased
//     to it once, added in fp64: every term is >= 0, nothing cancels;
//   * all K branches of a row in one block, one after the other (up to 32 per launch; more take
//     ceil(K / 32) launches with the teacher gradient summed in a workspace): registers and code do
//     not grow with K;
//   * fp32 math (fp64 for fp64 inputs), values converted right after the load; ~2 exp per element
//     and branch (a row held in registers keeps its weights while consecutive branches share eps);
//   * a register cap per dtype (MinBlocksPerSM, max_row_threads): two 512-thread blocks per SM for
//     float, one for bfloat16/half, one 256-thread block for double; 2 * threads * W acc_t of
//     dynamic shared memory (row_scratch_bytes) for a resident row's weights and teacher gradient;
//   * loads that will not be needed again are evict-first (ld.global.cs), gradient stores are
//     streaming (st.global.cs), so they do not push the rows still to be re-read out of L2.
//
// Registers, spills, shared-memory bytes, accuracy in ulps, and the launch shapes and bytes moved for
// the reference problems: "Sizes and figures of the kernels" in benchmarks/README.md.
#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "ofa_loss_cuda_kernel.cuh"
#include "ofa_loss_cuda_launch.h"

namespace ofakd {
namespace cuda_kernel {

template <typename scalar_t>
cudaError_t launch_rows(const LaunchParams<scalar_t>& params, const LaunchShape& shape, cudaStream_t stream) {
  ofa_rows_kernel<scalar_t><<<static_cast<unsigned>(shape.blocks), shape.threads, shape.shared_bytes, stream>>>(params);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_sparse_rows(const SparseLaunchParams<scalar_t>& params, const LaunchShape& shape,
                               cudaStream_t stream) {
  ofa_sparse_rows_kernel<scalar_t>
      <<<static_cast<unsigned>(shape.blocks), shape.threads, shape.shared_bytes, stream>>>(params);
  return cudaGetLastError();
}

// One kernel per dtype (c10::Half and c10::BFloat16 convert to and from float with the CUDA
// intrinsics; their arithmetic is never used).
template cudaError_t launch_rows<float>(const LaunchParams<float>&, const LaunchShape&, cudaStream_t);
template cudaError_t launch_rows<double>(const LaunchParams<double>&, const LaunchShape&, cudaStream_t);
template cudaError_t launch_rows<c10::BFloat16>(const LaunchParams<c10::BFloat16>&, const LaunchShape&, cudaStream_t);
template cudaError_t launch_rows<c10::Half>(const LaunchParams<c10::Half>&, const LaunchShape&, cudaStream_t);
template cudaError_t launch_sparse_rows<float>(const SparseLaunchParams<float>&, const LaunchShape&, cudaStream_t);
template cudaError_t launch_sparse_rows<double>(const SparseLaunchParams<double>&, const LaunchShape&, cudaStream_t);
template cudaError_t launch_sparse_rows<c10::BFloat16>(const SparseLaunchParams<c10::BFloat16>&, const LaunchShape&,
                                                       cudaStream_t);
template cudaError_t launch_sparse_rows<c10::Half>(const SparseLaunchParams<c10::Half>&, const LaunchShape&,
                                                   cudaStream_t);

}  // namespace cuda_kernel
}  // namespace ofakd
