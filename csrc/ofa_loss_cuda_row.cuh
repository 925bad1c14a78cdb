// The row program of the fused OFA loss CUDA kernel, and the host-side launch plan.
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
// The per-element formulas all come from ofa_row_math.h.
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
//   1. Teacher: running max and sum of exp over the row's slots, one group reduction -> max_t and
//      log_sum_t (rank 0 also computes p_y). Every branch below uses the exact
//      log_p = (z - max_t) - log_sum_t (in that order, like log_softmax: see log_softmax_of).
//   2. For each branch k in turn (a loop, not unrolled: registers and code size do not grow with K):
//      a. statistics over c != y: max_x, d = sum exp(x - max_x), S' = sum w, gap' = sum w (max_x - x),
//         with w = p ** eps_k = exp(eps_k log_p) (= p for eps 1; a resident row keeps w in registers
//         while consecutive branches share eps). A thread's gap' is rebased (gap' += S' (m_new -
//         m_old)) when its max grows, so every term is >= 0 and nothing cancels for logits of 1e4;
//      b. group reductions: the max (exact, to every thread), then each thread rebases its sums to it
//         once and the sums are added in double (to rank 0). Rank 0 adds the target class,
//         w_y = expm1(eps log1p(p_y)), writes loss = row_loss(S, gap, log d) and the constants of
//         the gradient pass to shared memory: max_x, log d, S, w_y, h_y, H, grad_scale / T;
//      c. (gradients only) student grad (S q - w) scale / T with log q = (x - max_x) - log d, and the teacher
//         contribution (h_c - p_c H) scale / T with h_c = p_c dl/dp_c = -eps w_c log q_c (c != y) and
//         H = sum_c h_c = eps * (non-target loss) + h_y, taken from the statistics (no extra pass,
//         never p ** (eps - 1)). The teacher gradient of a row held in registers accumulates there
//         over the branches; a streamed row accumulates it in an fp32 (fp64) workspace.
//   Row held in registers ("resident": C + phase <= G * W, e.g. C = 1000 fp32 with 256 threads):
//   every logit is read from memory exactly once (the next branch's slot is loaded while the current
//   one is reduced). Longer rows are streamed chunk by chunk: the teacher row once for its max and sum, then per
//   branch a statistics pass (branch row + teacher row) and a gradient pass (both again, in reverse
//   chunk order). Between two reads of the same bytes a block touches only ~2 rows, so the re-reads
//   are L2 hits on an A100/H100 and DRAM traffic stays near the floor.
//
// Numerics: math in float (double for double inputs) on values converted right after the load;
// eps == 1 uses w = p and S = 1 like the CPU kernel. A target outside [0, C) makes the row's loss
// and all its gradients NaN (no out-of-bounds read, no host synchronisation to check it).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// Everything one launch needs, passed by value (under 1 KB; the kernel parameter limit is 4 KB).
template <typename scalar_t>
struct LaunchParams {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* branch[kMaxBranchesPerLaunch];  // row 0 of each branch of this launch
  int64_t branch_stride[kMaxBranchesPerLaunch];   // row strides, in elements
  acc_t eps[kMaxBranchesPerLaunch];
  int num_branches;  // 1 .. kMaxBranchesPerLaunch
  const scalar_t* teacher;
  int64_t teacher_stride;
  const int64_t* target;  // [B], contiguous
  int64_t B, C;
  acc_t inv_t;       // 1 / temperature
  acc_t* loss_rows;  // [num_branches, B]: this launch's rows of the [K, B] output
  const acc_t* grad_scale;  // null: no gradients; else element [k, b] at k * stride_k + b * stride_b
  int64_t scale_stride_k, scale_stride_b;
  scalar_t* grad_branches;  // [num_branches, B, C] contiguous: this launch's part of [K, B, C]
  bool teacher_grad;        // add this launch's branches to the teacher gradient
  bool tg_accumulate;       // tg_work holds the sum over the previous launches
  acc_t* tg_work;           // [B, C] running teacher gradient (may alias grad_teacher if scalar_t == acc_t)
  scalar_t* grad_teacher;   // [B, C] final teacher gradient: set on the last launch only
};

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
// gap by s * (m_new - m_old) at every level, cost ~10 ulps of the loss at C = 1000).
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

// The whole computation of row b, run by every thread of its group (see the top of this file).
// `scratch` is shared memory of 2 * G * W acc_t (see row_scratch_bytes) for a resident row: the
// weights of each thread's slot and its teacher gradient, element i of thread r at i * G + r (a warp
// touches consecutive words: no bank conflicts). Registers would do too, but 16-bit inputs (W = 8)
// then spill. Barriers (ops.sync and inside the reductions) are reached by all threads of
// the group equally often: every condition around them is uniform over the group. Indices inside
// a row are 32-bit (the host checks C < 2^31 - 64); row offsets are 64-bit.
template <typename scalar_t, typename Ops>
OFA_ROW_FN void ofa_row(const Ops& ops, const LaunchParams<scalar_t>& P, int64_t b, RowShared<acc_of<scalar_t>>& sh,
                        acc_of<scalar_t>* scratch) {
  using acc_t = acc_of<scalar_t>;
  using PackT = Pack<scalar_t>;
  constexpr int W = PackT::kWidth;
  const int nk = P.num_branches;
  const int C = static_cast<int>(P.C);
  const acc_t inv_t = P.inv_t;
  const bool want_grad = P.grad_scale != nullptr;
  const bool want_tgrad = want_grad && P.teacher_grad;
  const int64_t target = P.target[b];
  const bool y_ok = target >= 0 && target < C;
  const int y = y_ok ? static_cast<int>(target) : -1;  // -1: no element is the target

  // The slot layout of this row: the phase most of its rows share.
  const scalar_t* t_row = P.teacher + b * P.teacher_stride;
  unsigned long long votes = 0;
  vote_phase(votes, t_row);
  for (int k = 0; k < nk; ++k) {
    vote_phase(votes, P.branch[k] + b * P.branch_stride[k]);
    if (want_grad) vote_phase(votes, P.grad_branches + (k * P.B + b) * P.C);
  }
  if (want_tgrad && P.grad_teacher != nullptr) vote_phase(votes, P.grad_teacher + b * P.C);
  const int phase = winning_phase<scalar_t>(votes);
  const bool t_aligned = phase_of(t_row) == phase;

  const int G = ops.size();
  const int r = ops.rank();
  const int nslots = (C + phase + W - 1) / W;
  const int nchunks = (nslots + G - 1) / G;
  // One slot per thread: the teacher slot and the current branch slot stay in registers and every
  // logit is read once. Otherwise each pass streams the row again (from L2 when it is still there).
  const bool resident = nchunks == 1;
  const int e0_resident = r * W - phase;
  acc_t* const w_res = scratch;          // [W][G]: resident weights for eps = w_res_eps
  acc_t* const t_acc = scratch + W * G;  // [W][G]: resident teacher gradient

  // ---------------------------------------------------------------- teacher: max and log-sum
  PackT z_res{};
  PackT x_next{};  // resident: the next branch's slot, loaded one branch ahead
  Partial<acc_t> tp = empty_partial<acc_t>();
  for (int j = 0; j < nchunks; ++j) {
    const int e0 = (j * G + r) * W - phase;
    const PackT z = load_slot(ops, t_row, e0, C, t_aligned, resident);
    if (resident) {
      z_res = z;
      const scalar_t* x0 = P.branch[0] + b * P.branch_stride[0];
      x_next = load_slot(ops, x0, e0, C, phase_of(x0) == phase, true);
    }
    add_teacher_slot(tp, z, e0, C, inv_t);
  }
  const acc_t t_max = ops.reduce_max(tp.m);  // in every thread
  const Sums t_sums = ops.reduce_sum(rebased_sums(tp, t_max));  // at rank 0
  acc_t p_y = acc_t(0), log1p_p_y = acc_t(0);  // rank 0 only
  if (r == 0) {
    sh.t_log_sum = ofa_log(static_cast<acc_t>(t_sums.d));
    if (y_ok) p_y = ofa_exp(log_softmax_of(static_cast<acc_t>(ops.load_one(t_row + y)) * inv_t, t_max, sh.t_log_sum));
    log1p_p_y = ofa_log1p(p_y);
  }
  if (want_tgrad && resident) {
OFA_UNROLL
    for (int i = 0; i < W; ++i) t_acc[i * G + r] = acc_t(0);
  }
  ops.sync();
  const acc_t t_log_sum = sh.t_log_sum;

  // Resident row: the weights of this thread's slot, recomputed only when eps changes (OFA usually
  // gives every branch the same eps: one exp per element per row instead of one per branch).
  acc_t w_res_eps = acc_t(0);  // 0: none yet (every eps is > 0)

  for (int k = 0; k < nk; ++k) {
    const scalar_t* x_row = P.branch[k] + b * P.branch_stride[k];
    const bool x_aligned = phase_of(x_row) == phase;
    const acc_t eps = P.eps[k];
    const PackT x_cur = x_next;
    if (resident && k + 1 < nk) {  // in flight during this branch's reductions
      const scalar_t* x1 = P.branch[k + 1] + b * P.branch_stride[k + 1];
      x_next = load_slot(ops, x1, e0_resident, C, phase_of(x1) == phase, true);
    }

    // ------------------------------------------------------------ branch statistics and loss
    Partial<acc_t> q = empty_partial<acc_t>();
    if (resident) {
      acc_t w[W];
      if (eps != w_res_eps) {
        slot_weights(z_res, inv_t, t_max, t_log_sum, eps, w);
OFA_UNROLL
        for (int i = 0; i < W; ++i) w_res[i * G + r] = w[i];
        w_res_eps = eps;
      } else {
OFA_UNROLL
        for (int i = 0; i < W; ++i) w[i] = w_res[i * G + r];
      }
      add_branch_slot(q, x_cur, w, e0_resident, C, y, inv_t);
    } else {
      for (int j = 0; j < nchunks; ++j) {
        const int e0 = (j * G + r) * W - phase;
        if (e0 + W <= 0 || e0 >= C) continue;
        // Without gradients this is the branch row's only read; the teacher is read by every branch.
        const PackT x = load_slot(ops, x_row, e0, C, x_aligned, !want_grad);
        const PackT z = load_slot(ops, t_row, e0, C, t_aligned, false);
        acc_t w[W];
        slot_weights(z, inv_t, t_max, t_log_sum, eps, w);
        add_branch_slot(q, x, w, e0, C, y, inv_t);
      }
    }
    const acc_t x_max = ops.reduce_max(q.m);  // in every thread
    // At rank 0, over c != y: d = sum exp(x - x_max), gap = sum w (x_max - x), s = sum w.
    const Sums x_sums = ops.reduce_sum(rebased_sums(q, x_max));
    BranchFinal<acc_t>& shared_final = sh.branch[k & 1];
    if (r == 0) {
      const acc_t log_d = ofa_log(static_cast<acc_t>(x_sums.d));
      const acc_t gap_nt = static_cast<acc_t>(x_sums.gap), s_nt = static_cast<acc_t>(x_sums.s);
      const acc_t x_y = y_ok ? static_cast<acc_t>(ops.load_one(x_row + y)) * inv_t : acc_t(0);
      const acc_t w_y = eps == acc_t(1) ? p_y : target_weight(p_y, eps);
      const acc_t weight_sum = eps == acc_t(1) ? acc_t(1) : s_nt + w_y;  // S = 1 exactly for eps = 1, as on CPU
      const acc_t loss = row_loss(weight_sum, gap_nt + w_y * (x_max - x_y), log_d);
      P.loss_rows[k * P.B + b] = y_ok ? loss : quiet_nan<acc_t>();
      if (want_grad) {
        shared_final.x_max = x_max;
        shared_final.x_log_sum = log_d;
        shared_final.weight_sum = weight_sum;
        shared_final.w_target = w_y;
        shared_final.h_target = p_y * weight_grad(log1p_p_y, eps, log_softmax_of(x_y, x_max, log_d));
        // H = sum_c p_c g_c = eps * sum_{c != y} w_c (-log q_c) + h_y: all terms >= 0.
        shared_final.sum_h = eps * row_loss(s_nt, gap_nt, log_d) + shared_final.h_target;
        shared_final.scale_over_t =
            y_ok ? P.grad_scale[k * P.scale_stride_k + b * P.scale_stride_b] * inv_t : quiet_nan<acc_t>();
      }
    }
    // Publishes shared_final; also orders warp 0's reads of the cross-warp scratch of reduce_sum
    // before the next reduce_sum's writes, and everyone's copy of slot k & 1 before rank 0 rewrites
    // it for branch k + 2.
    ops.sync();
    if (!want_grad) continue;

    // ------------------------------------------------------------ gradients of branch k
    const BranchFinal<acc_t> f = shared_final;
    scalar_t* g_row = P.grad_branches + (k * P.B + b) * P.C;
    const bool g_aligned = phase_of(g_row) == phase;
    const bool last_branch = k + 1 == nk;
    for (int j = nchunks - 1; j >= 0; --j) {  // reverse: the chunks read last are likeliest in L2
      const int e0 = (j * G + r) * W - phase;
      if (e0 + W <= 0 || e0 >= C) continue;
      PackT x = x_cur, z = z_res;
      if (!resident) {
        x = load_slot(ops, x_row, e0, C, x_aligned, true);
        z = load_slot(ops, t_row, e0, C, t_aligned, last_branch);
      }
      PackT out;
      acc_t t_contrib[W];  // streamed rows only
OFA_UNROLL
      for (int i = 0; i < W; ++i) {
        const bool is_y = e0 + i == y;
        acc_t log_p = acc_t(0), w_c;
        if (resident) {
          w_c = w_res[i * G + r];
        } else {
          log_p = log_softmax_of(static_cast<acc_t>(z.v[i]) * inv_t, t_max, t_log_sum);
          w_c = eps == acc_t(1) ? ofa_exp(log_p) : class_weight(log_p, eps);
        }
        const acc_t p_or_w = w_c;  // p_c when eps == 1
        if (is_y) w_c = f.w_target;
        const acc_t log_q = log_softmax_of(static_cast<acc_t>(x.v[i]) * inv_t, f.x_max, f.x_log_sum);
        const acc_t q_c = ofa_exp(log_q);
        out.v[i] = static_cast<scalar_t>(student_grad(f.weight_sum, q_c, w_c, f.scale_over_t));
        if (want_tgrad) {  // p only here: one more exp per element, unless eps == 1 (w = p)
          if (resident) log_p = log_softmax_of(static_cast<acc_t>(z.v[i]) * inv_t, t_max, t_log_sum);
          const acc_t p_c = eps == acc_t(1) ? p_or_w : ofa_exp(log_p);
          const acc_t h = is_y ? f.h_target : class_weight_grad_times_p(w_c, eps, log_q);
          const acc_t contribution = teacher_grad_from_products(h, p_c, f.sum_h, f.scale_over_t);
          if (resident) {
            t_acc[i * G + r] += contribution;
          } else {
            t_contrib[i] = contribution;
          }
        }
      }
      store_slot(ops, g_row, e0, C, g_aligned, out);
      if (want_tgrad && !resident) {
        write_teacher_slot(ops, P, b, e0, t_contrib, k == 0 && !P.tg_accumulate,
                           last_branch && P.grad_teacher != nullptr, phase);
      }
    }
  }
  if (want_tgrad && resident && e0_resident + W > 0 && e0_resident < C) {
    acc_t values[W];
OFA_UNROLL
    for (int i = 0; i < W; ++i) values[i] = t_acc[i * G + r];
    write_teacher_slot(ops, P, b, e0_resident, values, !P.tg_accumulate, P.grad_teacher != nullptr, phase);
  }
}

// ------------------------------------------------------------------------------------ host side

// How a call is launched (see ofa_loss_cuda.cu for the shapes of the reference problems): one
// block per row, the smallest power of two >= the row's slots threads (32 .. kMaxRowThreads).
struct LaunchShape {
  int threads;          // per block = per row
  int64_t blocks;       // = B
  int64_t chunks;       // slots per thread for the worst phase: 1 = the row stays in registers
  size_t shared_bytes;  // dynamic shared memory: ofa_row's scratch
};

// ofa_row's scratch: 2 * threads * W acc_t (8 KB for 256 threads in fp32, 32 KB at most).
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
    while (threads < slots && threads < kMaxRowThreads) threads *= 2;
  }
  LaunchShape shape;
  shape.threads = threads;
  shape.blocks = B;
  shape.chunks = (slots + threads - 1) / threads;
  shape.shared_bytes = row_scratch_bytes(threads, elem_size);
  return shape;
}

// One call of the op, in pointers (outputs allocated by the caller).
template <typename scalar_t>
struct Problem {
  using acc_t = acc_of<scalar_t>;
  std::vector<const scalar_t*> branch;  // K branch matrices [B, C], row 0
  std::vector<int64_t> branch_stride;
  std::vector<double> eps;
  const scalar_t* teacher = nullptr;
  int64_t teacher_stride = 0;
  const int64_t* target = nullptr;
  int64_t B = 0, C = 0;
  double temperature = 1.0;
  acc_t* loss_rows = nullptr;         // [K, B]
  const acc_t* grad_scale = nullptr;  // null: no gradients
  int64_t scale_stride_k = 0, scale_stride_b = 0;
  scalar_t* grad_branches = nullptr;  // [K, B, C]
  scalar_t* grad_teacher = nullptr;   // [B, C], or null: no teacher gradient
  // [B, C] acc_t, required by the teacher gradient when needs_teacher_workspace (may be grad_teacher
  // itself when scalar_t is acc_t).
  acc_t* teacher_workspace = nullptr;
};

inline int64_t branch_launches(int64_t K) { return (K + kMaxBranchesPerLaunch - 1) / kMaxBranchesPerLaunch; }

// The teacher gradient is summed in memory (not in registers) when a row is streamed in several
// chunks or the branches take several launches.
inline bool needs_teacher_workspace(int64_t K, const LaunchShape& shape) {
  return shape.chunks > 1 || branch_launches(K) > 1;
}

// Calls launch(params) once per group of at most kMaxBranchesPerLaunch consecutive branches. Each
// group adds its teacher gradient to the previous groups' sum; the last writes the final value.
template <typename scalar_t, typename Launch>
void launch_branch_groups(const Problem<scalar_t>& pb, Launch&& launch) {
  using acc_t = acc_of<scalar_t>;
  const int64_t K = static_cast<int64_t>(pb.branch.size());
  const bool want_tgrad = pb.grad_scale != nullptr && pb.grad_teacher != nullptr;
  for (int64_t k0 = 0; k0 < K; k0 += kMaxBranchesPerLaunch) {
    const int n = static_cast<int>(K - k0 < kMaxBranchesPerLaunch ? K - k0 : kMaxBranchesPerLaunch);
    LaunchParams<scalar_t> P;
    std::memset(&P, 0, sizeof(P));
    for (int k = 0; k < n; ++k) {
      P.branch[k] = pb.branch[k0 + k];
      P.branch_stride[k] = pb.branch_stride[k0 + k];
      P.eps[k] = static_cast<acc_t>(pb.eps[k0 + k]);
    }
    P.num_branches = n;
    P.teacher = pb.teacher;
    P.teacher_stride = pb.teacher_stride;
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
    if (want_tgrad) {
      P.teacher_grad = true;
      P.tg_accumulate = k0 > 0;
      P.tg_work = pb.teacher_workspace;
      if (k0 + n >= K) P.grad_teacher = pb.grad_teacher;
    }
    launch(P);
  }
}

}  // namespace cuda_kernel
}  // namespace ofakd
