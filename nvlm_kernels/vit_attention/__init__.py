"""Tile-batched, non-causal ViT attention (InternViT), and the same with InternViT-6B's
full-width QK-RMSNorm.

``vit_attention(q, k, v, *, softmax_scale=None)``: q, k, v [T, S, H, D] (tiles, tokens, heads, head
dim; the layout a fused QKV projection gives, read through strides, no transposes), any S and H;
returns softmax(scale · q kᵀ) v as [T, S, H, D] (contiguous), scale = D^-0.5 by default.

``vit_qk_norm_attention(qkv, q_norm_weight, k_norm_weight, *, num_heads, eps=1e-6,
norm_features=None, softmax_scale=None)``: qkv [T, S, 3·H·D], or (q, k, v) [T, S, H·D] each
(three projections' outputs, read in place: Hugging Face InternVL's q_proj / k_proj / v_proj); q
and k are each normalized by one RMS over the first ``norm_features`` (default all H·D) features of
the token — NVLM's checkpoint pads 7 zero heads to 32 and normalizes over the 3200 real features —
times their weights (InternRMSNorm: variance in float32, normalized value cast to the input dtype,
then the weight), and then attend.

Backends (``nk.available_backends(op, device)``; ``use_backend(name)`` selects one):

* ``sdpa`` (peer, ``sdpa.py``): ``torch.nn.functional.scaled_dot_product_attention`` on [T, H, S, D]
  views (torch picks cuDNN / flash / memory-efficient on a GPU, its fused kernel on a CPU); the
  QK-norm form first writes normalized q and k (a separate memory-bound RMSNorm), then SDPA. Any
  float dtype and head dim. The public functions run it as plain differentiable PyTorch.
* ``triton`` (``triton.py``; fp16, bf16; D in 64, 80, 96, 128): FlashAttention-2 style kernels; the
  QK-norm form normalizes q and k as the attention kernels load them (no normalized copy).
* ``hopper`` (``hopper.py``; fp16, bf16; D in 64, 80, 96, 128): the same kernels' sm_90 variants
  (TMA tensor descriptors, BLOCK_M = 128 over two warpgroups, the scale folded into the exp2 FMA,
  mask-free key loops with a peeled tail) and a single-pass backward (dQ by float32 atomics;
  deterministic with ``NVLM_KERNELS_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms``);
  CUDA tensors of a compute capability 9.x GPU, or CPU tensors through the interpreter.
  Unmeasured: ``auto`` never picks it until a GPU run's dispatch table does.
* ``reference`` (``reference.py``; any float dtype and D): plain PyTorch in float32, the oracle.

``auto`` takes what the dispatch table measured fastest for (op, device kind, dtype, bucket
``S=<pow2>,D=<D>,TH=<pow2 of T·H>``, pass) and, where nothing was measured, the ``sdpa`` peer on CPU
and CUDA tensors (never an unmeasured kernel of ours). An explicit request that cannot serve the call
(e.g. ``triton`` with float32, ``flex``, ``unfused``) raises ``BackendUnavailableError`` saying why.

Both ops are differentiable (q, k, v; qkv or q, k, v and both norm weights). Our kernels and the
reference run through registered torch.library ops (``nvlm_kernels::vit_attention`` /
``vit_qk_norm_attention`` / ``vit_qk_norm_attention_split`` (the three-projection form, whose
backward returns dq, dk, dv apart) and their ``_bwd`` twins), whose trailing ``backend`` argument
names the backend the public function resolved (``"auto"``: resolved inside the op at run time). The
ops accept ``"sdpa"`` too (so opcheck tests it): the forward runs SDPA under no_grad and also
computes the log-sum-exp the schema returns; the backward recomputes SDPA's forward with autograd and
differentiates it. The public functions never take that path for a peer.
"""

from __future__ import annotations

import math

import torch

from nvlm_kernels import _backend, _nvtx
from nvlm_kernels._checks import softmax_scale_from
from nvlm_kernels.vit_attention import sdpa as _sdpa

OP = "vit_attention"
OP_FUSED = "vit_qk_norm_attention"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 80, 96, 128)

PEERS = {"sdpa": _sdpa}
DEFAULT_PEER = {"cpu": "sdpa", "cuda": "sdpa"}

for _op in (OP, OP_FUSED):
    _backend.register_op(_op, has_triton=True, has_hopper=True, cuda_op=None, peers=tuple(PEERS),
                         default_peer=DEFAULT_PEER)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# validation


def _check_floating(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_three(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str) -> None:
    """q, k and v: float tensors of one shape ``layout`` (e.g. "[T, S, H, D]"), dtype and device."""
    dims = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_floating(t, name)
        if t.dim() != dims:
            raise ValueError(f"{name} must have shape {layout} ({dims} dims), got {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        shapes = ", ".join(str(tuple(t.shape)) for t in (q, k, v))
        raise ValueError(f"q, k and v must have the same shape {layout}, got {shapes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _check_three(q, k, v, "[T, S, H, D]")
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


def _check_heads(num_heads: int) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")


def _check_norm(
    x: torch.Tensor,
    name: str,
    features: int,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    eps: float,
    norm_features: int | None,
) -> int:
    """The norm weights [features], eps and norm_features (returned, None -> features)."""
    for w_name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        _check_floating(w, w_name)
        if w.shape != (features,):
            raise ValueError(f"{w_name} must have shape [H*D] = [{features}], got {tuple(w.shape)}")
        if w.device != x.device:
            raise ValueError(f"{w_name} is on {w.device}, {name} on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if norm_features is None:
        norm_features = features
    if isinstance(norm_features, bool) or not isinstance(norm_features, int) or not (1 <= norm_features <= features):
        raise ValueError(f"norm_features must be an int in [1, H*D = {features}], got {norm_features!r}")
    return norm_features


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
    _check_heads(num_heads)
    width = qkv.shape[2]
    if width % (3 * num_heads) or width == 0:
        raise ValueError(f"qkv.shape[2] = {width} is not 3 * num_heads ({num_heads}) * head_dim")
    if qkv.shape[1] < 1:
        raise ValueError(f"qkv: S must be at least 1, got shape {tuple(qkv.shape)}")
    features = width // 3
    norm_features = _check_norm(qkv, "qkv", features, q_norm_weight, k_norm_weight, eps, norm_features)
    return features // num_heads, norm_features


def _check_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int | None,
) -> tuple[int, int]:
    """The three-projection form: q, k, v [T, S, H*D] each. Returns (head_dim, norm_features)."""
    _check_three(q, k, v, "[T, S, H*D]")
    _check_heads(num_heads)
    features = q.shape[2]
    if features % num_heads or features == 0:
        raise ValueError(f"q.shape[2] = {features} is not num_heads ({num_heads}) * head_dim")
    if q.shape[1] < 1:
        raise ValueError(f"q: S must be at least 1, got shape {tuple(q.shape)}")
    norm_features = _check_norm(q, "q", features, q_norm_weight, k_norm_weight, eps, norm_features)
    return features // num_heads, norm_features


# --------------------------------------------------------------------------------------------------
# backend choice


def _unsupported(x: torch.Tensor, head_dim: int) -> tuple[tuple[str, str], ...]:
    """(backend, reason) pairs for the backends that cannot take this call (``_backend.select``)."""
    reason = _kernel_reason(x, head_dim)
    return (("triton", reason), ("hopper", reason)) if reason else ()


def _bucket(tiles: int, tokens: int, heads: int, head_dim: int) -> str:
    """The dispatch table's shape bucket: powers of two over S and T·H (they vary between calls), the
    exact head dim (a model fixes it)."""
    return f"S={_backend.pow2_bucket(tokens)},D={head_dim},TH={_backend.pow2_bucket(tiles * heads)}"


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _op_backend(op: str, backend: str, x: torch.Tensor, dims: tuple[int, int, int, int], grad: bool) -> str:
    """The backend a registered op runs (``_backend.op_backend``)."""
    return _backend.op_backend(op, backend, x.device, x.dtype, _bucket(*dims), grad, _unsupported(x, dims[3]))


def _impl(backend: str):
    """The module of ``backend`` (reference.py, triton.py, hopper.py, sdpa.py): the same interface in each."""
    return PEERS[backend] if backend in PEERS else _backend.implementation(__name__, backend)


def _run_peer(op: str, fn, *args):
    """The public functions' peer path: the peer itself (plain differentiable PyTorch), inside the
    op's NVTX forward range (its backward is SDPA's own autograd, without a range of ours)."""
    if torch.compiler.is_compiling():
        return fn(*args)
    with _nvtx.range(f"nvlm.kernels.{op}.fwd"):
        return fn(*args)


# --------------------------------------------------------------------------------------------------
# vit_attention: registered ops


def _attention_fwd(q, k, v, scale, backend):
    with _nvtx.range(f"nvlm.kernels.{OP}.fwd"):
        return _impl(backend).attention_fwd(q, k, v, scale)


@torch.library.custom_op("nvlm_kernels::vit_attention", mutates_args=())
def vit_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, S, H, D], lse [T, H, S] float32: base-2 log-sum-exp of each score row)."""
    _check_qkv(q, k, v)
    backend = _op_backend(OP, backend, q, q.shape, any(t.requires_grad for t in (q, k, v)))
    return _attention_fwd(q, k, v, scale, backend)


@vit_attention_op.register_fake
def _(q, k, v, scale, backend="auto"):
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous [T, S, H, D]. A peer backend recomputes its forward (out and lse unused)."""
    _check_qkv(q, k, v)
    if grad_out.shape != q.shape:
        raise ValueError(f"grad_out must have the shape of the output {tuple(q.shape)}, got {tuple(grad_out.shape)}")
    backend = _op_backend(OP, backend, q, q.shape, True)
    impl = _impl(backend)
    with _nvtx.range(f"nvlm.kernels.{OP}.bwd"):
        if backend in PEERS:
            with _backend.autograd_inside_op():
                return tuple(g.contiguous() for g in impl.attention_bwd(grad_out, q, k, v, out, lse, scale))
        return impl.attention_bwd(grad_out.to(q.dtype), q, k, v, out, lse, scale)


@vit_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, scale, backend="auto"):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    # "auto" (a direct op call) is resolved here as the forward resolved it, so both passes agree
    ctx.backend = _op_backend(OP, backend, q, q.shape, True) if backend == "auto" else backend
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = vit_attention_bwd_op(grad_out.contiguous(), q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


vit_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def vit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, softmax_scale: float | None = None
) -> torch.Tensor:
    """Non-causal attention over every tile: q, k, v [T, S, H, D] -> [T, S, H, D] (contiguous)."""
    _check_qkv(q, k, v)
    t, s, h, d = q.shape
    scale = softmax_scale_from(softmax_scale, d)
    backend = _backend.select(OP, q.device, q.dtype, _bucket(t, s, h, d), _needs_grad(q, k, v), _unsupported(q, d))
    if backend in PEERS:
        return _run_peer(OP, PEERS[backend].attention, q, k, v, scale)
    if _backend.eager_fast_path(q, k, v):
        return _attention_fwd(q, k, v, scale, backend)[0]
    return vit_attention_op(q, k, v, scale, backend)[0]


# --------------------------------------------------------------------------------------------------
# vit_qk_norm_attention: registered ops


def _fused_dims(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int, int]:
    t, s, width = qkv.shape
    return t, s, num_heads, width // (3 * num_heads)


def _fused_fwd(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale, backend):
    with _nvtx.range(f"nvlm.kernels.{OP_FUSED}.fwd"):
        return _impl(backend).qk_norm_attention_fwd(
            qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale
        )


@torch.library.custom_op("nvlm_kernels::vit_qk_norm_attention", mutates_args=())
def vit_qk_norm_attention_op(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [T, S, H, D], lse [T, H, S], rstd_q [T, S], rstd_k [T, S]; the last three float32)."""
    _check_fused(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    grad = any(t.requires_grad for t in (qkv, q_norm_weight, k_norm_weight))
    backend = _op_backend(OP_FUSED, backend, qkv, _fused_dims(qkv, num_heads), grad)
    return _fused_fwd(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale, backend)


@vit_qk_norm_attention_op.register_fake
def _(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale, backend="auto"):
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dqkv, dq_norm_weight, dk_norm_weight), contiguous. A peer backend recomputes its forward."""
    _check_fused(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    backend = _op_backend(OP_FUSED, backend, qkv, _fused_dims(qkv, num_heads), True)
    impl = _impl(backend)
    args = (qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, num_heads, eps, norm_features, scale)
    with _nvtx.range(f"nvlm.kernels.{OP_FUSED}.bwd"):
        if backend in PEERS:
            with _backend.autograd_inside_op():
                return tuple(g.contiguous() for g in impl.qk_norm_attention_bwd(grad_out, *args))
        return impl.qk_norm_attention_bwd(grad_out.to(qkv.dtype), *args)


@vit_qk_norm_attention_bwd_op.register_fake
def _(grad_out, qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, num_heads, eps, norm_features, scale,
      backend="auto"):  # fmt: skip
    return (
        qkv.new_empty(qkv.shape),
        q_norm_weight.new_empty(q_norm_weight.shape),
        k_norm_weight.new_empty(k_norm_weight.shape),
    )


def _fused_setup(ctx, inputs, output) -> None:
    qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale, backend = inputs
    out, lse, rstd_q, rstd_k = output
    ctx.save_for_backward(qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k)
    ctx.args = (num_heads, eps, norm_features, scale)
    if backend == "auto":  # a direct op call: resolved as the forward resolved it
        backend = _op_backend(OP_FUSED, backend, qkv, _fused_dims(qkv, num_heads), True)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse, rstd_q, rstd_k)


def _fused_backward(ctx, grad_out, _grad_lse, _grad_rstd_q, _grad_rstd_k):
    qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k = ctx.saved_tensors
    dqkv, dwq, dwk = vit_qk_norm_attention_bwd_op(
        grad_out.contiguous(), qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, *ctx.args, ctx.backend
    )
    return dqkv, dwq, dwk, None, None, None, None, None


vit_qk_norm_attention_op.register_autograd(_fused_backward, setup_context=_fused_setup)


# --------------------------------------------------------------------------------------------------
# vit_qk_norm_attention from three projections (q, k, v [T, S, H·D] each): registered ops


def _split_dims(q: torch.Tensor, num_heads: int) -> tuple[int, int, int, int]:
    t, s, features = q.shape
    return t, s, num_heads, features // num_heads


def _split_fwd(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale, backend):
    with _nvtx.range(f"nvlm.kernels.{OP_FUSED}.fwd"):
        return _impl(backend).qk_norm_attention_split_fwd(
            q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale
        )


@torch.library.custom_op("nvlm_kernels::vit_qk_norm_attention_split", mutates_args=())
def vit_qk_norm_attention_split_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [T, S, H, D], lse [T, H, S], rstd_q [T, S], rstd_k [T, S]; the last three float32)."""
    _check_split(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    grad = any(t.requires_grad for t in (q, k, v, q_norm_weight, k_norm_weight))
    backend = _op_backend(OP_FUSED, backend, q, _split_dims(q, num_heads), grad)
    return _split_fwd(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale, backend)


@vit_qk_norm_attention_split_op.register_fake
def _(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale, backend="auto"):
    head_dim, _ = _check_split(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    t, s, _ = q.shape
    out = q.new_empty((t, s, num_heads, head_dim))
    lse = q.new_empty((t, num_heads, s), dtype=torch.float32)
    return out, lse, q.new_empty((t, s), dtype=torch.float32), q.new_empty((t, s), dtype=torch.float32)


@torch.library.custom_op("nvlm_kernels::vit_qk_norm_attention_split_bwd", mutates_args=())
def vit_qk_norm_attention_split_bwd_op(
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dq_norm_weight, dk_norm_weight), contiguous. A peer backend recomputes its forward."""
    _check_split(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    backend = _op_backend(OP_FUSED, backend, q, _split_dims(q, num_heads), True)
    impl = _impl(backend)
    args = (q, k, v, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, num_heads, eps, norm_features, scale)
    with _nvtx.range(f"nvlm.kernels.{OP_FUSED}.bwd"):
        if backend in PEERS:
            with _backend.autograd_inside_op():
                return tuple(g.contiguous() for g in impl.qk_norm_attention_split_bwd(grad_out, *args))
        return impl.qk_norm_attention_split_bwd(grad_out.to(q.dtype), *args)


@vit_qk_norm_attention_split_bwd_op.register_fake
def _(grad_out, q, k, v, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, num_heads, eps, norm_features,
      scale, backend="auto"):  # fmt: skip
    return (
        *(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v)),
        q_norm_weight.new_empty(q_norm_weight.shape),
        k_norm_weight.new_empty(k_norm_weight.shape),
    )


def _split_setup(ctx, inputs, output) -> None:
    q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale, backend = inputs
    out, lse, rstd_q, rstd_k = output
    ctx.save_for_backward(q, k, v, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k)
    ctx.args = (num_heads, eps, norm_features, scale)
    if backend == "auto":  # a direct op call: resolved as the forward resolved it
        backend = _op_backend(OP_FUSED, backend, q, _split_dims(q, num_heads), True)
    ctx.backend = backend
    ctx.mark_non_differentiable(lse, rstd_q, rstd_k)


def _split_backward(ctx, grad_out, _grad_lse, _grad_rstd_q, _grad_rstd_k):
    saved = ctx.saved_tensors
    grads = vit_qk_norm_attention_split_bwd_op(grad_out.contiguous(), *saved, *ctx.args, ctx.backend)
    return (*grads, None, None, None, None, None)


vit_qk_norm_attention_split_op.register_autograd(_split_backward, setup_context=_split_setup)


def _qk_norm_attention_split(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, softmax_scale):
    head_dim, norm_features = _check_split(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    scale = softmax_scale_from(softmax_scale, head_dim)
    eps = float(eps)
    tensors = (q, k, v, q_norm_weight, k_norm_weight)
    grad = _needs_grad(*tensors)
    bucket = _bucket(*_split_dims(q, num_heads))
    backend = _backend.select(OP_FUSED, q.device, q.dtype, bucket, grad, _unsupported(q, head_dim))
    args = (*tensors, num_heads, eps, norm_features, scale)
    if backend in PEERS:
        return _run_peer(OP_FUSED, PEERS[backend].qk_norm_attention_split, *args)
    if _backend.eager_fast_path(*tensors):
        return _split_fwd(*args, backend)[0]
    return vit_qk_norm_attention_split_op(*args, backend)[0]


def vit_qk_norm_attention(
    qkv: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    *,
    num_heads: int,
    eps: float = 1e-6,
    norm_features: int | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """InternViT-6B's attention core: RMSNorm of q and of k over the whole token, then attention.

    qkv [T, S, 3·H·D] (q, k, v blocks of H heads each, as the fused projection writes them), or a
    tuple (q, k, v) of [T, S, H·D] tensors (three projections' outputs, e.g. Hugging Face InternVL's
    q_proj / k_proj / v_proj: read in place, no concatenation; the backward returns dq, dk, dv
    separately); weights [H·D]; returns [T, S, H, D] (contiguous)."""
    if isinstance(qkv, (tuple, list)):
        if len(qkv) != 3:
            raise ValueError(f"qkv as a sequence must be (q, k, v), got {len(qkv)} items")
        return _qk_norm_attention_split(*qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features,
                                        softmax_scale)  # fmt: skip
    head_dim, norm_features = _check_fused(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features)
    scale = softmax_scale_from(softmax_scale, head_dim)
    eps = float(eps)
    dims = _fused_dims(qkv, num_heads)
    grad = _needs_grad(qkv, q_norm_weight, k_norm_weight)
    backend = _backend.select(OP_FUSED, qkv.device, qkv.dtype, _bucket(*dims), grad, _unsupported(qkv, head_dim))
    args = (qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale)
    if backend in PEERS:
        return _run_peer(OP_FUSED, PEERS[backend].qk_norm_attention, *args)
    if _backend.eager_fast_path(qkv, q_norm_weight, k_norm_weight):
        return _fused_fwd(*args, backend)[0]
    return vit_qk_norm_attention_op(*args, backend)[0]
