"""Gated cross-attention through FlexAttention with a block mask (peer backend "flex").

The BlockMask is the one ``create_block_mask`` makes from a mask_mod that reads the ranges
(``kv_start[b, i] <= key < kv_end[b, i]``, i.e. the ranges clamped into [0, Skv] as every backend
does; a test checks that the two are equal): FlexAttention skips the key blocks no row of a query
block sees, computes the blocks every row sees whole without a mask, and applies the mask_mod only
in the others. Since each row's keys are one interval, ``block_mask`` makes the block tables straight
from the ranges, with O(B·Sq + blocks) tensor operations, instead of evaluating the mask_mod at all
B·Sq·Skv points through vmap as ``create_block_mask`` does (which also cannot run under dispatch
modes). In eager mode the last BlockMask is kept and reused while the same range tensors come back
unmodified (same objects, same version counters) at the same shapes: the cross-attention layers of
one forward, or the steps of one decode, share it. Tensors made under ``torch.inference_mode`` have
no version counter: an in-place edit of such a range tensor between two calls goes unnoticed (pass a
new tensor, or call ``clear_cache()``).

GQA through ``enable_gqa``; the tanh gate and the zeroing of empty rows (FlexAttention already gives
them 0; the ``where`` keeps that exact, with zero gradients) run after it, fused into one kernel on
CUDA. On CUDA, FlexAttention runs compiled (``torch.compile`` of this module's attention step, made
on first use; eager FlexAttention materializes the whole score matrix). On CPU it runs eagerly,
forward only: torch 2.13's FlexAttention has no CPU backward, so a CPU call that records gradients
raises ``BackendUnavailableError`` (``auto`` never picks flex on CPU).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from nvlm_kernels._backend import BackendUnavailableError

try:  # torch >= 2.8: the log-sum-exp is asked for with an AuxRequest
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

LOG2E = math.log2(math.e)
CPU_BACKWARD_REASON = (
    "this torch's FlexAttention has no backward on CPU tensors (its forward runs eagerly there): "
    "use another backend for gradients on CPU"
)


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


_last: tuple | None = None  # (kv_start, version, kv_end, version, shape key, BlockMask)


_BLOCK = 128  # FlexAttention's default sparse block (query and key)


def _rows_per_block(lo: torch.Tensor, hi: torch.Tensor, q_blocks: int, kv_blocks: int) -> torch.Tensor:
    """int32 [B, q_blocks, kv_blocks]: how many rows of each query block have key block j in their
    block interval [lo, hi) (rows past Sq, and rows with hi <= lo, count nowhere). A difference
    array per query block: +1 at lo, -1 at hi, then a running sum."""
    b, sq = lo.shape
    pad = q_blocks * _BLOCK - sq
    valid = F.pad(hi > lo, (0, pad)).view(b, q_blocks, _BLOCK)
    lo, hi = (F.pad(x, (0, pad)).view(b, q_blocks, _BLOCK) for x in (lo, hi))
    ones = valid.to(torch.int32)
    delta = torch.zeros((b, q_blocks, kv_blocks + 1), dtype=torch.int32, device=lo.device)
    delta.scatter_add_(2, torch.where(valid, lo, 0), ones)
    delta.scatter_add_(2, torch.where(valid, hi, 0), -ones)
    return delta.cumsum(2, dtype=torch.int32)[..., :kv_blocks]


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks per row, their indices first), as create_block_mask orders them."""
    dense = dense.to(torch.int32)[:, None]  # one head: [B, 1, q_blocks, kv_blocks]
    order = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1, dtype=torch.int32), order.to(torch.int32)


def block_mask(kv_start: torch.Tensor, kv_end: torch.Tensor, q_len: int, kv_len: int) -> BlockMask:
    """The BlockMask of the ranges [B, Sq] over kv_len keys: the one ``create_block_mask`` builds from
    the mask_mod ``kv_start[b, i] <= key < kv_end[b, i]`` (a test checks that they are equal), built
    from the ranges directly: O(B·Sq + blocks) tensor operations instead of evaluating the mask_mod at
    all B·Sq·Skv points through vmap (which also cannot run under dispatch modes: opcheck, sync
    counters). The last one is reused in eager mode (module docstring)."""
    global _last
    compiling = torch.compiler.is_compiling()
    key = (tuple(kv_start.shape), q_len, kv_len, kv_start.device)
    if not compiling and _last is not None:
        start, start_version, end, end_version, last_key, mask = _last
        if start is kv_start and end is kv_end and last_key == key:
            if start_version == _version(kv_start) and end_version == _version(kv_end):
                return mask

    index = torch.ops.aten.index

    def mask_mod(b, h, q_idx, kv_idx):  # for the partial blocks
        # aten.index, not kv_start[b, q_idx]: FlexAttention turns tensor subscripts into a higher-order
        # op that dispatch modes cannot run; eager, vmap and Inductor's lowering treat both alike
        return (kv_idx >= index(kv_start, [b, q_idx])) & (kv_idx < index(kv_end, [b, q_idx]))

    start = kv_start.clamp(0, kv_len).long()
    end = torch.maximum(kv_end.clamp(max=kv_len).long(), start)
    q_blocks, kv_blocks = -(-q_len // _BLOCK), -(-kv_len // _BLOCK)
    touched = _rows_per_block(start // _BLOCK, -(-end // _BLOCK), q_blocks, kv_blocks) > 0
    # a block is full when all _BLOCK rows of its query block (so none past Sq) see all its keys
    full = _rows_per_block(-(-start // _BLOCK), end // _BLOCK, q_blocks, kv_blocks) == _BLOCK
    partial = touched & ~full
    mask = BlockMask.from_kv_blocks(
        *_ordered(partial), *_ordered(full), BLOCK_SIZE=(_BLOCK, _BLOCK), mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len), compute_q_blocks=False,
    )  # fmt: skip
    # the backward's transposed tables, from the dense tables at hand (from_kv_blocks would rebuild
    # them from the ordered ones through vmap)
    mask.q_num_blocks, mask.q_indices = _ordered(partial.transpose(1, 2))
    mask.full_q_num_blocks, mask.full_q_indices = _ordered(full.transpose(1, 2))
    if not compiling:
        _last = (kv_start, _version(kv_start), kv_end, _version(kv_end), key, mask)
    return mask


def clear_cache() -> None:
    """Forget the kept BlockMask (and with it the range tensors it holds)."""
    global _last
    _last = None


def _attend(q, k, v, mask, keep, scale: float, gqa: bool, with_lse: bool):
    """FlexAttention on the [B, H, S, D] views; the output back as [B, Sq, Hq, D], empty rows 0."""
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if with_lse:
        if AuxRequest is not None:
            out, aux = flex_attention(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=gqa,
                                      return_aux=AuxRequest(lse=True))  # fmt: skip
            lse = aux.lse
        else:  # pragma: no cover - older torch
            out, lse = flex_attention(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=gqa, return_lse=True)
    else:
        out, lse = flex_attention(qh, kh, vh, block_mask=mask, scale=scale, enable_gqa=gqa), None
    return torch.where(keep[..., None, None], out.transpose(1, 2), 0), lse


def _attend_gated(q, k, v, mask, keep, tanh_gate, scale: float, gqa: bool):
    out, _ = _attend(q, k, v, mask, keep, scale, gqa, False)
    return out if tanh_gate is None else out * tanh_gate


_compiled: dict = {}


def _compiled_version(fn):
    """``torch.compile(fn)``, made on first use (importing this module stays cheap). FlexAttention is
    fast only compiled; the where and the gate fuse into one kernel after it."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]


def _run(fn, device: torch.device, *args):
    if device.type == "cuda":
        # inside a torch.compile trace, the caller's compilation covers FlexAttention already
        return fn(*args) if torch.compiler.is_compiling() else _compiled_version(fn)(*args)
    # CPU: forward only (the caller checked that no gradient is recorded); FlexAttention refuses CPU
    # tensors that require grad even under no_grad, so they go in detached
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    if torch.compiler.is_compiling():
        return fn(*args)
    with warnings.catch_warnings():  # eager on CPU is the point here, not an oversight
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return fn(*args)


def _keep(kv_start, kv_end, kv_len: int) -> torch.Tensor:
    """[B, Sq] bool: rows whose range, clamped into [0, Skv], is not empty."""
    start = kv_start.clamp(0, kv_len)
    return kv_end.clamp(max=kv_len) > start


def _check_grad(q, k, v, gate) -> None:
    if q.device.type == "cpu" and torch.is_grad_enabled():
        if any(t is not None and t.requires_grad for t in (q, k, v, gate)):
            raise BackendUnavailableError(f"nvlm_kernels.gated_cross_attention: flex: {CPU_BACKWARD_REASON}")


def _empty_output(q: torch.Tensor) -> torch.Tensor:
    """No query rows or no keys (FlexAttention rejects such shapes): every row is empty, so 0."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=q.device), q, 0)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    gate: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """[B, Sq, Hq, D] in q's dtype; differentiable in q, k, v and gate on CUDA, forward only on CPU."""
    _check_grad(q, k, v, gate)
    b, sq, hq, _ = q.shape
    skv = k.shape[1]
    if b * sq * skv == 0:
        out = _empty_output(q)
        return out if gate is None else out * torch.tanh(gate.reshape(())).to(out.dtype)
    mask = block_mask(kv_start, kv_end, sq, skv)
    keep = _keep(kv_start, kv_end, skv)
    tanh_gate = None if gate is None else torch.tanh(gate.reshape(())).to(q.dtype)
    gqa = hq != k.shape[2]
    return _run(_attend_gated, q.device, q, k, v, mask, keep, tanh_gate, scale, gqa)


def forward_with_lse(q, k, v, kv_start, kv_end, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ungated output [B, Sq, Hq, D], lse [B, Hq, Sq] float32 base 2, +inf for empty rows): the
    outputs the registered op returns (FlexAttention gives its natural-log lse, -inf when empty)."""
    b, sq, hq, _ = q.shape
    skv = k.shape[1]
    if b * sq * skv == 0:
        return _empty_output(q), torch.full((b, hq, sq), float("inf"), device=q.device)
    mask = block_mask(kv_start, kv_end, sq, skv)
    keep = _keep(kv_start, kv_end, skv)
    out, lse = _run(_attend, q.device, q, k, v, mask, keep, scale, hq != k.shape[2], True)
    lse = torch.where(keep[:, None, :], lse.float() * LOG2E, float("inf"))
    return out, lse.contiguous()
