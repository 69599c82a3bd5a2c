// Argument checks of alphadiv::adaptive_kd shared by its device kernels (clear errors for direct
// callers of the op; the Python API checks the same before it calls).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "adaptive_kd_math.h"

namespace alphadiv {

inline void check_arguments(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& mask,
                     double alpha_min, double alpha_max, double clip, double temperature, int64_t reduction) {
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.dim() == 2,
                    "alphadiv::adaptive_kd expects 2-D [N, C] logits, got student ", student.sizes(),
                    " and teacher ", teacher.sizes());
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "student and teacher logits must have the same shape, got ",
                    student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK_VALUE(student.size(1) > 0, "logits need at least one class (C = 0)");
  TORCH_CHECK_TYPE(at::isFloatingType(student.scalar_type()) && at::isFloatingType(teacher.scalar_type()),
                   "logits must be floating point, got ", student.scalar_type(), " and ", teacher.scalar_type());
  TORCH_CHECK_VALUE(student.device() == teacher.device(), "student and teacher must be on the same device, got ",
                    student.device(), " and ", teacher.device());
  TORCH_CHECK_VALUE(alpha_min <= alpha_max, "alpha_min (", alpha_min, ") must not exceed alpha_max (", alpha_max, ")");
  TORCH_CHECK_VALUE(clip > 0, "clip must be positive, got ", clip);
  TORCH_CHECK_VALUE(temperature > 0 && temperature <= kMaxTemperature, "temperature must be in (0, ", kMaxTemperature,
                    "], got ", temperature, ": above it the divergence is below the float32 rounding of its terms");
  TORCH_CHECK_VALUE(reduction >= kReductionNone && reduction <= kReductionSum, "reduction code must be 0, 1 or 2, got ",
                    reduction);
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, "mask must be a bool tensor, got ", mask->scalar_type());
    TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == student.size(0), "mask must have shape [", student.size(0),
                      "], got ", mask->sizes());
  }
}

}  // namespace alphadiv

namespace alphadiv {

// The checks of alphadiv::sparse_adaptive_kd's arguments (the parameters are the dense op's).
inline void check_sparse_arguments(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                                   const std::optional<at::Tensor>& mask, double alpha_min, double alpha_max,
                                   double clip, double temperature, int64_t reduction) {
  TORCH_CHECK_VALUE(student.dim() == 2 && indices.dim() == 2 && logprobs.dim() == 2,
                    "alphadiv::sparse_adaptive_kd expects [N, C] logits and [N, k] indices and log-probabilities, got ",
                    student.sizes(), ", ", indices.sizes(), " and ", logprobs.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == logprobs.sizes() && indices.size(0) == student.size(0),
                    "topk_indices and topk_logprobs must be [N, k] with the logits' N rows, got ", indices.sizes(),
                    " and ", logprobs.sizes(), " for logits ", student.sizes());
  TORCH_CHECK_VALUE(indices.size(1) > 0 && indices.size(1) <= student.size(1),
                    "k (the teacher's classes per row) must be in [1, C = ", student.size(1), "], got ", indices.size(1));
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
                   "topk_indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(logprobs.scalar_type()), "topk_logprobs must be floating point, got ",
                   logprobs.scalar_type());
  TORCH_CHECK_VALUE(student.device() == indices.device() && student.device() == logprobs.device(),
                    "logits, topk_indices and topk_logprobs must be on one device, got ", student.device(), ", ",
                    indices.device(), " and ", logprobs.device());
  // The dense op's checks of the parameters and the mask, with the logits standing in for the teacher.
  check_arguments(student, student, mask, alpha_min, alpha_max, clip, temperature, reduction);
}

}  // namespace alphadiv
