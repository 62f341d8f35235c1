"""The ``sdpa`` peer backend: ViT attention as ``torch.nn.functional.scaled_dot_product_attention``.

``attention(q, k, v, scale)``: q, k, v [T, S, H, D] are viewed as [T, H, S, D] (transposes, no
copies) and handed to SDPA, which picks cuDNN / FlashAttention / memory-efficient attention on a GPU
and its fused flash kernel on a CPU; the output comes back as [T, S, H, D], contiguous (SDPA's
kernels write it in that layout, so this is a view; ``contiguous()`` copies only otherwise).

``qk_norm_attention(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale)`` (and
``qk_norm_attention_split(q, k, v, ...)``, q, k, v [T, S, H·D] from three projections):
InternViT-6B's attention core as two steps, the way its own code runs it: a full-width RMSNorm of q
and of k (InternRMSNorm exactly: the variance in float32 over the first ``norm_features`` features of
the whole token, the normalized value cast to the input dtype, then times the weight), which writes
normalized q and k, then SDPA. float64 inputs stay float64 throughout.

Both are plain differentiable PyTorch: the public functions call them directly, so autograd and
torch.compile see SDPA itself (this backend *is* the peer, behind our checks and semantics).

The registered ops (``attention_fwd`` / ``attention_bwd`` / ``qk_norm_attention_fwd`` /
``qk_norm_attention_bwd`` and their ``_split`` twins, the interface every backend module of this op
has) accept this backend too, so ``torch.library.opcheck`` can test it: their forward also returns
the base-2 log-sum-exp (and the reciprocal RMS of q and k) that the op's schema promises, computed
with an extra q kᵀ; their backward recomputes the forward with autograd and takes
``torch.autograd.grad`` (the caller enables autograd inside the op). The public functions never take
that path for this backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2E = math.log2(math.e)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · q kᵀ) v per tile and head: [T, S, H, D] in, [T, S, H, D] (contiguous) out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2).contiguous()


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, norm_features: int) -> torch.Tensor:
    """InternRMSNorm over the last dim of x [..., F]: the variance over the first ``norm_features``
    features (NVLM's padded checkpoint: its 3200 real of 4096), in float32, applied to all F."""
    xf = x.to(_norm_dtype(x.dtype))
    variance = xf[..., :norm_features].pow(2).mean(-1, keepdim=True)
    return weight.to(x.dtype) * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def _normed(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features):
    """Normalized q and k ([T, S, H, D], fresh) and v (a [T, S, H, D] view) from q, k, v [T, S, H·D]."""
    head_dim = q.shape[-1] // num_heads
    q = rms_norm(q, q_norm_weight, eps, norm_features)
    k = rms_norm(k, k_norm_weight, eps, norm_features)
    return tuple(x.unflatten(-1, (num_heads, head_dim)) for x in (q, k, v))


def _split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv.split(qkv.shape[-1] // 3, dim=-1)


def qk_norm_attention_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
) -> torch.Tensor:
    """q, k, v [T, S, H·D] (three projections' outputs) -> [T, S, H, D]: RMSNorm of q and of k over
    the whole token, then SDPA."""
    return attention(*_normed(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features), scale)


def qk_norm_attention(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
) -> torch.Tensor:
    """qkv [T, S, 3·H·D] -> [T, S, H, D]: RMSNorm of q and of k over the whole token, then SDPA."""
    return qk_norm_attention_split(*_split(qkv), q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale)


# --------------------------------------------------------------------------------------------------
# the registered ops' interface (opcheck and direct torch.ops calls; the public functions use the above)


def _lse(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Base-2 log-sum-exp of each score row, [T, H, S] float32 (the unit our kernels save)."""
    ct = _norm_dtype(q.dtype)
    scores = torch.matmul(q.to(ct).transpose(1, 2), k.to(ct).permute(0, 2, 3, 1)) * scale
    return (torch.logsumexp(scores, dim=-1) * LOG2E).to(torch.float32).contiguous()


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return attention(q, k, v, scale), _lse(q, k, scale)


def _grads(outputs: torch.Tensor, inputs: tuple[torch.Tensor, ...], grad_out: torch.Tensor) -> tuple:
    return torch.autograd.grad(outputs, inputs, grad_out.to(outputs.dtype))


def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv by recomputing SDPA's forward under autograd (``out`` and ``lse`` are not used)."""
    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v))
    with torch.enable_grad():
        return _grads(attention(*leaves, scale), leaves, grad_out)


def _rstd(x: torch.Tensor, eps: float, norm_features: int) -> torch.Tensor:
    xf = x[..., :norm_features].to(_norm_dtype(x.dtype))
    return torch.rsqrt(xf.pow(2).mean(-1) + eps).to(torch.float32)


def qk_norm_attention_split_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, rstd_q, rstd_k): rstd the reciprocal RMS of q and k per token, [T, S] float32."""
    qn, kn, vh = _normed(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    rstd_q, rstd_k = _rstd(q, eps, norm_features), _rstd(k, eps, norm_features)
    return attention(qn, kn, vh, scale), _lse(qn, kn, scale), rstd_q, rstd_k


def qk_norm_attention_fwd(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, rstd_q, rstd_k): rstd the reciprocal RMS of q and k per token, [T, S] float32."""
    return qk_norm_attention_split_fwd(*_split(qkv), q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale)


def qk_norm_attention_split_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dq_norm_weight, dk_norm_weight) by recomputing the forward under autograd."""
    leaves = tuple(x.detach().requires_grad_() for x in (q, k, v, q_norm_weight, k_norm_weight))
    with torch.enable_grad():
        out = qk_norm_attention_split(*leaves, num_heads, eps, norm_features, scale)
        return _grads(out, leaves, grad_out)


def qk_norm_attention_bwd(
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
    """(dqkv, dq_norm_weight, dk_norm_weight) by recomputing the forward under autograd."""
    leaves = tuple(x.detach().requires_grad_() for x in (qkv, q_norm_weight, k_norm_weight))
    with torch.enable_grad():
        out = qk_norm_attention(*leaves, num_heads, eps, norm_features, scale)
        return _grads(out, leaves, grad_out)
