// The sparse-teacher rows of the CPU kernel (ofakd_fast_C::fused_forward_sparse; shared/docs/ofa-loss.md,
// "A sparse teacher"). Row b's teacher is k stored classes A with logits t_i and lse_t = logsumexp(t / T)
// over all C classes: log p_i = t_i / T - lse_t exactly, and the rest r = 1 - sum_A p_i is spread evenly
// over the C - k others (log_rest_probability). Per row, the k stored entries give log p once; per
// distinct eps, the k weights w_i = p_i ** eps, w_y = expm1(eps log1p p_y) (p_y stored or the rest's),
// w_rest = p_rest ** eps and S. Per branch, the student pass the dense kernel uses (StudentRows) with
// weights 1 gathers max_x, the exp-sum and G(all) = sum_c (max_x - x_c); then
//   weighted_gap = sum_{A} w_i g_i + [y not in A] w_y g_y + w_rest (G(all) - sum_{A} g_i - [y not in A] g_y)
// with g_c = max_x - x_c, and l = weighted_gap + S log(exp-sum). The gradient row is written densely with
// w_rest, then the stored classes and y are written again with their own weights. No dense teacher row
// is ever built.
#pragma once

#include <limits>
#include <vector>

#include "ofa_loss_cpu_row.h"

namespace ofakd {
namespace cpu_kernel {

// The stored teacher rows: logits [B, k] and lse [B] in acc_t, int64 classes [B, k] in [0, C).
template <typename acc_t>
struct SparseTeacherPtrs {
  const acc_t* logits;
  const int64_t* indices;
  const acc_t* lse;
  int64_t k;
};

// One teacher row: log p of its k stored classes, the log p each of the `others` = C - k non-stored
// classes gets (-inf when they have no mass), where y is, and the weights of the current eps.
template <typename acc_t>
struct SparseTeacherRow {
  explicit SparseTeacherRow(int64_t k) : log_p(k), w(k), k(k) {}
  std::vector<acc_t> log_p, w;  // w[y_slot] is w_y
  int64_t k;
  const int64_t* classes = nullptr;
  int64_t others = 0, y = 0, y_slot = -1;  // y_slot: y's position among the stored classes, -1 if none
  acc_t log_p_rest = 0;
  acc_t weight_sum = 0, w_target = 0, w_rest = 0;  // S, w_y, w_rest
};

// Reads row b of the stored teacher: log p_i, and the rest's log p from the stored mass, whose
// log-sum-exp is taken about its max (nothing overflows, and r = -expm1 of it does not cancel).
template <typename acc_t>
void load_sparse_row(const SparseTeacherPtrs<acc_t>& teacher, int64_t b, int64_t C, int64_t y, acc_t inv_t,
                     SparseTeacherRow<acc_t>& row) {
  const acc_t* logits = teacher.logits + b * row.k;
  const acc_t lse = teacher.lse[b];
  row.classes = teacher.indices + b * row.k;
  row.others = C - row.k;
  row.y = y;
  row.y_slot = -1;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < row.k; ++i) {
    row.log_p[i] = logits[i] * inv_t - lse;
    m = std::max(m, row.log_p[i]);
    if (row.classes[i] == y) row.y_slot = i;
  }
  acc_t log_stored_mass = m;  // -inf: no stored mass
  if (m > -std::numeric_limits<acc_t>::infinity()) {
    acc_t sum = 0;
    for (int64_t i = 0; i < row.k; ++i) sum += ofa_exp(row.log_p[i] - m);
    log_stored_mass = m + ofa_log(sum);
  }
  row.log_p_rest = log_rest_probability(log_stored_mass, static_cast<long long>(row.others));
}

// The weights of one eps: w_i of the stored classes, w_y (y stored or not), the rest's one weight
// (0 when the rest has no mass) and S = sum_{A, != y} w_i + w_y + w_rest (C - k - [y not in A]).
template <typename acc_t>
void sparse_weights(SparseTeacherRow<acc_t>& row, acc_t eps) {
  const bool has_rest = row.log_p_rest > -std::numeric_limits<acc_t>::infinity();
  row.w_rest = has_rest ? class_weight(row.log_p_rest, eps) : acc_t(0);
  acc_t sum = 0;
  for (int64_t i = 0; i < row.k; ++i) {
    row.w[i] = class_weight(row.log_p[i], eps);
    if (i != row.y_slot) sum += row.w[i];
  }
  const bool y_stored = row.y_slot >= 0;
  row.w_target = target_weight(ofa_exp(y_stored ? row.log_p[row.y_slot] : row.log_p_rest), eps);
  if (y_stored) row.w[row.y_slot] = row.w_target;
  row.weight_sum = sum + row.w_target + row.w_rest * static_cast<acc_t>(row.others - (y_stored ? 0 : 1));
}

// Loss of one student row (its statistics st, weights 1 in the gap: G(all)) against the teacher row:
// the stored classes' and y's gaps come from the row itself, the rest's as G(all) minus them.
template <typename scalar_t, typename acc_t>
acc_t sparse_row_loss(const scalar_t* s, acc_t inv_t, const StudentStats<acc_t>& st,
                      const SparseTeacherRow<acc_t>& row) {
  const auto gap = [&](int64_t c) { return st.x_max - static_cast<acc_t>(s[c]) * inv_t; };
  acc_t weighted = 0, stored_gap = 0;
  for (int64_t i = 0; i < row.k; ++i) {
    const acc_t g = gap(row.classes[i]);
    weighted += row.w[i] * g;
    stored_gap += g;
  }
  const acc_t gap_y = row.y_slot < 0 ? gap(row.y) : acc_t(0);  // y's own term when it is not stored
  weighted += row.w_target * gap_y + row.w_rest * (st.gap - stored_gap - gap_y);
  return row_loss(row.weight_sum, weighted, ofa_log(st.exp_sum));
}

// The gradient row: (S q_c - w_rest) scale / T everywhere, then the stored classes and y with their weights.
template <typename scalar_t, typename acc_t>
void sparse_row_grad(const GradRow<scalar_t>& grad, int64_t C, const SparseTeacherRow<acc_t>& row) {
  const acc_t w_rest = row.w_rest;
  grad.fill(C, [=](auto zero, int64_t) { return decltype(zero)(w_rest); });
  for (int64_t i = 0; i < row.k; ++i) grad.set(row.classes[i], row.w[i]);
  if (row.y_slot < 0) grad.set(row.y, row.w_target);
}

// All rows, spread over threads: per row the k stored entries once, per distinct eps their weights,
// per branch one statistics pass over the student row and, for gradients, one pass writing its gradient.
template <typename scalar_t>
void sparse_rows_cpu(const BranchRows<scalar_t>& branches, const SparseTeacherPtrs<at::opmath_type<scalar_t>>& teacher,
                     const int64_t* target, const double* eps_values, const Problem& pb,
                     const BranchOutPtrs<scalar_t>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = pb.C;
  const acc_t inv_t = static_cast<acc_t>(pb.inv_temperature);
  parallel_rows(pb.B, C, [&](int64_t row_begin, int64_t row_end) {
    SparseTeacherRow<acc_t> row(teacher.k);
    StudentRows<scalar_t> students(branches, C, inv_t, row_end);
    std::vector<acc_t> e(pb.want_grad ? C : 0);  // exp(x - max_x) of the current student row
    acc_t* e_row = pb.want_grad ? e.data() : nullptr;
    for (int64_t b = row_begin; b < row_end; ++b) {
      load_sparse_row(teacher, b, C, target[b], inv_t, row);
      for (int64_t k = 0; k < pb.K; ++k) {
        if (new_eps(eps_values, k)) sparse_weights(row, static_cast<acc_t>(eps_values[k]));
        const auto st = students.pass(k, b, e_row, [](auto, int64_t, auto g) { return g; });
        out.loss_rows[k * pb.B + b] = sparse_row_loss(branches.row(k, b), inv_t, st, row);
        if (!pb.want_grad) continue;
        const GradRow<scalar_t> grad{e_row, acc_t(1) / st.exp_sum, row.weight_sum, out.row_scale(k, b) * inv_t,
                                     out.grad + (k * pb.B + b) * C, pb.stream_grad};
        sparse_row_grad(grad, C, row);
      }
    }
  });
}

}  // namespace cpu_kernel
}  // namespace ofakd
