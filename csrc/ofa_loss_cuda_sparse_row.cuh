// The row program of the sparse-teacher CUDA kernel (ofakd_fast_C::fused_forward_sparse): device code
// templated on the same `Ops` as the dense row program (ofa_loss_cuda_row.cuh), whose slot layout,
// loads, stores, per-slot statistics and group reductions it reuses. Run on the GPU by
// ofa_sparse_rows_kernel (ofa_loss_cuda_kernel.cuh) and on the host by tests/loss/cuda_emulator.cpp.
//
// The teacher of row b is k stored classes A with logits t_i and lse_t = logsumexp(t / T) over all C
// classes (shared/docs/ofa-loss.md, "A sparse teacher"): log p_i = t_i / T - lse_t for i in A, the rest
// r = 1 - sum_A p_i spread evenly over the C - k others (log_rest_probability). No dense teacher row is
// built or read. For one row group (one block) and up to kMaxBranchesPerLaunch branches:
//   1. Teacher (sparse_teacher_pass): the k stored classes spread over the group's threads; one max and
//      one sum reduction give log sum_A p_i, whether y is in A, and p_y (stored, else the rest's).
//   2. Per branch k, loss (sparse_branch_loss): one pass over the student row gathers max_x, the
//      exp-sum d and the gap G(all) = sum_c (max_x - x_c) (add_branch_slot with weights 1: every term
//      >= 0, rebased to the group max, summed in double). Every thread folds in its stored classes:
//        weighted_gap = w_rest G(all) + sum_{i in A, i != y} (w_i - w_rest)(max_x - x_i)
//                       + (w_y - w_rest)(max_x - x_y)        [the last term at rank 0]
//        S = sum_{i in A, i != y} w_i + w_y + w_rest (C - k - [y not in A])
//      with w_i = p_i ** eps, w_y = expm1(eps log1p(p_y)), w_rest = p_rest ** eps (0 if there is no
//      rest), and l = weighted_gap + S log d. One reduction of three sums per branch, as in the dense.
//   3. Per branch k, gradients (sparse_branch_gradients): (S q_c - w_rest) scale / T stored for every
//      class in the dense program's slot layout (the row read once more, or not at all when resident),
//      then, after a barrier, (S q_i - w_i) scale / T stored again at the stored classes and y.
// A target outside [0, C), or a stored class outside it (never read or written), makes the row's loss
// and gradients NaN, like the dense kernel's out-of-range targets.
#pragma once

#include "ofa_loss_cuda_row.cuh"

namespace ofakd {
namespace cuda_kernel {

// Everything one launch of the sparse-teacher kernel needs (the kernel argument, by value): the
// branches and each row's stored teacher classes.
template <typename scalar_t>
struct SparseLaunchParams : BranchParams<scalar_t> {
  using acc_t = acc_of<scalar_t>;
  const acc_t* teacher_logits;     // [B, k] contiguous
  const int64_t* teacher_indices;  // [B, k] contiguous, distinct classes per row
  const acc_t* teacher_lse;        // [B]: logsumexp(t / T) over all C classes
  int64_t k;                       // stored classes per row, 0 .. C
};
static_assert(sizeof(SparseLaunchParams<double>) <= 4096, "SparseLaunchParams must fit the kernel parameter space");

// Per-branch constants of the gradient pass, written by rank 0 (double-buffered like BranchFinal).
template <typename acc_t>
struct SparseBranchFinal {
  acc_t x_max, x_log_sum;  // log q_c = (x_c - x_max) - x_log_sum
  acc_t weight_sum;        // S
  acc_t w_target;          // w_y
  acc_t w_rest;            // the weight of every class neither stored nor y
  acc_t scale_over_t;      // grad_scale[k, b] / T (NaN for a bad row)
};

// Shared memory of one row.
template <typename acc_t>
struct SparseRowShared {
  acc_t log_rest;  // log of one non-stored class's probability (-inf: k = C or no rest mass)
  SparseBranchFinal<acc_t> branch[2];
};

// One stored class of the row: its class (-1 when outside [0, C)) and log p = t / T - lse_t.
template <typename acc_t>
struct StoredClass {
  int c;
  acc_t log_p;
};

// Stored entry j of row b.
template <typename scalar_t, typename Ops>
OFA_ROW_FN StoredClass<acc_of<scalar_t>> stored_class(const Ops& ops, const SparseLaunchParams<scalar_t>& P,
                                                      const RowLayout<scalar_t>& row, int64_t j) {
  const int64_t at = row.b * P.k + j;
  const int64_t c = ops.load_one(P.teacher_indices + at);
  StoredClass<acc_of<scalar_t>> s;
  s.c = c >= 0 && c < row.C ? static_cast<int>(c) : -1;
  s.log_p = ops.load_one(P.teacher_logits + at) * row.inv_t - ops.load_one(P.teacher_lse + row.b);
  return s;
}

// The teacher's statistics the branches use.
template <typename acc_t>
struct SparseTeacherStats {
  acc_t log_rest;  // every thread: log p of a non-stored class
  acc_t p_y;       // rank 0: the target's probability, stored or the rest's (0 for a bad target)
  bool y_stored;   // rank 0: y is one of the stored classes
  bool row_ok;     // rank 0: the target and every stored class lie in [0, C)
};

// This thread's stored classes: running max and exp-sum of log p in `tp`, and in the returned sums
// gap = p_y and s = 1 if y is among them; d = NaN if a class lies outside [0, C) or its log p is NaN.
template <typename scalar_t, typename Ops>
OFA_ROW_FN Sums stored_partial(const Ops& ops, const SparseLaunchParams<scalar_t>& P, const RowLayout<scalar_t>& row,
                               Partial<acc_of<scalar_t>>& tp) {
  using acc_t = acc_of<scalar_t>;
  Sums found{0.0, 0.0, 0.0};
  for (int64_t j = row.r; j < P.k; j += row.G) {
    const StoredClass<acc_t> s = stored_class(ops, P, row, j);
    if (s.c < 0 || !(s.log_p == s.log_p)) found.d = quiet_nan<double>();
    if (s.c >= 0 && s.c == row.y) {
      found.gap = static_cast<double>(ofa_exp(s.log_p));
      found.s += 1.0;
    }
    if (s.log_p == neg_infinity<acc_t>()) continue;  // p = 0 adds nothing (and -inf - -inf is NaN)
    if (s.log_p > tp.m) {
      tp.d *= ofa_exp(tp.m - s.log_p);  // 0 * 0 while empty
      tp.m = s.log_p;
    }
    tp.d += ofa_exp(s.log_p - tp.m);
  }
  return found;
}

// Teacher pass over the k stored classes, spread over the group: the log of their mass (one max and
// one sum reduction) and from it log_rest, and at rank 0 the target's probability and the row's state.
template <typename scalar_t, typename Ops>
OFA_ROW_FN SparseTeacherStats<acc_of<scalar_t>> sparse_teacher_pass(const Ops& ops, const SparseLaunchParams<scalar_t>& P,
                                                                    const RowLayout<scalar_t>& row,
                                                                    SparseRowShared<acc_of<scalar_t>>& sh) {
  using acc_t = acc_of<scalar_t>;
  Partial<acc_t> tp = empty_partial<acc_t>();
  const Sums found = stored_partial(ops, P, row, tp);
  const acc_t m_all = ops.reduce_max(tp.m);  // in every thread
  Sums mine = rebased_sums(tp, m_all);
  mine.d += found.d;
  mine.gap = found.gap;
  mine.s = found.s;
  const Sums sums = ops.reduce_sum(mine);  // at rank 0
  SparseTeacherStats<acc_t> ts{acc_t(0), acc_t(0), false, false};
  if (row.r == 0) {
    const acc_t log_stored_mass = m_all + ofa_log(static_cast<acc_t>(sums.d));
    sh.log_rest = log_rest_probability(log_stored_mass, static_cast<long long>(row.C - P.k));
    ts.row_ok = row.y_ok && sums.d == sums.d;
    ts.y_stored = sums.s > 0.0;
    ts.p_y = !row.y_ok ? acc_t(0) : ts.y_stored ? static_cast<acc_t>(sums.gap) : ofa_exp(sh.log_rest);
  }
  ops.sync();  // publishes log_rest
  ts.log_rest = sh.log_rest;
  return ts;
}

// Statistics pass of branch k over all C classes: this thread's max_x, sum exp(x - max_x) and gap
// sum (max_x - x) (weights 1, no class left out), so G(all) needs nothing of the teacher.
template <typename scalar_t, typename Ops>
OFA_ROW_FN Partial<acc_of<scalar_t>> student_partial(const Ops& ops, const BranchParams<scalar_t>& P,
                                                     const RowLayout<scalar_t>& row, int k,
                                                     const Pack<scalar_t>& x_resident) {
  using acc_t = acc_of<scalar_t>;
  acc_t ones[Pack<scalar_t>::kWidth];
OFA_UNROLL
  for (int i = 0; i < Pack<scalar_t>::kWidth; ++i) ones[i] = acc_t(1);
  Partial<acc_t> q = empty_partial<acc_t>();
  if (row.resident) {
    add_branch_slot(q, x_resident, ones, row.slot_start(0), row.C, -1, row.inv_t);
    return q;
  }
  const scalar_t* x_row = branch_row(P, k, row.b);
  const bool x_aligned = phase_of(x_row) == row.phase;
  for (int j = 0; j < row.nchunks; ++j) {
    const int e0 = row.slot_start(j);
    if (!row.overlaps_row(e0)) continue;
    // Without gradients this is the branch row's only read.
    add_branch_slot(q, load_slot(ops, x_row, e0, row.C, x_aligned, !row.want_grad), ones, e0, row.C, -1, row.inv_t);
  }
  return q;
}

// Adds this thread's stored classes other than y to the sums of branch k: s += w_i and
// gap += (w_i - w_rest)(max_x - x_i), what they add to w_rest * G(all).
template <typename scalar_t, typename Ops>
OFA_ROW_FN void add_stored_terms(const Ops& ops, const SparseLaunchParams<scalar_t>& P, const RowLayout<scalar_t>& row,
                                 int k, acc_of<scalar_t> x_max, acc_of<scalar_t> w_rest, Sums& sums) {
  using acc_t = acc_of<scalar_t>;
  const scalar_t* x_row = branch_row(P, k, row.b);
  for (int64_t j = row.r; j < P.k; j += row.G) {
    const StoredClass<acc_t> s = stored_class(ops, P, row, j);
    if (s.c < 0 || s.c == row.y) continue;
    const acc_t w = class_weight(s.log_p, P.eps[k]);
    const acc_t gap = x_max - static_cast<acc_t>(ops.load_one(x_row + s.c)) * row.inv_t;
    sums.s += static_cast<double>(w);
    sums.gap += (static_cast<double>(w) - static_cast<double>(w_rest)) * static_cast<double>(gap);
  }
}

// Rank 0, from branch k's reduced sums (d, the weighted gap and S without y and the rest): the loss,
// and (gradients only) the constants of the gradient pass. The target class enters here.
template <typename scalar_t, typename Ops>
OFA_ROW_FN void finish_sparse_branch(const Ops& ops, const SparseLaunchParams<scalar_t>& P,
                                     const RowLayout<scalar_t>& row, const SparseTeacherStats<acc_of<scalar_t>>& ts,
                                     int k, acc_of<scalar_t> x_max, acc_of<scalar_t> w_rest, const Sums& sums,
                                     SparseBranchFinal<acc_of<scalar_t>>& f) {
  using acc_t = acc_of<scalar_t>;
  const acc_t log_d = ofa_log(static_cast<acc_t>(sums.d));
  const acc_t x_y = row.y_ok ? static_cast<acc_t>(ops.load_one(branch_row(P, k, row.b) + row.y)) * row.inv_t : acc_t(0);
  const acc_t w_y = target_weight(ts.p_y, P.eps[k]);
  const double rest_classes = static_cast<double>(row.C - P.k - (ts.y_stored ? 0 : 1));
  const double weight_sum = sums.s + static_cast<double>(w_y) + static_cast<double>(w_rest) * rest_classes;
  const double gap = sums.gap + (static_cast<double>(w_y) - static_cast<double>(w_rest)) * static_cast<double>(x_max - x_y);
  const acc_t loss = static_cast<acc_t>(row_loss(weight_sum, gap, static_cast<double>(log_d)));
  P.loss_rows[k * P.B + row.b] = ts.row_ok ? loss : quiet_nan<acc_t>();
  if (!row.want_grad) return;
  f.x_max = x_max;
  f.x_log_sum = log_d;
  f.weight_sum = static_cast<acc_t>(weight_sum);
  f.w_target = w_y;
  f.w_rest = w_rest;
  f.scale_over_t =
      ts.row_ok ? P.grad_scale[k * P.scale_stride_k + row.b * P.scale_stride_b] * row.inv_t : quiet_nan<acc_t>();
}

// Loss of branch k: the student pass, its two group reductions (the max; then d, the weighted gap and
// S with every thread's stored classes folded in), rank 0's finish. Returns the shared constants of
// the gradient pass, published by the barrier at its end.
template <typename scalar_t, typename Ops>
OFA_ROW_FN const SparseBranchFinal<acc_of<scalar_t>>& sparse_branch_loss(
    const Ops& ops, const SparseLaunchParams<scalar_t>& P, const RowLayout<scalar_t>& row,
    const SparseTeacherStats<acc_of<scalar_t>>& ts, SparseRowShared<acc_of<scalar_t>>& sh, int k,
    const Pack<scalar_t>& x_resident) {
  using acc_t = acc_of<scalar_t>;
  const Partial<acc_t> q = student_partial(ops, P, row, k, x_resident);
  const acc_t x_max = ops.reduce_max(q.m);  // in every thread
  const acc_t w_rest = ofa_exp(P.eps[k] * ts.log_rest);  // 0 when there is no rest
  Sums sums = rebased_sums(q, x_max);  // d, G and the count of this thread's classes
  sums.gap *= static_cast<double>(w_rest);
  sums.s = 0.0;
  add_stored_terms(ops, P, row, k, x_max, w_rest, sums);
  sums = ops.reduce_sum(sums);  // at rank 0
  SparseBranchFinal<acc_t>& shared_final = sh.branch[k & 1];
  if (row.r == 0) finish_sparse_branch(ops, P, row, ts, k, x_max, w_rest, sums, shared_final);
  ops.sync();  // publishes shared_final and orders the reduction scratch, as in branch_loss
  return shared_final;
}

// Student gradient of one element: (S q - w) scale / T with log q = (x - x_max) - x_log_sum.
template <typename scalar_t>
OFA_ROW_FN scalar_t sparse_grad(const SparseBranchFinal<acc_of<scalar_t>>& f, acc_of<scalar_t> x, acc_of<scalar_t> w) {
  const acc_of<scalar_t> q = ofa_exp(log_softmax_of(x, f.x_max, f.x_log_sum));
  return static_cast<scalar_t>(student_grad(f.weight_sum, q, w, f.scale_over_t));
}

// Dense part of branch k's gradient: (S q_c - w_rest) scale / T for every class, in the slot layout
// (a streamed row re-reads its slots in reverse chunk order, likeliest in L2).
template <typename scalar_t, typename Ops>
OFA_ROW_FN void rest_gradients(const Ops& ops, const BranchParams<scalar_t>& P, const RowLayout<scalar_t>& row, int k,
                               const SparseBranchFinal<acc_of<scalar_t>>& f, const Pack<scalar_t>& x_resident) {
  const scalar_t* x_row = branch_row(P, k, row.b);
  const bool x_aligned = phase_of(x_row) == row.phase;
  scalar_t* g_row = branch_grad_row(P, k, row.b);
  const bool g_aligned = phase_of(g_row) == row.phase;
  for (int j = row.nchunks - 1; j >= 0; --j) {
    const int e0 = row.slot_start(j);
    if (!row.overlaps_row(e0)) continue;
    const Pack<scalar_t> x = row.resident ? x_resident : load_slot(ops, x_row, e0, row.C, x_aligned, true);
    Pack<scalar_t> out;
OFA_UNROLL
    for (int i = 0; i < Pack<scalar_t>::kWidth; ++i)
      out.v[i] = sparse_grad<scalar_t>(f, static_cast<acc_of<scalar_t>>(x.v[i]) * row.inv_t, f.w_rest);
    store_slot(ops, g_row, e0, row.C, g_aligned, out);
  }
}

// Rewrites branch k's gradient at class c with its own weight w (one element load and store).
template <typename scalar_t, typename Ops>
OFA_ROW_FN void class_gradient(const Ops& ops, const BranchParams<scalar_t>& P, const RowLayout<scalar_t>& row, int k,
                               const SparseBranchFinal<acc_of<scalar_t>>& f, int c, acc_of<scalar_t> w) {
  const acc_of<scalar_t> x = static_cast<acc_of<scalar_t>>(ops.load_one(branch_row(P, k, row.b) + c)) * row.inv_t;
  ops.store_one(branch_grad_row(P, k, row.b) + c, sparse_grad<scalar_t>(f, x, w));
}

// Gradient pass of branch k: the dense store, a barrier, then the stored classes (spread over the
// group) and y (rank 0) rewritten with their own weights, so these stores land last.
template <typename scalar_t, typename Ops>
OFA_ROW_FN void sparse_branch_gradients(const Ops& ops, const SparseLaunchParams<scalar_t>& P,
                                        const RowLayout<scalar_t>& row, int k,
                                        const SparseBranchFinal<acc_of<scalar_t>> f,  // a copy: see branch_gradients
                                        const Pack<scalar_t>& x_resident) {
  using acc_t = acc_of<scalar_t>;
  rest_gradients(ops, P, row, k, f, x_resident);
  ops.sync();  // every thread's dense stores before the rewrites of the same elements
  for (int64_t j = row.r; j < P.k; j += row.G) {
    const StoredClass<acc_t> s = stored_class(ops, P, row, j);
    if (s.c >= 0 && s.c != row.y) class_gradient(ops, P, row, k, f, s.c, class_weight(s.log_p, P.eps[k]));
  }
  if (row.r == 0 && row.y_ok) class_gradient(ops, P, row, k, f, row.y, f.w_target);
}

// The whole computation of row b, run by every thread of its group (see the top of this file).
template <typename scalar_t, typename Ops>
OFA_ROW_FN void ofa_sparse_row(const Ops& ops, const SparseLaunchParams<scalar_t>& P, int64_t b,
                               SparseRowShared<acc_of<scalar_t>>& sh) {
  RowLayout<scalar_t> row;
  plan_layout(ops, P, b, row);
  unsigned long long votes = 0;
  vote_branch_phases(votes, P, b, row.want_grad);
  set_phase(row, winning_phase<scalar_t>(votes));
  Pack<scalar_t> x_next{};
  if (row.resident) x_next = resident_slot(ops, P, row, 0);  // in flight during the teacher pass
  const SparseTeacherStats<acc_of<scalar_t>> ts = sparse_teacher_pass(ops, P, row, sh);
  for (int k = 0; k < P.num_branches; ++k) {  // a loop, not unrolled: code size does not grow with K
    const Pack<scalar_t> x_resident = x_next;
    if (row.resident && k + 1 < P.num_branches) x_next = resident_slot(ops, P, row, k + 1);
    const SparseBranchFinal<acc_of<scalar_t>>& f = sparse_branch_loss(ops, P, row, ts, sh, k, x_resident);
    if (row.want_grad) sparse_branch_gradients(ops, P, row, k, f, x_resident);
  }
}

}  // namespace cuda_kernel
}  // namespace ofakd
