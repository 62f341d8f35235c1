"""Launch helpers shared by the Triton launchers.

Triton (and cuBLAS through torch) launch on the *current* CUDA device, not on the device of the
tensors: a call with tensors on ``cuda:1`` while ``cuda:0`` is current would launch on the wrong
GPU. Every launcher enters ``device_guard(tensor)`` first.

Grids: CUDA limits grid axes 1 and 2 to 65535 programs, axis 0 to 2^31 - 1. Our kernels put every
program on axis 0 (``flat_grid``) and recover (block, row) inside; the block index runs fastest, so
programs that run together share the same head's keys and values in L2, as with the usual
(blocks, batch·heads) grid.
"""

from __future__ import annotations

import contextlib

import torch

MAX_GRID_AXIS0 = 2**31 - 1
MAX_GRID_AXIS12 = 65535


def device_guard(x: torch.Tensor | torch.device):
    """``torch.cuda.device(x's device)`` for CUDA, a no-op context for anything else."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def flat_grid(blocks: int, rows: int) -> tuple[int]:
    """A 1-D grid of ``blocks`` x ``rows`` programs (program id = row · blocks + block). Raises
    ValueError past the axis-0 limit instead of letting the launch fail."""
    total = blocks * rows
    if total > MAX_GRID_AXIS0:
        raise ValueError(f"{total} programs ({rows} rows x {blocks} blocks) exceed CUDA's grid limit {MAX_GRID_AXIS0}")
    return (total,)


def check_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    """Raises ValueError when a grid exceeds CUDA's per-axis limits (for host tests of launchers)."""
    limits = (MAX_GRID_AXIS0, MAX_GRID_AXIS12, MAX_GRID_AXIS12)
    for axis, (size, limit) in enumerate(zip(grid, limits, strict=False)):
        if size > limit:
            raise ValueError(f"grid axis {axis} has {size} programs, over CUDA's limit {limit}")
    return grid
