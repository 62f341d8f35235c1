// The one binding file of the extension: declares every private op's schema in the nvlm_C
// torch.library namespace (kernels register per dispatch key next to their code) and, when built
// as the Python module nvlm_kernels._C, a bare PyInit__C. There is deliberately no pybind11:
// importing the shared object runs the static registrations, which is all Python needs, and
// <torch/extension.h> would triple the compile time.
#include <torch/library.h>

#include "core/macros.h"

TORCH_LIBRARY(nvlm_C, m) {
  // pixel shuffle (csrc/pixel_shuffle): x [N, L, C] -> [N, L/r², r²·C] and its inverse
  m.def("pixel_shuffle_fwd(Tensor x, int downscale, bool v2) -> Tensor");
  m.def("pixel_shuffle_bwd(Tensor grad_out, int downscale, bool v2) -> Tensor");
  m.def("pixel_shuffle_copy_unit(Tensor x, int downscale, bool v2) -> int");
  // preprocessing (csrc/preprocess): uint8 images -> Pillow-exact bicubic resize -> normalized tiles
  // [T, 3, S, S] (channels-last strides when asked). Host kernel only: num_threads (0 = torch's
  // thread count) and isa (-1 = best the CPU supports, 0 = per-pixel scalar, 1 = baseline SIMD, 2 = AVX2).
  m.def(
      "resize_to_tiles(Tensor[] images, Tensor job_table, Tensor coefficients, Tensor table, int total_tiles, "
      "int tile_size, ScalarType dtype, bool channels_last=False, int num_threads=0, int isa=-1) -> Tensor");
  // uint8 [nbytes] on the host from the allocator that recycles the host kernels' large outputs
  // (csrc/core/recycling_allocator.h): staging memory reused from call to call.
  m.def("host_buffer(int nbytes) -> Tensor");
}

#if defined(NVLM_PYTHON_MODULE)
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "nvlm-kernels compiled ops (registered as torch.ops.nvlm_C.*)",
      -1,
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", NVLM_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
#endif
