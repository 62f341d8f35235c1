"""ViT attention in plain PyTorch: the oracle and the CPU path.

Layout [T, S, H, D] (tiles, tokens, heads, head_dim), non-causal:
``out = softmax(scale · q kᵀ) v`` per tile and head, computed in float32 (float64 stays float64),
cast back to the input dtype. ``lse`` is the log-sum-exp of each score row in base 2 (the unit the
Triton kernels keep), [T, H, S] float32.

The fused variant normalizes q and k the way InternViT's ``InternRMSNorm`` does before splitting
heads: RMS over the first ``norm_features`` features of the whole token (all heads), in float32,
cast to the input dtype, times the weight. It takes the fused projection's qkv [T, S, 3·H·D] or
three projections' q, k, v [T, S, H·D] each (``qk_norm_attention_split_*``: InternVL's
q_proj / k_proj / v_proj); the qkv form is the split form on views of qkv.
"""

from __future__ import annotations

import math

import torch

LOG2E = math.log2(math.e)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    ct = _compute_dtype(q.dtype)
    qh, kh, vh = (x.to(ct).permute(0, 2, 1, 3) for x in (q, k, v))  # [T, H, S, D]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), vh)
    return out.permute(0, 2, 1, 3).to(q.dtype).contiguous(), (lse * LOG2E).to(torch.float32).contiguous()


def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor | None,
    lse: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv by the textbook formulas (recomputing P; ``out`` and ``lse`` are not needed), in
    float32."""
    ct = _compute_dtype(q.dtype)
    qh, kh, vh, gh = (x.to(ct).permute(0, 2, 1, 3) for x in (q, k, v, grad_out))
    p = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
    dv = torch.matmul(p.transpose(-1, -2), gh)
    dp = torch.matmul(gh, vh.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kh) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qh) * scale
    return tuple(x.permute(0, 2, 1, 3).to(q.dtype).contiguous() for x in (dq, dk, dv))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, norm_features: int) -> torch.Tensor:
    """InternRMSNorm over the last dim, variance over the first ``norm_features`` features."""
    ct = _compute_dtype(x.dtype)
    xf = x.to(ct)
    variance = xf[..., :norm_features].pow(2).mean(-1, keepdim=True)
    return weight.to(x.dtype) * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t, s, width = qkv.shape
    q, k, v = qkv.split(width // 3, dim=-1)
    head_dim = width // (3 * num_heads)
    return tuple(x.reshape(t, s, num_heads, head_dim) for x in (q, k, v))


def qk_norm_attention(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
) -> torch.Tensor:
    """Differentiable (plain autograd): norm q and k over the whole token, then attention."""
    t, s, width = qkv.shape
    q, k, v = qkv.split(width // 3, dim=-1)
    q = rms_norm(q, q_norm_weight, eps, norm_features)
    k = rms_norm(k, k_norm_weight, eps, norm_features)
    head_dim = width // (3 * num_heads)
    q, k, v = (x.reshape(t, s, num_heads, head_dim) for x in (q, k, v))
    ct = _compute_dtype(qkv.dtype)
    qh, kh, vh = (x.to(ct).permute(0, 2, 1, 3) for x in (q, k, v))
    p = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(p, vh).permute(0, 2, 1, 3).to(qkv.dtype).contiguous()


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
    """The three-projection form: q, k, v [T, S, H·D] each. (out, lse, rstd_q, rstd_k): the
    reciprocal RMS of q and k per token, [T, S] float32."""
    ct = _compute_dtype(q.dtype)
    rstd = [torch.rsqrt(x[..., :norm_features].to(ct).pow(2).mean(-1) + eps).to(torch.float32) for x in (q, k)]
    t, s, width = q.shape
    head_dim = width // num_heads
    qn = rms_norm(q, q_norm_weight, eps, norm_features).reshape(t, s, num_heads, head_dim)
    kn = rms_norm(k, k_norm_weight, eps, norm_features).reshape(t, s, num_heads, head_dim)
    out, lse = attention_fwd(qn, kn, v.reshape(t, s, num_heads, head_dim), scale)
    return out, lse, rstd[0], rstd[1]


def qk_norm_attention_fwd(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, rstd_q, rstd_k): the reciprocal RMS of q and k per token, [T, S] float32."""
    q, k, v = qkv.split(qkv.shape[-1] // 3, dim=-1)
    return qk_norm_attention_split_fwd(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale)


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
    """(dq, dk, dv, dq_norm_weight, dk_norm_weight) by the formulas, in float32: the attention
    backward gives the gradients g of the normalized q and k; through x_n = x · r · w (r over the
    first ``norm_features`` features): dx = r·(g ⊙ w) − [f < n]·x·r³·Σ(g ⊙ w ⊙ x)/n,
    dw = Σ_tokens g ⊙ x · r."""
    ct = _compute_dtype(q.dtype)
    t, s, features = q.shape
    head_dim = features // num_heads
    qf, kf, vf = (x.to(ct) for x in (q, k, v))
    weights = (q_norm_weight.to(ct), k_norm_weight.to(ct))
    rstd = [torch.rsqrt(x[..., :norm_features].pow(2).mean(-1, keepdim=True) + eps) for x in (qf, kf)]
    normed = [x * r * w for x, r, w in zip((qf, kf), rstd, weights, strict=True)]
    q_n, k_n, v_h = (x.reshape(t, s, num_heads, head_dim) for x in (*normed, vf))
    dq_n, dk_n, dv = attention_bwd(grad_out.to(ct), q_n, k_n, v_h, None, None, scale)
    in_norm = (torch.arange(features, device=q.device) < norm_features).to(ct)
    grads, weight_grads = [], []
    for x, r, w, g in zip((qf, kf), rstd, weights, (dq_n, dk_n), strict=True):
        g = g.reshape(t, s, features)
        gw = g * w
        grads.append(r * gw - in_norm * x * r.pow(3) * (gw * x).sum(-1, keepdim=True) / norm_features)
        weight_grads.append((g * x * r).sum((0, 1)))
    return (
        grads[0].to(q.dtype),
        grads[1].to(k.dtype),
        dv.reshape(t, s, features).to(v.dtype),
        weight_grads[0].to(q_norm_weight.dtype),
        weight_grads[1].to(k_norm_weight.dtype),
    )


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
    """(dqkv, dq_norm_weight, dk_norm_weight): the three-projection form's gradients, side by side."""
    q, k, v = qkv.split(qkv.shape[-1] // 3, dim=-1)
    args = (q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, num_heads, eps, norm_features, scale)
    dq, dk, dv, dwq, dwk = qk_norm_attention_split_bwd(grad_out, q, k, v, *args)
    return torch.cat([dq, dk, dv], dim=-1), dwq, dwk
