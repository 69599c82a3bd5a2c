// Schema of the op and the Python module that loads it. Kernels register per device in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing alphadiv_kernels._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(alphadiv, m) {
  // student, teacher: [N, C] logits (any strides). mask: optional bool [N], true = row counts.
  // reduction: 0 none, 1 mean, 2 sum. Returns (value, grad): value is [N] or a scalar in the
  // promoted dtype of the inputs; grad is d value_row / d student scaled for the reduction
  // ([N, C], student dtype, contiguous) when compute_grad, else an empty tensor.
  m.def(
      "adaptive_kd(Tensor student, Tensor teacher, Tensor? mask, float alpha_min, float alpha_max, "
      "float clip, float temperature, int reduction, bool surrogate, bool compute_grad) "
      "-> (Tensor, Tensor)");
}
