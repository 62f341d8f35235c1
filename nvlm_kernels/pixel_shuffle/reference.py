"""Pixel shuffle in plain PyTorch: InternVL's reshape sequence (nvlm-spec §4.1).

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


def pixel_shuffle_fwd(x: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    n, length, channels = x.shape
    side = math.isqrt(length)
    r = downscale
    grid = x.reshape(n, side, side, channels)
    grid = grid.reshape(n, side, side // r, channels * r)
    grid = grid.permute(0, 2, 1, 3).reshape(n, side // r, side // r, channels * r * r)
    if v2:
        grid = grid.permute(0, 2, 1, 3)
    # A fresh tensor: the custom op's output must never alias its input.
    return grid.reshape(n, length // (r * r), channels * r * r).clone(memory_format=torch.contiguous_format)


def pixel_shuffle_bwd(grad_out: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    """The inverse permutation: grad_in[n, t, ch] = grad_out at the place token t's channel went."""
    n, out_length, out_channels = grad_out.shape
    r = downscale
    side_out = math.isqrt(out_length)
    channels = out_channels // (r * r)
    grid = grad_out.reshape(n, side_out, side_out, out_channels)
    if v2:
        grid = grid.permute(0, 2, 1, 3)
    # grid is [n, side/r (column blocks), side/r (row blocks), r²C]; undo the row merge and the swap
    grid = grid.reshape(n, side_out, side_out * r, channels * r).permute(0, 2, 1, 3)
    return grid.reshape(n, out_length * r * r, channels).clone(memory_format=torch.contiguous_format)
