// The Python module fusedgauss._C. `import fusedgauss._C` loads this library, which runs
// the static op registrations of csrc/ops.cpp and the device kernels. The module itself is
// empty, so it is built against the limited Python API. Not part of the CMake build.

#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
