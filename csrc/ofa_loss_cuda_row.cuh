// The row program of the fused OFA loss CUDA kernel: device code only (the host-side launch plan is
// ofa_loss_cuda_launch.h).
//
// One "row group" of threads (one thread block of 32 .. 512 threads) computes one batch row b for up
// to kMaxBranchesPerLaunch student branches: the loss of each branch and, when asked, the student
// gradients and this launch's share of the teacher gradient. The code here is plain C++ templated
// on an `Ops` type that supplies the group's thread rank and size, its barrier, its reduction and
// its memory accesses:
//   * ofa_loss_cuda.cu instantiates it with block operations (warp shuffles, shared memory,
//     128-bit cache-hinted loads and stores) inside the __global__ kernel;
//   * tests/cuda_emulator.cpp instantiates it on the host, one std::thread per GPU thread with a
//     barrier, and checks every memory access (bounds, 16-byte alignment of vector accesses), so the
//     indexing, masking and math run in CI on machines without a GPU.
// The per-element formulas all come from ofa_row_math.h. The student side (BranchParams, RowLayout,
// plan_layout, the slot loads, stores and statistics, the group reductions) is shared with the
// sparse-teacher row program, ofa_loss_cuda_sparse_row.cuh.
//
// Layout of a row in registers ("slots"): the row is cut into slots of W = 16 / sizeof(scalar_t)
// elements (4 float, 8 bf16/half, 2 double) aligned to 16 bytes in memory: slot s covers elements
// [s*W - phase, s*W - phase + W) where `phase` = (row address / sizeof(scalar_t)) mod W. A slot that
// lies inside the row is moved with one 128-bit access; the first and last slot of a row (partly
// outside it) element by element. Thread r of a group of G threads owns slots r, r + G, r + 2G, ...:
// chunk j is slots [j*G, (j+1)*G), so every warp access is coalesced. Rows of a call need not share
// one phase (C = 21841 is odd, so consecutive rows of one tensor do not): each row picks the phase
// most of its K + 1 input rows and K gradient rows have (a majority vote); a row pointer with another
// phase is accessed element by element in the same slot layout (correct, slower).
//
// Algorithm for one row (x = s / T, z = t / T; see shared/docs/ofa-loss.md):
//   1. Teacher (teacher_pass): running max and sum of exp over the row's slots, one group reduction -> max_t and
//      log_sum_t (rank 0 also computes p_y). Every branch below uses the exact
//      log_p = (z - max_t) - log_sum_t (in that order, like log_softmax: see log_softmax_of).
//   2. For each branch k in turn (a loop, not unrolled: registers and code size do not grow with K):
//      a. statistics (branch_partial) over c != y: max_x, d = sum exp(x - max_x), S' = sum w, gap' = sum w (max_x - x),
//         with w = p ** eps_k = exp(eps_k log_p) (= p for eps 1; a resident row keeps w in registers
//         while consecutive branches share eps). A thread's gap' is rebased (gap' += S' (m_new -
//         m_old)) when its max grows, so every term is >= 0 and nothing cancels for logits of 1e4;
//      b. group reductions (branch_loss): the max (exact, to every thread), then each thread rebases its sums to it
//         once and the sums are added in double (to rank 0). Rank 0 (finish_branch) adds the target class,
//         w_y = expm1(eps log1p(p_y)), writes loss = row_loss(S, gap, log d) and the constants of
//         the gradient pass to shared memory: max_x, log d, S, w_y, h_y, H, grad_scale / T;
//      c. (gradients only; branch_gradients, slot_gradients) student grad (S q - w) scale / T with log q = (x - max_x) - log d, and the teacher
//         contribution (h_c - p_c H) scale / T with h_c = p_c dl/dp_c = -eps w_c log q_c (c != y) and
//         H = sum_c h_c = eps * (non-target loss) + h_y, taken from the statistics (no extra pass,
//         never p ** (eps - 1)). The teacher gradient of a row held in registers accumulates there
//         over the branches (written by write_resident_teacher_gradient); a streamed row accumulates it in
//         an fp32 (fp64) workspace (write_teacher_slot).
//   Row held in registers ("resident": C + phase <= G * W, e.g. C = 1000 fp32 with 256 threads):
//   every logit is read from memory exactly once (the next branch's slot is loaded while the current
//   one is reduced). Longer rows are streamed chunk by chunk: the teacher row once for its max and sum, then per
//   branch a statistics pass (branch row + teacher row) and a gradient pass (both again, in reverse
//   chunk order). Between two reads of the same bytes a block touches only ~2 rows, so the re-reads
//   are mostly L2 hits (the traffic estimate: "Sizes and figures of the kernels", benchmarks/README.md).
//
// Numerics: math in float (double for double inputs) on values converted right after the load;
// eps == 1 uses w = p and S = 1 like the CPU kernel. A target outside [0, C) makes the row's loss
// and all its gradients NaN (no out-of-bounds read, no host synchronisation to check it).
#pragma once


#include <cmath>
#include <cstdint>

#include "ofa_row_math.h"

#if defined(__CUDACC__)
#define OFA_ROW_FN __device__ __forceinline__
#define OFA_UNROLL _Pragma("unroll")
#else
#define OFA_ROW_FN inline
#define OFA_UNROLL
#endif

namespace ofakd {
namespace cuda_kernel {

// Branches handled by one launch: their pointers, strides and eps are kernel arguments (by value,
// no host-to-device copy). More branches are handled by more launches (see launch_branch_groups).
constexpr int kMaxBranchesPerLaunch = 32;
constexpr int kWarpSize = 32;
constexpr int kMaxRowThreads = 512;  // threads of one row (= one block)
constexpr int kMaxWarpsPerRow = kMaxRowThreads / kWarpSize;

// The most threads a row group of this element size gets: 512, but 256 for float64, whose kernel
// needs more registers than a 512-thread block can have (65536 / 512 = 128 per thread; see
// MinBlocksPerSM in ofa_loss_cuda_kernel.cuh). The kernel's __launch_bounds__ and plan_launch both
// use it.
OFA_HOST_DEVICE constexpr int max_row_threads(int elem_size) { return elem_size == 8 ? 256 : kMaxRowThreads; }

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename scalar_t>
using acc_of = typename AccOf<scalar_t>::type;

// Sixteen bytes of a row: the unit of a vectorized load or store.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kWidth = static_cast<int>(16 / sizeof(scalar_t));
  scalar_t v[kWidth];
};

template <typename T>
OFA_HOST_DEVICE T neg_infinity() {
  return -static_cast<T>(INFINITY);
}
template <typename T>
OFA_HOST_DEVICE T quiet_nan() {
  return static_cast<T>(NAN);
}

// The student side of one launch, shared by the dense and the sparse-teacher kernels
// (ofa_loss_cuda_sparse_row.cuh): the branches, targets, temperature, losses and student gradients.
template <typename scalar_t>
struct BranchParams {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* branch[kMaxBranchesPerLaunch];  // row 0 of each branch of this launch
  int64_t branch_stride[kMaxBranchesPerLaunch];   // row strides, in elements
  acc_t eps[kMaxBranchesPerLaunch];
  int num_branches;  // 1 .. kMaxBranchesPerLaunch
  const int64_t* target;  // [B], contiguous
  int64_t B, C;
  acc_t inv_t;       // 1 / temperature
  acc_t* loss_rows;  // [num_branches, B]: this launch's rows of the [K, B] output
  const acc_t* grad_scale;  // null: no gradients; else element [k, b] at k * stride_k + b * stride_b
  int64_t scale_stride_k, scale_stride_b;
  scalar_t* grad_branches;  // [num_branches, B, C] contiguous: this launch's part of [K, B, C]
};

// Everything one launch of the dense kernel needs, passed by value as the kernel argument (see the
// static_assert below): the branches and the dense teacher.
template <typename scalar_t>
struct LaunchParams : BranchParams<scalar_t> {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* teacher;
  int64_t teacher_stride;
  bool teacher_grad;        // add this launch's branches to the teacher gradient
  bool tg_accumulate;       // tg_work holds the sum over the previous launches
  acc_t* tg_work;           // [B, C] running teacher gradient (may alias grad_teacher if scalar_t == acc_t)
  scalar_t* grad_teacher;   // [B, C] final teacher gradient: set on the last launch only
};
// The classic kernel-parameter limit (newer toolkits and GPUs allow more); double is the largest.
static_assert(sizeof(LaunchParams<double>) <= 4096, "LaunchParams must fit the kernel parameter space");

// Running statistics of one thread's elements: max m, sum d of exp(v - m), and for the weights:
// gap = sum w (m - x) and s = sum w. Empty: m = -inf, the rest 0.
template <typename acc_t>
struct Partial {
  acc_t m, d, gap, s;
};

template <typename acc_t>
OFA_HOST_DEVICE Partial<acc_t> empty_partial() {
  return Partial<acc_t>{neg_infinity<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

// The sums a group reduces, in double for every input dtype: a few double additions per row and
// branch make the reduction's rounding negligible (a tree of float additions, or merges that rebase
// gap by s * (m_new - m_old) at every level, cost ulps of the loss: "Sizes and figures of the
// kernels" in benchmarks/README.md).
struct Sums {
  double d, gap, s;
};

// A thread's statistics rebased to the group's max `max_all` (>= p.m): one rounding per sum.
template <typename acc_t>
OFA_HOST_DEVICE Sums rebased_sums(const Partial<acc_t>& p, acc_t max_all) {
  if (p.m == neg_infinity<acc_t>()) return Sums{0.0, 0.0, 0.0};  // no element here
  const acc_t d = p.d * ofa_exp(p.m - max_all);
  const acc_t gap = p.gap + p.s * (max_all - p.m);  // every term of gap grows by max_all - m
  return Sums{static_cast<double>(d), static_cast<double>(gap), static_cast<double>(p.s)};
}

// Per-branch constants of the gradient pass, written by rank 0.
template <typename acc_t>
struct BranchFinal {
  acc_t x_max;         // max_c x_c
  acc_t x_log_sum;     // log sum_c exp(x_c - x_max): log q_c = (x_c - x_max) - x_log_sum
  acc_t weight_sum;    // S
  acc_t w_target;      // w_y
  acc_t h_target;      // h_y = p_y * dl/dp_y
  acc_t sum_h;         // H = sum_c h_c
  acc_t scale_over_t;  // grad_scale[k, b] / T (NaN for an out-of-range target)
};

// Shared memory of one row. The branch constants are double-buffered (branch k uses slot k & 1) so
// rank 0 can write branch k + 1's while slower threads still copy branch k's (see ofa_row).
template <typename acc_t>
struct RowShared {
  acc_t t_log_sum;  // log sum_c exp(z_c - t_max): log p_c = (z_c - t_max) - t_log_sum
  BranchFinal<acc_t> branch[2];
};

// (address / element size) mod W: rows with equal phases share the slot layout.
template <typename scalar_t>
OFA_HOST_DEVICE int phase_of(const scalar_t* row) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(row) / sizeof(scalar_t)) % Pack<scalar_t>::kWidth);
}

// Counts of each phase, 8 bits per phase (at most 2 * kMaxBranchesPerLaunch + 2 rows vote).
template <typename scalar_t>
OFA_HOST_DEVICE void vote_phase(unsigned long long& votes, const scalar_t* row) {
  votes += 1ull << (8 * phase_of(row));
}

template <typename scalar_t>
OFA_HOST_DEVICE int winning_phase(unsigned long long votes) {
  int best = 0;
  unsigned best_count = 0;
OFA_UNROLL
  for (int p = 0; p < Pack<scalar_t>::kWidth; ++p) {
    const unsigned count = static_cast<unsigned>((votes >> (8 * p)) & 0xffu);
    if (count > best_count) {
      best_count = count;
      best = p;
    }
  }
  return best;
}

// Elements [e0, e0 + W) of a row; those outside [0, C) are not read and set to 0.
template <typename scalar_t, typename Ops>
OFA_ROW_FN Pack<scalar_t> load_slot(const Ops& ops, const scalar_t* row, int e0, int C, bool aligned, bool last_use) {
  constexpr int W = Pack<scalar_t>::kWidth;
  if (aligned && e0 >= 0 && e0 + W <= C) return ops.load_pack(row + e0, last_use);
  Pack<scalar_t> pack;
OFA_UNROLL
  for (int i = 0; i < W; ++i) {
    const int e = e0 + i;
    pack.v[i] = (e >= 0 && e < C) ? ops.load_one(row + e) : static_cast<scalar_t>(0.0f);
  }
  return pack;
}

// Stores the elements of [e0, e0 + W) that lie in [0, C).
template <typename scalar_t, typename Ops>
OFA_ROW_FN void store_slot(const Ops& ops, scalar_t* row, int e0, int C, bool aligned, const Pack<scalar_t>& pack) {
  constexpr int W = Pack<scalar_t>::kWidth;
  if (aligned && e0 >= 0 && e0 + W <= C) {
    ops.store_pack(row + e0, pack);
    return;
  }
OFA_UNROLL
  for (int i = 0; i < W; ++i) {
    const int e = e0 + i;
    if (e >= 0 && e < C) ops.store_one(row + e, pack.v[i]);
  }
}

// The largest element of a slot that lies in [0, C), times inv_t; -inf when none does.
template <typename scalar_t, typename acc_t>
OFA_ROW_FN acc_t slot_max(const Pack<scalar_t>& v, int e0, int C, acc_t inv_t) {
  acc_t max = neg_infinity<acc_t>();
OFA_UNROLL
  for (int i = 0; i < Pack<scalar_t>::kWidth; ++i) {
    const acc_t vi = static_cast<acc_t>(v.v[i]) * inv_t;
    if (e0 + i >= 0 && e0 + i < C && vi > max) max = vi;
  }
  return max;
}

// Adds a slot of teacher logits to the running (max, sum of exp) of z = t / T.
template <typename scalar_t, typename acc_t>
OFA_ROW_FN void add_teacher_slot(Partial<acc_t>& tp, const Pack<scalar_t>& z, int e0, int C, acc_t inv_t) {
  constexpr int W = Pack<scalar_t>::kWidth;
  const acc_t z_max = slot_max(z, e0, C, inv_t);
  if (z_max == neg_infinity<acc_t>()) return;
  if (z_max > tp.m) {
    tp.d *= ofa_exp(tp.m - z_max);  // 0 * 0 while empty
    tp.m = z_max;
  }
OFA_UNROLL
  for (int i = 0; i < W; ++i)
    if (e0 + i >= 0 && e0 + i < C) tp.d += ofa_exp(static_cast<acc_t>(z.v[i]) * inv_t - tp.m);
}

// log p_c (or log q_c) from the row's max and log-sum: (v - max) - log_sum, in this order. (v - lse
// with lse = max + log_sum rounded would cost ~ulp(max) of absolute error, a relative error of p of
// 1e-6 and more for logits ~10 .. 20.)
template <typename acc_t>
OFA_HOST_DEVICE acc_t log_softmax_of(acc_t v, acc_t max, acc_t log_sum) {
  return (v - max) - log_sum;
}

// The weights of a slot: w_c = p_c ** eps = exp(eps * log_p_c) (the target's weight is handled
// separately). eps == 1: w = p.
template <typename scalar_t, typename acc_t>
OFA_ROW_FN void slot_weights(const Pack<scalar_t>& z, acc_t inv_t, acc_t t_max, acc_t t_log_sum, acc_t eps,
                             acc_t (&w)[Pack<scalar_t>::kWidth]) {
OFA_UNROLL
  for (int i = 0; i < Pack<scalar_t>::kWidth; ++i) {
    const acc_t log_p = log_softmax_of(static_cast<acc_t>(z.v[i]) * inv_t, t_max, t_log_sum);
    w[i] = eps == acc_t(1) ? ofa_exp(log_p) : class_weight(log_p, eps);
  }
}

// Adds a slot of one branch to its running (max_x, sum exp(x - max_x), sum_{c != y} w (max_x - x),
// sum_{c != y} w), x = s / T.
template <typename scalar_t, typename acc_t>
OFA_ROW_FN void add_branch_slot(Partial<acc_t>& q, const Pack<scalar_t>& x, const acc_t (&w)[Pack<scalar_t>::kWidth],
                                int e0, int C, int y, acc_t inv_t) {
  constexpr int W = Pack<scalar_t>::kWidth;
  const acc_t x_max = slot_max(x, e0, C, inv_t);
  if (x_max == neg_infinity<acc_t>()) return;
  if (x_max > q.m) {
    if (q.m != neg_infinity<acc_t>()) {  // rebase: every term of gap grows by (x_max - m)
      q.d *= ofa_exp(q.m - x_max);
      q.gap += q.s * (x_max - q.m);
    }
    q.m = x_max;
  }
OFA_UNROLL
  for (int i = 0; i < W; ++i) {
    const int e = e0 + i;
    if (e < 0 || e >= C) continue;
    const acc_t xi = static_cast<acc_t>(x.v[i]) * inv_t;
    q.d += ofa_exp(xi - q.m);
    if (e != y) {
      q.s += w[i];
      q.gap += w[i] * (q.m - xi);
    }
  }
}

// The teacher gradient of a slot: `values` (this launch's contributions, or only branch k's) plus
// the running sum in tg_work unless `first`; written to grad_teacher (input dtype) if `final_write`,
// else back to tg_work (acc_t). Each element is always handled by the same thread, so the
// read-modify-write needs no synchronisation.
template <typename scalar_t, typename Ops>
OFA_ROW_FN void write_teacher_slot(const Ops& ops, const LaunchParams<scalar_t>& P, int64_t b, int e0,
                                   acc_of<scalar_t> (&values)[Pack<scalar_t>::kWidth], bool first, bool final_write,
                                   int phase) {
  using acc_t = acc_of<scalar_t>;
  constexpr int W = Pack<scalar_t>::kWidth;
  const int C = static_cast<int>(P.C);
  acc_t* work = P.tg_work != nullptr ? P.tg_work + b * P.C : nullptr;
  if (!first) {
OFA_UNROLL
    for (int i = 0; i < W; ++i)
      if (e0 + i >= 0 && e0 + i < C) values[i] += ops.load_one(work + e0 + i);
  }
  if (final_write) {
    scalar_t* out = P.grad_teacher + b * P.C;
    Pack<scalar_t> pack;
OFA_UNROLL
    for (int i = 0; i < W; ++i) pack.v[i] = static_cast<scalar_t>(values[i]);
    store_slot(ops, out, e0, C, phase_of(out) == phase, pack);
  } else {
OFA_UNROLL
    for (int i = 0; i < W; ++i)
      if (e0 + i >= 0 && e0 + i < C) ops.store_one(work + e0 + i, values[i]);
  }
}


// ------------------------------------------------------------------------------------ row passes
//
// ofa_row runs the passes below in order, every thread of the group each of them. Barriers (ops.sync
// and inside the reductions) are reached by all threads of the group equally often: every condition
// around them is uniform over the group. Indices inside a row are 32-bit (the host checks
// C < 2^31 - 64); row offsets are 64-bit.

// Row b of branch k (a launch-local branch index).
template <typename scalar_t>
OFA_ROW_FN const scalar_t* branch_row(const BranchParams<scalar_t>& P, int k, int64_t b) {
  return P.branch[k] + b * P.branch_stride[k];
}

// Row b of branch k's student gradient ([num_branches, B, C], contiguous).
template <typename scalar_t>
OFA_ROW_FN scalar_t* branch_grad_row(const BranchParams<scalar_t>& P, int k, int64_t b) {
  return P.grad_branches + (k * P.B + b) * P.C;
}

// Row b's student side as one thread sees it in every pass (both kernels): what is wanted, the
// target, the slot layout.
template <typename scalar_t>
struct RowLayout {
  using acc_t = acc_of<scalar_t>;
  static constexpr int W = Pack<scalar_t>::kWidth;
  int64_t b;
  int C;
  acc_t inv_t;
  bool want_grad;
  bool y_ok;     // the target lies in [0, C)
  int y;         // the target class; -1 when out of range, so no element is the target
  int phase;     // the slot phase (see majority_phase)
  int G, r;      // group size, this thread's rank
  int nchunks;   // slots per thread
  bool resident; // one slot per thread: the row stays in registers, each logit read once

  // First element of this thread's slot in chunk j; chunk 0 is a resident row's only slot.
  OFA_ROW_FN int slot_start(int j) const { return (j * G + r) * W - phase; }
  OFA_ROW_FN bool overlaps_row(int e0) const { return e0 + W > 0 && e0 < C; }
};

// The dense kernel's row plan: the layout plus the teacher row and the resident row's scratch.
template <typename scalar_t>
struct RowPlan : RowLayout<scalar_t> {
  using acc_t = acc_of<scalar_t>;
  bool want_tgrad;
  const scalar_t* t_row;
  bool t_aligned;
  acc_t* w_res;  // resident: the weights of this thread's slot, [W][G] shared scratch
  acc_t* t_acc;  // resident: the teacher gradient of this thread's slot, [W][G] shared scratch

  // Element i of this thread's slot in [W][G] scratch: a warp touches consecutive words.
  OFA_ROW_FN int scratch_index(int i) const { return i * this->G + this->r; }
};

// Adds the votes of row b of every branch (and of its gradient when wanted) to `votes`.
template <typename scalar_t>
OFA_ROW_FN void vote_branch_phases(unsigned long long& votes, const BranchParams<scalar_t>& P, int64_t b,
                                   bool want_grad) {
  for (int k = 0; k < P.num_branches; ++k) {
    vote_phase(votes, branch_row(P, k, b));
    if (want_grad) vote_phase(votes, branch_grad_row(P, k, b));
  }
}

// The phase most of row b's input and output rows have (a vote), so most of them move in 16-byte
// accesses; a row of another phase is accessed element by element in the same slot layout.
template <typename scalar_t>
OFA_ROW_FN int majority_phase(const LaunchParams<scalar_t>& P, int64_t b, bool want_grad, bool want_tgrad) {
  unsigned long long votes = 0;
  vote_phase(votes, P.teacher + b * P.teacher_stride);
  vote_branch_phases(votes, P, b, want_grad);
  if (want_tgrad && P.grad_teacher != nullptr) vote_phase(votes, P.grad_teacher + b * P.C);
  return winning_phase<scalar_t>(votes);
}

// Fills this thread's layout of row b (both kernels) except the slot phase and what depends on it (set_phase).
template <typename scalar_t, typename Ops>
OFA_ROW_FN void plan_layout(const Ops& ops, const BranchParams<scalar_t>& P, int64_t b, RowLayout<scalar_t>& row) {
  row.b = b;
  row.C = static_cast<int>(P.C);
  row.inv_t = P.inv_t;
  row.want_grad = P.grad_scale != nullptr;
  const int64_t target = P.target[b];
  row.y_ok = target >= 0 && target < row.C;
  row.y = row.y_ok ? static_cast<int>(target) : -1;
  row.G = ops.size();
  row.r = ops.rank();
}

// Completes the layout for the slot phase `phase`: this thread's chunks, and whether the row is resident.
template <typename scalar_t>
OFA_ROW_FN void set_phase(RowLayout<scalar_t>& row, int phase) {
  constexpr int W = Pack<scalar_t>::kWidth;
  row.phase = phase;
  const int nslots = (row.C + row.phase + W - 1) / W;
  row.nchunks = (nslots + row.G - 1) / row.G;
  row.resident = row.nchunks == 1;
}

// A resident row's slot of branch k (loaded once, kept in registers for both passes).
template <typename scalar_t, typename Ops>
OFA_ROW_FN Pack<scalar_t> resident_slot(const Ops& ops, const BranchParams<scalar_t>& P, const RowLayout<scalar_t>& row,
                                        int k) {
  const scalar_t* x_row = branch_row(P, k, row.b);
  return load_slot(ops, x_row, row.slot_start(0), row.C, phase_of(x_row) == row.phase, true);
}

// This thread's plan of row b; `scratch` is the row's 2 * G * W acc_t of shared memory.
template <typename scalar_t, typename Ops>
OFA_ROW_FN RowPlan<scalar_t> plan_row(const Ops& ops, const LaunchParams<scalar_t>& P, int64_t b,
                                      acc_of<scalar_t>* scratch) {
  constexpr int W = Pack<scalar_t>::kWidth;
  RowPlan<scalar_t> row;
  plan_layout(ops, P, b, row);
  row.want_tgrad = row.want_grad && P.teacher_grad;
  set_phase(row, majority_phase(P, b, row.want_grad, row.want_tgrad));
  row.t_row = P.teacher + b * P.teacher_stride;
  row.t_aligned = phase_of(row.t_row) == row.phase;
  row.w_res = scratch;
  row.t_acc = scratch + W * row.G;
  return row;
}

// The teacher's statistics every branch uses: log p_c = (z_c - t_max) - t_log_sum.
template <typename acc_t>
struct TeacherStats {
  acc_t t_max, t_log_sum;
  acc_t p_y, log1p_p_y;  // the target's probability (rank 0 only; 0 for an out-of-range target)
};

// What a resident row keeps in registers from one branch to the next.
template <typename scalar_t>
struct ResidentSlots {
  Pack<scalar_t> z{};          // this thread's teacher slot
  Pack<scalar_t> x_next{};     // the next branch's slot, loaded one branch ahead
  acc_of<scalar_t> w_eps = 0;  // the eps of the weights in w_res (0: none yet; every eps is > 0)
};

// Teacher pass: max and log-sum-exp of z = t / T (one read of the teacher row; a resident row
// also loads branch 0's slot here). Zeroes a resident row's teacher gradient.
template <typename scalar_t, typename Ops>
OFA_ROW_FN TeacherStats<acc_of<scalar_t>> teacher_pass(const Ops& ops, const LaunchParams<scalar_t>& P,
                                                       const RowPlan<scalar_t>& row, RowShared<acc_of<scalar_t>>& sh,
                                                       ResidentSlots<scalar_t>& res) {
  using acc_t = acc_of<scalar_t>;
  Partial<acc_t> tp = empty_partial<acc_t>();
  for (int j = 0; j < row.nchunks; ++j) {
    const int e0 = row.slot_start(j);
    const Pack<scalar_t> z = load_slot(ops, row.t_row, e0, row.C, row.t_aligned, row.resident);
    if (row.resident) {
      res.z = z;
      res.x_next = resident_slot(ops, P, row, 0);
    }
    add_teacher_slot(tp, z, e0, row.C, row.inv_t);
  }
  TeacherStats<acc_t> ts;
  ts.t_max = ops.reduce_max(tp.m);                                     // in every thread
  const Sums t_sums = ops.reduce_sum(rebased_sums(tp, ts.t_max));      // at rank 0
  ts.p_y = acc_t(0);
  ts.log1p_p_y = acc_t(0);
  if (row.r == 0) {
    sh.t_log_sum = ofa_log(static_cast<acc_t>(t_sums.d));
    if (row.y_ok) {
      const acc_t z_y = static_cast<acc_t>(ops.load_one(row.t_row + row.y)) * row.inv_t;
      ts.p_y = ofa_exp(log_softmax_of(z_y, ts.t_max, sh.t_log_sum));
    }
    ts.log1p_p_y = ofa_log1p(ts.p_y);
  }
  if (row.want_tgrad && row.resident) {
OFA_UNROLL
    for (int i = 0; i < Pack<scalar_t>::kWidth; ++i) row.t_acc[row.scratch_index(i)] = acc_t(0);
  }
  ops.sync();  // publishes t_log_sum
  ts.t_log_sum = sh.t_log_sum;
  return ts;
}

// A resident row's weights for `eps` in w[], recomputed only when eps changes (OFA usually gives
// every branch the same eps: one exp per element per row instead of one per branch).
template <typename scalar_t>
OFA_ROW_FN void resident_weights(const RowPlan<scalar_t>& row, const TeacherStats<acc_of<scalar_t>>& ts,
                                 ResidentSlots<scalar_t>& res, acc_of<scalar_t> eps,
                                 acc_of<scalar_t> (&w)[Pack<scalar_t>::kWidth]) {
  constexpr int W = Pack<scalar_t>::kWidth;
  if (eps != res.w_eps) {
    slot_weights(res.z, row.inv_t, ts.t_max, ts.t_log_sum, eps, w);
OFA_UNROLL
    for (int i = 0; i < W; ++i) row.w_res[row.scratch_index(i)] = w[i];
    res.w_eps = eps;
  } else {
OFA_UNROLL
    for (int i = 0; i < W; ++i) w[i] = row.w_res[row.scratch_index(i)];
  }
}

// Statistics pass of branch k: this thread's running max, exp-sum and weighted gap over c != y.
template <typename scalar_t, typename Ops>
OFA_ROW_FN Partial<acc_of<scalar_t>> branch_partial(const Ops& ops, const LaunchParams<scalar_t>& P,
                                                    const RowPlan<scalar_t>& row,
                                                    const TeacherStats<acc_of<scalar_t>>& ts,
                                                    ResidentSlots<scalar_t>& res, int k,
                                                    const Pack<scalar_t>& x_resident) {
  using acc_t = acc_of<scalar_t>;
  const acc_t eps = P.eps[k];
  Partial<acc_t> q = empty_partial<acc_t>();
  acc_t w[Pack<scalar_t>::kWidth];
  if (row.resident) {
    resident_weights(row, ts, res, eps, w);
    add_branch_slot(q, x_resident, w, row.slot_start(0), row.C, row.y, row.inv_t);
    return q;
  }
  const scalar_t* x_row = branch_row(P, k, row.b);
  const bool x_aligned = phase_of(x_row) == row.phase;
  for (int j = 0; j < row.nchunks; ++j) {
    const int e0 = row.slot_start(j);
    if (!row.overlaps_row(e0)) continue;
    // Without gradients this is the branch row's only read; the teacher is read by every branch.
    const Pack<scalar_t> x = load_slot(ops, x_row, e0, row.C, x_aligned, !row.want_grad);
    const Pack<scalar_t> z = load_slot(ops, row.t_row, e0, row.C, row.t_aligned, false);
    slot_weights(z, row.inv_t, ts.t_max, ts.t_log_sum, eps, w);
    add_branch_slot(q, x, w, e0, row.C, row.y, row.inv_t);
  }
  return q;
}

// Rank 0, from branch k's reduced statistics: its loss, and (gradients only) the constants of its
// gradient pass. The target class enters here: w_y = expm1(eps log1p(p_y)).
template <typename scalar_t, typename Ops>
OFA_ROW_FN void finish_branch(const Ops& ops, const LaunchParams<scalar_t>& P, const RowPlan<scalar_t>& row,
                              const TeacherStats<acc_of<scalar_t>>& ts, int k, acc_of<scalar_t> x_max,
                              const Sums& x_sums, BranchFinal<acc_of<scalar_t>>& f) {
  using acc_t = acc_of<scalar_t>;
  const acc_t eps = P.eps[k];
  const acc_t log_d = ofa_log(static_cast<acc_t>(x_sums.d));
  const acc_t gap_nt = static_cast<acc_t>(x_sums.gap), s_nt = static_cast<acc_t>(x_sums.s);
  const acc_t x_y = row.y_ok ? static_cast<acc_t>(ops.load_one(branch_row(P, k, row.b) + row.y)) * row.inv_t : acc_t(0);
  const acc_t w_y = eps == acc_t(1) ? ts.p_y : target_weight(ts.p_y, eps);
  const acc_t weight_sum = eps == acc_t(1) ? acc_t(1) : s_nt + w_y;  // S = 1 exactly for eps = 1, as on CPU
  const acc_t loss = row_loss(weight_sum, gap_nt + w_y * (x_max - x_y), log_d);
  P.loss_rows[k * P.B + row.b] = row.y_ok ? loss : quiet_nan<acc_t>();
  if (!row.want_grad) return;
  f.x_max = x_max;
  f.x_log_sum = log_d;
  f.weight_sum = weight_sum;
  f.w_target = w_y;
  f.h_target = ts.p_y * weight_grad(ts.log1p_p_y, eps, log_softmax_of(x_y, x_max, log_d));
  // H = sum_c p_c g_c = eps * sum_{c != y} w_c (-log q_c) + h_y: all terms >= 0.
  f.sum_h = eps * row_loss(s_nt, gap_nt, log_d) + f.h_target;
  f.scale_over_t =
      row.y_ok ? P.grad_scale[k * P.scale_stride_k + row.b * P.scale_stride_b] * row.inv_t : quiet_nan<acc_t>();
}

// Loss of branch k: the statistics pass, its two group reductions, rank 0's finish. Returns the
// shared constants of the gradient pass, published by the barrier at its end.
template <typename scalar_t, typename Ops>
OFA_ROW_FN const BranchFinal<acc_of<scalar_t>>& branch_loss(const Ops& ops, const LaunchParams<scalar_t>& P,
                                                     const RowPlan<scalar_t>& row,
                                                     const TeacherStats<acc_of<scalar_t>>& ts,
                                                     RowShared<acc_of<scalar_t>>& sh, ResidentSlots<scalar_t>& res,
                                                     int k, const Pack<scalar_t>& x_resident) {
  using acc_t = acc_of<scalar_t>;
  const Partial<acc_t> q = branch_partial(ops, P, row, ts, res, k, x_resident);
  const acc_t x_max = ops.reduce_max(q.m);  // in every thread
  // At rank 0, over c != y: d = sum exp(x - x_max), gap = sum w (x_max - x), s = sum w.
  const Sums x_sums = ops.reduce_sum(rebased_sums(q, x_max));
  BranchFinal<acc_t>& shared_final = sh.branch[k & 1];
  if (row.r == 0) finish_branch(ops, P, row, ts, k, x_max, x_sums, shared_final);
  // Publishes shared_final; also orders warp 0's reads of the cross-warp scratch of reduce_sum
  // before the next reduce_sum's writes, and everyone's copy of slot k & 1 before rank 0 rewrites
  // it for branch k + 2.
  ops.sync();
  return shared_final;
}

// Gradients of one slot of branch k: the student gradient in `out` and, if wanted, the teacher
// contribution, added to a resident row's t_acc or left in `t_contrib` (streamed rows).
template <typename scalar_t>
OFA_ROW_FN void slot_gradients(const RowPlan<scalar_t>& row, const TeacherStats<acc_of<scalar_t>>& ts,
                               const BranchFinal<acc_of<scalar_t>>& f, acc_of<scalar_t> eps, int e0,
                               const Pack<scalar_t>& x, const Pack<scalar_t>& z, Pack<scalar_t>& out,
                               acc_of<scalar_t> (&t_contrib)[Pack<scalar_t>::kWidth]) {
  using acc_t = acc_of<scalar_t>;
OFA_UNROLL
  for (int i = 0; i < Pack<scalar_t>::kWidth; ++i) {
    const bool is_y = e0 + i == row.y;
    acc_t log_p = acc_t(0), w_c;
    if (row.resident) {
      w_c = row.w_res[row.scratch_index(i)];
    } else {
      log_p = log_softmax_of(static_cast<acc_t>(z.v[i]) * row.inv_t, ts.t_max, ts.t_log_sum);
      w_c = eps == acc_t(1) ? ofa_exp(log_p) : class_weight(log_p, eps);
    }
    const acc_t p_or_w = w_c;  // p_c when eps == 1
    if (is_y) w_c = f.w_target;
    const acc_t log_q = log_softmax_of(static_cast<acc_t>(x.v[i]) * row.inv_t, f.x_max, f.x_log_sum);
    const acc_t q_c = ofa_exp(log_q);
    out.v[i] = static_cast<scalar_t>(student_grad(f.weight_sum, q_c, w_c, f.scale_over_t));
    if (!row.want_tgrad) continue;
    // p only here: one more exp per element, unless eps == 1 (w = p)
    if (row.resident) log_p = log_softmax_of(static_cast<acc_t>(z.v[i]) * row.inv_t, ts.t_max, ts.t_log_sum);
    const acc_t p_c = eps == acc_t(1) ? p_or_w : ofa_exp(log_p);
    const acc_t h = is_y ? f.h_target : class_weight_grad_times_p(w_c, eps, log_q);
    const acc_t contribution = teacher_grad_from_products(h, p_c, f.sum_h, f.scale_over_t);
    if (row.resident) {
      row.t_acc[row.scratch_index(i)] += contribution;
    } else {
      t_contrib[i] = contribution;
    }
  }
}

// Gradient pass of branch k: student gradient (S q - w) scale / T and the teacher contribution
// (h - p H) scale / T; a streamed row re-reads its slots in reverse chunk order (likeliest in L2).
template <typename scalar_t, typename Ops>
OFA_ROW_FN void branch_gradients(const Ops& ops, const LaunchParams<scalar_t>& P, const RowPlan<scalar_t>& row,
                                 const TeacherStats<acc_of<scalar_t>>& ts, const ResidentSlots<scalar_t>& res, int k,
                                 const BranchFinal<acc_of<scalar_t>> f,  // a copy: rank 0 reuses the slot at k + 2
                                 const Pack<scalar_t>& x_resident) {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* x_row = branch_row(P, k, row.b);
  const bool x_aligned = phase_of(x_row) == row.phase;
  scalar_t* g_row = branch_grad_row(P, k, row.b);
  const bool g_aligned = phase_of(g_row) == row.phase;
  const bool last_branch = k + 1 == P.num_branches;
  for (int j = row.nchunks - 1; j >= 0; --j) {
    const int e0 = row.slot_start(j);
    if (!row.overlaps_row(e0)) continue;
    Pack<scalar_t> x = x_resident, z = res.z;
    if (!row.resident) {
      x = load_slot(ops, x_row, e0, row.C, x_aligned, true);
      z = load_slot(ops, row.t_row, e0, row.C, row.t_aligned, last_branch);
    }
    Pack<scalar_t> out;
    acc_t t_contrib[Pack<scalar_t>::kWidth];  // streamed rows only
    slot_gradients(row, ts, f, P.eps[k], e0, x, z, out, t_contrib);
    store_slot(ops, g_row, e0, row.C, g_aligned, out);
    if (row.want_tgrad && !row.resident) {
      write_teacher_slot(ops, P, row.b, e0, t_contrib, k == 0 && !P.tg_accumulate,
                         last_branch && P.grad_teacher != nullptr, row.phase);
    }
  }
}

// A resident row's teacher gradient, summed over this launch's branches in t_acc, written once.
template <typename scalar_t, typename Ops>
OFA_ROW_FN void write_resident_teacher_gradient(const Ops& ops, const LaunchParams<scalar_t>& P,
                                                const RowPlan<scalar_t>& row) {
  const int e0 = row.slot_start(0);
  if (!row.overlaps_row(e0)) return;
  acc_of<scalar_t> values[Pack<scalar_t>::kWidth];
OFA_UNROLL
  for (int i = 0; i < Pack<scalar_t>::kWidth; ++i) values[i] = row.t_acc[row.scratch_index(i)];
  write_teacher_slot(ops, P, row.b, e0, values, !P.tg_accumulate, P.grad_teacher != nullptr, row.phase);
}

// The whole computation of row b, run by every thread of its group (see the top of this file).
// `scratch` is shared memory of 2 * G * W acc_t (see row_scratch_bytes) for a resident row: the
// weights of each thread's slot and its teacher gradient. Registers would do too, but 16-bit inputs
// (W = 8) then spill.
template <typename scalar_t, typename Ops>
OFA_ROW_FN void ofa_row(const Ops& ops, const LaunchParams<scalar_t>& P, int64_t b, RowShared<acc_of<scalar_t>>& sh,
                        acc_of<scalar_t>* scratch) {
  const RowPlan<scalar_t> row = plan_row(ops, P, b, scratch);
  ResidentSlots<scalar_t> res;
  const TeacherStats<acc_of<scalar_t>> ts = teacher_pass(ops, P, row, sh, res);
  for (int k = 0; k < P.num_branches; ++k) {  // a loop, not unrolled: code size does not grow with K
    const Pack<scalar_t> x_resident = res.x_next;
    // The next branch's slot is in flight during this branch's reductions.
    if (row.resident && k + 1 < P.num_branches) res.x_next = resident_slot(ops, P, row, k + 1);
    const BranchFinal<acc_of<scalar_t>>& f = branch_loss(ops, P, row, ts, sh, res, k, x_resident);
    if (row.want_grad) branch_gradients(ops, P, row, ts, res, k, f, x_resident);
  }
  if (row.want_tgrad && row.resident) write_resident_teacher_gradient(ops, P, row);
}

}  // namespace cuda_kernel
}  // namespace ofakd
