// Schema of the op. Kernels register per device in cpu/ (and cuda/ where built).
#include <torch/library.h>

TORCH_LIBRARY(alphadiv, m) {
  // student, teacher: [N, C] logits (any strides). mask: optional bool [N], true = row counts.
  // reduction: 0 none, 1 mean, 2 sum. Returns (value, grad): value is [N] or a scalar in the
  // promoted dtype of the inputs; grad is d value / d student ([N, C], student dtype, contiguous;
  // the mean's 1 / count included) when compute_grad, else an empty tensor.
  m.def(
      "adaptive_kd(Tensor student, Tensor teacher, Tensor? mask, float alpha_min, float alpha_max, "
      "float clip, float temperature, int reduction, bool surrogate, bool compute_grad) "
      "-> (Tensor, Tensor)");
  // The value of adaptive_kd with its autograd node in C++, for eager training calls (every device:
  // adaptive_kd_autograd.cpp calls adaptive_kd through the dispatcher).
  m.def(
      "adaptive_kd_loss(Tensor student, Tensor teacher, Tensor? mask, float alpha_min, float alpha_max, "
      "float clip, float temperature, int reduction, bool surrogate) -> Tensor");
  // Sparse teacher: per row, k classes and their log-probabilities; the rest of the teacher's mass is one
  // tail bin (math in sparse_adaptive_kd_math.h). Returns (value, grad) as adaptive_kd.
  m.def(
      "sparse_adaptive_kd(Tensor student, Tensor topk_indices, Tensor topk_logprobs, Tensor? mask, float alpha_min, "
      "float alpha_max, float clip, float temperature, int reduction, bool surrogate, bool compute_grad) "
      "-> (Tensor, Tensor)");
}
