"""What the sm_90 ("hopper") Triton kernels share on the host: TMA descriptors and the deterministic switch.

TMA (the Hopper copy engine) reads a tensor through a ``CUtensorMap`` built on the host
(``triton.tools.tensor_descriptor.TensorDescriptor``, a kernel argument). It needs a unit innermost
stride and a 16-byte aligned base and outer strides; a tensor that does not qualify is read by the
same kernels' pointer loads instead (``tma_ok`` decides). An attention head slice of [B, S, H, D]
is one 4-D descriptor with block [1, rows, 1, BLOCK_D]: its bounds are the tensor's, so rows past S
and padded head-dim columns read as zeros. A descriptor carries its block shape, which depends on the
configuration the autotuner launches: the launchers build every descriptor with a placeholder block
and the configuration's pre-hook (``block_shape_hook``) sets the real one.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

DETERMINISTIC_ENV_VAR = "NVLM_KERNELS_DETERMINISTIC"


def deterministic_requested(deterministic: bool | None = None) -> bool:
    """Whether a backward runs without float atomics (bitwise reproducible): ``deterministic`` if
    given, else the environment variable NVLM_KERNELS_DETERMINISTIC=1 or
    ``torch.use_deterministic_algorithms(True)``."""
    if deterministic is not None:
        return bool(deterministic)
    flag = os.environ.get(DETERMINISTIC_ENV_VAR, "").strip().lower() not in ("", "0", "false")
    return flag or torch.are_deterministic_algorithms_enabled()


def tma_ok(x: torch.Tensor) -> bool:
    """Whether TMA can read ``x``: non-empty, unit innermost stride, 16-byte aligned base and outer
    strides (every contiguous tensor, and a view of a fused QKV / KV projection when its row width
    in bytes is a multiple of 16)."""
    size = x.element_size()
    return (
        x.numel() > 0
        and x.stride(-1) == 1
        and x.data_ptr() % 16 == 0
        and all((stride * size) % 16 == 0 for stride in x.stride()[:-1])
    )


def descriptor(x: torch.Tensor, block: list[int]) -> TensorDescriptor:
    """A host descriptor over all of ``x`` with ``block``."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), block)


def head_descriptors(use_tma: bool, *tensors: torch.Tensor, rows: int = 16) -> list:
    """4-D descriptors over [B, S, H, D] ``tensors`` (block [1, rows, 1, BLOCK_D], reset by the
    pre-hook) when ``use_tma``, else the tensors themselves (the kernels' unused arguments)."""
    if not use_tma:
        return list(tensors)
    return [descriptor(x, [1, rows, 1, triton.next_power_of_2(x.shape[-1])]) for x in tensors]


def block_shape_hook(descriptor_rows: dict[str, str]) -> Callable[[dict], None]:
    """An autotuner pre-hook giving each head descriptor argument (name -> the meta-parameter of the
    rows it streams) the block [1, rows, 1, BLOCK_D] of the configuration being launched."""

    def set_block_shapes(nargs: dict) -> None:
        for name, rows in descriptor_rows.items():
            desc = nargs.get(name)
            if isinstance(desc, TensorDescriptor):
                desc.block_shape = [1, nargs[rows], 1, nargs["BLOCK_D"]]

    return set_block_shapes
