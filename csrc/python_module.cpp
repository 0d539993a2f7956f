// The Python module fusedgauss._C. `import fusedgauss._C` loads this library, which runs
// the static op registrations of csrc/ops.cpp and the device kernels. The module holds only
// process state rather than ops: the CPU kernels' SIMD level (csrc/cpu/simd.h), the CPU
// output cache (csrc/common/outputs.h) and how the CPU noise op draws
// (csrc/cpu/standard_normal.h). It is built against the limited Python API. Not part of the
// CMake build.

#include <Python.h>

#include <c10/util/Exception.h>

#include "common/outputs.h"
#include "cpu/simd.h"
#include "cpu/standard_normal.h"

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

PyObject* cpu_normal_transform(PyObject*, PyObject*) {
  const char* name = fusedgauss::cpu::mirrored_normal_transform();
  if (name == nullptr) Py_RETURN_NONE;
  return PyUnicode_FromString(name);
}

PyObject* cpu_output_cache_stats(PyObject*, PyObject*) {
  fusedgauss::OutputCacheStats stats{};
  try {
    stats = fusedgauss::cpu_output_cache_stats();
  } catch (const c10::Error& e) {  // a bad FUSEDGAUSS_CPU_OUTPUT_CACHE_MB
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  return Py_BuildValue("{sLsLsLsLsL}", "cached_bytes", static_cast<long long>(stats.cached_bytes), "cached_blocks",
                       static_cast<long long>(stats.cached_blocks), "limit_bytes",
                       static_cast<long long>(stats.limit_bytes), "hits", static_cast<long long>(stats.hits),
                       "misses", static_cast<long long>(stats.misses));
}

PyObject* set_cpu_output_cache_limit(PyObject*, PyObject* args) {
  long long bytes = 0;
  if (!PyArg_ParseTuple(args, "L", &bytes)) return nullptr;
  try {
    fusedgauss::set_cpu_output_cache_limit(bytes);
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
    {"cpu_normal_transform", cpu_normal_transform, METH_NOARGS,
     "The Box-Muller transform of torch's normal_ that the CPU noise op mirrors (avx2, scalar), or None."},
    {"cpu_output_cache_stats", cpu_output_cache_stats, METH_NOARGS,
     "The CPU output cache: cached_bytes, cached_blocks, limit_bytes, hits, misses."},
    {"set_cpu_output_cache_limit", set_cpu_output_cache_limit, METH_VARARGS,
     "Keeps at most this many bytes of freed output blocks for reuse."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
