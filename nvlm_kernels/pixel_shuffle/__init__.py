"""Pixel shuffle (space-to-depth) of ViT tokens, as InternVL / NVLM do before the projector.

``pixel_shuffle(x, scale_factor=0.5, version="v2")``: x [N, L, C] with L = side² (a square token
grid, CLS already dropped) and side divisible by r = 1/scale_factor; returns [N, L/r², r²·C].
For NVLM: [T, 1024, 3200] -> [T, 256, 12800]. ``version="v2"`` (NVLM, InternVL ≥ 1.5) keeps the
output tokens row-major; ``"v1"`` is the transposed order of old InternVL checkpoints. The index map
is in ``reference.py`` and nvlm-spec §4.2.

A strided view such as ``vit_out[:, 1:]`` is read in place: no copy of the CLS-less slice is made.

Registered once as ``torch.ops.nvlm_kernels.pixel_shuffle`` (+ ``pixel_shuffle_bwd``) with a fake
kernel and autograd, so it works under ``torch.compile(fullgraph=True)`` and ``opcheck``.
"""

from __future__ import annotations

import math

import torch

from nvlm_kernels import _backend, _nvtx

OP = "pixel_shuffle"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
VERSIONS = ("v1", "v2")

_backend.register_op(OP, has_triton=True, cuda_op="nvlm_C::pixel_shuffle_fwd")


def _downscale_from(scale_factor: float) -> int:
    if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)):
        raise TypeError(f"scale_factor must be a float such as 0.5, got {type(scale_factor).__name__}")
    if not (0.0 < scale_factor < 1.0):
        raise ValueError(f"scale_factor must be 1/r for an integer r >= 2 (0.5 in NVLM), got {scale_factor}")
    r = round(1.0 / scale_factor)
    if r < 2 or abs(r * scale_factor - 1.0) > 1e-6:
        raise ValueError(f"scale_factor must be 1/r for an integer r >= 2 (0.5 in NVLM), got {scale_factor}")
    return r


def _check_input(x: torch.Tensor, downscale: int, name: str = "x") -> int:
    """Validates x [N, L, C] for downscale r; returns side = sqrt(L)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape [N, L, C] (3 dims), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got {x.dtype}"
        )
    if isinstance(downscale, bool) or not isinstance(downscale, int) or downscale < 2:
        raise ValueError(f"downscale must be an integer >= 2, got {downscale!r}")
    length = x.shape[1]
    side = math.isqrt(length)
    if side * side != length:
        hint = " (is the CLS token still there? pass x[:, 1:])" if math.isqrt(length - 1) ** 2 == length - 1 else ""
        raise ValueError(f"{name}.shape[1] must be a square number of tokens L = side*side, got L={length}{hint}")
    if side % downscale:
        raise ValueError(
            f"{name}: the token grid side ({side}, from L={length}) must be divisible by 1/scale_factor = {downscale}"
        )
    return side


def _check_grad(grad_out: torch.Tensor, downscale: int) -> None:
    if not isinstance(grad_out, torch.Tensor) or grad_out.dim() != 3:
        raise ValueError("grad_out must be a tensor of shape [N, L/r², r²·C]")
    r2 = downscale * downscale
    side_out = math.isqrt(grad_out.shape[1])
    if grad_out.shape[2] % r2 or side_out * side_out != grad_out.shape[1]:
        raise ValueError(
            f"grad_out must have shape [N, (side/r)², r²·C] for r = {downscale}, got {tuple(grad_out.shape)}"
        )


def _run_fwd(x: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    impl = _backend.implementation(__name__, _backend.resolve(OP, x.device))
    with _nvtx.range(f"nvlm.kernels.{OP}.fwd"):
        return impl.pixel_shuffle_fwd(x, downscale, v2)


def _run_bwd(grad_out: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    impl = _backend.implementation(__name__, _backend.resolve(OP, grad_out.device))
    with _nvtx.range(f"nvlm.kernels.{OP}.bwd"):
        return impl.pixel_shuffle_bwd(grad_out, downscale, v2)


@torch.library.custom_op("nvlm_kernels::pixel_shuffle", mutates_args=())
def pixel_shuffle_op(x: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    _check_input(x, downscale)
    return _run_fwd(x, downscale, v2)


@pixel_shuffle_op.register_fake
def _pixel_shuffle_fake(x: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    _check_input(x, downscale)
    n, length, channels = x.shape
    return x.new_empty((n, length // (downscale * downscale), channels * downscale * downscale))


@torch.library.custom_op("nvlm_kernels::pixel_shuffle_bwd", mutates_args=())
def pixel_shuffle_bwd_op(grad_out: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    _check_grad(grad_out, downscale)
    return _run_bwd(grad_out, downscale, v2)


@pixel_shuffle_bwd_op.register_fake
def _pixel_shuffle_bwd_fake(grad_out: torch.Tensor, downscale: int, v2: bool) -> torch.Tensor:
    _check_grad(grad_out, downscale)
    n, out_length, out_channels = grad_out.shape
    r2 = downscale * downscale
    return grad_out.new_empty((n, out_length * r2, out_channels // r2))


def _setup_context(ctx, inputs, output) -> None:
    _, ctx.downscale, ctx.v2 = inputs
    _backend.remember_backend(ctx, OP)


def _pixel_shuffle_backward(ctx, grad_out: torch.Tensor):
    with _backend.backward_backend(ctx, OP):
        return pixel_shuffle_bwd_op(grad_out, ctx.downscale, ctx.v2), None, None


def _pixel_shuffle_bwd_backward(ctx, grad_grad_in: torch.Tensor):
    # The backward is a permutation too: its own gradient is the forward (double backward works).
    with _backend.backward_backend(ctx, OP):
        return pixel_shuffle_op(grad_grad_in, ctx.downscale, ctx.v2), None, None


pixel_shuffle_op.register_autograd(_pixel_shuffle_backward, setup_context=_setup_context)
pixel_shuffle_bwd_op.register_autograd(_pixel_shuffle_bwd_backward, setup_context=_setup_context)


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, version: str = "v2") -> torch.Tensor:
    """Space-to-depth of a square token grid: [N, side², C] -> [N, (side·s)², C/s²].

    Args:
        x: [N, L, C] tokens, L = side² (drop CLS first: ``vit_out[:, 1:]`` is read without a copy).
            float32, float16, bfloat16 or float64; any strides.
        scale_factor: 1/r for an integer r >= 2; NVLM uses 0.5 (2x2 blocks).
        version: "v2" (NVLM; row-major output tokens) or "v1" (old InternVL; transposed).

    Returns:
        A new contiguous tensor [N, L·s², C/s²]; each output token holds its r×r block's source
        tokens' channels in row-major block order (top-left, top-right, bottom-left, bottom-right).
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    downscale = _downscale_from(scale_factor)
    _check_input(x, downscale)
    if _backend.eager_fast_path(x):  # same backends, without the registered op's per-call cost
        return _run_fwd(x, downscale, version == "v2")
    return pixel_shuffle_op(x, downscale, version == "v2")
