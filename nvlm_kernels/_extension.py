"""Loads the compiled extension ``nvlm_kernels._C`` once, remembering why when it cannot.

The extension registers private ops in the ``torch.ops.nvlm_C`` namespace from C++ static
initializers, so importing the shared object is all that is needed. ``NVLM_KERNELS_BUILD_EXT=0``
at build time skips it; the package then runs on its Triton and reference backends.
"""

from __future__ import annotations

import functools
import importlib

import torch


@functools.cache
def _load() -> tuple[object | None, str | None]:
    try:
        module = importlib.import_module("nvlm_kernels._C")
    except ImportError as exc:
        text = str(exc)
        if "No module named" in text:
            return None, "the extension nvlm_kernels._C is not built (pip install -e . --no-build-isolation)"
        return None, f"the extension nvlm_kernels._C failed to load ({text})"
    except Exception as exc:  # pragma: no cover - a broken build
        return None, f"the extension nvlm_kernels._C failed to load ({type(exc).__name__}: {exc})"
    return module, None


def load_error() -> str | None:
    """None when the extension is loaded, else why not."""
    return _load()[1]


def require() -> None:
    """Raise ``RuntimeError`` with the reason when the extension is not loaded."""
    err = load_error()
    if err:
        raise RuntimeError(err)


def is_loaded() -> bool:
    return _load()[0] is not None


def has_kernel(qualified_op: str, dispatch_key: str) -> bool:
    """Whether the loaded extension registered ``qualified_op`` ("nvlm_C::x") for ``dispatch_key``."""
    if not is_loaded():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(qualified_op, dispatch_key)
    except RuntimeError:  # op not registered at all
        return False


def built_with_cuda() -> bool:
    """True when the extension carries CUDA kernels (compiled against a CUDA torch with nvcc)."""
    module = _load()[0]
    return bool(getattr(module, "WITH_CUDA", False)) if module is not None else False
