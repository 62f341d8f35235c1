"""Gated cross-attention through ``torch.nn.functional.scaled_dot_product_attention`` (peer backend "sdpa").

What a user of plain PyTorch writes (vLLM's Mllama and Meta's reference do the same): a dense
boolean mask [B, 1, Sq, Skv] built from the ranges, SDPA over the [B, H, S, D] views, the rows
with an empty range zeroed afterwards. Those rows get an all-true mask row first, so their softmax
is finite and no NaN reaches the output or any gradient. The ranges are clamped into [0, Skv] as
every backend does (the mask compares key indices with them, which is the same thing), with tensor
operations only: no Python loop, no host sync.

GQA: on CPU through ``enable_gqa=True``; on CUDA k and v are repeated per query head first, because
SDPA's flash and memory-efficient kernels do not take a mask together with ``enable_gqa`` and torch
would fall back to its math kernel (a float32 [B, Hq, Sq, Skv] score matrix).

Plain differentiable PyTorch: torch's autograd and torch.compile see it natively.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2E = math.log2(math.e)


def _clamped(kv_start: torch.Tensor, kv_end: torch.Tensor, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    start = kv_start.clamp(0, kv_len)
    return start, torch.maximum(kv_end.clamp(max=kv_len), start)


def _mask(kv_start, kv_end, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, 1, Sq, Skv] with every key allowed in empty rows, keep [B, Sq]: rows with keys)."""
    start, end = _clamped(kv_start, kv_end, kv_len)
    keep = end > start
    keys = torch.arange(kv_len, device=device, dtype=start.dtype)
    inside = (keys >= start[..., None]) & (keys < end[..., None])
    return (inside | ~keep[..., None])[:, None], keep


def _heads_first(q, k, v) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """[B, H, S, D] views, and whether SDPA should broadcast the key/value heads itself."""
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if q.device.type != "cpu":
        if group > 1:
            return qh, kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1), False
        return qh, kh, vh, False
    # a constant, not ``group > 1``: under torch.compile with dynamic shapes that would be a symbolic
    # bool, which SDPA's enable_gqa rejects (with as many key/value heads as query heads it is a no-op)
    return qh, kh, vh, True


def _ungated(q, k, v, kv_start, kv_end, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ungated output [B, Sq, Hq, D] in q's dtype, keep [B, Sq])."""
    mask, keep = _mask(kv_start, kv_end, k.shape[1], q.device)
    qh, kh, vh, gqa = _heads_first(q, k, v)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa).transpose(1, 2)
    return torch.where(keep[..., None, None], out, 0), keep


def _gated(out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return out if gate is None else out * torch.tanh(gate.reshape(())).to(out.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    gate: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """[B, Sq, Hq, D] in q's dtype (a view of SDPA's output, not necessarily contiguous);
    differentiable in q, k, v and gate."""
    return _gated(_ungated(q, k, v, kv_start, kv_end, scale)[0], gate)


def forward_with_lse(q, k, v, kv_start, kv_end, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ungated output [B, Sq, Hq, D], lse [B, Hq, Sq] float32 base 2, +inf for empty rows): the
    outputs the registered op returns. SDPA does not return its log-sum-exp, so it is computed here
    from a dense float32 score matrix: this serves only the op-level path (``torch.ops`` calls,
    opcheck); the public function never asks for it."""
    out, keep = _ungated(q, k, v, kv_start, kv_end, scale)
    mask, _ = _mask(kv_start, kv_end, k.shape[1], q.device)
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).float()
    kh = k.transpose(1, 2).float().repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1) * LOG2E  # [B, Hq, Sq]
    return out, torch.where(keep[:, None, :], lse, float("inf")).contiguous()
