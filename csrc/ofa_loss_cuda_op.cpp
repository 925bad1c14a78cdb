// The CUDA implementations of ofakd_fast_C::fused_forward and fused_forward_sparse: input checks,
// outputs, launches, and the registration (module ofakd_fast._C_cuda). The contracts, the design and
// the launch shapes are documented in ofa_loss_cuda.cu, which launches the kernels; this file is
// compiled by the host compiler (the ATen headers would cost minutes in nvcc's device passes).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <Python.h>

#include <limits>
#include <vector>

#include "op_inputs.h"
#include "ofa_loss_cuda_launch.h"

namespace ofakd {
namespace cuda_kernel {

// Defined in ofa_loss_cuda.cu for float, double, c10::BFloat16 and c10::Half.
template <typename scalar_t>
cudaError_t launch_rows(const LaunchParams<scalar_t>& params, const LaunchShape& shape, cudaStream_t stream);
template <typename scalar_t>
cudaError_t launch_sparse_rows(const SparseLaunchParams<scalar_t>& params, const LaunchShape& shape,
                               cudaStream_t stream);

namespace {

// What both ops allocate and convert before a launch: the loss rows [K, B], the branch gradients
// [K, B, C] (or empty) and the row factors [K, B] (undefined without gradients).
struct BranchOutputs {
  at::Tensor loss_rows, grad_branches, scale;
};

// The shape limits of one launch and the outputs of the branches (both ops).
BranchOutputs branch_outputs(const OpInputs& in, const at::TensorOptions& options, double temperature,
                             const c10::optional<at::Tensor>& grad_scale) {
  TORCH_CHECK(temperature > 0, "ofakd_fast: temperature must be > 0");
  TORCH_CHECK(in.B <= std::numeric_limits<int32_t>::max(), "ofakd_fast: batch too large for one launch");
  TORCH_CHECK(in.C <= std::numeric_limits<int32_t>::max() - 64, "ofakd_fast: too many classes for the CUDA kernel");
  BranchOutputs out;
  out.loss_rows = at::empty({in.K, in.B}, options.dtype(in.acc_dtype));
  out.grad_branches = grad_scale.has_value() ? at::empty({in.K, in.B, in.C}, options) : at::empty({0}, options);
  if (grad_scale.has_value()) out.scale = grad_scale->to(options.device(), in.acc_dtype).expand({in.K, in.B});
  return out;
}

// The student side of a call in pointers (target and eps contiguous).
template <typename scalar_t>
void fill_branch_problem(const OpInputs& in, const at::Tensor& target, const at::Tensor& eps, double temperature,
                         BranchOutputs& out, BranchProblem<scalar_t>& pb) {
  using acc_t = acc_of<scalar_t>;
  for (int64_t k = 0; k < in.K; ++k) {
    pb.branch.push_back(in.branches[k].const_data_ptr<scalar_t>());
    pb.branch_stride.push_back(in.row_strides[k]);
    pb.eps.push_back(eps.const_data_ptr<double>()[k]);
  }
  pb.target = target.const_data_ptr<int64_t>();
  pb.B = in.B;
  pb.C = in.C;
  pb.temperature = temperature;
  pb.loss_rows = out.loss_rows.mutable_data_ptr<acc_t>();
  if (out.scale.defined()) {
    pb.grad_scale = out.scale.const_data_ptr<acc_t>();
    pb.scale_stride_k = out.scale.stride(0);
    pb.scale_stride_b = out.scale.stride(1);
    pb.grad_branches = out.grad_branches.mutable_data_ptr<scalar_t>();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_cuda(at::TensorList branches, const at::Tensor& teacher,
                                                                  const at::Tensor& target, const at::Tensor& eps,
                                                                  double temperature,
                                                                  const c10::optional<at::Tensor>& grad_scale,
                                                                  bool teacher_grad) {
  TORCH_CHECK(teacher.is_cuda(), "ofakd_fast (CUDA kernel): teacher logits must be a CUDA tensor, got ",
              teacher.device());
  const OpInputs in = check_op_inputs(branches, teacher, target, eps);
  const int64_t K = in.K, B = in.B, C = in.C;
  const auto dtype = in.dtype, acc_dtype = in.acc_dtype;
  const bool want_tgrad = grad_scale.has_value() && teacher_grad;

  const c10::cuda::CUDAGuard guard(teacher.device());
  const auto options = teacher.options();
  BranchOutputs out = branch_outputs(in, options, temperature, grad_scale);
  at::Tensor grad_teacher = want_tgrad ? at::empty({B, C}, options) : at::empty({0}, options);
  if (B == 0) return {out.loss_rows, out.grad_branches, grad_teacher};
  if (C == 0) {  // every target is out of range
    out.loss_rows.fill_(std::numeric_limits<double>::quiet_NaN());
    return {out.loss_rows, out.grad_branches, grad_teacher};
  }
  const auto target_c = target.contiguous();
  const auto eps_c = eps.contiguous();
  const LaunchShape shape = plan_launch(B, C, static_cast<int>(c10::elementSize(dtype)));
  at::Tensor workspace;  // the running teacher gradient of streamed rows / several launches
  if (want_tgrad && needs_teacher_workspace(K, shape)) {
    workspace = dtype == acc_dtype ? grad_teacher : at::empty({B, C}, options.dtype(acc_dtype));
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "ofa_fused_forward_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    Problem<scalar_t> pb;
    fill_branch_problem(in, target_c, eps_c, temperature, out, pb);
    pb.teacher = teacher.const_data_ptr<scalar_t>();
    pb.teacher_stride = teacher.stride(0);
    if (want_tgrad) pb.grad_teacher = grad_teacher.mutable_data_ptr<scalar_t>();
    if (workspace.defined()) pb.teacher_workspace = workspace.mutable_data_ptr<acc_t>();

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    launch_branch_groups(pb, [&](const LaunchParams<scalar_t>& params) {
      C10_CUDA_CHECK(launch_rows<scalar_t>(params, shape, stream));
    });
  });
  return {out.loss_rows, out.grad_branches, grad_teacher};
}

// The branches checked and flattened as check_op_inputs does (branch 0 stands in for the dense
// teacher as the reference of B, C, dtype and device), then the stored teacher rows: logits [B, k]
// and lse [B] in the loss dtype, int64 indices [B, k], contiguous, on the branches' device, k <= C.
OpInputs check_sparse_op_inputs(at::TensorList branches, const at::Tensor& logits, const at::Tensor& indices,
                                const at::Tensor& lse, const at::Tensor& target, const at::Tensor& eps) {
  TORCH_CHECK(!branches.empty(), "ofakd_fast: need at least one student branch");
  const at::Tensor& first = branches[0];
  const OpInputs in = check_op_inputs(branches, first.dim() == 3 && first.size(0) > 0 ? first[0] : first, target, eps);
  const auto device = in.branches[0].device();
  TORCH_CHECK(device.is_cuda(), "ofakd_fast (CUDA kernel): the logits must be CUDA tensors, got ", device);
  for (const at::Tensor* t : {&logits, &indices, &lse}) {
    TORCH_CHECK(t->device() == device, "ofakd_fast: the sparse teacher must be on ", device, " like the branches, got ",
                t->device());
    TORCH_CHECK(t->is_contiguous(), "ofakd_fast: the sparse teacher's tensors must be contiguous");
  }
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == in.B && logits.size(1) <= in.C,
              "ofakd_fast: teacher_logits must be [B, k] with k <= C");
  TORCH_CHECK(indices.sizes() == logits.sizes() && indices.scalar_type() == at::kLong,
              "ofakd_fast: teacher_indices must be int64 [B, k] like teacher_logits");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == in.B, "ofakd_fast: teacher_lse must be [B]");
  TORCH_CHECK(logits.scalar_type() == in.acc_dtype && lse.scalar_type() == in.acc_dtype,
              "ofakd_fast: teacher_logits and teacher_lse must be ", in.acc_dtype, " for ", in.dtype, " branches");
  return in;
}

std::tuple<at::Tensor, at::Tensor> fused_forward_sparse_cuda(at::TensorList branches, const at::Tensor& teacher_logits,
                                                             const at::Tensor& teacher_indices,
                                                             const at::Tensor& teacher_lse, const at::Tensor& target,
                                                             const at::Tensor& eps, double temperature,
                                                             const c10::optional<at::Tensor>& grad_scale) {
  const OpInputs in = check_sparse_op_inputs(branches, teacher_logits, teacher_indices, teacher_lse, target, eps);
  const c10::cuda::CUDAGuard guard(teacher_logits.device());
  BranchOutputs out = branch_outputs(in, in.branches[0].options(), temperature, grad_scale);
  if (in.B == 0) return {out.loss_rows, out.grad_branches};
  if (in.C == 0) {  // every target is out of range
    out.loss_rows.fill_(std::numeric_limits<double>::quiet_NaN());
    return {out.loss_rows, out.grad_branches};
  }
  const auto target_c = target.contiguous();
  const auto eps_c = eps.contiguous();
  const LaunchShape shape = plan_sparse_launch(in.B, in.C, static_cast<int>(c10::elementSize(in.dtype)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.dtype, "ofa_fused_forward_sparse_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    SparseProblem<scalar_t> pb;
    fill_branch_problem(in, target_c, eps_c, temperature, out, pb);
    pb.teacher_logits = teacher_logits.const_data_ptr<acc_t>();
    pb.teacher_indices = teacher_indices.const_data_ptr<int64_t>();
    pb.teacher_lse = teacher_lse.const_data_ptr<acc_t>();
    pb.k = teacher_logits.size(1);

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    launch_sparse_branch_groups(pb, [&](const SparseLaunchParams<scalar_t>& params) {
      C10_CUDA_CHECK(launch_sparse_rows<scalar_t>(params, shape, stream));
    });
  });
  return {out.loss_rows, out.grad_branches};
}

}  // namespace
}  // namespace cuda_kernel
}  // namespace ofakd

// The schemas are defined by the CPU extension (ofakd_fast._C); this module adds the CUDA kernels.
TORCH_LIBRARY_IMPL(ofakd_fast_C, CUDA, m) {
  m.impl("fused_forward", &ofakd::cuda_kernel::fused_forward_cuda);
  m.impl("fused_forward_sparse", &ofakd::cuda_kernel::fused_forward_sparse_cuda);
}

// A Python module with no attributes: importing it runs the registration above. (Python.h only,
// not torch/extension.h: pybind11 would add ~20 s of nvcc time for nothing.)
#define OFA_CONCAT_IMPL(a, b) a##b
#define OFA_CONCAT(a, b) OFA_CONCAT_IMPL(a, b)
#define OFA_STRINGIFY_IMPL(a) #a
#define OFA_STRINGIFY(a) OFA_STRINGIFY_IMPL(a)

PyMODINIT_FUNC OFA_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, OFA_STRINGIFY(TORCH_EXTENSION_NAME),
                                          "CUDA kernels of ofakd_fast_C::fused_forward and fused_forward_sparse "
                                          "(registered on import).",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
