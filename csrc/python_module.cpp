// The Python module fusedgauss._C. `import fusedgauss._C` loads this library, which runs
// the static op registrations of csrc/ops.cpp and the device kernels. The module holds only
// the CPU kernels' SIMD level (csrc/cpu/simd.h), which is process state rather than an op;
// it is built against the limited Python API. Not part of the CMake build.

#include <Python.h>

#include <c10/util/Exception.h>

#include "cpu/simd.h"

namespace {

using fusedgauss::cpu::SimdLevel;

PyObject* cpu_simd_level(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fusedgauss::cpu::simd_level_name(fusedgauss::cpu::simd_level()));
  } catch (const c10::Error& e) {  // a bad FUSEDGAUSS_CPU_SIMD
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* cpu_simd_levels(PyObject*, PyObject*) {
  const int best = static_cast<int>(fusedgauss::cpu::best_supported_simd());
  PyObject* levels = PyList_New(0);
  for (int level = 0; levels != nullptr && level <= best; ++level) {
    PyObject* name = PyUnicode_FromString(fusedgauss::cpu::simd_level_name(static_cast<SimdLevel>(level)));
    if (name == nullptr || PyList_Append(levels, name) != 0) {
      Py_XDECREF(name);
      Py_DECREF(levels);
      return nullptr;
    }
    Py_DECREF(name);
  }
  return levels;
}

PyObject* set_cpu_simd_level(PyObject*, PyObject* args) {
  const char* name = nullptr;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  try {
    fusedgauss::cpu::set_simd_level(fusedgauss::cpu::parse_simd_level(name, "set_cpu_simd_level"));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_simd_level", cpu_simd_level, METH_NOARGS, "The SIMD level the CPU kernels run: baseline, avx2 or avx512."},
    {"cpu_simd_levels", cpu_simd_levels, METH_NOARGS, "The SIMD levels this CPU can run, narrowest first."},
    {"set_cpu_simd_level", set_cpu_simd_level, METH_VARARGS, "Makes the CPU kernels run the named SIMD level."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
