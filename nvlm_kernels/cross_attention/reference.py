"""Gated cross-attention over key ranges in plain PyTorch: the oracle and the CPU path.

q [B, Sq, Hq, D]; k, v [B, Skv, Hkv, D] (query head h reads key/value head h // (Hq / Hkv));
query row (b, i) attends keys [kv_start[b, i], kv_end[b, i]) and outputs exactly 0 when that range
is empty. The result is multiplied by tanh(gate) when a gate is given. Computed in float32
(float64 stays float64) through a dense mask built from the ranges.
"""

from __future__ import annotations

import math

import torch

LOG2E = math.log2(math.e)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def range_mask(kv_start: torch.Tensor, kv_end: torch.Tensor, kv_len: int) -> torch.Tensor:
    """bool [B, Sq, Skv]: True where key j is in row i's range."""
    j = torch.arange(kv_len, device=kv_start.device)
    return (j >= kv_start[..., None].long()) & (j < kv_end[..., None].long())


def _attention(q, k, v, kv_start, kv_end, scale):
    """(ungated output [B, Sq, Hq, D] in the compute dtype, base-2 lse [B, Hq, Sq], +inf when empty)."""
    ct = _compute_dtype(q.dtype)
    group = q.shape[2] // k.shape[2]
    qh = q.to(ct).permute(0, 2, 1, 3)  # [B, Hq, Sq, D]
    kh, vh = (x.to(ct).repeat_interleave(group, dim=2).permute(0, 2, 1, 3) for x in (k, v))
    mask = range_mask(kv_start, kv_end, k.shape[1])[:, None]  # [B, 1, Sq, Skv]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    safe = scores.masked_fill(empty, 0.0)
    p = torch.softmax(safe, dim=-1).masked_fill(empty, 0.0)  # empty rows: exactly 0, no NaN
    lse = torch.logsumexp(safe, dim=-1).masked_fill(empty[..., 0], float("inf")) * LOG2E
    return torch.matmul(p, vh).permute(0, 2, 1, 3), lse


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    gate: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Differentiable (plain autograd) in q, k, v and gate; returns q's dtype, contiguous."""
    out, _ = _attention(q, k, v, kv_start, kv_end, scale)
    if gate is not None:
        out = out * torch.tanh(gate.to(out.dtype))
    return out.to(q.dtype).contiguous()


def attention_fwd(q, k, v, kv_start, kv_end, gate, scale, save_ungated: bool):
    """(out, lse [B, Hq, Sq] float32, ungated output when a gate is given and save_ungated, else an
    empty placeholder) — the same outputs as the Triton forward."""
    ungated, lse = _attention(q, k, v, kv_start, kv_end, scale)
    out = ungated * torch.tanh(gate.to(ungated.dtype)) if gate is not None else ungated
    keep = ungated.to(q.dtype).contiguous() if (gate is not None and save_ungated) else q.new_empty((0,))
    return out.to(q.dtype).contiguous(), lse.to(torch.float32).contiguous(), keep


def attention_bwd(grad_out, q, k, v, kv_start, kv_end, gate, out, lse, ungated, scale):
    """(dq, dk, dv, dgate) by the textbook formulas, recomputing P, in float32:
    dO_u = t·dOut (t = tanh(gate), 1 without a gate), dV = Pᵀ dO_u, dS = P ⊙ (dO_u Vᵀ − rowsum),
    dQ = scale·dS K, dK = scale·dSᵀ Q (key/value gradients summed over each GQA group),
    dgate = (1 − t²)·Σ dOut ⊙ O_u."""
    ct = _compute_dtype(q.dtype)
    b, sq, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    qh = q.to(ct).permute(0, 2, 1, 3)
    kh, vh = (x.to(ct).repeat_interleave(group, dim=2).permute(0, 2, 1, 3) for x in (k, v))
    mask = range_mask(kv_start, kv_end, k.shape[1])[:, None]
    scores = (torch.matmul(qh, kh.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    g = grad_out.to(ct).permute(0, 2, 1, 3)
    t = torch.tanh(gate.to(ct)) if gate is not None else None
    g_u = g * t if t is not None else g
    dv = torch.matmul(p.transpose(-1, -2), g_u)
    dp = torch.matmul(g_u, vh.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = torch.matmul(ds, kh) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qh) * scale

    def per_kv_head(x):  # [B, Hq, Skv, D] -> [B, Skv, Hkv, D], summing each group
        return x.reshape(b, hkv, group, *x.shape[2:]).sum(2).permute(0, 2, 1, 3)

    dq = dq.permute(0, 2, 1, 3).to(q.dtype).contiguous()
    dk, dv = (per_kv_head(x).to(q.dtype).contiguous() for x in (dk, dv))
    if gate is None:
        return dq, dk, dv, q.new_empty((0,))
    o_u = torch.matmul(p, vh)
    dgate = (1 - t * t) * (g * o_u).sum()
    return dq, dk, dv, dgate.to(gate.dtype)
