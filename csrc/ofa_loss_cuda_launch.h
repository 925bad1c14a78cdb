// The host-side launch plan of the fused OFA loss CUDA kernels (dense and sparse teacher): the grid,
// block and shared-memory choice for a call (plan_launch, plan_sparse_launch), the teacher-gradient
// workspace rule, and the split of the branches into launches of at most kMaxBranchesPerLaunch
// (launch_branch_groups, launch_sparse_branch_groups). Plain C++ with no CUDA or ATen header:
// ofa_loss_cuda_op.cpp (the ops), ofa_loss_cuda.cu (the <<<>>> launches) and tests/loss/cuda_emulator.cpp
// (the host emulation) all plan with this same code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ofa_loss_cuda_sparse_row.cuh"

namespace ofakd {
namespace cuda_kernel {

// How a call is launched: one block per row, the smallest power of two >= the row's slots threads
// (32 .. max_row_threads(elem_size): 512, 256 for float64, as in the kernel's __launch_bounds__).
// The shapes of the reference problems: benchmarks/README.md.
struct LaunchShape {
  int threads;          // per block = per row
  int64_t blocks;       // = B
  int64_t chunks;       // slots per thread for the worst phase: 1 = the row stays in registers
  size_t shared_bytes;  // dynamic shared memory: ofa_row's scratch
};

// ofa_row's scratch: 2 * threads * W acc_t (the resident weights and teacher gradient).
inline size_t row_scratch_bytes(int threads, int elem_size) {
  const size_t acc_size = elem_size == 8 ? 8 : 4;
  return 2 * static_cast<size_t>(threads) * static_cast<size_t>(16 / elem_size) * acc_size;
}

// `threads` > 0 forces the group size (the host emulator's tests use tiny groups to stream rows).
inline LaunchShape plan_launch(int64_t B, int64_t C, int elem_size, int threads = 0) {
  const int64_t W = 16 / elem_size;
  const int64_t slots = (C + 2 * W - 2) / W;  // ceil((C + phase) / W) for the worst phase W - 1
  if (threads <= 0) {
    threads = kWarpSize;
    while (threads < slots && threads < max_row_threads(elem_size)) threads *= 2;
  }
  LaunchShape shape;
  shape.threads = threads;
  shape.blocks = B;
  shape.chunks = (slots + threads - 1) / threads;
  shape.shared_bytes = row_scratch_bytes(threads, elem_size);
  return shape;
}

// The student side of one call, in pointers (outputs allocated by the caller): both ops.
template <typename scalar_t>
struct BranchProblem {
  using acc_t = acc_of<scalar_t>;
  std::vector<const scalar_t*> branch;  // K branch matrices [B, C], row 0
  std::vector<int64_t> branch_stride;
  std::vector<double> eps;
  const int64_t* target = nullptr;
  int64_t B = 0, C = 0;
  double temperature = 1.0;
  acc_t* loss_rows = nullptr;         // [K, B]
  const acc_t* grad_scale = nullptr;  // null: no gradients
  int64_t scale_stride_k = 0, scale_stride_b = 0;
  scalar_t* grad_branches = nullptr;  // [K, B, C]
};

// One call of the dense op: the branches and the teacher logits.
template <typename scalar_t>
struct Problem : BranchProblem<scalar_t> {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* teacher = nullptr;
  int64_t teacher_stride = 0;
  scalar_t* grad_teacher = nullptr;   // [B, C], or null: no teacher gradient
  // [B, C] acc_t, required by the teacher gradient when needs_teacher_workspace (may be grad_teacher
  // itself when scalar_t is acc_t).
  acc_t* teacher_workspace = nullptr;
};

// One call of the sparse-teacher op: the branches and each row's k stored teacher classes.
template <typename scalar_t>
struct SparseProblem : BranchProblem<scalar_t> {
  using acc_t = acc_of<scalar_t>;
  const acc_t* teacher_logits = nullptr;     // [B, k]
  const int64_t* teacher_indices = nullptr;  // [B, k]
  const acc_t* teacher_lse = nullptr;        // [B]
  int64_t k = 0;
};

inline int64_t branch_launches(int64_t K) { return (K + kMaxBranchesPerLaunch - 1) / kMaxBranchesPerLaunch; }

// The teacher gradient is summed in memory (not in registers) when a row is streamed in several
// chunks or the branches take several launches.
inline bool needs_teacher_workspace(int64_t K, const LaunchShape& shape) {
  return shape.chunks > 1 || branch_launches(K) > 1;
}

// The sparse kernel's launch: the dense plan's blocks and threads, no dynamic shared memory (it keeps
// no per-slot weights or teacher gradient).
inline LaunchShape plan_sparse_launch(int64_t B, int64_t C, int elem_size, int threads = 0) {
  LaunchShape shape = plan_launch(B, C, elem_size, threads);
  shape.shared_bytes = 0;
  return shape;
}

// The branch fields of the launch of branches [k0, k0 + n) (n = the return value, at most
// kMaxBranchesPerLaunch); P must be zeroed.
template <typename scalar_t>
int fill_branch_group(const BranchProblem<scalar_t>& pb, int64_t k0, BranchParams<scalar_t>& P) {
  using acc_t = acc_of<scalar_t>;
  const int64_t K = static_cast<int64_t>(pb.branch.size());
  const int n = static_cast<int>(K - k0 < kMaxBranchesPerLaunch ? K - k0 : kMaxBranchesPerLaunch);
  for (int k = 0; k < n; ++k) {
    P.branch[k] = pb.branch[k0 + k];
    P.branch_stride[k] = pb.branch_stride[k0 + k];
    P.eps[k] = static_cast<acc_t>(pb.eps[k0 + k]);
  }
  P.num_branches = n;
  P.target = pb.target;
  P.B = pb.B;
  P.C = pb.C;
  P.inv_t = static_cast<acc_t>(1.0 / pb.temperature);
  P.loss_rows = pb.loss_rows + k0 * pb.B;
  if (pb.grad_scale != nullptr) {
    P.grad_scale = pb.grad_scale + k0 * pb.scale_stride_k;
    P.scale_stride_k = pb.scale_stride_k;
    P.scale_stride_b = pb.scale_stride_b;
    P.grad_branches = pb.grad_branches + k0 * pb.B * pb.C;
  }
  return n;
}

// Calls launch(params) once per group of at most kMaxBranchesPerLaunch consecutive branches. Each
// group adds its teacher gradient to the previous groups' sum; the last writes the final value.
template <typename scalar_t, typename Launch>
void launch_branch_groups(const Problem<scalar_t>& pb, Launch&& launch) {
  const int64_t K = static_cast<int64_t>(pb.branch.size());
  const bool want_tgrad = pb.grad_scale != nullptr && pb.grad_teacher != nullptr;
  for (int64_t k0 = 0; k0 < K; k0 += kMaxBranchesPerLaunch) {
    LaunchParams<scalar_t> P;
    std::memset(&P, 0, sizeof(P));
    const int n = fill_branch_group(pb, k0, P);
    P.teacher = pb.teacher;
    P.teacher_stride = pb.teacher_stride;
    if (want_tgrad) {
      P.teacher_grad = true;
      P.tg_accumulate = k0 > 0;
      P.tg_work = pb.teacher_workspace;
      if (k0 + n >= K) P.grad_teacher = pb.grad_teacher;
    }
    launch(P);
  }
}

// The sparse op's launches: one per group of at most kMaxBranchesPerLaunch branches (independent).
template <typename scalar_t, typename Launch>
void launch_sparse_branch_groups(const SparseProblem<scalar_t>& pb, Launch&& launch) {
  const int64_t K = static_cast<int64_t>(pb.branch.size());
  for (int64_t k0 = 0; k0 < K; k0 += kMaxBranchesPerLaunch) {
    SparseLaunchParams<scalar_t> P;
    std::memset(&P, 0, sizeof(P));
    fill_branch_group(pb, k0, P);
    P.teacher_logits = pb.teacher_logits;
    P.teacher_indices = pb.teacher_indices;
    P.teacher_lse = pb.teacher_lse;
    P.k = pb.k;
    launch(P);
  }
}

}  // namespace cuda_kernel
}  // namespace ofakd
