"""Tile-batched, non-causal ViT attention (InternViT), and the same with InternViT-6B's
full-width QK-RMSNorm fused in.

``vit_attention(q, k, v, *, softmax_scale=None)``: q, k, v [T, S, H, D] (tiles, tokens, heads,
head dim; the layout a fused QKV projection gives, read through strides, no transposes), any S and
H; returns softmax(scale · q kᵀ) v as [T, S, H, D], scale = D^-0.5 by default.

``vit_qk_norm_attention(qkv, q_norm_weight, k_norm_weight, *, num_heads, eps=1e-6,
norm_features=None, softmax_scale=None)``: qkv [T, S, 3·H·D]; q and k are each normalized by one
RMS over the first ``norm_features`` (default all H·D) features of the token — NVLM's checkpoint
pads 7 zero heads to 32 and normalizes over the 3200 real features — times their weights, and
then attend. The Triton backend writes no normalized copy of q and k.

Backends: ``triton`` (fp16, bf16; D in 64, 80, 96, 128) and ``reference`` (any float dtype and
D). ``auto`` takes Triton on CUDA tensors when it supports the call and the reference otherwise;
an explicit ``triton`` request it cannot serve raises ``BackendUnavailableError`` saying why.
Both ops are differentiable (q, k, v; qkv and both norm weights).
"""

from __future__ import annotations

import math

import torch

from nvlm_kernels import _backend, _nvtx
from nvlm_kernels._checks import softmax_scale_from

OP = "vit_attention"
OP_FUSED = "vit_qk_norm_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 80, 96, 128)

_backend.register_op(OP, has_triton=True, cuda_op=None)
_backend.register_op(OP_FUSED, has_triton=True, cuda_op=None)


# --------------------------------------------------------------------------------------------------
# validation


def _check_floating(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_floating(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [T, S, H, D] (4 dims), got {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        shapes = ", ".join(str(tuple(t.shape)) for t in (q, k, v))
        raise ValueError(f"q, k and v must have the same shape [T, S, H, D], got {shapes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    _, s, h, d = q.shape
    if s < 1 or h < 1 or d < 1:
        raise ValueError(f"q: S, H and D must be at least 1, got shape {tuple(q.shape)}")


def _kernel_reason(x: torch.Tensor, head_dim: int) -> str | None:
    """Why the Triton kernels cannot take this call (None when they can)."""
    if x.dtype not in KERNEL_DTYPES:
        return f"its kernels take float16 or bfloat16, not {x.dtype} (the reference takes any float dtype)"
    if head_dim not in KERNEL_HEAD_DIMS:
        return f"its kernels take head_dim in {KERNEL_HEAD_DIMS}, not {head_dim} (the reference takes any)"
    return None


def _check_fused(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int | None,
) -> tuple[int, int]:
    """Returns (head_dim, norm_features)."""
    _check_floating(qkv, "qkv")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must have shape [T, S, 3*H*D] (3 dims), got {tuple(qkv.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    width = qkv.shape[2]
    if width % (3 * num_heads) or width == 0:
        raise ValueError(f"qkv.shape[2] = {width} is not 3 * num_heads ({num_heads}) * head_dim")
    if qkv.shape[1] < 1:
        raise ValueError(f"qkv: S must be at least 1, got shape {tuple(qkv.shape)}")
    features = width // 3
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        _check_floating(w, name)
        if w.shape != (features,):
            raise ValueError(f"{name} must have shape [H*D] = [{features}], got {tuple(w.shape)}")
        if w.device != qkv.device:
            raise ValueError(f"{name} is on {w.device}, qkv on {qkv.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if norm_features is None:
        norm_features = features
    if isinstance(norm_features, bool) or not isinstance(norm_features, int) or not (1 <= norm_features <= features):
        raise ValueError(f"norm_features must be an int in [1, H*D = {features}], got {norm_features!r}")
    return features // num_heads, norm_features


# --------------------------------------------------------------------------------------------------
# vit_attention: registered ops


def _impl(op: str, x: torch.Tensor, head_dim: int):
    backend = _backend.resolve_supported(op, x.device, {"triton": _kernel_reason(x, head_dim)})
    return _backend.implementation(__name__, "triton" if backend == "triton" else "reference")


def _attention_fwd(q, k, v, scale):
    impl = _impl(OP, q, q.shape[-1])
    with _nvtx.range(f"nvlm.kernels.{OP}.fwd"):
        return impl.attention_fwd(q, k, v, scale)


@torch.library.custom_op("nvlm_kernels::vit_attention", mutates_args=())
def vit_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_qkv(q, k, v)
    return _attention_fwd(q, k, v, scale)


@vit_attention_op.register_fake
def _(q, k, v, scale):
    _check_qkv(q, k, v)
    t, s, h, d = q.shape
    return q.new_empty((t, s, h, d)), q.new_empty((t, h, s), dtype=torch.float32)


@torch.library.custom_op("nvlm_kernels::vit_attention_bwd", mutates_args=())
def vit_attention_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_qkv(q, k, v)
    if grad_out.shape != q.shape:
        raise ValueError(f"grad_out must have the shape of the output {tuple(q.shape)}, got {tuple(grad_out.shape)}")
    impl = _impl(OP, q, q.shape[-1])
    with _nvtx.range(f"nvlm.kernels.{OP}.bwd"):
        return impl.attention_bwd(grad_out.to(q.dtype), q, k, v, out, lse, scale)


@vit_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)
    _backend.remember_backend(ctx, OP)


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    with _backend.backward_backend(ctx, OP):
        dq, dk, dv = vit_attention_bwd_op(grad_out.contiguous(), q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


vit_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def vit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None
) -> torch.Tensor:
    """Non-causal attention over every tile: q, k, v [T, S, H, D] -> [T, S, H, D] (contiguous)."""
    _check_qkv(q, k, v)
    scale = softmax_scale_from(softmax_scale, q.shape[-1])
    if _backend.eager_fast_path(q, k, v):
        return _attention_fwd(q, k, v, scale)[0]
    return vit_attention_op(q, k, v, scale)[0]


# --------------------------------------------------------------------------------------------------
# vit_qk_norm_attention: registered ops


def _fused_fwd(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale):
    impl = _impl(OP_FUSED, qkv, qkv.shape[-1] // (3 * num_heads))
    with _nvtx.range(f"nvlm.kernels.{OP_FUSED}.fwd"):
        return impl.qk_norm_attention_fwd(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale)


@torch.library.custom_op("nvlm_kernels::vit_qk_norm_attention", mutates_args=())
def vit_qk_norm_attention_op(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_fused(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    return _fused_fwd(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale)


@vit_qk_norm_attention_op.register_fake
def _(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale):
    head_dim, _ = _check_fused(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    t, s, _ = qkv.shape
    out = qkv.new_empty((t, s, num_heads, head_dim))
    lse = qkv.new_empty((t, num_heads, s), dtype=torch.float32)
    return out, lse, qkv.new_empty((t, s), dtype=torch.float32), qkv.new_empty((t, s), dtype=torch.float32)


@torch.library.custom_op("nvlm_kernels::vit_qk_norm_attention_bwd", mutates_args=())
def vit_qk_norm_attention_bwd_op(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    rstd_q: torch.Tensor,
    rstd_k: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_fused(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    impl = _impl(OP_FUSED, qkv, qkv.shape[-1] // (3 * num_heads))
    with _nvtx.range(f"nvlm.kernels.{OP_FUSED}.bwd"):
        return impl.qk_norm_attention_bwd(
            grad_out.to(qkv.dtype), qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k,
            num_heads, eps, norm_features, scale,
        )  # fmt: skip


@vit_qk_norm_attention_bwd_op.register_fake
def _(grad_out, qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, num_heads, eps, norm_features, scale):
    return torch.empty_like(qkv), torch.empty_like(q_norm_weight), torch.empty_like(k_norm_weight)


def _fused_setup(ctx, inputs, output) -> None:
    qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale = inputs
    out, lse, rstd_q, rstd_k = output
    ctx.save_for_backward(qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k)
    ctx.args = (num_heads, eps, norm_features, scale)
    ctx.mark_non_differentiable(lse, rstd_q, rstd_k)
    _backend.remember_backend(ctx, OP_FUSED)


def _fused_backward(ctx, grad_out, _grad_lse, _grad_rstd_q, _grad_rstd_k):
    qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k = ctx.saved_tensors
    with _backend.backward_backend(ctx, OP_FUSED):
        dqkv, dwq, dwk = vit_qk_norm_attention_bwd_op(
            grad_out.contiguous(), qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, *ctx.args
        )
    return dqkv, dwq, dwk, None, None, None, None


vit_qk_norm_attention_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def vit_qk_norm_attention(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    *,
    num_heads: int,
    eps: float = 1e-6,
    norm_features: int | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """InternViT-6B's attention core: RMSNorm of q and of k over the whole token, then attention.

    qkv [T, S, 3·H·D] (q, k, v blocks of H heads each, as the fused projection writes them);
    weights [H·D]; returns [T, S, H, D]."""
    head_dim, norm_features = _check_fused(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    scale = softmax_scale_from(softmax_scale, head_dim)
    eps = float(eps)
    if _backend.eager_fast_path(qkv, q_norm_weight, k_norm_weight):
        return _fused_fwd(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale)[0]
    return vit_qk_norm_attention_op(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale)[0]
