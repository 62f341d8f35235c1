"""Gated cross-attention over key ranges in plain PyTorch: the oracle and the CPU path.

q [B, Sq, Hq, D]; k, v [B, Skv, Hkv, D] (query head h reads key/value head h // (Hq / Hkv));
query row (b, i) attends keys [kv_start[b, i], kv_end[b, i]) and outputs exactly 0 when that range
is empty. The result is multiplied by tanh(gate) when a gate is given. Computed in float32
(float64 stays float64) through a dense mask built from the ranges.
"""

from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def range_mask(kv_start: torch.Tensor, kv_end: torch.Tensor, kv_len: int) -> torch.Tensor:
    """bool [B, Sq, Skv]: True where key j is in row i's range."""
    j = torch.arange(kv_len, device=kv_start.device)
    return (j >= kv_start[..., None].long()) & (j < kv_end[..., None].long())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    gate: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Differentiable (plain autograd) in q, k, v and gate; returns q's dtype."""
    ct = _compute_dtype(q.dtype)
    group = q.shape[2] // k.shape[2]
    qh = q.to(ct).permute(0, 2, 1, 3)  # [B, Hq, Sq, D]
    kh, vh = (x.to(ct).repeat_interleave(group, dim=2).permute(0, 2, 1, 3) for x in (k, v))
    mask = range_mask(kv_start, kv_end, k.shape[1])[:, None]  # [B, 1, Sq, Skv]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)  # empty rows: 0, no NaN
    out = torch.matmul(p, vh).permute(0, 2, 1, 3)
    if gate is not None:
        out = out * torch.tanh(gate.to(ct))
    return out.to(q.dtype)


def attention_fwd(q, k, v, kv_start, kv_end, gate, scale, save_ungated: bool):
    """(out, lse, ungated): lse and ungated are empty placeholders (the reference backward
    recomputes)."""
    out = attention(q, k, v, kv_start, kv_end, gate, scale)
    return out, q.new_empty((0,), dtype=torch.float32), q.new_empty((0,))


def attention_bwd(grad_out, q, k, v, kv_start, kv_end, gate, out, lse, ungated, scale):
    """(dq, dk, dv, dgate) by autograd through ``attention`` in float32."""
    ct = _compute_dtype(q.dtype)
    inputs = [q.to(ct), k.to(ct), v.to(ct)] + ([gate.to(ct)] if gate is not None else [])

    def forward(*xs):
        return attention(xs[0], xs[1], xs[2], kv_start, kv_end, xs[3] if gate is not None else None, scale)

    _, vjp = torch.func.vjp(forward, *inputs)
    grads = vjp(grad_out.to(ct))
    dq, dk, dv = (g.to(x.dtype) for g, x in zip(grads[:3], (q, k, v), strict=True))
    dgate = grads[3].to(gate.dtype) if gate is not None else q.new_empty((0,))
    return dq, dk, dv, dgate
