// Fused multi-branch OFA loss on CPU: K student branches x B rows x C classes against one
// teacher, forward and (optionally) the gradients, in one pass over the logits.
//
// Per row: the teacher row is read from memory once (two passes over it in cache give its
// log-sum-exp, a third the unnormalised weights of an eps, shared by consecutive branches
// with that eps); each branch then needs one pass that gathers exp-sum and the weighted gap
// (and the max of the next branch row), and, when gradients are wanted, one pass that writes
// the gradient row. Rows are spread over threads with at::parallel_for; the inner loops use
// at::vec with float32 math (float64 for float64 inputs), bfloat16 and float16 logits widened
// as they are loaded (ofa_loss_cpu_row.h). The sparse-teacher op (fused_forward_sparse, a top-k
// teacher) shares the student side and is in ofa_loss_cpu_sparse.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/ExpandUtils.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "ofa_loss_cpu_row.h"
#include "ofa_loss_cpu_sparse.h"
#include "op_inputs.h"
#include "reusable_buffer.h"

namespace ofakd {
namespace cpu_kernel {
namespace {

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
  acc_t eps;  // eps of the weights in u
  acc_t norm, u_target, w_target, weight_sum;
};

// z = t / T of one teacher row: its max and log-sum-exp (two passes, the row stays in L1/L2) and p_y.
template <typename scalar_t, typename acc_t>
TeacherRow<acc_t> teacher_row(const scalar_t* t, int64_t C, int64_t y, acc_t inv_t) {
  TeacherRow<acc_t> tr;
  tr.z_max = row_max<acc_t>(C, t) * inv_t;
  const acc_t z_max = tr.z_max;
  tr.log_sum = ofa_log(row_sum<acc_t>(C, [=](auto zero, int64_t c) {
    using V = decltype(zero);
    return ofa_exp(load(zero, t + c) * V(inv_t) - V(z_max));
  }));
  tr.p_target = ofa_exp(static_cast<acc_t>(t[y]) * inv_t - tr.z_max - tr.log_sum);
  return tr;
}

// The weights of one eps: u (unnormalised, see TeacherRow) written to `u`, w_y and their sum S.
template <typename scalar_t, typename acc_t>
void teacher_weights(const scalar_t* t, int64_t C, int64_t y, acc_t inv_t, acc_t eps, acc_t* u, TeacherRow<acc_t>& tr) {
  const acc_t z_max = tr.z_max;
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

// Adds one branch's teacher gradient to the row's dt: h_c = p_c * dl/dp_c = -eps * w_c * log_q_c off
// the target (never p ** (eps - 1), which overflows where p underflows), then dt += scale/T * (h - p * sum(h)).
template <typename scalar_t, typename acc_t>
void add_teacher_grad(const scalar_t* s, const scalar_t* t, int64_t C, int64_t y, acc_t inv_t,
                      const TeacherRow<acc_t>& tr, const StudentStats<acc_t>& st, acc_t scale_over_t,
                      RowScratch<acc_t>& scratch) {
  using Scratch = RowScratch<acc_t>;
  const acc_t* u = scratch.row(Scratch::kWeights);
  acc_t* h = scratch.row(Scratch::kWeightGrad);
  acc_t* dt = scratch.row(Scratch::kTeacherGrad);
  const acc_t x_max = st.x_max, log_sum_s = ofa_log(st.exp_sum), norm = tr.norm, eps = tr.eps;
  const acc_t h_sum = row_sum<acc_t>(C, [=](auto zero, int64_t c) {
    using V = decltype(zero);
    // (x - max) - log_sum: subtracting the rounded sum max + log_sum would cost ulps of the max.
    auto log_q = (load(zero, s + c) * V(inv_t) - V(x_max)) - V(log_sum_s);
    auto hc = class_weight_grad_times_p(load(zero, u + c) * V(norm), V(eps), log_q);
    store(hc, h + c);
    return hc;
  });
  const acc_t s_target = static_cast<acc_t>(s[y]) * inv_t;
  const acc_t h_target = tr.p_target * weight_grad(ofa_log1p(tr.p_target), eps, (s_target - x_max) - log_sum_s);
  const acc_t sum_h = h_sum - h[y] + h_target;
  h[y] = h_target;
  const acc_t z_max = tr.z_max, log_sum_t = tr.log_sum;
  for_each_element<acc_t>(C, [=](auto zero, int64_t c) {
    using V = decltype(zero);
    auto p = ofa_exp((load(zero, t + c) * V(inv_t) - V(z_max)) - V(log_sum_t));
    store(load(zero, dt + c) + teacher_grad_from_products(load(zero, h + c), p, V(sum_h), V(scale_over_t)), dt + c);
  });
}

// All rows against a dense teacher, spread over threads: per row the teacher's statistics, per distinct
// eps its weights, per branch the student pass, the gradient row and, when wanted, the teacher gradient.
template <typename scalar_t>
void ofa_rows_cpu(const BranchRows<scalar_t>& branches, const scalar_t* teacher, int64_t teacher_row_stride,
                  const int64_t* target, const double* eps_values, const Problem& pb,
                  const BranchOutPtrs<scalar_t>& out, scalar_t* grad_teacher) {
  using acc_t = at::opmath_type<scalar_t>;
  using Scratch = RowScratch<acc_t>;
  const int64_t C = pb.C;
  const acc_t inv_t = static_cast<acc_t>(pb.inv_temperature);
  parallel_rows(pb.B, C, [&](int64_t row_begin, int64_t row_end) {
    Scratch scratch(C);
    acc_t* u = scratch.row(Scratch::kWeights);
    acc_t* e = scratch.row(Scratch::kExpShifted);
    acc_t* dt = scratch.row(Scratch::kTeacherGrad);
    StudentRows<scalar_t> students(branches, C, inv_t, row_end);
    for (int64_t b = row_begin; b < row_end; ++b) {
      const int64_t y = target[b];
      const scalar_t* t = teacher + b * teacher_row_stride;
      TeacherRow<acc_t> tr = teacher_row(t, C, y, inv_t);
      if (pb.want_teacher_grad) std::fill(dt, dt + C, acc_t(0));
      for (int64_t k = 0; k < pb.K; ++k) {
        if (new_eps(eps_values, k)) teacher_weights(t, C, y, inv_t, static_cast<acc_t>(eps_values[k]), u, tr);
        const auto st = students.pass(k, b, pb.want_grad ? e : nullptr,
                                      [u](auto zero, int64_t c, auto g) { return load(zero, u + c) * g; });
        const scalar_t* s = branches.row(k, b);
        const acc_t gap_target = st.x_max - static_cast<acc_t>(s[y]) * inv_t;
        const acc_t gap = tr.norm * (st.gap - tr.u_target * gap_target) + tr.w_target * gap_target;
        out.loss_rows[k * pb.B + b] = row_loss(tr.weight_sum, gap, ofa_log(st.exp_sum));
        if (!pb.want_grad) continue;

        const acc_t scale_over_t = out.row_scale(k, b) * inv_t, norm = tr.norm;
        const GradRow<scalar_t> grad{e, acc_t(1) / st.exp_sum, tr.weight_sum, scale_over_t,
                                     out.grad + (k * pb.B + b) * C, pb.stream_grad};
        grad.fill(C, [=](auto zero, int64_t c) { return load(zero, u + c) * decltype(zero)(norm); });
        grad.set(y, tr.w_target);
        if (pb.want_teacher_grad) add_teacher_grad(s, t, C, y, inv_t, tr, st, scale_over_t, scratch);
      }
      if (pb.want_teacher_grad) write_row(dt, C, grad_teacher + b * C);
    }
  });
}

// Targets in [0, C): an out-of-range target is an error on CPU (it would index out of the row).
void check_targets(const int64_t* target, int64_t B, int64_t C) {
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(target[b] >= 0 && target[b] < C, "ofakd_fast: target ", target[b], " of row ", b,
                " is outside [0, ", C, ")");
  }
}

// The outputs both ops share: loss rows [K, B] in the loss dtype and, when grad_scale is given, the
// gradient buffer [K, B, C] (possibly reused, see reusable_buffer.h) and the row factors as a [K, B] view.
struct BranchOutputs {
  at::Tensor loss_rows, grad_branches, scale;
};

BranchOutputs branch_outputs(const OpInputs& in, const at::TensorOptions& options,
                             const c10::optional<at::Tensor>& grad_scale) {
  BranchOutputs out;
  out.loss_rows = at::empty({in.K, in.B}, options.dtype(in.acc_dtype));
  if (!grad_scale.has_value()) {
    out.grad_branches = at::empty({0}, options);
    return out;
  }
  const at::Tensor& g = *grad_scale;
  TORCH_CHECK(g.device().is_cpu() && g.is_floating_point(), "ofakd_fast: grad_scale must be a floating-point CPU "
              "tensor, got ", g.scalar_type(), " on ", g.device());
  TORCH_CHECK(at::is_expandable_to(g.sizes(), {in.K, in.B}), "ofakd_fast: grad_scale must be [K, B] = [", in.K, ", ",
              in.B, "] (or broadcast to it), got ", g.sizes());
  out.grad_branches = ReusableBuffers::empty({in.K, in.B, in.C}, in.dtype);
  out.scale = g.to(in.acc_dtype).expand({in.K, in.B});
  return out;
}

// Whether the branch gradients [K, B, C] are large enough to be streamed past the caches (kStreamGradBytes).
bool streams_gradients(const OpInputs& in, bool want_grad) {
  return want_grad && in.K * in.B * in.C * static_cast<int64_t>(c10::elementSize(in.dtype)) >= kStreamGradBytes;
}

// The kernels' view of the outputs (no gradient pointers when none are wanted).
template <typename scalar_t>
BranchOutPtrs<scalar_t> out_ptrs(BranchOutputs& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool want_grad = out.scale.defined();
  return {out.loss_rows.mutable_data_ptr<acc_t>(),
          want_grad ? out.grad_branches.mutable_data_ptr<scalar_t>() : nullptr,
          want_grad ? out.scale.const_data_ptr<acc_t>() : nullptr, want_grad ? out.scale.stride(0) : 0,
          want_grad ? out.scale.stride(1) : 0};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cpu(at::TensorList branches, const at::Tensor& teacher,
                                                                 const at::Tensor& target, const at::Tensor& eps,
                                                                 double temperature,
                                                                 const c10::optional<at::Tensor>& grad_scale,
                                                                 bool teacher_grad) {
  const OpInputs in = check_op_inputs(branches, teacher, target, eps);
  const int64_t B = in.B, C = in.C;
  const bool want_grad = grad_scale.has_value();
  const auto target_c = target.contiguous();
  const auto eps_c = eps.contiguous();
  const int64_t* target_ptr = target_c.data_ptr<int64_t>();
  check_targets(target_ptr, B, C);

  BranchOutputs out = branch_outputs(in, teacher.options(), grad_scale);
  at::Tensor grad_teacher =
      want_grad && teacher_grad ? ReusableBuffers::empty({B, C}, in.dtype) : at::empty({0}, teacher.options());
  if (B == 0 || C == 0) return {out.loss_rows.zero_(), out.grad_branches, grad_teacher};

  const Problem pb{in.K, B, C, 1.0 / temperature, want_grad, want_grad && teacher_grad, streams_gradients(in, want_grad)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.dtype, "ofa_fused_forward_cpu", [&] {
    ofa_rows_cpu<scalar_t>(branch_rows<scalar_t>(in), teacher.const_data_ptr<scalar_t>(), teacher.stride(0), target_ptr,
                           eps_c.const_data_ptr<double>(), pb, out_ptrs<scalar_t>(out),
                           pb.want_teacher_grad ? grad_teacher.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {out.loss_rows, out.grad_branches, grad_teacher};
}

// Every branch entry of branch 0's dtype and [B, C]: without a dense teacher, branch 0 is the reference,
// and a mismatch is named here rather than as one "like the teacher".
void check_branches_alike(at::TensorList branches) {
  TORCH_CHECK(!branches.empty(), "ofakd_fast: branches: need at least one student branch, got none");
  const at::Tensor& first = branches[0];
  for (size_t i = 0; i < branches.size(); ++i) {
    const at::Tensor& m = branches[i];
    TORCH_CHECK(m.dim() == 2 || m.dim() == 3, "ofakd_fast: branches[", i, "] must be [B, C] or [k, B, C], got ",
                m.sizes());
    TORCH_CHECK(m.scalar_type() == first.scalar_type(), "ofakd_fast: branches[", i, "] is ", m.scalar_type(),
                " but branches[0] is ", first.scalar_type(), ": all branches must share one dtype");
    TORCH_CHECK(m.size(-2) == first.size(-2) && m.size(-1) == first.size(-1), "ofakd_fast: branches[", i,
                "] has rows [B, C] = ", m.sizes().slice(m.dim() - 2), " but branches[0] has ",
                first.sizes().slice(first.dim() - 2));
  }
}

// The branches checked and flattened as check_op_inputs does (branch 0 stands in for the dense teacher
// as the reference of B, C, dtype and device), then the stored teacher rows: logits [B, k] and lse [B]
// in the loss dtype, int64 indices [B, k] with every class in [0, C), contiguous CPU tensors, k <= C.
// Distinct classes per row are the caller's promise (checks.py); they are not re-checked here.
OpInputs check_sparse_inputs(at::TensorList branches, const at::Tensor& logits, const at::Tensor& indices,
                             const at::Tensor& lse, const at::Tensor& target, const at::Tensor& eps) {
  check_branches_alike(branches);
  const at::Tensor& first = branches[0];
  const OpInputs in = check_op_inputs(branches, first.dim() == 3 && first.size(0) > 0 ? first[0] : first, target, eps);
  TORCH_CHECK(in.branches[0].device().is_cpu(), "ofakd_fast (CPU kernel): branches must be CPU tensors, got ",
              in.branches[0].device());
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"teacher_logits", &logits}, {"teacher_indices", &indices}, {"teacher_lse", &lse}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device().is_cpu(), "ofakd_fast: ", name, " must be a CPU tensor like the branches, got ",
                t->device());
    TORCH_CHECK(t->is_contiguous(), "ofakd_fast: ", name, " must be contiguous");
  }
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == in.B && logits.size(1) <= in.C, "ofakd_fast: teacher_logits "
              "must be [B, k] with B = ", in.B, " and k <= C = ", in.C, ", got ", logits.sizes());
  TORCH_CHECK(indices.sizes() == logits.sizes() && indices.scalar_type() == at::kLong, "ofakd_fast: teacher_indices "
              "must be int64 ", logits.sizes(), " like teacher_logits, got ", indices.scalar_type(), " ",
              indices.sizes());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == in.B, "ofakd_fast: teacher_lse must be [B] with B = ", in.B, ", got ",
              lse.sizes());
  TORCH_CHECK(logits.scalar_type() == in.acc_dtype && lse.scalar_type() == in.acc_dtype, "ofakd_fast: teacher_logits "
              "and teacher_lse must be ", in.acc_dtype, " for ", in.dtype, " branches, got ", logits.scalar_type(),
              " and ", lse.scalar_type());
  const int64_t* classes = indices.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    TORCH_CHECK(classes[i] >= 0 && classes[i] < in.C, "ofakd_fast: teacher_indices: class ", classes[i], " of row ",
                i / indices.size(1), " is outside [0, ", in.C, ")");
  }
  return in;
}

// ofakd_fast_C::fused_forward_sparse on CPU: loss rows [K, B] and, for grad_scale, the branch gradients
// [K, B, C] against a top-k teacher, without building a dense teacher row.
std::tuple<at::Tensor, at::Tensor> fused_forward_sparse_cpu(at::TensorList branches, const at::Tensor& teacher_logits,
                                                            const at::Tensor& teacher_indices,
                                                            const at::Tensor& teacher_lse, const at::Tensor& target,
                                                            const at::Tensor& eps, double temperature,
                                                            const c10::optional<at::Tensor>& grad_scale) {
  const OpInputs in = check_sparse_inputs(branches, teacher_logits, teacher_indices, teacher_lse, target, eps);
  const auto target_c = target.contiguous();
  const auto eps_c = eps.contiguous();
  const int64_t* target_ptr = target_c.data_ptr<int64_t>();
  check_targets(target_ptr, in.B, in.C);
  BranchOutputs out = branch_outputs(in, teacher_logits.options(), grad_scale);
  if (in.B == 0 || in.C == 0) return {out.loss_rows.zero_(), out.grad_branches};

  const Problem pb{in.K, in.B, in.C, 1.0 / temperature, grad_scale.has_value(), false,
                   streams_gradients(in, grad_scale.has_value())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.dtype, "ofa_fused_forward_sparse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SparseTeacherPtrs<acc_t> teacher{teacher_logits.const_data_ptr<acc_t>(),
                                           teacher_indices.const_data_ptr<int64_t>(),
                                           teacher_lse.const_data_ptr<acc_t>(), teacher_logits.size(1)};
    sparse_rows_cpu<scalar_t>(branch_rows<scalar_t>(in), teacher, target_ptr, eps_c.const_data_ptr<double>(), pb,
                              out_ptrs<scalar_t>(out));
  });
  return {out.loss_rows, out.grad_branches};
}

int64_t release_buffers() { return ReusableBuffers::release(); }

}  // namespace
}  // namespace cpu_kernel
}  // namespace ofakd

TORCH_LIBRARY(ofakd_fast_C, m) {
  m.def(
      "fused_forward(Tensor[] branches, Tensor teacher, Tensor target, Tensor eps, float temperature, "
      "Tensor? grad_scale, bool teacher_grad) -> (Tensor loss_rows, Tensor grad_branches, Tensor grad_teacher)");
  m.def(
      "fused_forward_sparse(Tensor[] branches, Tensor teacher_logits, Tensor teacher_indices, Tensor teacher_lse, "
      "Tensor target, Tensor eps, float temperature, Tensor? grad_scale) -> (Tensor, Tensor)");
  m.def("release_buffers() -> int", &ofakd::cpu_kernel::release_buffers);
}

TORCH_LIBRARY_IMPL(ofakd_fast_C, CPU, m) {
  m.impl("fused_forward", &ofakd::cpu_kernel::fused_forward_cpu);
  m.impl("fused_forward_sparse", &ofakd::cpu_kernel::fused_forward_sparse_cpu);
}

// The module is imported only to run the registrations above.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {}
