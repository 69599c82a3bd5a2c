// The Python module alphadiv_kernels._C_cuda: empty; importing it loads the library, whose static
// initialisers register the CUDA kernel of alphadiv::adaptive_kd (the schema lives in _C).
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
