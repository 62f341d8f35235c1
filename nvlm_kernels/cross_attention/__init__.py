"""Masked, gated cross-attention over per-query key ranges (NVLM-X, NVLM-H, Mllama, Flamingo).

``gated_cross_attention(q, k, v, kv_start, kv_end, gate=None, *, softmax_scale=None)``:
q [B, Sq, Hq, D]; k, v [B, Skv, Hkv, D] with Hq a multiple of Hkv (GQA); kv_start, kv_end int32
[B, Sq]: query row i of batch row b attends keys [kv_start[b, i], kv_end[b, i]). A row with an
empty range outputs exactly 0. With ``gate`` (a one-element tensor) the output is multiplied by
tanh(gate). Differentiable in q, k, v and gate. One query token per batch row (Sq = 1, decoding)
takes a kernel that reads each key block once for all query heads of a group.

``cross_attention_ranges(...)`` builds the ranges from a token layout for the NVLM-X / NVLM-H /
Mllama / Flamingo policies; ``ranges_from_mask(mask)`` converts a boolean [B, Sq, Skv] mask.

Backends: ``triton`` (fp16, bf16; D in 64, 80, 96, 128) and ``reference`` (dense mask, any float
dtype). The ranges are checked on the host once per call (one device sync), which also keeps the
kernels from ever reading outside the keys; the kernels clamp them as well.
"""

from __future__ import annotations

import torch

from nvlm_kernels import _backend, _nvtx
from nvlm_kernels._checks import softmax_scale_from
from nvlm_kernels.cross_attention.ranges import POLICIES, cross_attention_ranges, ranges_from_mask

OP = "gated_cross_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 80, 96, 128)

_backend.register_op(OP, has_triton=True, cuda_op=None)

__all__ = ["POLICIES", "cross_attention_ranges", "gated_cross_attention", "ranges_from_mask"]


def _check_tensor(t, name: str, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")


def _check_inputs(q, k, v, kv_start, kv_end, gate, check_values: bool = True) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(t, name, 4)
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Skv, Hkv, D], got {tuple(k.shape)}, {tuple(v.shape)}")
    b, sq, hq, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"q and k must have the same batch size, got {b} and {k.shape[0]}")
    if k.shape[3] != d:
        raise ValueError(f"q and k must have the same head_dim, got {d} and {k.shape[3]}")
    hkv = k.shape[2]
    if hkv < 1 or hq < 1 or hq % hkv:
        raise ValueError(f"the query heads ({hq}) must be a positive multiple of the key/value heads ({hkv})")
    if d < 1:
        raise ValueError(f"head_dim must be at least 1, got {d}")
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        _check_tensor(t, name, 2)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if tuple(t.shape) != (b, sq):
            raise ValueError(f"{name} must have shape [B, Sq] = {(b, sq)}, got {tuple(t.shape)}")
    devices = {q.device, k.device, v.device, kv_start.device, kv_end.device}
    if gate is not None:
        if not isinstance(gate, torch.Tensor) or gate.numel() != 1 or not gate.dtype.is_floating_point:
            raise ValueError("gate must be a one-element floating-point tensor (or None)")
        devices.add(gate.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(x) for x in devices)}")
    if check_values and kv_start.numel() and not torch.compiler.is_compiling():
        skv = k.shape[1]
        bad = (kv_start < 0) | (kv_end > skv) | (kv_start > kv_end)
        if bool(bad.any()):  # one device sync per call: bad ranges must never reach a kernel
            bi, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"kv_start/kv_end[{bi}, {i}] = [{int(kv_start[bi, i])}, {int(kv_end[bi, i])}) is not a range "
                f"in [0, Skv = {skv}] with start <= end"
            )


def _kernel_reason(q: torch.Tensor) -> str | None:
    if q.dtype not in KERNEL_DTYPES:
        return f"its kernels take float16 or bfloat16, not {q.dtype} (the reference takes any float dtype)"
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"its kernels take head_dim in {KERNEL_HEAD_DIMS}, not {q.shape[-1]}"
    return None


def _backend_module(q: torch.Tensor):
    backend = _backend.resolve_supported(OP, q.device, {"triton": _kernel_reason(q)})
    return _backend.implementation(__name__, "triton" if backend == "triton" else "reference"), backend


def _gate_arg(impl_is_triton: bool, gate: torch.Tensor | None):
    """The kernels take tanh(gate) (one float32 on the device); the reference takes the gate."""
    if gate is None:
        return None
    return torch.tanh(gate.detach().reshape(1).float()) if impl_is_triton else gate.reshape(())


def _forward(q, k, v, kv_start, kv_end, gate, scale, save_ungated: bool):
    impl, backend = _backend_module(q)
    with _nvtx.range(f"nvlm.kernels.{OP}.fwd"):
        return impl.attention_fwd(q, k, v, kv_start, kv_end, _gate_arg(backend == "triton", gate), scale, save_ungated)


@torch.library.custom_op("nvlm_kernels::gated_cross_attention", mutates_args=())
def gated_cross_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    gate: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, ungated output or an empty placeholder)."""
    _check_inputs(q, k, v, kv_start, kv_end, gate)
    needs_grad = gate is not None  # the ungated output is kept for the gate's gradient
    return _forward(q, k, v, kv_start, kv_end, gate, scale, save_ungated=needs_grad)


@gated_cross_attention_op.register_fake
def _(q, k, v, kv_start, kv_end, gate, scale):
    _check_inputs(q, k, v, kv_start, kv_end, gate, check_values=False)
    b, sq, hq, d = q.shape
    ungated = q.new_empty((b, sq, hq, d)) if gate is not None else q.new_empty((0,))
    return q.new_empty((b, sq, hq, d)), q.new_empty((b, hq, sq), dtype=torch.float32), ungated


@torch.library.custom_op("nvlm_kernels::gated_cross_attention_bwd", mutates_args=())
def gated_cross_attention_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    gate: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    ungated: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dgate) — dgate shaped like gate, or empty without a gate."""
    _check_inputs(q, k, v, kv_start, kv_end, gate, check_values=False)
    impl, backend = _backend_module(q)
    with _nvtx.range(f"nvlm.kernels.{OP}.bwd"):
        if backend != "triton":
            dq, dk, dv, dgate = impl.attention_bwd(grad_out, q, k, v, kv_start, kv_end, gate, out, lse, ungated, scale)
            return dq, dk, dv, dgate.reshape(gate.shape) if gate is not None else dgate
        gate_tanh = _gate_arg(True, gate)
        dq, dk, dv, dsum = impl.attention_bwd(
            grad_out.to(q.dtype), q, k, v, kv_start, kv_end, gate_tanh, out, lse, ungated, scale
        )
        if gate is None:
            return dq, dk, dv, dsum
        dgate = (1 - gate_tanh.square()) * dsum  # d tanh(g) / dg = 1 - tanh²
        return dq, dk, dv, dgate.to(gate.dtype).reshape(gate.shape)


@gated_cross_attention_bwd_op.register_fake
def _(grad_out, q, k, v, kv_start, kv_end, gate, out, lse, ungated, scale):
    dgate = torch.empty_like(gate) if gate is not None else q.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dgate


def _setup(ctx, inputs, output) -> None:
    q, k, v, kv_start, kv_end, gate, scale = inputs
    out, lse, ungated = output
    ctx.save_for_backward(q, k, v, kv_start, kv_end, gate, out, lse, ungated)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse, ungated)
    _backend.remember_backend(ctx, OP)


def _backward(ctx, grad_out, _grad_lse, _grad_ungated):
    q, k, v, kv_start, kv_end, gate, out, lse, ungated = ctx.saved_tensors
    with _backend.backward_backend(ctx, OP):
        dq, dk, dv, dgate = gated_cross_attention_bwd_op(
            grad_out.contiguous(), q, k, v, kv_start, kv_end, gate, out, lse, ungated, ctx.scale
        )
    return dq, dk, dv, None, None, (dgate if gate is not None else None), None


gated_cross_attention_op.register_autograd(_backward, setup_context=_setup)


def gated_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    gate: torch.Tensor | None = None,
    *,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v over each row's key range [kv_start, kv_end), times tanh(gate);
    exactly 0 for rows with an empty range. Returns [B, Sq, Hq, D]."""
    _check_inputs(q, k, v, kv_start, kv_end, gate)
    scale = softmax_scale_from(softmax_scale, q.shape[-1])
    tensors = (q, k, v, kv_start, kv_end) + ((gate,) if gate is not None else ())
    if _backend.eager_fast_path(*tensors):
        impl, backend = _backend_module(q)
        if backend == "triton" and q.shape[1] == 1:  # decoding: one query token per batch row
            with _nvtx.range(f"nvlm.kernels.{OP}.decode"):
                max_range = int((kv_end - kv_start).max()) if q.shape[0] else 0
                return impl.attention_decode(q, k, v, kv_start, kv_end, _gate_arg(True, gate), scale, max_range)
        return _forward(q, k, v, kv_start, kv_end, gate, scale, save_ungated=False)[0]
    return gated_cross_attention_op(q, k, v, kv_start, kv_end, gate, scale)[0]
