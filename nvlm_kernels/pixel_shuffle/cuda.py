"""Pixel shuffle through the compiled extension (``csrc/pixel_shuffle``).

On CUDA tensors: one warp per input token copies its channel run with 16-byte loads and stores
when the addresses allow it (they do at NVLM's shapes, CLS-dropped views included). On CPU tensors:
the C++ host kernel, which shares that index math and alignment logic with the device kernel.
"""

from __future__ import annotations

import torch

from nvlm_kernels import _extension


def _ops():
    _extension.require()
    return torch.ops.nvlm_C


def pixel_shuffle_fwd(x: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    return _ops().pixel_shuffle_fwd(x, downscale, v2)


def pixel_shuffle_bwd(grad_out: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    return _ops().pixel_shuffle_bwd(grad_out, downscale, v2)


def copy_unit_bytes(x: torch.Tensor, downscale: int = 2, v2: bool = True) -> int:
    """The width (bytes) of the loads and stores the forward would use for ``x``: 16 is vectorized."""
    return _ops().pixel_shuffle_copy_unit(x, downscale, v2)
