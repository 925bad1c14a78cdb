// The inputs of the fused_forward op, checked and flattened: shared by the CPU and CUDA bindings,
// which add only the checks of their device.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace ofakd {

struct OpInputs {
  std::vector<at::Tensor> branches;  // every [B, C] branch in order ([k, B, C] entries as views)
  std::vector<int64_t> row_strides;  // of each branch, in elements
  int64_t K, B, C;
  at::ScalarType dtype, acc_dtype;   // logits; losses and accumulation (float64 for float64, else float32)
};

// Branch entries [B, C] or [k, B, C], teacher [B, C], int64 targets [B], one float64 CPU eps per
// branch; one dtype and one device for all logits, rows dense in the class dimension.
inline OpInputs check_op_inputs(at::TensorList entries, const at::Tensor& teacher, const at::Tensor& target,
                                const at::Tensor& eps) {
  OpInputs in;
  for (const auto& entry : entries) {
    TORCH_CHECK(entry.dim() == 2 || entry.dim() == 3, "ofakd_fast: each branch entry must be [B, C] or [k, B, C]");
    if (entry.dim() == 3) {
      for (int64_t i = 0; i < entry.size(0); ++i) in.branches.push_back(entry.select(0, i));
    } else {
      in.branches.push_back(entry);
    }
  }
  in.K = static_cast<int64_t>(in.branches.size());
  TORCH_CHECK(in.K > 0, "ofakd_fast: need at least one student branch");
  TORCH_CHECK(teacher.dim() == 2, "ofakd_fast: teacher logits must be [B, C]");
  in.B = teacher.size(0);
  in.C = teacher.size(1);
  TORCH_CHECK(teacher.stride(1) == 1 || in.C <= 1, "ofakd_fast: teacher rows must be contiguous");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.numel() == in.B, "ofakd_fast: target must be int64 [B]");
  TORCH_CHECK(target.device() == teacher.device(), "ofakd_fast: target must be on ", teacher.device(),
              " like the logits, got ", target.device());
  TORCH_CHECK(eps.scalar_type() == at::kDouble && eps.device().is_cpu() && eps.numel() == in.K,
              "ofakd_fast: eps must be a float64 CPU tensor with one value per branch");
  in.dtype = teacher.scalar_type();
  TORCH_CHECK(in.dtype == at::kFloat || in.dtype == at::kDouble || in.dtype == at::kBFloat16 || in.dtype == at::kHalf,
              "ofakd_fast: logits must be float32, float64, bfloat16 or float16, got ", in.dtype);
  in.acc_dtype = in.dtype == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& m : in.branches) {
    TORCH_CHECK(m.scalar_type() == in.dtype, "ofakd_fast: branches and teacher must share one dtype");
    TORCH_CHECK(m.device() == teacher.device(), "ofakd_fast: every branch must be on ", teacher.device(),
                " like the teacher, got ", m.device());
    TORCH_CHECK(m.size(0) == in.B && m.size(1) == in.C, "ofakd_fast: every branch must be [B, C] like the teacher");
    TORCH_CHECK(m.stride(1) == 1 || in.C <= 1, "ofakd_fast: branch rows must be contiguous");
    in.row_strides.push_back(m.stride(0));
  }
  return in;
}

}  // namespace ofakd
