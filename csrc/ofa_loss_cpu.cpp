// Fused multi-branch OFA loss on CPU: K student branches x B rows x C classes against one
// teacher, forward and (optionally) the gradients, in one pass over the logits.
//
// Per row: the teacher row is read from memory once (two passes over it in cache give its
// log-sum-exp, a third the unnormalised weights of an eps, shared by consecutive branches
// with that eps); each branch then needs one pass that gathers exp-sum and the weighted gap
// (and the max of the next branch row), and, when gradients are wanted, one pass that writes
// the gradient row. Rows are spread over threads with at::parallel_for; the inner loops use
// at::vec with float32 math (float64 for float64 inputs), bfloat16 and float16 logits widened
// as they are loaded.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <utility>
#include <limits>
#include <vector>

#include "cpu_vec_exp.h"  // first: ofa_row_math.h calls its vector ofa_exp
#include "op_inputs.h"
#include "ofa_row_math.h"
#include "reusable_buffer.h"

namespace ofakd {
namespace {

using at::vec::Vectorized;

// Runs body(T(0), c) over [0, n): SIMD vectors first, then a scalar tail, so one generic
// lambda (using the shared formulas) serves both.
template <typename acc_t, typename Body>
inline void for_each_element(int64_t n, const Body& body) {
  constexpr int64_t kWidth = Vectorized<acc_t>::size();
  int64_t c = 0;
  for (; c + kWidth <= n; c += kWidth) body(Vectorized<acc_t>(acc_t(0)), c);
  for (; c < n; ++c) body(acc_t(0), c);
}

// Loads in acc_t from acc_t rows or from the logits' own dtype: bfloat16 and float16 are widened
// in registers, so their rows need no converted copy.
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load(const Vectorized<acc_t>&, const scalar_t* ptr) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(ptr);
  } else {
    Vectorized<acc_t> widened;
    at::vec::load_to_float(ptr, widened);
    return widened;
  }
}
template <typename acc_t, typename scalar_t>
inline acc_t load(acc_t, const scalar_t* ptr) { return static_cast<acc_t>(*ptr); }
// Stores acc_t values to acc_t rows, or narrowed to a bfloat16 / float16 gradient row.
template <typename acc_t, typename scalar_t>
inline void store(const Vectorized<acc_t>& value, scalar_t* ptr) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    value.store(ptr);
  } else {
    at::vec::convert_from_float<scalar_t>(value, value).store(ptr, Vectorized<acc_t>::size());
  }
}
template <typename acc_t, typename scalar_t>
inline void store(acc_t value, scalar_t* ptr) { *ptr = static_cast<scalar_t>(value); }

struct AddOp {
  template <typename T>
  T operator()(const T& a, const T& b) const { return a + b; }
  template <typename acc_t>
  static constexpr acc_t identity() { return acc_t(0); }
};

struct MaxOp {
  template <typename acc_t>
  Vectorized<acc_t> operator()(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) const {
    return at::vec::maximum(a, b);
  }
  template <typename acc_t>
  acc_t operator()(acc_t a, acc_t b) const { return std::max(a, b); }
  template <typename acc_t>
  static constexpr acc_t identity() { return -std::numeric_limits<acc_t>::infinity(); }
};

// Reduces each value body(T(0), c) returns (a std::array, one value per op in Ops) over c in
// [0, n), value i with Ops[i]. The accumulators are locals here, not captured by the body, so
// they stay in registers (a body storing to a float row could otherwise alias them and force a
// memory round trip per vector), and with kInterleave = 2 there are two per value, for even
// and odd vectors, so that cheap bodies (the max pass) are not bound by the latency of one
// chain. Bodies with an exp take 1: there the exp dominates and more live registers spill.
template <typename acc_t, int kInterleave, typename... Ops, typename Body>
inline std::array<acc_t, sizeof...(Ops)> reduce_row(int64_t n, const Body& body) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kWidth = V::size();
  constexpr size_t kN = sizeof...(Ops);
  const auto combine = [](auto& acc, const auto& value) {
    [&]<size_t... I>(std::index_sequence<I...>) { ((acc[I] = Ops()(acc[I], value[I])), ...); }
    (std::make_index_sequence<kN>());
  };
  std::array<V, kN> even{V(Ops::template identity<acc_t>())...}, odd = even;
  int64_t c = 0;
  for (; kInterleave == 2 && c + 2 * kWidth <= n; c += 2 * kWidth) {
    combine(even, body(V(acc_t(0)), c));
    combine(odd, body(V(acc_t(0)), c + kWidth));
  }
  for (; c + kWidth <= n; c += kWidth) combine(even, body(V(acc_t(0)), c));
  combine(even, odd);
  std::array<acc_t, kN> total;
  [&]<size_t... I>(std::index_sequence<I...>) {
    ((total[I] = at::vec::vec_reduce_all<acc_t>([](V& x, V& y) { return Ops()(x, y); }, even[I])), ...);
  }(std::make_index_sequence<kN>());
  for (; c < n; ++c) combine(total, body(acc_t(0), c));
  return total;
}

template <typename acc_t, typename Body>
inline acc_t row_sum(int64_t n, const Body& body) {
  return reduce_row<acc_t, 1, AddOp>(n, [&](auto zero, int64_t c) { return std::array{body(zero, c)}; })[0];
}

template <typename acc_t, typename scalar_t>
inline acc_t row_max(int64_t n, const scalar_t* row) {
  return reduce_row<acc_t, 2, MaxOp>(n, [row](auto zero, int64_t c) { return std::array{load(zero, row + c)}; })[0];
}

template <typename scalar_t, typename acc_t>
inline void write_row(const acc_t* values, int64_t n, scalar_t* out) {
  at::vec::convert(values, out, n);
}

struct Problem {
  int64_t K, B, C;
  double inv_temperature;
  bool want_grad, want_teacher_grad;
};

// Row-sized scratch of one thread; each row lives in L2 while its logits row is processed.
template <typename acc_t>
struct RowScratch {
  enum Row { kWeights, kExpShifted, kWeightGrad, kTeacherGrad, kNumRows };
  explicit RowScratch(int64_t C) : C(C), storage(static_cast<size_t>(kNumRows * C)) {}
  acc_t* row(Row r) { return storage.data() + r * C; }
  int64_t C;
  std::vector<acc_t> storage;
};

// Teacher statistics of one row, with the weights of one eps kept unnormalised:
// w_c = norm * u_c with u_c = exp(eps * (z_c - z_max)) and norm = sum_t ** -eps
// (= p_c ** eps off the target), so no pass rescales the row.
template <typename acc_t>
struct TeacherRow {
  acc_t z_max, log_sum;  // log_p_c = z_c - z_max - log_sum
  acc_t p_target;
  acc_t eps = acc_t(0);  // eps of the weights in u (0: not computed yet)
  acc_t norm, u_target, w_target, weight_sum;
};

template <typename scalar_t>
void ofa_rows_cpu(const std::vector<const scalar_t*>& branch_rows0, const std::vector<int64_t>& branch_row_stride,
                  const scalar_t* teacher, int64_t teacher_row_stride, const int64_t* target, const double* eps_values,
                  const at::opmath_type<scalar_t>* grad_scale, int64_t scale_stride_k, int64_t scale_stride_b,
                  const Problem& pb, at::opmath_type<scalar_t>* loss_rows, scalar_t* grad_branches,
                  scalar_t* grad_teacher) {
  using acc_t = at::opmath_type<scalar_t>;
  using Scratch = RowScratch<acc_t>;
  const int64_t C = pb.C;
  const acc_t inv_t = static_cast<acc_t>(pb.inv_temperature);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));

  at::parallel_for(0, pb.B, grain, [&](int64_t row_begin, int64_t row_end) {
    Scratch scratch(C);
    acc_t* u = scratch.row(Scratch::kWeights);
    acc_t* e = scratch.row(Scratch::kExpShifted);
    acc_t* dt = scratch.row(Scratch::kTeacherGrad);
    acc_t next_max = 0;  // max of the current student row, taken by the previous row's exp pass
    bool have_next_max = false;

    for (int64_t b = row_begin; b < row_end; ++b) {
      const int64_t y = target[b];
      // Teacher: z = t / T, its max and log-sum-exp; two passes, the row stays in L1/L2.
      const scalar_t* t = teacher + b * teacher_row_stride;
      TeacherRow<acc_t> tr;
      tr.z_max = row_max<acc_t>(C, t) * inv_t;
      const acc_t z_max = tr.z_max;
      tr.log_sum = ofa_log(row_sum<acc_t>(C, [=](auto zero, int64_t c) {
        using V = decltype(zero);
        return ofa_exp(load(zero, t + c) * V(inv_t) - V(z_max));
      }));
      tr.p_target = ofa_exp(static_cast<acc_t>(t[y]) * inv_t - tr.z_max - tr.log_sum);
      if (pb.want_teacher_grad) std::fill(dt, dt + C, acc_t(0));

      for (int64_t k = 0; k < pb.K; ++k) {
        const acc_t eps = static_cast<acc_t>(eps_values[k]);
        if (eps != tr.eps) {  // weights of this eps; consecutive branches with one eps share them
          const acc_t u_sum = row_sum<acc_t>(C, [=](auto zero, int64_t c) {
            using V = decltype(zero);
            auto uc = class_weight(load(zero, t + c) * V(inv_t) - V(z_max), V(eps));
            store(uc, u + c);
            return uc;
          });
          tr.eps = eps;
          tr.norm = ofa_exp(-eps * tr.log_sum);
          tr.u_target = u[y];
          tr.w_target = target_weight(tr.p_target, eps);
          tr.weight_sum = tr.norm * (u_sum - tr.u_target) + tr.w_target;
        }

        // Student: x = s / T; exp-sum and the weighted gap in one pass, which also takes the max
        // of the next student row (this row's successor in the thread's order): the next row's
        // first touch, a stream from L3 or memory, then overlaps the exp arithmetic instead of
        // being a pass of its own. Only a thread's first row has a max pass.
        const scalar_t* s = branch_rows0[k] + b * branch_row_stride[k];
        const acc_t x_max = (have_next_max ? next_max : row_max<acc_t>(C, s)) * inv_t;
        const scalar_t* next = s;  // read for nothing when the thread has no next row
        if (k + 1 < pb.K) {
          next = branch_rows0[k + 1] + b * branch_row_stride[k + 1];
        } else if (b + 1 < row_end) {
          next = branch_rows0[0] + (b + 1) * branch_row_stride[0];
        }
        have_next_max = next != s;
        const bool keep_exp = pb.want_grad;
        const auto [sum_s, u_gap, max_of_next] = reduce_row<acc_t, 1, AddOp, AddOp, MaxOp>(C, [=](auto zero, int64_t c) {
          using V = decltype(zero);
          auto shifted = load(zero, s + c) * V(inv_t) - V(x_max);  // x_c - max_x <= 0
          auto ex = ofa_exp(shifted);
          if (keep_exp) store(ex, e + c);
          return std::array{ex, load(zero, u + c) * (V(acc_t(0)) - shifted), load(zero, next + c)};
        });
        next_max = max_of_next;
        const acc_t log_sum_s = ofa_log(sum_s);
        const acc_t s_target = static_cast<acc_t>(s[y]) * inv_t;
        const acc_t gap_target = x_max - s_target;
        const acc_t gap = tr.norm * (u_gap - tr.u_target * gap_target) + tr.w_target * gap_target;
        loss_rows[k * pb.B + b] = row_loss(tr.weight_sum, gap, log_sum_s);
        if (!pb.want_grad) continue;

        const acc_t scale_over_t = grad_scale[k * scale_stride_k + b * scale_stride_b] * inv_t;
        const acc_t inv_sum_s = acc_t(1) / sum_s;
        const acc_t weight_sum = tr.weight_sum, norm = tr.norm;
        scalar_t* grad_row = grad_branches + (k * pb.B + b) * C;
        for_each_element<acc_t>(C, [=](auto zero, int64_t c) {
          using V = decltype(zero);
          auto q = load(zero, e + c) * V(inv_sum_s);
          auto w = load(zero, u + c) * V(norm);
          store(student_grad(V(weight_sum), q, w, V(scale_over_t)), grad_row + c);
        });
        store(student_grad(tr.weight_sum, e[y] * inv_sum_s, tr.w_target, scale_over_t), grad_row + y);

        if (pb.want_teacher_grad) {
          // h_c = p_c * dl/dp_c = -eps * w_c * log_q_c off the target (never p ** (eps - 1), which
          // overflows where p underflows), then dt += scale/T * (h - p * sum(h)).
          acc_t* h = scratch.row(Scratch::kWeightGrad);
          const acc_t h_sum = row_sum<acc_t>(C, [=](auto zero, int64_t c) {
            using V = decltype(zero);
            // (x - max) - log_sum: subtracting the rounded sum max + log_sum would cost ulps of the max.
            auto log_q = (load(zero, s + c) * V(inv_t) - V(x_max)) - V(log_sum_s);
            auto hc = class_weight_grad_times_p(load(zero, u + c) * V(norm), V(eps), log_q);
            store(hc, h + c);
            return hc;
          });
          const acc_t h_target =
              tr.p_target * weight_grad(ofa_log1p(tr.p_target), eps, (s_target - x_max) - log_sum_s);
          const acc_t sum_h = h_sum - h[y] + h_target;
          h[y] = h_target;
          const acc_t log_sum_t = tr.log_sum;
          for_each_element<acc_t>(C, [=](auto zero, int64_t c) {
            using V = decltype(zero);
            auto p = ofa_exp((load(zero, t + c) * V(inv_t) - V(z_max)) - V(log_sum_t));
            store(load(zero, dt + c) + teacher_grad_from_products(load(zero, h + c), p, V(sum_h), V(scale_over_t)),
                  dt + c);
          });
        }
      }
      if (pb.want_teacher_grad) write_row(dt, C, grad_teacher + b * C);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(at::TensorList branches, const at::Tensor& teacher,
                                                                 const at::Tensor& target, const at::Tensor& eps,
                                                                 double temperature,
                                                                 const c10::optional<at::Tensor>& grad_scale,
                                                                 bool teacher_grad) {
  const OpInputs in = check_op_inputs(branches, teacher, target, eps);
  const int64_t K = in.K, B = in.B, C = in.C;
  const auto dtype = in.dtype, acc_dtype = in.acc_dtype;
  const bool want_grad = grad_scale.has_value();
  const auto target_c = target.contiguous();
  const auto eps_c = eps.contiguous();
  const int64_t* target_ptr = target_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(target_ptr[b] >= 0 && target_ptr[b] < C, "ofakd_fast: target ", target_ptr[b], " of row ", b,
                " is outside [0, ", C, ")");
  }

  auto loss_rows = at::empty({K, B}, teacher.options().dtype(acc_dtype));
  at::Tensor grad_branches = want_grad ? ReusableBuffers::empty({K, B, C}, dtype) : at::empty({0}, teacher.options());
  at::Tensor grad_teacher =
      want_grad && teacher_grad ? ReusableBuffers::empty({B, C}, dtype) : at::empty({0}, teacher.options());
  at::Tensor scale;
  if (want_grad) {
    scale = grad_scale->to(acc_dtype).expand({K, B});
  }
  if (B == 0 || C == 0) return {loss_rows.zero_(), grad_branches, grad_teacher};

  Problem pb{K, B, C, 1.0 / temperature, want_grad, want_grad && teacher_grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ofa_fused_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> rows0;
    for (const auto& m : in.branches) rows0.push_back(m.const_data_ptr<scalar_t>());
    ofa_rows_cpu<scalar_t>(rows0, in.row_strides, teacher.const_data_ptr<scalar_t>(), teacher.stride(0), target_ptr,
                           eps_c.const_data_ptr<double>(), want_grad ? scale.const_data_ptr<acc_t>() : nullptr,
                           want_grad ? scale.stride(0) : 0, want_grad ? scale.stride(1) : 0, pb,
                           loss_rows.mutable_data_ptr<acc_t>(),
                           want_grad ? grad_branches.mutable_data_ptr<scalar_t>() : nullptr,
                           pb.want_teacher_grad ? grad_teacher.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {loss_rows, grad_branches, grad_teacher};
}

int64_t release_buffers() { return ReusableBuffers::release(); }

}  // namespace
}  // namespace ofakd

TORCH_LIBRARY(ofakd_fast_C, m) {
  m.def(
      "fused_forward(Tensor[] branches, Tensor teacher, Tensor target, Tensor eps, float temperature, "
      "Tensor? grad_scale, bool teacher_grad) -> (Tensor loss_rows, Tensor grad_branches, Tensor grad_teacher)");
  m.def("release_buffers() -> int", &ofakd::release_buffers);
}

TORCH_LIBRARY_IMPL(ofakd_fast_C, CPU, m) {
  m.impl("fused_forward", &ofakd::fused_forward_cpu);
}

// The module is imported only to run the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {}
