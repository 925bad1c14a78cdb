// ofakd_fast_C::ofa_loss: the eager path's autograd node in C++ (CPU and CUDA kernels).
//
// The Python autograd.Function of op.py (EagerOFALoss) costs about as much Python per call as the
// 256x1000x5 CPU kernel's gap to its floor: apply, setup_context, a Python backward and the engine's
// hops into Python. This op does the same in C++: its forward runs ofakd_fast_C::fused_forward (the
// device's kernel, through the dispatcher) and reduces the loss rows; when the caller announces the
// upstream gradient (`expected_upstream`, with its row factors `grad_scale`: eager CPU), that same
// pass writes the gradients and backward hands them out once if the real upstream is that one,
// else it recomputes them for the real upstream. A backward that must itself be differentiable
// (create_graph=True) calls ofakd_fast::ofa_loss_graph_backward, which op.py defines over the
// PyTorch reference. torch.compile keeps using op.py's custom op (it needs a fake kernel).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace ofakd {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

using FusedForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const c10::optional<at::Tensor>&,
    bool);

// (loss rows [K, B], branch gradients [K, B, C] or empty, teacher gradient [B, C] or empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward(at::TensorList branches, const at::Tensor& teacher,
                                                             const at::Tensor& target, const at::Tensor& eps,
                                                             double temperature,
                                                             const c10::optional<at::Tensor>& grad_scale,
                                                             bool teacher_grad) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ofakd_fast_C::fused_forward", "").typed<FusedForward>();
  return op.call(branches, teacher, target, eps, temperature, grad_scale, teacher_grad);
}

// The reduced losses [K] of the loss rows [K, B], by the same ATen ops as op.py's _reduce, so that
// every path gives the same bits.
at::Tensor reduce_rows(const at::Tensor& loss_rows, int64_t reduction) {
  if (reduction == kNone) return loss_rows;
  return reduction == kSum ? loss_rows.sum(1) : loss_rows.mean(1);
}

// The factor of each (branch, row) gradient for an upstream gradient of the reduced loss (op.py's
// row_grad_scale): [K, B] as it is for 'none', else [K, 1], divided by B for 'mean'.
at::Tensor row_grad_scale(const at::Tensor& grad_loss, int64_t reduction, int64_t batch, at::ScalarType acc_dtype) {
  const at::Tensor upstream = grad_loss.to(acc_dtype);
  if (upstream.dim() == 2) return upstream;
  const at::Tensor scale = upstream.unsqueeze(1);
  return reduction == kMean ? scale / static_cast<double>(batch) : scale;
}

// The gradient of each branch entry from the [K, B, C] buffer: a view of it per [B, C] entry, a
// [k, B, C] slice per stacked entry; undefined where the entry needs none.
variable_list entry_grads(const at::Tensor& grad_branches, const variable_list& entries) {
  variable_list grads;
  int64_t first = 0;
  for (const auto& entry : entries) {
    const int64_t count = entry.dim() == 3 ? entry.size(0) : 1;
    if (entry.requires_grad()) {
      grads.push_back(entry.dim() == 3 ? grad_branches.narrow(0, first, count) : grad_branches.select(0, first));
    } else {
      grads.emplace_back();
    }
    first += count;
  }
  return grads;
}

struct OFALossFunction : public torch::autograd::Function<OFALossFunction> {
  // Inputs in this order, so that backward returns the teacher's gradient first, then the entries'.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& teacher, at::TensorList branches,
                            const at::Tensor& target, const at::Tensor& eps, double temperature, int64_t reduction,
                            const c10::optional<at::Tensor>& expected_upstream,
                            const c10::optional<at::Tensor>& grad_scale, bool wants_grad, bool teacher_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool precompute = wants_grad && expected_upstream.has_value() && grad_scale.has_value();
    auto [loss_rows, grad_branches, grad_teacher] =
        fused_forward(branches, teacher, target, eps, temperature, precompute ? grad_scale : c10::nullopt,
                      precompute && teacher_grad);
    if (wants_grad) {
      std::vector<at::Tensor> saved{teacher, target, eps};
      saved.insert(saved.end(), branches.begin(), branches.end());
      ctx->save_for_backward(saved);
      ctx->saved_data["temperature"] = temperature;
      ctx->saved_data["reduction"] = reduction;
      ctx->saved_data["teacher_grad"] = teacher_grad;
      if (precompute) {  // handed out once, by the first backward whose upstream is the announced one
        ctx->saved_data["expected_upstream"] = *expected_upstream;
        ctx->saved_data["grad_branches"] = grad_branches;
        ctx->saved_data["grad_teacher"] = grad_teacher;
      }
      ctx->set_materialize_grads(false);
    }
    return reduce_rows(loss_rows, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs);
};

// The precomputed gradients if `grad_loss` is the upstream the forward announced, else undefined
// tensors. Taken either way: a second backward (retain_graph) recomputes.
std::pair<at::Tensor, at::Tensor> take_precomputed(AutogradContext* ctx, const at::Tensor& grad_loss) {
  auto& data = ctx->saved_data;
  if (data.count("grad_branches") == 0) return {};
  const at::Tensor expected = data.at("expected_upstream").toTensor();
  const bool same = at::equal(grad_loss, grad_loss.dim() == 2 ? expected.unsqueeze(1).expand_as(grad_loss) : expected);
  std::pair<at::Tensor, at::Tensor> grads{data.at("grad_branches").toTensor(), data.at("grad_teacher").toTensor()};
  for (const char* key : {"grad_branches", "grad_teacher", "expected_upstream"}) data.erase(key);
  return same ? grads : std::pair<at::Tensor, at::Tensor>{};
}

// Gradients that have a graph themselves, from autograd over the reference (op.py): the kernels
// write first-order gradients only.
std::pair<variable_list, at::Tensor> graph_backward(const variable_list& saved, const at::Tensor& grad_loss,
                                                   double temperature, int64_t reduction, bool teacher_grad) {
  using GraphBackward = std::vector<at::Tensor>(at::TensorList, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, double, int64_t, const at::Tensor&, bool);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ofakd_fast::ofa_loss_graph_backward", "")
                             .typed<GraphBackward>();
  const variable_list entries(saved.begin() + 3, saved.end());
  std::vector<at::Tensor> grads =
      op.call(entries, saved[0], saved[1], saved[2], temperature, reduction, grad_loss, teacher_grad);
  at::Tensor grad_teacher = teacher_grad ? grads.back() : at::Tensor();
  grads.resize(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    if (!entries[i].requires_grad()) grads[i] = at::Tensor();  // op.py returns an empty tensor there
  }
  return {grads, grad_teacher};
}

variable_list OFALossFunction::backward(AutogradContext* ctx, variable_list grad_outputs) {
  const at::Tensor& grad_loss = grad_outputs[0];
  const variable_list saved = ctx->get_saved_variables();
  const variable_list entries(saved.begin() + 3, saved.end());
  const size_t num_inputs = 1 + entries.size() + 8;  // teacher, the entries, then the other arguments
  if (!grad_loss.defined()) return variable_list(num_inputs);
  const double temperature = ctx->saved_data.at("temperature").toDouble();
  const int64_t reduction = ctx->saved_data.at("reduction").toInt();
  const bool teacher_grad = ctx->saved_data.at("teacher_grad").toBool();
  variable_list result;
  if (at::GradMode::is_enabled()) {  // backward with create_graph=True
    take_precomputed(ctx, grad_loss);  // not used: dropped
    auto [grads, grad_teacher] = graph_backward(saved, grad_loss, temperature, reduction, teacher_grad);
    result.push_back(grad_teacher);
    result.insert(result.end(), grads.begin(), grads.end());
  } else {
    auto [grad_branches, grad_teacher] = take_precomputed(ctx, grad_loss);
    if (!grad_branches.defined()) {
      const at::Tensor& teacher = saved[0];
      const at::ScalarType acc = teacher.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      const at::Tensor scale = row_grad_scale(grad_loss, reduction, teacher.size(0), acc);
      std::tie(std::ignore, grad_branches, grad_teacher) =
          fused_forward(entries, teacher, saved[1], saved[2], temperature, scale, teacher_grad);
    }
    result.push_back(teacher_grad ? grad_teacher : at::Tensor());
    const variable_list grads = entry_grads(grad_branches, entries);
    result.insert(result.end(), grads.begin(), grads.end());
  }
  result.resize(num_inputs);
  return result;
}

// The Autograd kernel: which gradients are wanted is read here, where grad mode is still the caller's.
at::Tensor ofa_loss_autograd(at::TensorList branches, const at::Tensor& teacher, const at::Tensor& target,
                             const at::Tensor& eps, double temperature, int64_t reduction,
                             const c10::optional<at::Tensor>& expected_upstream,
                             const c10::optional<at::Tensor>& grad_scale) {
  const bool grad_mode = at::GradMode::is_enabled();
  const bool teacher_grad = grad_mode && teacher.requires_grad();
  bool wants_grad = teacher_grad;
  for (const auto& entry : branches) wants_grad = wants_grad || (grad_mode && entry.requires_grad());
  return OFALossFunction::apply(teacher, branches, target, eps, temperature, reduction, expected_upstream, grad_scale,
                                wants_grad, teacher_grad);
}

// Without autograd (inference tensors under torch.inference_mode): the losses only.
at::Tensor ofa_loss_no_grad(at::TensorList branches, const at::Tensor& teacher, const at::Tensor& target,
                            const at::Tensor& eps, double temperature, int64_t reduction,
                            const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&) {
  return reduce_rows(std::get<0>(fused_forward(branches, teacher, target, eps, temperature, c10::nullopt, false)),
                     reduction);
}

}  // namespace
}  // namespace ofakd

TORCH_LIBRARY_FRAGMENT(ofakd_fast_C, m) {
  m.def(
      "ofa_loss(Tensor[] branches, Tensor teacher, Tensor target, Tensor eps, float temperature, int reduction, "
      "Tensor? expected_upstream, Tensor? grad_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ofakd_fast_C, Autograd, m) { m.impl("ofa_loss", &ofakd::ofa_loss_autograd); }

TORCH_LIBRARY_IMPL(ofakd_fast_C, CompositeExplicitAutograd, m) { m.impl("ofa_loss", &ofakd::ofa_loss_no_grad); }
