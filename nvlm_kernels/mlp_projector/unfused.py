"""The ``unfused`` peer backend of mlp_projector: the best projector a user builds from stock parts.

    z   = LayerNorm(pixel_shuffle(x[:, cls:]))     [M, K] in x's dtype: one memory-bound pass
    h   = z · W1ᵀ + b1                              cuBLAS GEMM (``F.linear``)
    out = GELU(h) · W2ᵀ + b2                        torch's GELU (exact or tanh), cuBLAS GEMM

M = N · L_out projector rows, K = C · r² features (r = 1/scale of the pixel shuffle).

The memory-bound step reads x where the shuffle puts each element and writes z once:

* on CUDA in float16 / bfloat16, the Triton kernel ``_ln_fwd_kernel`` of ``mlp_projector/triton.py``
  (statistics and normalized output in one launch; rows up to 16384 features stay in registers, so
  x is read once). This module imports that file's launchers: the one exception to "backends never
  import each other" (design.md), made so that the gather + LayerNorm kernels exist once;
* elsewhere (CPU, float32 / float64, or without Triton) in torch ops: the CLS drop and the shuffle as
  one permutation written by a single copy, then ``torch.native_layer_norm``;
* without a LayerNorm (``ln_weight=None``) the step is that copy alone (none at all for tokens that
  need no shuffle and no CLS drop), differentiated by torch.

Autograd: torch's own for the GEMMs and the GELU. The gather + LayerNorm step is the internal op
``nvlm_kernels::mlp_projector_gather_ln`` (fake kernel and registered autograd: torch.compile sees one
opaque step and fake tensors work); its backward ``nvlm_kernels::mlp_projector_gather_ln_bwd`` is
the LayerNorm backward from the saved row statistics plus the scatter back through the shuffle (CLS
rows get zeros): Triton's ``_ln_bwd_rowsum_kernel`` + ``_ln_bwd_kernel`` on CUDA,
``native_layer_norm_backward`` + one copy elsewhere. Plain eager calls run the same forward and
backward through a ``torch.autograd.Function`` instead (no torch.library dispatch cost).

Saved for the backward: z is *saved*, not recomputed — autograd keeps F.linear's input for dW1 —
plus the row statistics (2·M floats) and x itself (the caller's tensor, kept alive anyway). Eager
InternVL keeps two [M, K] tensors (the shuffled copy and the LayerNorm output); this keeps one.
Recomputing z would save M·K elements (46 MB in bf16 at NVLM-72B's 1792 rows, K = 12800) at the
cost of re-reading x and writing z once more in every backward, and would need a custom autograd
around the first GEMM; autograd keeps h and GELU(h) [M, N1] anyway (N1 = 29568: 4.6x z), so the
saving would not change the peak much while the time would grow: we save.

The op-level path (``projector_fwd`` / ``projector_bwd``, called by ``torch.ops.nvlm_kernels.
mlp_projector`` with backend "unfused", e.g. by ``torch.library.opcheck``) runs the forward without
autograd and, in the backward, *recomputes* the forward with autograd enabled and takes
``torch.autograd.grad``; the public function never takes that path.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

from nvlm_kernels import _backend
from nvlm_kernels._device import device_guard

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _kernels():
    """mlp_projector/triton.py, or None where Triton cannot be imported."""
    try:
        from nvlm_kernels.mlp_projector import triton as kernels
    except Exception:  # noqa: BLE001 - no Triton: the torch path runs
        return None
    return kernels


def _use_kernels(x: torch.Tensor) -> bool:
    """The Triton gather + LayerNorm kernels run this call (CUDA tensors in float16 / bfloat16)."""
    return (
        x.device.type == "cuda"
        and x.dtype in KERNEL_DTYPES
        and not _backend.triton_interpreter_enabled()
        and _kernels() is not None
    )


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the saved row statistics: float32 from the kernels; ``native_layer_norm``'s own
    otherwise (the input dtype on CPU, float32 for half inputs on CUDA)."""
    if _use_kernels(x) or (x.device.type != "cpu" and x.dtype in KERNEL_DTYPES):
        return torch.float32
    return x.dtype


def _rows(x: torch.Tensor, r: int, cls: int) -> tuple[int, int]:
    """(M, K) of the gathered input. Valid for symbolic sizes: the token grid is square and side % r == 0."""
    n, length, channels = x.shape
    return n * ((length - cls) // (r * r)), channels * r * r


# --------------------------------------------------------------------------------------------------
# the gather (CLS drop + pixel shuffle) in torch ops


def _order(v2: bool) -> tuple[int, ...]:
    # [n, i, dr, j, dc, ch] -> output tokens (i, j) (v2) or (j, i) (v1), features (dr, dc, ch)
    return (0, 1, 3, 2, 4, 5) if v2 else (0, 3, 1, 2, 4, 5)


def _blocks(t: torch.Tensor, r: int) -> torch.Tensor:
    """[N, side², C] -> the view [N, side/r, r, side/r, r, C] (splits one axis: always a view)."""
    n, length, channels = t.shape
    blocks = math.isqrt(length) // r
    return t.reshape(n, blocks, r, blocks, r, channels)


def _gather(x: torch.Tensor, r: int, v2: bool, cls: int) -> torch.Tensor:
    """[N, L, C] -> the projector rows [M, K]: one copy (a view where no CLS drop or shuffle is needed)."""
    t = x[:, cls:]
    if r > 1:
        return _blocks(t, r).permute(_order(v2)).reshape(-1, t.shape[-1] * r * r)
    return t.reshape(-1, t.shape[-1])


def _scatter(rows: torch.Tensor, x: torch.Tensor, r: int, v2: bool, cls: int) -> torch.Tensor:
    """The gradient of ``_gather``: rows [M, K] written back to x's layout (CLS rows get zeros)."""
    n, length, channels = x.shape
    dx = rows.new_zeros((n, length, channels)) if cls else rows.new_empty((n, length, channels))
    target = dx[:, cls:]
    if r > 1:
        target = _blocks(target, r).permute(_order(v2))
    target.copy_(rows.reshape(target.shape))
    return dx


# --------------------------------------------------------------------------------------------------
# the gather + LayerNorm step


def gather_ln_fwd(x, ln_weight, ln_bias, eps, r, v2, cls):
    """(z [M, K] in x's dtype, mean [M], rstd [M])."""
    if _use_kernels(x):
        return _kernels().gather_layer_norm(x, ln_weight, ln_bias, eps, r, v2, cls)
    rows = _gather(x, r, v2, cls)
    z, mean, rstd = torch.native_layer_norm(rows, (rows.shape[-1],), ln_weight, ln_bias, eps)
    return z, mean.reshape(-1), rstd.reshape(-1)


def gather_ln_bwd(dz, x, ln_weight, ln_bias, mean, rstd, eps, r, v2, cls, needs):
    """(dx, dγ, dβ) of ``gather_ln_fwd``; ``needs`` = (dx?, dγ?, dβ?), the others None."""
    need_x, need_g, need_b = needs
    need_b = need_b and ln_bias is not None
    if _use_kernels(x):
        return _kernels().gather_layer_norm_bwd(
            dz, x, ln_weight, ln_bias, mean, rstd, r, v2, cls, (need_x, need_g, need_b)
        )
    rows = _gather(x, r, v2, cls)  # recomputed: the backward's only extra copy
    drows, dgamma, dbeta = torch.ops.aten.native_layer_norm_backward(
        dz, rows, (rows.shape[-1],), mean.reshape(-1, 1), rstd.reshape(-1, 1), ln_weight, ln_bias,
        [need_x, need_g, need_b],
    )  # fmt: skip
    dx = _scatter(drows, x, r, v2, cls) if need_x else None
    return dx, dgamma if need_g else None, dbeta if need_b else None


@torch.library.custom_op("nvlm_kernels::mlp_projector_gather_ln", mutates_args=())
def gather_ln_op(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    eps: float,
    downscale: int,
    v2: bool,
    cls: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, row mean, row 1/std): LayerNorm of x's projector rows (CLS dropped, pixel-shuffled)."""
    return gather_ln_fwd(x, ln_weight, ln_bias, eps, downscale, v2, cls)


@gather_ln_op.register_fake
def _(x, ln_weight, ln_bias, eps, downscale, v2, cls):
    m, k = _rows(x, downscale, cls)
    stats = [x.new_empty((m,), dtype=_stat_dtype(x)) for _ in range(2)]
    return x.new_empty((m, k)), stats[0], stats[1]


@torch.library.custom_op("nvlm_kernels::mlp_projector_gather_ln_bwd", mutates_args=())
def gather_ln_bwd_op(
    dz: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    downscale: int,
    v2: bool,
    cls: int,
    needs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dγ, dβ); bit i of ``needs`` asks for gradient i, the others come back empty."""
    wanted = tuple(bool(needs >> i & 1) for i in range(3))
    grads = gather_ln_bwd(dz, x, ln_weight, ln_bias, mean, rstd, eps, downscale, v2, cls, wanted)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@gather_ln_bwd_op.register_fake
def _(dz, x, ln_weight, ln_bias, mean, rstd, eps, downscale, v2, cls, needs):
    inputs = (x, ln_weight, ln_bias)
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if (needs >> i & 1 and t is not None)
        else x.new_empty(0)
        for i, t in enumerate(inputs)
    )  # fmt: skip


def _setup(ctx, inputs, output) -> None:
    x, ln_weight, ln_bias, *meta = inputs
    _z, mean, rstd = output
    ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd)
    ctx.meta = tuple(meta)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dz, _grad_mean, _grad_rstd):
    wanted = ctx.needs_input_grad[:3]
    needs = sum(1 << i for i, w in enumerate(wanted) if w)
    x, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
    grads = gather_ln_bwd_op(dz.contiguous(), x, ln_weight, ln_bias, mean, rstd, *ctx.meta, needs)
    return (*(g if w else None for g, w in zip(grads, wanted, strict=True)), None, None, None, None)


gather_ln_op.register_autograd(_backward, setup_context=_setup)


class _EagerGatherLayerNorm(torch.autograd.Function):
    """The op's forward and backward for plain eager training calls, without torch.library's
    dispatch (see ``_backend.eager_autograd_path``)."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, r, v2, cls):
        z, mean, rstd = gather_ln_fwd(x, ln_weight, ln_bias, eps, r, v2, cls)
        ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd)
        ctx.meta = (eps, r, v2, cls)
        return z

    @staticmethod
    def backward(ctx, dz):
        x, ln_weight, ln_bias, mean, rstd = ctx.saved_tensors
        grads = gather_ln_bwd(dz.contiguous(), x, ln_weight, ln_bias, mean, rstd, *ctx.meta, ctx.needs_input_grad[:3])
        return (*grads, None, None, None, None)


def gather_layer_norm(x, ln_weight, ln_bias, eps: float, r: int, v2: bool, cls: int) -> torch.Tensor:
    """z [M, K], differentiable in x, ln_weight and ln_bias."""
    tensors = (x, ln_weight) if ln_bias is None else (x, ln_weight, ln_bias)
    if _backend.eager_autograd_path(*tensors):
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return _EagerGatherLayerNorm.apply(x, ln_weight, ln_bias, eps, r, v2, cls)
        return gather_ln_fwd(x, ln_weight, ln_bias, eps, r, v2, cls)[0]
    return gather_ln_op(x, ln_weight, ln_bias, eps, r, v2, cls)[0]


# --------------------------------------------------------------------------------------------------
# the projector


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def _guard(x: torch.Tensor):
    # torch.compile places its own kernels; a Python device context inside a traced function is noise
    return contextlib.nullcontext() if torch.compiler.is_compiling() else device_guard(x)


def projector(x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, r, v2, cls) -> torch.Tensor:
    """out [N, L_out, N_out] as plain differentiable PyTorch (the public function's path)."""
    with _guard(x):
        if ln_weight is not None:
            z = gather_layer_norm(x, ln_weight, ln_bias, eps, r, v2, cls)
        else:
            z = _gather(x, r, v2, cls)
        out = F.linear(z, w1, b1)
        if w2 is not None:
            out = F.linear(_act(out, activation), w2, b2)
        return out.reshape(x.shape[0], (x.shape[1] - cls) // (r * r), out.shape[-1])


def projector_fwd(x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, r, v2, cls, save_for_backward):
    """The op-level forward, shaped like the kernels': (out, mean [M] float32 or empty, rstd, pre-activation
    [M, N1] or empty). No autograd: ``projector_bwd`` recomputes what it needs."""
    with _guard(x), torch.no_grad():
        empty = x.new_empty(0, dtype=torch.float32)
        if ln_weight is not None:
            z, mean, rstd = gather_ln_fwd(x, ln_weight, ln_bias, eps, r, v2, cls)
            mean, rstd = mean.float(), rstd.float()
        else:
            z, mean, rstd = _gather(x, r, v2, cls), empty, empty.clone()
        h = F.linear(z, w1, b1)
        out = F.linear(_act(h, activation), w2, b2) if w2 is not None else h
        pre = h if (w2 is not None and save_for_backward) else x.new_empty(0)
        return out.reshape(x.shape[0], (x.shape[1] - cls) // (r * r), out.shape[-1]), mean, rstd, pre


def projector_bwd(grad_out, x, ln_weight, ln_bias, w1, w2, b1, b2, mean, rstd, pre, eps, activation, r, v2, cls, needs):
    """The op-level backward: recomputes ``projector`` with autograd and differentiates it (the
    saved statistics and pre-activation are not used). Gradients (dx, dγ, dβ, dW1, dW2, db1, db2),
    None where ``needs`` does not ask."""
    inputs = (x, ln_weight, ln_bias, w1, w2, b1, b2)
    asked = [i for i, (t, need) in enumerate(zip(inputs, needs, strict=True)) if need and t is not None]
    grads: list[torch.Tensor | None] = [None] * len(inputs)
    if not asked:
        return tuple(grads)
    with _backend.autograd_inside_op():
        leaves = [t.detach().requires_grad_(i in asked) if t is not None else None for i, t in enumerate(inputs)]
        out = projector(*leaves, eps, activation, r, v2, cls)
        found = torch.autograd.grad(out, [leaves[i] for i in asked], grad_out.to(out.dtype), allow_unused=True)
    for i, g in zip(asked, found, strict=True):
        grads[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(grads)
