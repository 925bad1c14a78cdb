// The CUDA implementation of ofakd_fast_C::fused_forward: input checks, outputs, launches, and the
// registration (module ofakd_fast._C_cuda). The contract, the design and the launch shapes are
// documented in ofa_loss_cuda.cu, which launches the kernel; this file is compiled by the host
// compiler (the ATen headers would cost minutes in nvcc's device passes).
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

namespace {

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
  const auto device = teacher.device();
  TORCH_CHECK(temperature > 0, "ofakd_fast: temperature must be > 0");
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(), "ofakd_fast: batch too large for one launch");
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max() - 64, "ofakd_fast: too many classes for the CUDA kernel");
  const bool want_grad = grad_scale.has_value();
  const bool want_tgrad = want_grad && teacher_grad;

  const c10::cuda::CUDAGuard guard(device);
  const auto options = teacher.options();
  auto loss_rows = at::empty({K, B}, options.dtype(acc_dtype));
  at::Tensor grad_branches = want_grad ? at::empty({K, B, C}, options) : at::empty({0}, options);
  at::Tensor grad_teacher = want_tgrad ? at::empty({B, C}, options) : at::empty({0}, options);
  if (B == 0) return {loss_rows, grad_branches, grad_teacher};
  if (C == 0) {  // every target is out of range
    loss_rows.fill_(std::numeric_limits<double>::quiet_NaN());
    return {loss_rows, grad_branches, grad_teacher};
  }
  at::Tensor scale;
  if (want_grad) scale = grad_scale->to(device, acc_dtype).expand({K, B});
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
    for (int64_t k = 0; k < K; ++k) {
      pb.branch.push_back(in.branches[k].const_data_ptr<scalar_t>());
      pb.branch_stride.push_back(in.row_strides[k]);
      pb.eps.push_back(eps_c.const_data_ptr<double>()[k]);
    }
    pb.teacher = teacher.const_data_ptr<scalar_t>();
    pb.teacher_stride = teacher.stride(0);
    pb.target = target_c.const_data_ptr<int64_t>();
    pb.B = B;
    pb.C = C;
    pb.temperature = temperature;
    pb.loss_rows = loss_rows.mutable_data_ptr<acc_t>();
    if (want_grad) {
      pb.grad_scale = scale.const_data_ptr<acc_t>();
      pb.scale_stride_k = scale.stride(0);
      pb.scale_stride_b = scale.stride(1);
      pb.grad_branches = grad_branches.mutable_data_ptr<scalar_t>();
    }
    if (want_tgrad) pb.grad_teacher = grad_teacher.mutable_data_ptr<scalar_t>();
    if (workspace.defined()) pb.teacher_workspace = workspace.mutable_data_ptr<acc_t>();

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    launch_branch_groups(pb, [&](const LaunchParams<scalar_t>& params) {
      C10_CUDA_CHECK(launch_rows<scalar_t>(params, shape, stream));
    });
  });
  return {loss_rows, grad_branches, grad_teacher};
}

}  // namespace
}  // namespace cuda_kernel
}  // namespace ofakd

// The schema is defined by the CPU extension (ofakd_fast._C); this module adds the CUDA kernel.
TORCH_LIBRARY_IMPL(ofakd_fast_C, CUDA, m) {
  m.impl("fused_forward", &ofakd::cuda_kernel::fused_forward_cuda);
}

// A Python module with no attributes: importing it runs the registration above. (Python.h only,
// not torch/extension.h: pybind11 would add ~20 s of nvcc time for nothing.)
#define OFA_CONCAT_IMPL(a, b) a##b
#define OFA_CONCAT(a, b) OFA_CONCAT_IMPL(a, b)
#define OFA_STRINGIFY_IMPL(a) #a
#define OFA_STRINGIFY(a) OFA_STRINGIFY_IMPL(a)

PyMODINIT_FUNC OFA_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, OFA_STRINGIFY(TORCH_EXTENSION_NAME),
                                          "CUDA kernel of ofakd_fast_C::fused_forward (registered on import).", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
