"""Masked, gated cross-attention over per-query key ranges (NVLM-X, NVLM-H, Mllama, Flamingo).

``gated_cross_attention(q, k, v, kv_start, kv_end, gate=None, *, softmax_scale=None)``:
q [B, Sq, Hq, D]; k, v [B, Skv, Hkv, D] with Hq a multiple of Hkv (GQA); kv_start, kv_end int32
[B, Sq] (any strides: a [B, 1] slice of a longer range tensor is fine): query row i of batch row b
attends keys [kv_start[b, i], kv_end[b, i]). A row with an empty range outputs exactly 0 (and gets
zero, never NaN, gradients). With ``gate`` (a one-element tensor) the output is multiplied by
tanh(gate). Differentiable in q, k, v and gate.

``cross_attention_ranges(...)`` builds the ranges from a token layout for the NVLM-X / NVLM-H /
Mllama / Flamingo policies; ``ranges_from_mask(mask)`` converts a boolean [B, Sq, Skv] mask.

Backends (``use_backend(name)``; ``auto`` takes the dispatch table's measured fastest, else the
default peer: ``flex`` on CUDA, ``sdpa`` on CPU):

* ``flex`` — FlexAttention with a BlockMask built from the ranges (block-sparse: key blocks no row
  of a query block sees cost nothing), compiled on CUDA; on CPU forward only (torch has no CPU
  backward for it: a CPU call that records gradients raises ``BackendUnavailableError``).
* ``sdpa`` — ``scaled_dot_product_attention`` with a dense boolean mask.
* ``triton`` — our kernels (fp16, bf16; D in 64, 80, 96, 128), FlashAttention-2 style with
  block skipping; one query token per batch row (Sq = 1, decoding) takes a split-K kernel that reads
  each key block once for all query heads of a group.
* ``hopper`` — our sm_90 variants of those kernels (same dtypes and head dims; ``hopper.py``):
  K/V (and the backward's q/dO) by TMA tensor descriptors where the strides allow (pointer loads
  otherwise), a mask-free steady-state key loop plus the masked rest, FMA-folded scaling, BLOCK_M =
  128 over two warpgroups, a one-pass backward with dQ by float32 atomics (deterministic mode:
  ``NVLM_KERNELS_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms``), TMA-fed split-K decode.
  CUDA tensors of a compute capability 9.x GPU, or CPU tensors through the interpreter. Unmeasured:
  ``auto`` never picks it until a GPU run's dispatch table does.
* ``reference`` — plain PyTorch through a dense mask, any float dtype: the oracle.

Ranges outside [0, Skv] are clamped by every backend, so they can never read outside the keys.
Eager calls with Sq > 1 also check the range values on the host (one device sync, raising
ValueError for a range that is not within [0, Skv] with start <= end), once per range tensor: the
result is remembered while the tensor is not modified in place, and ranges made by
``cross_attention_ranges`` / ``ranges_from_mask`` need no check. Decoding (Sq = 1), compiled
graphs and CUDA-graph capture make no host sync at all.

Peers run as plain differentiable PyTorch in this public function. Our kernels and the reference
run through the registered op ``nvlm_kernels::gated_cross_attention`` (+ ``_bwd``), whose last
argument is the backend; the op also accepts a peer name (so ``torch.library.opcheck`` can test the
peers through it): its forward then runs the peer without autograd, and its backward recomputes
the peer's forward with autograd and differentiates it (the public function never takes that path).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from nvlm_kernels import _backend, _nvtx
from nvlm_kernels._checks import softmax_scale_from
from nvlm_kernels.cross_attention import flex as _flex
from nvlm_kernels.cross_attention import sdpa as _sdpa
from nvlm_kernels.cross_attention.ranges import POLICIES, cross_attention_ranges, is_trusted, ranges_from_mask

OP = "gated_cross_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 80, 96, 128)
PEERS = {"flex": _flex, "sdpa": _sdpa}  # imported here: torch.compile traces through the public function
FLEX_CPU_GRAD_REASON = "FlexAttention has no backward on CPU tensors in this torch (its CPU forward runs)"

_backend.register_op(
    OP,
    has_triton=True,
    has_hopper=True,
    cuda_op=None,
    peers=tuple(PEERS),
    default_peer={"cpu": "sdpa", "cuda": "flex"},
)
KERNELS = ("triton", "hopper")  # our kernel backends: same launcher interface, gate passed as tanh(gate)

__all__ = ["POLICIES", "cross_attention_ranges", "gated_cross_attention", "ranges_from_mask"]


# --------------------------------------------------------------------------------------------------
# checks


def _check_tensor(t, name: str, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")


def _check_inputs(q, k, v, kv_start, kv_end, gate) -> None:
    """Types, shapes, dtypes and devices: metadata only, never the values (no device sync)."""
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


# kv_start -> (its version, weakref to the kv_end checked with it, kv_end's version, max of kv_end)
_VALIDATED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _already_checked(kv_start: torch.Tensor, kv_end: torch.Tensor, kv_len: int) -> bool:
    if is_trusted(kv_start) and is_trusted(kv_end):
        return True
    entry = _VALIDATED.get(kv_start)
    if entry is None:
        return False
    start_version, end_ref, end_version, max_end = entry
    return (
        end_ref() is kv_end
        and start_version == kv_start._version
        and end_version == kv_end._version
        and max_end <= kv_len
    )


def _check_range_values(q, k, kv_start, kv_end) -> None:
    """ValueError for a range that is not inside [0, Skv] with start <= end, on the host, once per
    range tensor. Skipped where a host sync must not happen: decoding (Sq = 1), torch.compile
    traces, CUDA-graph capture; the kernels clamp the ranges there (and everywhere)."""
    if q.shape[1] <= 1 or kv_start.numel() == 0 or torch.compiler.is_compiling():
        return
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    kv_len = k.shape[1]
    if _already_checked(kv_start, kv_end, kv_len):
        return
    malformed = ((kv_start < 0) | (kv_start > kv_end)).any()
    flag, max_end = torch.stack([malformed.to(torch.int64), kv_end.max().to(torch.int64)]).tolist()  # one sync
    if flag or max_end > kv_len:
        bad = (kv_start < 0) | (kv_end > kv_len) | (kv_start > kv_end)
        bi, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"kv_start/kv_end[{bi}, {i}] = [{int(kv_start[bi, i])}, {int(kv_end[bi, i])}) is not a range "
            f"in [0, Skv = {kv_len}] with start <= end"
        )
    if not (kv_start.is_inference() or kv_end.is_inference()):  # no version counter to notice edits
        _VALIDATED[kv_start] = (kv_start._version, weakref.ref(kv_end), kv_end._version, max_end)


def _kernel_reason(q: torch.Tensor) -> str | None:
    if q.dtype not in KERNEL_DTYPES:
        return f"its kernels take float16 or bfloat16, not {q.dtype} (the reference takes any float dtype)"
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"its kernels take head_dim in {KERNEL_HEAD_DIMS}, not {q.shape[-1]}"
    return None


def _unsupported(q: torch.Tensor, grad: bool) -> tuple[tuple[str, str], ...]:
    """(backend, reason) pairs for the backends that cannot run this call."""
    reasons = []
    kernel = _kernel_reason(q)
    if kernel is not None:  # hopper: the same kernels' limits; no TMA requirement (pointer loads otherwise)
        reasons += [("triton", kernel), ("hopper", kernel)]
    if grad and q.device.type == "cpu":
        reasons.append(("flex", FLEX_CPU_GRAD_REASON))
    return tuple(reasons)


def _bucket(q: torch.Tensor, k: torch.Tensor) -> str:
    """The dispatch table's shape bucket (Sq = 1 is the decode bucket)."""
    b, sq, hq, d = q.shape
    skv, hkv = k.shape[1], k.shape[2]
    pow2 = _backend.pow2_bucket
    return f"Sq={pow2(sq)},Skv={pow2(skv)},D={d},G={hq // hkv},BH={pow2(b * hq)}"


def _op_backend(backend: str, q: torch.Tensor, k: torch.Tensor, grad: bool) -> str:
    """The backend a registered op runs (``_backend.op_backend``)."""
    return _backend.op_backend(OP, backend, q.device, q.dtype, _bucket(q, k), grad, _unsupported(q, grad))


# --------------------------------------------------------------------------------------------------
# our kernels and the reference (through the registered op)


def _forward(backend: str, q, k, v, kv_start, kv_end, gate, scale, save_ungated: bool):
    """(out, lse, ungated or an empty placeholder) from a kernel backend or the reference."""
    impl = _backend.implementation(__name__, backend)
    if backend not in KERNELS:
        with _nvtx.range(f"nvlm.kernels.{OP}.fwd"):
            return impl.attention_fwd(q, k, v, kv_start, kv_end, None if gate is None else gate.reshape(()), scale,
                                      save_ungated)  # fmt: skip
    gate_tanh = None if gate is None else torch.tanh(gate.detach().reshape(1).float())  # one float32 on the device
    if q.shape[1] == 1:  # decoding: one query token per batch row
        with _nvtx.range(f"nvlm.kernels.{OP}.decode"):
            return impl.attention_decode(q, k, v, kv_start, kv_end, gate_tanh, scale, save_ungated)
    with _nvtx.range(f"nvlm.kernels.{OP}.fwd"):
        return impl.attention_fwd(q, k, v, kv_start, kv_end, gate_tanh, scale, save_ungated)


def _apply_gate(out: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return out if gate is None else out * torch.tanh(gate.reshape(())).to(out.dtype)


def _peer_backward(backend: str, grad_out, q, k, v, kv_start, kv_end, gate, scale):
    """(dq, dk, dv, dgate) of a peer: its forward recomputed with autograd, then differentiated."""
    peer = PEERS[backend]
    with _backend.autograd_inside_op():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        if gate is not None:
            leaves.append(gate.detach().requires_grad_())
        out = peer.attention(*leaves[:3], kv_start, kv_end, leaves[3] if gate is not None else None, scale)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True)
    # laid out as the fake kernel says (empty_like), whatever layout autograd produced
    like = [
        torch.zeros_like(x) if g is None else torch.empty_like(x).copy_(g) for g, x in zip(grads, leaves, strict=True)
    ]
    dgate = like[3] if gate is not None else q.new_empty((0,), dtype=torch.float32)
    return like[0], like[1], like[2], dgate


@torch.library.custom_op("nvlm_kernels::gated_cross_attention", mutates_args=())
def gated_cross_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor,
    kv_end: torch.Tensor,
    gate: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse [B, Hq, Sq] float32 base 2 (+inf for empty rows), ungated output or an empty
    placeholder). ``backend``: a name, or "auto" to resolve it here. No range values are checked
    here (the op runs inside compiled graphs, where a check would sync): every backend clamps them."""
    _check_inputs(q, k, v, kv_start, kv_end, gate)
    backend = _op_backend(backend, q, k, grad=False)
    if backend in PEERS:
        with torch.no_grad():
            ungated, lse = PEERS[backend].forward_with_lse(q, k, v, kv_start, kv_end, scale)
            out = _apply_gate(ungated, gate).contiguous()
        keep = ungated.contiguous() if gate is not None else q.new_empty((0,))
        return out, lse, keep
    needs_grad = gate is not None  # the ungated output is kept for the gate's gradient
    return _forward(backend, q, k, v, kv_start, kv_end, gate, scale, save_ungated=needs_grad)


@gated_cross_attention_op.register_fake
def _(q, k, v, kv_start, kv_end, gate, scale, backend):
    _check_inputs(q, k, v, kv_start, kv_end, gate)
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
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dgate) — dgate shaped like gate, or empty without a gate. A peer backend
    recomputes its forward (out, lse and ungated are not used then)."""
    _check_inputs(q, k, v, kv_start, kv_end, gate)
    backend = _op_backend(backend, q, k, grad=True)
    if backend in PEERS:
        with _nvtx.range(f"nvlm.kernels.{OP}.bwd"):
            return _peer_backward(backend, grad_out, q, k, v, kv_start, kv_end, gate, scale)
    impl = _backend.implementation(__name__, backend)
    with _nvtx.range(f"nvlm.kernels.{OP}.bwd"):
        if backend not in KERNELS:
            dq, dk, dv, dgate = impl.attention_bwd(grad_out, q, k, v, kv_start, kv_end, gate, out, lse, ungated, scale)
            return dq, dk, dv, dgate.reshape(gate.shape) if gate is not None else dgate
        gate_tanh = None if gate is None else torch.tanh(gate.detach().reshape(1).float())
        dq, dk, dv, dsum = impl.attention_bwd(
            grad_out.to(q.dtype), q, k, v, kv_start, kv_end, gate_tanh, out, lse, ungated, scale
        )
        if gate is None:
            return dq, dk, dv, dsum
        dgate = (1 - gate_tanh.square()) * dsum  # d tanh(g) / dg = 1 - tanh²
        return dq, dk, dv, dgate.to(gate.dtype).reshape(gate.shape)


@gated_cross_attention_bwd_op.register_fake
def _(grad_out, q, k, v, kv_start, kv_end, gate, out, lse, ungated, scale, backend):
    dgate = torch.empty_like(gate) if gate is not None else q.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dgate


def _setup(ctx, inputs, output) -> None:
    q, k, v, kv_start, kv_end, gate, scale, backend = inputs
    out, lse, ungated = output
    ctx.save_for_backward(q, k, v, kv_start, kv_end, gate, out, lse, ungated)
    ctx.scale = scale
    # the backward runs where the forward ran ("auto" resolves exactly as the forward's did)
    ctx.backend = _op_backend(backend, q, k, grad=False) if backend == "auto" else backend
    ctx.mark_non_differentiable(lse, ungated)


def _backward(ctx, grad_out, _grad_lse, _grad_ungated):
    q, k, v, kv_start, kv_end, gate, out, lse, ungated = ctx.saved_tensors
    dq, dk, dv, dgate = gated_cross_attention_bwd_op(
        grad_out.contiguous(), q, k, v, kv_start, kv_end, gate, out, lse, ungated, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, (dgate if gate is not None else None), None, None


gated_cross_attention_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------------
# the public function


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
    exactly 0 for rows with an empty range. Returns [B, Sq, Hq, D] in q's dtype."""
    _check_inputs(q, k, v, kv_start, kv_end, gate)
    scale = softmax_scale_from(softmax_scale, q.shape[-1])
    _check_range_values(q, k, kv_start, kv_end)
    tensors = (q, k, v, kv_start, kv_end) + ((gate,) if gate is not None else ())
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    backend = _backend.select(OP, q.device, q.dtype, _bucket(q, k), grad, _unsupported(q, grad))
    if backend in PEERS:  # the peer itself, as plain differentiable PyTorch
        with _nvtx.range(f"nvlm.kernels.{OP}.{'decode' if q.shape[1] == 1 else 'fwd'}"):
            return PEERS[backend].attention(q, k, v, kv_start, kv_end, gate, scale)
    if _backend.eager_fast_path(*tensors):
        return _forward(backend, q, k, v, kv_start, kv_end, gate, scale, save_ungated=False)[0]
    return gated_cross_attention_op(q, k, v, kv_start, kv_end, gate, scale, backend)[0]
