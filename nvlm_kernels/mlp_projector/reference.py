"""The MLP projector in plain PyTorch: the CPU path and the backend for dtypes the kernels lack.

Forward: drop CLS, pixel-shuffle (InternVL's reshape sequence), LayerNorm, Linear, activation,
Linear — what InternVL's / NVLM's ``mlp1`` does, with the same roundings (each step's output in the
input dtype). The backward is eager autograd's chain (the linears' gradients, ATen's GELU and LayerNorm
backward kernels) from the saved pre-activation: the same speed and roundings as the eager module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nvlm_kernels.pixel_shuffle.reference import pixel_shuffle_bwd, pixel_shuffle_fwd


def _gather(x: torch.Tensor, r: int, v2: bool, cls: int) -> torch.Tensor:
    """[N, L, C] -> the projector input rows [M, K]."""
    x = x[:, cls:]
    if r > 1:
        x = pixel_shuffle_fwd(x, r, v2)
    return x.reshape(-1, x.shape[-1])


def _scatter(grad_rows: torch.Tensor, shape, r: int, v2: bool, cls: int) -> torch.Tensor:
    """The gradient of ``_gather``: rows [M, K] back to x's shape (zeros for CLS rows)."""
    n, length, channels = shape
    grad = grad_rows.reshape(n, -1, grad_rows.shape[-1])
    if r > 1:
        grad = pixel_shuffle_bwd(grad, r, v2)
    out = grad_rows.new_zeros((n, length, channels))
    out[:, cls:] = grad
    return out


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def projector_fwd(x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, r, v2, cls, save_for_backward):
    rows = _gather(x, r, v2, cls)
    mean, rstd = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    if ln_weight is not None:  # the statistics come out of the same pass (the backward recomputes its own)
        rows, mean, rstd = torch.native_layer_norm(rows, (rows.shape[-1],), ln_weight, ln_bias, eps)
        mean, rstd = mean.reshape(-1).float(), rstd.reshape(-1).float()
    hidden = F.linear(rows, w1, b1)
    pre = hidden if (w2 is not None and save_for_backward) else x.new_empty(0)
    out = F.linear(_act(hidden, activation), w2, b2) if w2 is not None else hidden
    per_image = (x.shape[1] - cls) // (r * r)
    return out.reshape(x.shape[0], per_image, out.shape[-1]), mean, rstd, pre


def projector_bwd(grad_out, x, ln_weight, ln_bias, w1, w2, b1, b2, mean, rstd, pre, eps, activation, r, v2, cls, needs):
    """Eager autograd's data flow with ATen's own backward kernels (``gelu_backward``,
    ``native_layer_norm_backward``), so the CPU path runs at eager's speed. LayerNorm's statistics
    are recomputed with the normalized rows (one ``native_layer_norm`` pass, needed for dW1 anyway)
    rather than taken from the saved float32 ones, which keeps float64 exact."""
    need_x, need_g, need_b, need_w1, need_w2, need_b1, need_b2 = needs
    dy = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)
    dw2 = db2 = None
    if w2 is not None:
        if need_w2:
            dw2 = dy.t() @ _act(pre, activation)
        if need_b2:
            db2 = dy.sum(0)
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        dh = torch.ops.aten.gelu_backward(dy @ w2, pre, approximate=approximate)
    else:
        dh = dy
    db1 = dh.sum(0) if need_b1 else None
    rows = _gather(x, r, v2, cls)
    z = rows
    if ln_weight is not None:
        z, row_mean, row_rstd = torch.native_layer_norm(rows, (rows.shape[-1],), ln_weight, ln_bias, eps)
    dw1 = dh.t() @ z if need_w1 else None
    dx = dgamma = dbeta = None
    if need_x or need_g or need_b:
        dz = dh @ w1
        if ln_weight is not None:
            dz, dgamma, dbeta = torch.ops.aten.native_layer_norm_backward(
                dz, rows, (rows.shape[-1],), row_mean, row_rstd, ln_weight, ln_bias, [need_x, need_g, need_b]
            )
        if need_x:
            dx = _scatter(dz, x.shape, r, v2, cls)
    return dx, dgamma, dbeta, dw1, dw2, db1, db2
