"""Pixel shuffle in plain PyTorch: the permutation of InternVL's reshape sequence (nvlm-spec §4.1).

x [N, L, C] with L = side², side divisible by r (r = 1/scale_factor). Per token grid [side, side]
(row, column):

    [N, side, side, C] -> [N, side, side/r, r·C]        merge r neighbouring columns into channels
                       -> [N, side/r, side, r·C]        swap the spatial axes
                       -> [N, side/r, side/r, r²·C]     merge r neighbouring rows into channels
        v2 only        -> swap the spatial axes back    (row-major output tokens; v1 is transposed)
                       -> [N, L/r², r²·C]

Index map (v2): out[n, (side/r)·i + j, C·(r·dr + dc) + ch] = in[n, side·(r·i + dr) + r·j + dc, ch].
"""

from __future__ import annotations

import math

import torch


def _blocks(x: torch.Tensor, r: int) -> torch.Tensor:
    """[N, side², C] -> the view [N, side/r (row block i), r (dr), side/r (column block j), r (dc), C]."""
    n, length, channels = x.shape
    blocks = math.isqrt(length) // r
    return x.reshape(n, blocks, r, blocks, r, channels)


def _fresh(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    # The custom op's output must never alias its input (a reshape of a permutation of size-1 axes,
    # r = 1, can stay a view).
    return out.clone() if out.data_ptr() == src.data_ptr() else out


def pixel_shuffle_fwd(x: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    """The index map as one permutation, so the result is written by a single copy (InternVL's
    sequence of reshapes and permutes copies twice): out tokens (i, j) (v2) or (j, i) (v1), channels
    (dr, dc, ch)."""
    n, length, channels = x.shape
    r = downscale
    order = (0, 1, 3, 2, 4, 5) if v2 else (0, 3, 1, 2, 4, 5)
    out = _blocks(x, r).permute(order).reshape(n, length // (r * r), channels * r * r)
    return _fresh(out, x)


def pixel_shuffle_bwd(grad_out: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    """The inverse permutation: grad_in[n, t, ch] = grad_out at the place token t's channel went."""
    n, out_length, out_channels = grad_out.shape
    r = downscale
    blocks = math.isqrt(out_length)
    channels = out_channels // (r * r)
    grid = grad_out.reshape(n, blocks, blocks, r, r, channels)  # [n, i, j, dr, dc, ch] (v2); [n, j, i, ...] (v1)
    order = (0, 1, 3, 2, 4, 5) if v2 else (0, 2, 3, 1, 4, 5)
    out = grid.permute(order).reshape(n, out_length * r * r, channels)
    return _fresh(out, grad_out)
