"""Triton kernels for pixel shuffle (a pure permutation, so memory bound).

Each program moves a [BLOCK_T tokens x BLOCK_C channels] tile. Tokens are input tokens
(flattened over N): a tile's loads from x are BLOCK_C-long contiguous runs, and so are its stores,
because every input token's C channels land as one contiguous run of the output row (nvlm-spec §4.2).
The backward is the same walk with loads and stores swapped. Offsets are int64: at NVLM shapes
N·L·C is small, but a batch of 1,000 tiles passes 2^31 elements.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nvlm_kernels._backend import triton_interpreter_enabled

_TILE_ELEMENTS_GPU = 4096
# The interpreter's cost grows with the number of programs, not their size: use big tiles there.
_TILE_ELEMENTS_INTERPRETER = 1 << 16


@triton.jit
def _shuffled_offset(token, channel, side, r: tl.constexpr, V2: tl.constexpr, C, stride_l, stride_c):
    """Offset (within one image) in the shuffled tensor of input token ``token``, channel ``channel``."""
    row = token // side
    col = token - row * side
    block_row = row // r
    sub_row = row - block_row * r
    block_col = col // r
    sub_col = col - block_col * r
    side_out = side // r
    if V2:
        out_token = block_row * side_out + block_col
    else:
        out_token = block_col * side_out + block_row
    out_channel = (sub_row * r + sub_col) * C + channel
    return out_token.to(tl.int64) * stride_l + out_channel.to(tl.int64) * stride_c


@triton.jit
def _pixel_shuffle_fwd_kernel(
    x_ptr,
    out_ptr,
    total_tokens,
    L,
    C,
    side,
    stride_xn,
    stride_xl,
    stride_xc,
    stride_on,
    stride_ol,
    stride_oc,
    r: tl.constexpr,
    V2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    image = tokens // L
    token = tokens - image * L
    mask = (tokens < total_tokens)[:, None] & (channels < C)[None, :]
    src = (
        image.to(tl.int64)[:, None] * stride_xn
        + token.to(tl.int64)[:, None] * stride_xl
        + channels.to(tl.int64)[None, :] * stride_xc
    )
    dst = image.to(tl.int64)[:, None] * stride_on + _shuffled_offset(
        token[:, None], channels[None, :], side, r, V2, C, stride_ol, stride_oc
    )
    values = tl.load(x_ptr + src, mask=mask)
    tl.store(out_ptr + dst, values, mask=mask)


@triton.jit
def _pixel_shuffle_bwd_kernel(
    grad_out_ptr,
    grad_in_ptr,
    total_tokens,
    L,
    C,
    side,
    stride_gn,
    stride_gl,
    stride_gc,
    stride_in,
    stride_il,
    stride_ic,
    r: tl.constexpr,
    V2: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    image = tokens // L
    token = tokens - image * L
    mask = (tokens < total_tokens)[:, None] & (channels < C)[None, :]
    src = image.to(tl.int64)[:, None] * stride_gn + _shuffled_offset(
        token[:, None], channels[None, :], side, r, V2, C, stride_gl, stride_gc
    )
    dst = (
        image.to(tl.int64)[:, None] * stride_in
        + token.to(tl.int64)[:, None] * stride_il
        + channels.to(tl.int64)[None, :] * stride_ic
    )
    values = tl.load(grad_out_ptr + src, mask=mask)
    tl.store(grad_in_ptr + dst, values, mask=mask)


def _tile_shape(channels: int) -> tuple[int, int]:
    """BLOCK_C: the largest power of two up to 512 that divides C (3200 -> 128), so channel tiles
    have no masked tail; BLOCK_T fills the tile."""
    elements = _TILE_ELEMENTS_INTERPRETER if triton_interpreter_enabled() else _TILE_ELEMENTS_GPU
    cap = elements // 4 if triton_interpreter_enabled() else 512
    block_c = min(triton.next_power_of_2(max(channels, 1)), cap)
    divisor = channels & -channels if channels > 0 else 1  # largest power-of-two divisor
    if divisor >= 16:
        block_c = min(block_c, divisor)
    block_t = max(1, elements // block_c)
    return block_t, block_c


def _launch(kernel, src: torch.Tensor, dst: torch.Tensor, L: int, C: int, r: int, v2: bool) -> None:
    """``L``, ``C``: tokens and channels of the unshuffled (token-major) tensor."""
    total_tokens = src.shape[0] * L
    if total_tokens == 0 or C == 0:
        return
    block_t, block_c = _tile_shape(C)
    grid = (triton.cdiv(total_tokens, block_t), triton.cdiv(C, block_c))
    kernel[grid](
        src,
        dst,
        total_tokens,
        L,
        C,
        math.isqrt(L),
        *src.stride(),
        *dst.stride(),
        r=r,
        V2=v2,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=4,
    )


def pixel_shuffle_fwd(x: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    n, length, channels = x.shape
    r = downscale
    out = torch.empty((n, length // (r * r), channels * r * r), dtype=x.dtype, device=x.device)
    _launch(_pixel_shuffle_fwd_kernel, x, out, length, channels, r, v2)
    return out


def pixel_shuffle_bwd(grad_out: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    n, out_length, out_channels = grad_out.shape
    r = downscale
    length, channels = out_length * r * r, out_channels // (r * r)
    grad_in = torch.empty((n, length, channels), dtype=grad_out.dtype, device=grad_out.device)
    _launch(_pixel_shuffle_bwd_kernel, grad_out, grad_in, length, channels, r, v2)
    return grad_in


def aot_specs() -> list[dict]:
    """Kernels and signatures for ahead-of-time compilation (tools/triton_aot.py) at the NVLM shape
    [T, 1024 (CLS view), 3200]. The specialization mirrors what the JIT does on a GPU: unit channel
    strides become constants, and pointers and strides divisible by 16 are marked so."""
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for name, kernel in (("fwd", _pixel_shuffle_fwd_kernel), ("bwd", _pixel_shuffle_bwd_kernel)):
            args = kernel.arg_names
            unit_strides = (args[8], args[11])  # channel strides of the two tensors
            specs.append(
                {
                    "name": f"pixel_shuffle_{name}[{dtype}]",
                    "fn": kernel,
                    "signature": {a: (f"*{dtype}" if i < 2 else "i32") for i, a in enumerate(args[:12])},
                    "constexprs": {"r": 2, "V2": True, "BLOCK_T": 32, "BLOCK_C": 128, **dict.fromkeys(unit_strides, 1)},
                    "divisible_by_16": [a for a in args[:12] if a not in (*unit_strides, "total_tokens", "side")],
                    "num_warps": 4,
                    # memory bound: the loads and stores must be 16-byte vectors
                    "expect_ptx": {90: ["ld.global.v4", "st.global.v4"], 80: ["ld.global.v4", "st.global.v4"]},
                }
            )
    return specs
