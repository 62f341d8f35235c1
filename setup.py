"""Builds the compiled extension ``nvlm_kernels._C`` (everything else is plain Python).

Always install with ``pip install -e . --no-build-isolation`` (or without ``-e``): the extension is
compiled against the torch already installed. In an isolated build pip would fetch another torch
(a multi-GB CUDA build) and compile against its headers.

* CUDA build of torch and nvcc present (``CUDA_HOME``): C++ host kernels + CUDA kernels for
  ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0a``: A100 and H100/H200 with wgmma).
* CPU build of torch: the C++ host kernels only (the ``cuda`` backend then serves CPU tensors).
* ``NVLM_KERNELS_BUILD_EXT=0``: no extension; the package runs on its Triton and reference backends.

Sources and flags come from ``csrc/build.json``, which ``CMakeLists.txt`` reads too.
"""

from __future__ import annotations

import json
import os
import pathlib

from setuptools import setup

ROOT = pathlib.Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _extensions() -> tuple[list, dict]:
    if os.environ.get("NVLM_KERNELS_BUILD_EXT", "1").strip() == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    manifest = json.loads((CSRC / "build.json").read_text())
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("NVLM_KERNELS_FORCE_CPU", "0") == "1":
        with_cuda = False
    sources = list(manifest["cpp_sources"]) + (list(manifest["cuda_sources"]) if with_cuda else [])
    macros = [("NVLM_PYTHON_MODULE", None), ("NVLM_WITH_CUDA", "1" if with_cuda else "0")]
    extra = {"cxx": list(manifest["cxx_flags"])}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", manifest["default_cuda_arch_list"])
        extra["nvcc"] = list(manifest["nvcc_flags"])
        if os.environ.get("NVLM_KERNELS_PTXAS_VERBOSE", "0") == "1":
            extra["nvcc"].append("-Xptxas=-v")
    extension_class = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    extension = extension_class(
        "nvlm_kernels._C",
        # Relative paths: setuptools refuses absolute ones in sources.
        sources=[str((CSRC / s).relative_to(ROOT)) for s in sources],
        include_dirs=[str(CSRC)],
        define_macros=macros,
        extra_compile_args=extra,
    )

    class BuildExtension(cpp_extension.BuildExtension):
        """Object files of the CPU and CUDA builds go to separate folders, so the two development
        environments (.venv and .venv-cuda) never reuse each other's objects."""

        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = os.path.join(self.build_temp, "cuda" if with_cuda else "cpu")

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
