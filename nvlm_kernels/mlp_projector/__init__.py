"""The vision-to-language MLP projector ("mlp1") of NVLM-D / NVLM-H / NVLM-X and InternVL.

``mlp_projector(x, ln_weight, ln_bias, w1, w2=None, b1=None, b2=None, *, eps=1e-5,
activation="gelu", pixel_shuffle=None, drop_cls=False, version="v2")`` computes

    LayerNorm(x) · W1ᵀ + b1  ->  GELU  ->  · W2ᵀ + b2

over tokens x [N, L, K] (already pixel-shuffled), or, with ``pixel_shuffle=0.5``, over the ViT
output itself ([N, 1024, C], or [N, 1025, C] with ``drop_cls=True``): the CLS drop and the shuffle
happen in the triton backend's first-GEMM loads (no shuffled tensor is written), and in the unfused
backend's one memory-bound pass, which writes the first GEMM's input z [M, K] (on CUDA its Triton
LayerNorm kernel reads x in shuffled order; the torch path copies once). γ, β and the biases may
be strided views. ``ln_weight=None`` skips the
LayerNorm, ``w2=None`` is the one-layer form (no activation: NVLM-X's single Linear), biases are
optional. NVLM-D/H: LayerNorm(12800) -> 12800x29568 -> GELU -> 29568x8192, no biases (72B).

Backends (``nk.use_backend(name)`` / ``NVLM_KERNELS_BACKEND``; ``auto`` otherwise):

* ``unfused`` — the peer: the projector as the best unfused implementation a user has (one
  memory-bound gather + LayerNorm pass writing z [M, K], then cuBLAS GEMM1 + bias, GELU, cuBLAS
  GEMM2 + bias; ``unfused.py``), with torch's own autograd around the GEMMs. Any float dtype, CPU
  and CUDA. ``auto`` runs it wherever the dispatch table has no measurement for the call (today:
  everywhere), so the op is never slower than what a user already had;
* ``triton`` (float16, bfloat16) — ours: the shuffle and the LayerNorm in the first GEMM's loads,
  GELU in its epilogue (``triton.py``);
* ``hopper`` (float16, bfloat16; K % 8 == 0) — ours for sm_90: the unfused path's gather + LayerNorm
  pass writing z, then a persistent TMA-fed first GEMM with bias + GELU in its epilogue, cuBLAS for
  the second (``hopper.py``); CUDA tensors of a compute capability 9.x GPU, or CPU tensors through
  the interpreter. Unmeasured: ``auto`` never picks it until a GPU run's dispatch table does;
* ``reference`` (any float dtype) — plain PyTorch, the oracle (``reference.py``).

The public function picks the backend once per call (``_backend.select`` with the shape bucket
``M=..,K=..,N1=..,N2=..``: powers of two of the projector rows M = N · L_out, features, hidden and
output sizes; ``N2=0`` for the one-layer form). The peer runs as plain differentiable PyTorch in
the public function. Our kernels and the reference run through the registered
``torch.ops.nvlm_kernels.mlp_projector`` (+ ``mlp_projector_bwd``) with fake kernels and autograd:
differentiable in x, the LayerNorm parameters, the weights and the biases (dx only when x requires
grad). Its trailing ``backend`` argument is the resolved backend ("auto" resolves inside the op);
the backward runs on the forward's backend. The op also takes "unfused" (so ``torch.library.opcheck``
tests the peer through it): the forward runs the peer without autograd, and its backward recomputes
the peer's forward with autograd and differentiates it (a recompute the public function never does).
"""

from __future__ import annotations

import math

import torch

from nvlm_kernels import _backend, _nvtx
from nvlm_kernels.mlp_projector import unfused as _unfused
from nvlm_kernels.pixel_shuffle import VERSIONS, _downscale_from

OP = "mlp_projector"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
ACTIVATIONS = ("gelu", "gelu_tanh")
PARAMETERS = ("x", "ln_weight", "ln_bias", "w1", "w2", "b1", "b2")

PEER = "unfused"
_backend.register_op(
    OP, has_triton=True, has_hopper=True, cuda_op=None, peers=(PEER,), default_peer={"cpu": PEER, "cuda": PEER}
)

__all__ = ["mlp_projector"]


def _check_inputs(x, ln_weight, ln_bias, w1, w2, b1, b2, downscale: int, cls: int) -> None:
    given = {n: t for n, t in zip(PARAMETERS, (x, ln_weight, ln_bias, w1, w2, b1, b2), strict=True) if t is not None}
    for name, t in given.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [N, L, C] (3 dims), got shape {tuple(x.shape)}")
    n, length, channels = x.shape
    tokens = length - cls
    if tokens < 0:
        raise ValueError("x has no tokens to drop: drop_cls=True needs L >= 1")
    if downscale > 1:
        side = math.isqrt(tokens)
        if side * side != tokens:
            hint = (
                " (pass drop_cls=True if x still has its CLS token)"
                if not cls and math.isqrt(tokens - 1) ** 2 == tokens - 1
                else ""
            )
            raise ValueError(f"x: a pixel shuffle needs a square token grid, got {tokens} tokens{hint}")
        if side % downscale:
            raise ValueError(f"x: the token grid side {side} must be divisible by 1/pixel_shuffle = {downscale}")
    features = channels * downscale * downscale
    if w1.dim() != 2 or w1.shape[1] != features:
        raise ValueError(
            f"w1 must have shape [hidden, {features}] (x's {channels} channels"
            + (f" x {downscale * downscale} from the pixel shuffle)" if downscale > 1 else ")")
            + f", got {tuple(w1.shape)}"
        )
    for name, t, size in (("ln_weight", ln_weight, features), ("ln_bias", ln_bias, features), ("b1", b1, w1.shape[0])):
        if t is not None and tuple(t.shape) != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(t.shape)}")
    if ln_bias is not None and ln_weight is None:
        raise ValueError("ln_bias needs ln_weight (ln_weight=None means no LayerNorm)")
    if w2 is not None:
        if w2.dim() != 2 or w2.shape[1] != w1.shape[0]:
            raise ValueError(f"w2 must have shape [out, {w1.shape[0]}] (w1's output size), got {tuple(w2.shape)}")
        if b2 is not None and tuple(b2.shape) != (w2.shape[0],):
            raise ValueError(f"b2 must have shape ({w2.shape[0]},), got {tuple(b2.shape)}")
    elif b2 is not None:
        raise ValueError("b2 needs w2 (w2=None is the one-layer form)")


def _kernel_reason(x: torch.Tensor) -> str | None:
    if x.dtype not in KERNEL_DTYPES:
        return f"its kernels take float16 or bfloat16, not {x.dtype} (unfused and reference take any float dtype)"
    return None


def _bucket(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None, downscale: int, cls: int) -> str:
    """The dispatch table's shape bucket: powers of two of M (projector rows), K, N1 and N2 (0 for
    the one-layer form). Comparisons only (``pow2_bucket``): no exact-size guards under compile."""
    pow2 = _backend.pow2_bucket
    m = x.shape[0] * ((x.shape[1] - cls) // (downscale * downscale))
    n2 = pow2(w2.shape[0]) if w2 is not None else 0
    return f"M={pow2(m)},K={pow2(w1.shape[1])},N1={pow2(w1.shape[0])},N2={n2}"


def _hopper_reason(w1: torch.Tensor) -> str | None:
    """The hopper kernels' TMA loads need 16-byte rows of z and W1 (K % 8 == 0)."""
    if w1.shape[1] % 8:
        return f"its TMA loads need K % 8 == 0 (16-byte rows), got K = {w1.shape[1]}"
    return None


def _unsupported(x: torch.Tensor, w1: torch.Tensor) -> tuple[tuple[str, str], ...]:
    reason = _kernel_reason(x)
    if reason:
        return (("triton", reason), ("hopper", reason))
    hopper = _hopper_reason(w1)
    return (("hopper", hopper),) if hopper else ()


def _select(x, w1, w2, downscale: int, cls: int, grad: bool) -> str:
    """The backend that runs this call: the request (raising if it cannot run it) or auto's choice."""
    return _backend.select(OP, x.device, x.dtype, _bucket(x, w1, w2, downscale, cls), grad, _unsupported(x, w1))


def _resolve(backend: str, x, w1, w2, downscale: int, cls: int, grad: bool) -> str:
    """Inside the op: the backend to run (``_backend.op_backend``)."""
    bucket = _bucket(x, w1, w2, downscale, cls)
    return _backend.op_backend(OP, backend, x.device, x.dtype, bucket, grad, _unsupported(x, w1))


def _impl(backend: str):
    return _backend.implementation(__name__, backend)


def _forward(x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, downscale, v2, cls, save, backend):
    with _nvtx.range(f"nvlm.kernels.{OP}.fwd"):
        return _impl(backend).projector_fwd(
            x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, downscale, v2, cls, save
        )


def _out_shape(x, w1, w2, downscale: int, cls: int) -> tuple[int, int, int]:
    tokens = x.shape[1] - cls
    return x.shape[0], tokens // (downscale * downscale), (w2 if w2 is not None else w1).shape[0]


@torch.library.custom_op("nvlm_kernels::mlp_projector", mutates_args=())
def mlp_projector_op(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor | None,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    eps: float,
    activation: str,
    downscale: int,
    v2: bool,
    cls: int,
    save_for_backward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, row mean, row 1/std, pre-activation) — the last three empty when not kept."""
    _check_inputs(x, ln_weight, ln_bias, w1, w2, b1, b2, downscale, cls)
    backend = _resolve(backend, x, w1, w2, downscale, cls, save_for_backward)
    args = (x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, downscale, v2, cls, save_for_backward)
    return _forward(*args, backend)


@mlp_projector_op.register_fake
def _(x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, downscale, v2, cls, save_for_backward, backend):
    _check_inputs(x, ln_weight, ln_bias, w1, w2, b1, b2, downscale, cls)
    n, l_out, out_features = _out_shape(x, w1, w2, downscale, cls)
    rows = n * l_out if ln_weight is not None else 0
    stats = [x.new_empty((rows,), dtype=torch.float32) for _ in range(2)]
    pre = x.new_empty((n * l_out, w1.shape[0]) if (w2 is not None and save_for_backward) else (0,))
    return x.new_empty((n, l_out, out_features)), stats[0], stats[1], pre


@torch.library.custom_op("nvlm_kernels::mlp_projector_bwd", mutates_args=())
def mlp_projector_bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor | None,
    b1: torch.Tensor | None,
    b2: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    pre: torch.Tensor,
    eps: float,
    activation: str,
    downscale: int,
    v2: bool,
    cls: int,
    needs: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dln_weight, dln_bias, dw1, dw2, db1, db2); bit i of ``needs`` asks for gradient i,
    the others come back empty. ``backend``: the one the forward ran on ("unfused": recomputes the
    peer's forward with autograd)."""
    wanted = tuple(bool(needs >> i & 1) for i in range(7))
    backend = _resolve(backend, x, w1, w2, downscale, cls, True)
    grads = _backward_grads(grad_out, x, ln_weight, ln_bias, w1, w2, b1, b2, mean, rstd, pre, eps, activation,
                            downscale, v2, cls, wanted, backend)  # fmt: skip
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _backward_grads(grad_out, x, ln_weight, ln_bias, w1, w2, b1, b2, mean, rstd, pre, eps, activation,
                    downscale, v2, cls, wanted, backend):  # fmt: skip
    with _nvtx.range(f"nvlm.kernels.{OP}.bwd"):
        return _impl(backend).projector_bwd(grad_out, x, ln_weight, ln_bias, w1, w2, b1, b2, mean, rstd, pre, eps,
                                            activation, downscale, v2, cls, wanted)  # fmt: skip


@mlp_projector_bwd_op.register_fake
def _(grad_out, x, ln_weight, ln_bias, w1, w2, b1, b2, mean, rstd, pre, eps, activation, downscale, v2, cls, needs,
      backend):  # fmt: skip
    inputs = (x, ln_weight, ln_bias, w1, w2, b1, b2)
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format)
        if (needs >> i & 1 and t is not None)
        else x.new_empty(0)
        for i, t in enumerate(inputs)
    )


def _save(ctx, args, mean, rstd, pre, backend: str) -> None:
    """What both autograd paths keep: the 7 tensor inputs + the forward's statistics, the 5 options,
    and the backend the forward ran on (the backward runs there too, wherever it is called)."""
    ctx.save_for_backward(*args[:7], mean, rstd, pre)
    ctx.meta = tuple(args[7:12])
    ctx.backend = backend


def _setup(ctx, inputs, output) -> None:
    _out, mean, rstd, pre = output
    x, w1, w2, downscale, cls = inputs[0], inputs[3], inputs[4], inputs[9], inputs[11]
    save, backend = inputs[12], inputs[13]
    # "auto" resolves to what the forward chose (the same call of the same cached selection)
    _save(ctx, inputs, mean, rstd, pre, _resolve(backend, x, w1, w2, downscale, cls, save))
    ctx.mark_non_differentiable(mean, rstd, pre)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd, _grad_pre):
    saved = ctx.saved_tensors
    wanted = ctx.needs_input_grad[:7]
    needs = sum(1 << i for i, w in enumerate(wanted) if w)
    grads = mlp_projector_bwd_op(grad_out.contiguous(), *saved, *ctx.meta, needs, ctx.backend)
    return (*(g if w else None for g, w in zip(grads, wanted, strict=True)), *([None] * 7))


mlp_projector_op.register_autograd(_backward, setup_context=_setup)


class _EagerProjector(torch.autograd.Function):
    """The registered op's forward and backward for plain eager training calls, without
    torch.library's dispatch (see ``_backend.eager_autograd_path``); compile, fake tensors and
    opcheck go through the registered op."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, downscale, v2, cls, backend):
        args = (x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, downscale, v2, cls)
        out, mean, rstd, pre = _forward(*args, True, backend)
        _save(ctx, args, mean, rstd, pre, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        wanted = ctx.needs_input_grad[:7]
        grads = _backward_grads(grad_out.contiguous(), *ctx.saved_tensors, *ctx.meta, wanted, ctx.backend)
        return (*(g if w else None for g, w in zip(grads, wanted, strict=True)), *([None] * 6))


def mlp_projector(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    w1: torch.Tensor,
    w2: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    eps: float = 1e-5,
    activation: str = "gelu",
    pixel_shuffle: float | None = None,
    drop_cls: bool = False,
    version: str = "v2",
) -> torch.Tensor:
    """LayerNorm -> Linear -> GELU -> Linear over projector tokens; returns [N, L_out, out_features].

    Args:
        x: [N, L, K] tokens, or the ViT output [N, L, C] with ``pixel_shuffle`` (K = C / s²);
            any strides.
        ln_weight, ln_bias: LayerNorm affine parameters [K] (``ln_weight=None``: no LayerNorm).
        w1, w2: Linear weights [hidden, K] and [out, hidden] (``w2=None``: the one-layer form,
            no activation). b1, b2: optional biases.
        eps: LayerNorm epsilon; 1e-5 is Hugging Face's (NVLM trained with 1e-6).
        activation: between the linears: "gelu" (exact erf) or "gelu_tanh".
        pixel_shuffle: None, or the scale factor s (0.5 in NVLM) to shuffle x inside the loads.
        drop_cls: x's first token is the ViT's CLS token: skip it.
        version: the pixel shuffle's "v2" (NVLM) or "v1" (old InternVL) token order.
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if not isinstance(drop_cls, bool):
        raise TypeError(f"drop_cls must be a bool, got {type(drop_cls).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(w1, torch.Tensor):
        raise TypeError(f"w1 must be a torch.Tensor, got {type(w1).__name__}")
    downscale = 1 if pixel_shuffle is None else _downscale_from(pixel_shuffle)
    cls = int(drop_cls)
    _check_inputs(x, ln_weight, ln_bias, w1, w2, b1, b2, downscale, cls)
    tensors = tuple(t for t in (x, ln_weight, ln_bias, w1, w2, b1, b2) if t is not None)
    args = (x, ln_weight, ln_bias, w1, w2, b1, b2, float(eps), activation, downscale, version == "v2", cls)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    backend = _select(x, w1, w2, downscale, cls, grad)
    if backend == PEER:
        with _nvtx.range(f"nvlm.kernels.{OP}.fwd"):  # the peer forward: the same label as ours
            return _unfused.projector(*args)
    if _backend.eager_autograd_path(*tensors):
        return _EagerProjector.apply(*args, backend) if grad else _forward(*args, False, backend)[0]
    return mlp_projector_op(*args, grad, backend)[0]
