// The branch list of the fused_forward op, flattened: shared by the CPU and CUDA op bindings.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace ofakd {

// Every [B, C] branch of `branches` (each entry [B, C] or [k, B, C]), in order, as views.
inline std::vector<at::Tensor> branch_matrices(at::TensorList branches) {
  std::vector<at::Tensor> rows;
  for (const auto& entry : branches) {
    TORCH_CHECK(entry.dim() == 2 || entry.dim() == 3, "ofakd_fast: each branch entry must be [B, C] or [k, B, C]");
    if (entry.dim() == 3) {
      for (int64_t i = 0; i < entry.size(0); ++i) rows.push_back(entry.select(0, i));
    } else {
      rows.push_back(entry);
    }
  }
  return rows;
}

}  // namespace ofakd
