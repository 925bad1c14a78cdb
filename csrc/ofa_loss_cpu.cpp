// Fused multi-branch OFA loss on CPU: K student branches x B rows x C classes against one
// teacher, forward and (optionally) the gradients, in one pass over the logits.
//
// Per row: the teacher row is read from memory once (two passes over it in cache give its
// log-sum-exp, a third the unnormalised weights of an eps, shared by consecutive branches
// with that eps); each branch then needs one max pass, one pass that gathers exp-sum and the
// weighted gap, and, when gradients are wanted, one pass that writes the gradient row. Rows are spread over threads with at::parallel_for; the inner
// loops use at::vec with float32 math (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace ofakd {
// exp_u20: an inlined polynomial (within 20 ulp for float32, exact exp for float64); the
// Sleef exp behind Vectorized::exp is an out-of-line call that made the kernel exp-bound.
template <typename T>
inline at::vec::Vectorized<T> ofa_exp(const at::vec::Vectorized<T>& x) {
  return x.exp_u20();
}
}  // namespace ofakd

#include "branch_matrices.h"
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

template <typename acc_t>
inline Vectorized<acc_t> load(const Vectorized<acc_t>&, const acc_t* ptr) { return Vectorized<acc_t>::loadu(ptr); }
template <typename acc_t>
inline acc_t load(acc_t, const acc_t* ptr) { return *ptr; }
template <typename acc_t>
inline void store(const Vectorized<acc_t>& value, acc_t* ptr) { value.store(ptr); }
template <typename acc_t>
inline void store(acc_t value, acc_t* ptr) { *ptr = value; }

// A sum or a max gathered from vectors and scalars alike.
template <typename acc_t>
struct Sum {
  Vectorized<acc_t> vec{acc_t(0)};
  acc_t scalar = 0;
  void add(const Vectorized<acc_t>& v) { vec = vec + v; }
  void add(acc_t v) { scalar += v; }
  acc_t total() const {
    return at::vec::vec_reduce_all<acc_t>([](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return a + b; }, vec) +
        scalar;
  }
};

template <typename acc_t>
struct Max {
  Vectorized<acc_t> vec{-std::numeric_limits<acc_t>::infinity()};
  acc_t scalar = -std::numeric_limits<acc_t>::infinity();
  void add(const Vectorized<acc_t>& v) { vec = at::vec::maximum(vec, v); }
  void add(acc_t v) { scalar = std::max(scalar, v); }
  acc_t total() const {
    return std::max(scalar, at::vec::vec_reduce_all<acc_t>(
                                [](Vectorized<acc_t>& a, Vectorized<acc_t>& b) { return at::vec::maximum(a, b); },
                                vec));
  }
};

// A row of the input in acc_t: the row itself for float/double, else a converted copy.
template <typename scalar_t, typename acc_t>
inline const acc_t* row_as_acc(const scalar_t* row, int64_t n, acc_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    at::vec::convert(row, scratch, n);
    return scratch;
  }
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
  enum Row { kWeights, kExpShifted, kTeacher, kStudent, kGrad, kWeightGrad, kTeacherGrad, kNumRows };
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

    for (int64_t b = row_begin; b < row_end; ++b) {
      const int64_t y = target[b];
      // Teacher: z = t / T, its max and log-sum-exp; two passes, the row stays in L1/L2.
      const acc_t* t = row_as_acc(teacher + b * teacher_row_stride, C, scratch.row(Scratch::kTeacher));
      TeacherRow<acc_t> tr;
      Max<acc_t> t_max;
      for_each_element<acc_t>(C, [&](auto zero, int64_t c) { t_max.add(load(zero, t + c)); });
      tr.z_max = t_max.total() * inv_t;
      Sum<acc_t> t_sum;
      for_each_element<acc_t>(C, [&](auto zero, int64_t c) {
        using V = decltype(zero);
        t_sum.add(ofa_exp(load(zero, t + c) * V(inv_t) - V(tr.z_max)));
      });
      tr.log_sum = ofa_log(t_sum.total());
      tr.p_target = ofa_exp(t[y] * inv_t - tr.z_max - tr.log_sum);
      if (pb.want_teacher_grad) std::fill(scratch.row(Scratch::kTeacherGrad), scratch.row(Scratch::kTeacherGrad) + C, acc_t(0));

      for (int64_t k = 0; k < pb.K; ++k) {
        const acc_t eps = static_cast<acc_t>(eps_values[k]);
        if (eps != tr.eps) {  // weights of this eps; consecutive branches with one eps share them
          Sum<acc_t> u_sum;
          for_each_element<acc_t>(C, [&](auto zero, int64_t c) {
            using V = decltype(zero);
            auto uc = class_weight(load(zero, t + c) * V(inv_t) - V(tr.z_max), V(eps));
            store(uc, u + c);
            u_sum.add(uc);
          });
          tr.eps = eps;
          tr.norm = ofa_exp(-eps * tr.log_sum);
          tr.u_target = u[y];
          tr.w_target = target_weight(tr.p_target, eps);
          tr.weight_sum = tr.norm * (u_sum.total() - tr.u_target) + tr.w_target;
        }

        // Student: x = s / T; its max, then exp-sum and the weighted gap in one pass.
        const acc_t* s = row_as_acc(branch_rows0[k] + b * branch_row_stride[k], C, scratch.row(Scratch::kStudent));
        Max<acc_t> s_max;
        for_each_element<acc_t>(C, [&](auto zero, int64_t c) { s_max.add(load(zero, s + c)); });
        const acc_t x_max = s_max.total() * inv_t;
        Sum<acc_t> s_sum, u_gap;
        for_each_element<acc_t>(C, [&](auto zero, int64_t c) {
          using V = decltype(zero);
          auto shifted = load(zero, s + c) * V(inv_t) - V(x_max);  // x_c - max_x <= 0
          auto ex = ofa_exp(shifted);
          if (pb.want_grad) store(ex, e + c);
          s_sum.add(ex);
          u_gap.add(load(zero, u + c) * (V(acc_t(0)) - shifted));
        });
        const acc_t sum_s = s_sum.total();
        const acc_t log_sum_s = ofa_log(sum_s);
        const acc_t gap_target = x_max - s[y] * inv_t;
        const acc_t gap = tr.norm * (u_gap.total() - tr.u_target * gap_target) + tr.w_target * gap_target;
        loss_rows[k * pb.B + b] = row_loss(tr.weight_sum, gap, log_sum_s);
        if (!pb.want_grad) continue;

        const acc_t scale_over_t = grad_scale[k * scale_stride_k + b * scale_stride_b] * inv_t;
        const acc_t inv_sum_s = acc_t(1) / sum_s;
        scalar_t* grad_row = grad_branches + (k * pb.B + b) * C;
        acc_t* g = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(grad_row) : scratch.row(Scratch::kGrad);
        for_each_element<acc_t>(C, [&](auto zero, int64_t c) {
          using V = decltype(zero);
          auto q = load(zero, e + c) * V(inv_sum_s);
          auto w = load(zero, u + c) * V(tr.norm);
          store(student_grad(V(tr.weight_sum), q, w, V(scale_over_t)), g + c);
        });
        g[y] = student_grad(tr.weight_sum, e[y] * inv_sum_s, tr.w_target, scale_over_t);
        if constexpr (!std::is_same_v<scalar_t, acc_t>) write_row(g, C, grad_row);

        if (pb.want_teacher_grad) {
          // h_c = p_c * dl/dp_c = -eps * w_c * log_q_c off the target (never p ** (eps - 1), which
          // overflows where p underflows), then dt += scale/T * (h - p * sum(h)).
          acc_t* h = scratch.row(Scratch::kWeightGrad);
          Sum<acc_t> h_sum;
          for_each_element<acc_t>(C, [&](auto zero, int64_t c) {
            using V = decltype(zero);
            // (x - max) - log_sum: subtracting the rounded sum max + log_sum would cost ulps of the max.
            auto log_q = (load(zero, s + c) * V(inv_t) - V(x_max)) - V(log_sum_s);
            auto hc = class_weight_grad_times_p(load(zero, u + c) * V(tr.norm), V(eps), log_q);
            store(hc, h + c);
            h_sum.add(hc);
          });
          const acc_t h_target =
              tr.p_target * weight_grad(ofa_log1p(tr.p_target), eps, (s[y] * inv_t - x_max) - log_sum_s);
          const acc_t sum_h = h_sum.total() - h[y] + h_target;
          h[y] = h_target;
          acc_t* dt = scratch.row(Scratch::kTeacherGrad);
          for_each_element<acc_t>(C, [&](auto zero, int64_t c) {
            using V = decltype(zero);
            auto p = ofa_exp((load(zero, t + c) * V(inv_t) - V(tr.z_max)) - V(tr.log_sum));
            store(load(zero, dt + c) + teacher_grad_from_products(load(zero, h + c), p, V(sum_h), V(scale_over_t)),
                  dt + c);
          });
        }
      }
      if (pb.want_teacher_grad) write_row(scratch.row(Scratch::kTeacherGrad), C, grad_teacher + b * C);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(at::TensorList branches, const at::Tensor& teacher,
                                                                 const at::Tensor& target, const at::Tensor& eps,
                                                                 double temperature,
                                                                 const c10::optional<at::Tensor>& grad_scale,
                                                                 bool teacher_grad) {
  const auto matrices = branch_matrices(branches);
  const int64_t K = static_cast<int64_t>(matrices.size());
  TORCH_CHECK(K > 0, "ofakd_fast: need at least one student branch");
  TORCH_CHECK(teacher.dim() == 2, "ofakd_fast: teacher logits must be [B, C]");
  const int64_t B = teacher.size(0), C = teacher.size(1);
  TORCH_CHECK(teacher.stride(1) == 1 || C <= 1, "ofakd_fast: teacher rows must be contiguous");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.numel() == B, "ofakd_fast: target must be int64 [B]");
  TORCH_CHECK(eps.scalar_type() == at::kDouble && eps.device().is_cpu() && eps.numel() == K,
              "ofakd_fast: eps must be a float64 CPU tensor with one value per branch");
  const auto dtype = teacher.scalar_type();
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<int64_t> row_strides;
  for (const auto& m : matrices) {
    TORCH_CHECK(m.scalar_type() == dtype, "ofakd_fast: branches and teacher must share one dtype");
    TORCH_CHECK(m.size(0) == B && m.size(1) == C, "ofakd_fast: every branch must be [B, C] like the teacher");
    TORCH_CHECK(m.stride(1) == 1 || C <= 1, "ofakd_fast: branch rows must be contiguous");
    row_strides.push_back(m.stride(0));
  }
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
    for (const auto& m : matrices) rows0.push_back(m.const_data_ptr<scalar_t>());
    ofa_rows_cpu<scalar_t>(rows0, row_strides, teacher.const_data_ptr<scalar_t>(), teacher.stride(0), target_ptr,
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
