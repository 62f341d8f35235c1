"""Triton kernels for the MLP projector: gathered LayerNorm prologue, GELU epilogue, backward pieces.

Rows are the projector's tokens (M = N · L_out). Row m, feature k of the projector input is read
straight from the ViT output x [N, L, C] at ``row_base(m) + col_offset(k)``: with a pixel shuffle
of r = 1/scale the row part picks the r×r block's top-left source token (plus one for a CLS row)
and the column part the sub-token (dr, dc) and channel (nvlm-spec §4.2). The split keeps the
per-element address math of the GEMM's K loop to one add, as in a plain matmul, and no shuffled
tensor is ever written.

Forward: ``_ln_stats_kernel`` makes each row's mean and 1/std (float32, two passes over the row,
the second from L2); ``_ln_linear_kernel`` is the first GEMM: it normalizes the A tile as it loads
it, ((x − mean) · rstd) · γ + β rounded to the input dtype exactly as an eager LayerNorm output is,
and applies bias and GELU in its epilogue (writing the pre-activation too when autograd will need
it). γ and β are applied on load, not folded into W1: folding needs a scaled copy of W1 (757 MB at
72B) that is stale after every optimizer step, and applying them costs two BLOCK_K vectors per K
step next to a BLOCK_M × BLOCK_K tile. The second GEMM is cuBLAS through ``torch.nn.functional.linear``
(a plain GEMM: nothing to fuse, and cuBLAS is the fastest plain GEMM there is).

Backward (cuBLAS for the four GEMMs): ``_act_bwd_kernel`` turns dA into dH in place and rebuilds
A = GELU(H) for dW2 from the saved pre-activation (saving H only, not the LayerNorm output and A as
eager does: one [M, N1] tensor instead of two plus [M, K]); ``_ln_apply_kernel`` rebuilds the
LayerNorm output for dW1; ``_ln_bwd_rowsum_kernel`` and ``_ln_bwd_kernel`` make dx (scattered back
through the shuffle; CLS rows get zeros) and per-block partial sums of dγ and dβ.

The ``unfused`` backend (``unfused.py``) uses ``gather_layer_norm``: ``_ln_fwd_kernel`` writes the
gathered LayerNorm output z [M, K] and the row statistics in one launch (a row of up to 16384
features stays in registers, so x is read once), and ``gather_layer_norm_bwd`` (the two LayerNorm
backward kernels above) for its backward.

Launchers: every one enters the tensors' CUDA device (``_device.device_guard``); γ, β and b1 are
made unit-stride once there (the kernels index them as ``ptr + k``); x and W1 take any strides;
grids come from small functions that ``launch_grids`` exposes to a host test of CUDA's limits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nvlm_kernels._backend import autotune_configs, triton_interpreter_enabled
from nvlm_kernels._device import check_grid, device_guard

_INTERPRET = triton_interpreter_enabled()
ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per architecture (Hopper?); every entry is
# compiled by `make triton-aot` for its architecture with triton 3.6 and 3.8 and must not spill.
GEMM_TABLE = {
    True: [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (64, 128, 64, 4, 4)],
    False: [(128, 128, 32, 8, 4), (64, 256, 32, 8, 3), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4)],
}
INTERPRETER_GEMM = (64, 64, 64, 4, 1)
GROUP_M = 8
_ROW_BLOCK = 4  # rows per program of the row-statistics kernels
_TILE = (32, 256)  # (rows, features) per program of the elementwise LayerNorm kernels
_TILE_BWD = (16, 256)  # the same for the LayerNorm backward (more live values: 32 rows spill)


def _as_config(entry) -> triton.Config:
    m, n, k, w, s = entry
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)


def _gemm_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [_as_config(INTERPRETER_GEMM)]
    return [_as_config(e) for e in dict.fromkeys(e for configs in GEMM_TABLE.values() for e in configs)]


def _prune(configs, named_args, **kwargs):
    if _INTERPRET:
        return configs
    allowed = set(GEMM_TABLE[torch.cuda.get_device_capability()[0] >= 9])
    keep = [c for c in configs if (*c.kwargs.values(), c.num_warps, c.num_stages) in allowed]
    return autotune_configs(keep or configs[:1])


# --------------------------------------------------------------------------------------------------
# address math of the gathered input


@triton.jit
def _row_base(rows, L_out, side_out, side, cls, stride_xn, stride_xl, R: tl.constexpr, V2: tl.constexpr):
    """Offset of row ``rows``'s first source token (int64)."""
    image = rows // L_out
    t = rows - image * L_out
    if R == 1:
        token = t + cls
    else:
        major = t // side_out
        minor = t - major * side_out
        if V2:  # row-major output tokens: t = block_row · side_out + block_col
            token = side * R * major + R * minor + cls
        else:  # v1, transposed: t = block_col · side_out + block_row
            token = side * R * minor + R * major + cls
    return image.to(tl.int64) * stride_xn + token.to(tl.int64) * stride_xl


@triton.jit
def _col_offset(cols, C, side, stride_xl, stride_xc, R: tl.constexpr):
    """Offset, from a row's base, of feature ``cols``: sub-token (dr, dc) = divmod(cols // C, R)."""
    if R == 1:
        return cols.to(tl.int64) * stride_xc
    sub = cols // C
    channel = cols - sub * C
    dr = sub // R
    dc = sub - dr * R
    return (side * dr + dc).to(tl.int64) * stride_xl + channel.to(tl.int64) * stride_xc


@triton.jit
def _gelu(h, ACT: tl.constexpr):
    if ACT == 1:  # exact: h · Φ(h)
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:  # tanh approximation; tanh(u) = 2σ(2u) − 1
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return h * tl.sigmoid(2.0 * u)
    else:
        return h


@triton.jit
def _gelu_grad(h, ACT: tl.constexpr):
    if ACT == 1:  # Φ(h) + h φ(h)
        return 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    else:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * h * h)


# --------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _row_stats(X, base, row_ok, K, C, side, eps, stride_xl, stride_xc, R: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr):  # fmt: skip
    """(mean, 1/std) of BLOCK_R gathered rows in float32, walking each row in BLOCK_K steps twice:
    the sum, then the centred second moment (no cancellation for large means; the 2nd pass from L2)."""
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        offs = base[:, None] + _col_offset(cols, C, side, stride_xl, stride_xc, R)[None, :]
        total += tl.sum(tl.load(X + offs, mask=mask, other=0.0).to(tl.float32), axis=1)
    mean = total / K
    squares = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols < K)[None, :]
        offs = base[:, None] + _col_offset(cols, C, side, stride_xl, stride_xc, R)[None, :]
        centred = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    return mean, 1.0 / tl.sqrt(squares / K + eps)


@triton.jit
def _ln_stats_kernel(
    X, Mean, Rstd,
    M, K, L_out, side_out, side, C, cls, eps,
    stride_xn, stride_xl, stride_xc,
    R: tl.constexpr, V2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    base = _row_base(tl.where(row_ok, rows, 0), L_out, side_out, side, cls, stride_xn, stride_xl, R, V2)
    mean, rstd = _row_stats(X, base, row_ok, K, C, side, eps, stride_xl, stride_xc, R, BLOCK_R, BLOCK_K)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _ln_fwd_kernel(
    X, Gamma, Beta, Z, Mean, Rstd,
    M, K, L_out, side_out, side, C, cls, eps,
    stride_xn, stride_xl, stride_xc,
    HAS_BETA: tl.constexpr, R: tl.constexpr, V2: tl.constexpr, ONE_TILE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The unfused backend's memory-bound step: Z [M, K] = LayerNorm(gathered x) in x's dtype, with
    each row's mean and 1/std (float32), in one launch. ``ONE_TILE`` (BLOCK_K >= K): the rows stay in
    registers, x is read once; otherwise three passes over each row (the 2nd and 3rd from L2)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    base = _row_base(tl.where(row_ok, rows, 0), L_out, side_out, side, cls, stride_xn, stride_xl, R, V2)
    z_rows = rows.to(tl.int64)[:, None] * K
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        offs = base[:, None] + _col_offset(cols, C, side, stride_xl, stride_xc, R)[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / K
        centred = tl.where(mask, x - mean[:, None], 0.0)  # centred second moment: no cancellation
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / K + eps)
        z = centred * rstd[:, None] * tl.load(Gamma + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BETA:
            z += tl.load(Beta + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Z + z_rows + cols[None, :], z.to(Z.dtype.element_ty), mask=mask)
    else:
        mean, rstd = _row_stats(X, base, row_ok, K, C, side, eps, stride_xl, stride_xc, R, BLOCK_R, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            mask = row_ok[:, None] & col_ok[None, :]
            offs = base[:, None] + _col_offset(cols, C, side, stride_xl, stride_xc, R)[None, :]
            gamma = tl.load(Gamma + cols, mask=col_ok, other=0.0).to(tl.float32)
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            z = (x - mean[:, None]) * rstd[:, None] * gamma[None, :]
            if HAS_BETA:
                z += tl.load(Beta + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Z + z_rows + cols[None, :], z.to(Z.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _ln_linear_kernel(
    X, W, Bias, Mean, Rstd, Gamma, Beta, Pre, Out,
    M, N, K, M_BUCKET, L_out, side_out, side, C, cls,
    stride_xn, stride_xl, stride_xc, stride_wn, stride_wk,
    HAS_LN: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    WRITE_PRE: tl.constexpr, R: tl.constexpr, V2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """Out[m, n] = act(sum_k LN(x)[m, k] · W[n, k] + bias[n]); Pre (optional) before act."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * grid_n  # grouped order: programs in flight share W tiles in L2
    group = pid // per_group
    first_m = group * GROUP
    group_size = min(grid_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    safe_rows = tl.where(row_ok, rows, 0)
    base = _row_base(safe_rows, L_out, side_out, side, cls, stride_xn, stride_xl, R, V2)
    w_cols = tl.where(col_ok, cols, 0).to(tl.int64) * stride_wn
    if HAS_LN:
        mean = tl.load(Mean + safe_rows)
        rstd = tl.load(Rstd + safe_rows)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        offs = base[:, None] + _col_offset(ks, C, side, stride_xl, stride_xc, R)[None, :]
        a = tl.load(X + offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_LN:
            gamma = tl.load(Gamma + ks, mask=k_ok, other=0.0).to(tl.float32)
            normed = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :]
            if HAS_BETA:
                normed += tl.load(Beta + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            a = normed.to(X.dtype.element_ty)  # rounded as an eager LayerNorm output is
        w = tl.load(W + w_cols[None, :] + ks.to(tl.int64)[:, None] * stride_wk, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, w, acc)
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if WRITE_PRE:
        tl.store(Pre + out_offs, acc.to(Out.dtype.element_ty), mask=mask)
    tl.store(Out + out_offs, _gelu(acc, ACT).to(Out.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _act_bwd_kernel(Pre, DA, A, numel, ACT: tl.constexpr, WRITE_A: tl.constexpr, BLOCK: tl.constexpr):
    """DA <- DA · act'(Pre) in place; A <- act(Pre) (for dW2)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    h = tl.load(Pre + offs, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(DA + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DA + offs, (da * _gelu_grad(h, ACT)).to(DA.dtype.element_ty), mask=mask)
    if WRITE_A:
        tl.store(A + offs, _gelu(h, ACT).to(A.dtype.element_ty), mask=mask)


@triton.jit
def _ln_apply_kernel(
    X, Mean, Rstd, Gamma, Beta, Z,
    M, K, L_out, side_out, side, C, cls,
    stride_xn, stride_xl, stride_xc,
    HAS_LN: tl.constexpr, HAS_BETA: tl.constexpr, R: tl.constexpr, V2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Z [M, K] = the projector input after the LayerNorm (what the first GEMM read)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    safe_rows = tl.where(row_ok, rows, 0)
    base = _row_base(safe_rows, L_out, side_out, side, cls, stride_xn, stride_xl, R, V2)
    x = tl.load(X + base[:, None] + _col_offset(cols, C, side, stride_xl, stride_xc, R)[None, :], mask=mask, other=0.0)
    if HAS_LN:
        mean = tl.load(Mean + safe_rows)
        rstd = tl.load(Rstd + safe_rows)
        gamma = tl.load(Gamma + cols, mask=col_ok, other=0.0).to(tl.float32)
        z = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :]
        if HAS_BETA:
            z += tl.load(Beta + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        x = z.to(Z.dtype.element_ty)
    tl.store(Z + rows.to(tl.int64)[:, None] * K + cols[None, :], x, mask=mask)


@triton.jit
def _ln_bwd_rowsum_kernel(
    X, Mean, Rstd, Gamma, DZ, S1, S2,
    M, K, L_out, side_out, side, C, cls,
    stride_xn, stride_xl, stride_xc,
    R: tl.constexpr, V2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Per row: S1 = Σ_k g, S2 = Σ_k g · x̂ with g = dz · γ and x̂ the normalized input."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    safe_rows = tl.where(row_ok, rows, 0)
    base = _row_base(safe_rows, L_out, side_out, side, cls, stride_xn, stride_xl, R, V2)
    mean = tl.load(Mean + safe_rows)
    rstd = tl.load(Rstd + safe_rows)
    s1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        offs = base[:, None] + _col_offset(cols, C, side, stride_xl, stride_xc, R)[None, :]
        xhat = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        dz = tl.load(DZ + safe_rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = dz * tl.load(Gamma + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        s1 += tl.sum(g, axis=1)
        s2 += tl.sum(tl.where(mask, g * xhat, 0.0), axis=1)
    tl.store(S1 + rows, s1, mask=row_ok)
    tl.store(S2 + rows, s2, mask=row_ok)


@triton.jit
def _ln_bwd_kernel(
    X, Mean, Rstd, Gamma, DZ, S1, S2, DX, PartGamma, PartBeta,
    M, K, L_out, side_out, side, C, cls,
    stride_xn, stride_xl, stride_xc, stride_dn, stride_dl, stride_dc,
    HAS_LN: tl.constexpr, WRITE_DX: tl.constexpr, PARTIALS: tl.constexpr, R: tl.constexpr, V2: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dx = rstd · (g − S1/K − x̂ · S2/K) scattered to x's layout (g = dz without a LayerNorm);
    PartGamma/PartBeta[program row, k] = Σ over the block's rows of dz · x̂ and dz."""
    pid_r = tl.program_id(0)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < K
    mask = row_ok[:, None] & col_ok[None, :]
    safe_rows = tl.where(row_ok, rows, 0)
    dz = tl.load(DZ + safe_rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_LN:
        base = _row_base(safe_rows, L_out, side_out, side, cls, stride_xn, stride_xl, R, V2)
        offs = base[:, None] + _col_offset(cols, C, side, stride_xl, stride_xc, R)[None, :]
        mean = tl.load(Mean + safe_rows)
        rstd = tl.load(Rstd + safe_rows)
        xhat = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        if PARTIALS:
            part = pid_r.to(tl.int64) * K + cols
            tl.store(PartGamma + part, tl.sum(tl.where(mask, dz * xhat, 0.0), axis=0), mask=col_ok)
            tl.store(PartBeta + part, tl.sum(dz, axis=0), mask=col_ok)
        if WRITE_DX:
            g = dz * tl.load(Gamma + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            s1 = tl.load(S1 + safe_rows)
            s2 = tl.load(S2 + safe_rows)
            dz = rstd[:, None] * (g - (s1[:, None] + xhat * s2[:, None]) / K)
    if WRITE_DX:
        dbase = _row_base(safe_rows, L_out, side_out, side, cls, stride_dn, stride_dl, R, V2)
        doffs = dbase[:, None] + _col_offset(cols, C, side, stride_dl, stride_dc, R)[None, :]
        tl.store(DX + doffs, dz.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# launchers


def _geometry(x: torch.Tensor, r: int, cls: int) -> dict:
    n, length, channels = x.shape
    tokens = length - cls
    side = math.isqrt(tokens) if r > 1 else 1
    side_out = side // r if r > 1 else 1
    l_out = side_out * side_out if r > 1 else tokens
    return {"L_out": l_out, "side_out": side_out, "side": side, "C": channels, "cls": cls, "M": n * l_out}


def _geo_args(geo: dict) -> tuple:
    return geo["L_out"], geo["side_out"], geo["side"], geo["C"], geo["cls"]


def _x_args(x: torch.Tensor) -> tuple:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_stride(*vectors):
    """γ, β and the biases as the kernels read them (element k at offset k): a strided view (e.g. a
    parameter sliced out of a bigger buffer) is copied once here; a contiguous one is used as it is."""
    return tuple(v.contiguous() if v is not None else None for v in vectors)


# Grids. Every launcher takes its grid from these functions, so that a host test can check them
# against CUDA's limits at the largest shapes (``launch_grids``). Rows always go on axis 0 (limit
# 2^31 - 1); only the elementwise LayerNorm kernels use axis 1, for the feature blocks (K / 256).


def _rows_grid(m: int) -> tuple[int]:
    return (triton.cdiv(m, _ROW_BLOCK),)


def _gemm_grid(m: int, n: int, block_m: int, block_n: int) -> tuple[int]:
    return (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)


def _tile_grid(m: int, k: int, tile: tuple[int, int]) -> tuple[int, int]:
    return check_grid((triton.cdiv(m, tile[0]), triton.cdiv(k, tile[1])))


_ACT_BLOCK = 4096 if _INTERPRET else 1024
_LN_ONE_TILE_MAX = 16384  # features a program keeps in registers (NVLM's K = 12800: 16384 wide, 32 warps)
_LN_LOOP_BLOCK = 4096  # features per step over wider rows


def _act_grid(numel: int) -> tuple[int]:
    return (triton.cdiv(numel, _ACT_BLOCK),)


def _ln_fwd_config(k: int) -> tuple[int, int, bool, int]:
    """(BLOCK_R, BLOCK_K, ONE_TILE, num_warps) of ``_ln_fwd_kernel`` for K features: whole rows in
    registers up to 16384 features, several rows per program when they are short (about 8192
    elements per program; up to 64 rows through the interpreter, which pays per program)."""
    return _ln_fwd_config_gpu(k, 64 if _INTERPRET else 16)


def _ln_fwd_config_gpu(k: int, max_rows: int = 16) -> tuple[int, int, bool, int]:
    width = triton.next_power_of_2(k)
    if width > _LN_ONE_TILE_MAX:
        return (max_rows if max_rows > 16 else 1), _LN_LOOP_BLOCK, False, 8
    rows = max(1, min(max_rows, 8192 // width))
    # 16 elements per thread: 62 registers at K = 12800 (1024 threads); 32 per thread take 121,
    # which halves the warps an SM holds for this latency-bound row reduction
    return rows, width, True, max(4, min(32, rows * width // 512))


def _ln_fwd_grid(m: int, k: int) -> tuple[int]:
    return (triton.cdiv(m, _ln_fwd_config(k)[0]),)


def launch_grids(m: int, k: int, n1: int) -> dict[str, tuple[int, ...]]:
    """The grid of every launch for M projector rows, K features and N1 hidden units (the GEMM at
    its smallest tile, i.e. its largest grid)."""
    block_m, block_n = min((c[0] * c[1], c[0], c[1]) for e in GEMM_TABLE.values() for c in e)[1:]
    return {
        "ln_stats": _rows_grid(m),
        "ln_linear": _gemm_grid(m, n1, block_m, block_n),
        "act_bwd": _act_grid(m * n1),
        "ln_apply": _tile_grid(m, k, _TILE),
        "ln_bwd_rowsum": _rows_grid(m),
        "ln_bwd": _tile_grid(m, k, _TILE_BWD),
        "ln_fwd": _ln_fwd_grid(m, k),
    }


def _ln_stats(x, geo, k, eps, r, v2):
    m = geo["M"]
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m:
        block_k = min(triton.next_power_of_2(k), 4096 if _INTERPRET else 1024)
        _ln_stats_kernel[_rows_grid(m)](
            x, mean, rstd, m, k, *_geo_args(geo), eps, *_x_args(x),
            R=r, V2=v2, BLOCK_R=_ROW_BLOCK, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip
    return mean, rstd


def projector_fwd(x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, r, v2, cls, save_for_backward):
    """(out [N, L_out, N_out], mean [M] or empty, rstd [M] or empty, pre-activation [M, N1] or empty)."""
    with device_guard(x):
        ln_weight, ln_bias, b1 = _unit_stride(ln_weight, ln_bias, b1)
        geo = _geometry(x, r, cls)
        m = geo["M"]
        k = w1.shape[1]
        n1 = w1.shape[0]
        empty = x.new_empty(0)
        has_ln = ln_weight is not None
        if has_ln:
            mean, rstd = _ln_stats(x, geo, k, eps, r, v2)
        else:  # distinct placeholders: a custom op's outputs must not alias each other
            mean, rstd = x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
        two_layer = w2 is not None
        act = ACTIVATIONS[activation] if two_layer else 0
        pre = x.new_empty((m, n1)) if (two_layer and save_for_backward) else x.new_empty(0)
        hidden = x.new_empty((m, n1))
        if m:
            grid = lambda meta: _gemm_grid(m, n1, meta["BLOCK_M"], meta["BLOCK_N"])  # noqa: E731
            _ln_linear_kernel[grid](
                x, w1, b1 if b1 is not None else empty, mean, rstd,
                ln_weight if has_ln else empty, ln_bias if ln_bias is not None else empty, pre, hidden,
                m, n1, k, triton.next_power_of_2(max(m, 16)), *_geo_args(geo), *_x_args(x), w1.stride(0), w1.stride(1),
                HAS_LN=has_ln, HAS_BETA=ln_bias is not None, HAS_BIAS=b1 is not None, ACT=act,
                WRITE_PRE=pre.numel() > 0, R=r, V2=v2, GROUP=GROUP_M,
            )  # fmt: skip
        out = F.linear(hidden, w2, b2) if two_layer else hidden
        return out.view(x.shape[0], geo["L_out"], out.shape[-1]), mean, rstd, pre


def _ln_apply(x, geo, ln_weight, ln_bias, mean, rstd, k, r, v2):
    m = geo["M"]
    z = x.new_empty((m, k))
    if m:
        empty = x.new_empty(0)
        _ln_apply_kernel[_tile_grid(m, k, _TILE)](
            x, mean, rstd, ln_weight if ln_weight is not None else empty, ln_bias if ln_bias is not None else empty,
            z, m, k, *_geo_args(geo), *_x_args(x),
            HAS_LN=ln_weight is not None, HAS_BETA=ln_bias is not None, R=r, V2=v2,
            BLOCK_R=_TILE[0], BLOCK_K=_TILE[1], num_warps=4,
        )  # fmt: skip
    return z


def _gather_ln_bwd(dz, x, geo, ln_weight, has_beta, mean, rstd, r, v2, need_x, need_g, need_b):
    """dx (scattered back through the shuffle; CLS rows get zeros), dγ, dβ from dz [M, K] (contiguous)
    = the gradient of the gathered LayerNorm output (or of the gathered rows, without LayerNorm)."""
    m, k = dz.shape
    dx = dgamma = dbeta = None
    has_ln = ln_weight is not None
    partials = has_ln and (need_g or need_b)
    if not (need_x or partials):
        return dx, dgamma, dbeta
    grid = _tile_grid(m, k, _TILE_BWD)
    empty = x.new_empty(0)
    s1 = s2 = empty.float()
    if need_x and has_ln and m:
        s1 = torch.empty(m, device=x.device, dtype=torch.float32)
        s2 = torch.empty_like(s1)
        _ln_bwd_rowsum_kernel[_rows_grid(m)](
            x, mean, rstd, ln_weight, dz, s1, s2, m, k, *_geo_args(geo), *_x_args(x),
            R=r, V2=v2, BLOCK_R=_ROW_BLOCK, BLOCK_K=min(triton.next_power_of_2(k), 1024), num_warps=4,
        )  # fmt: skip
    # Rows a shuffle never reads (CLS) get zeros; every other element is written exactly once.
    if need_x:
        dx = (torch.zeros_like if geo["cls"] else torch.empty_like)(x, memory_format=torch.contiguous_format)
    part_g = torch.empty((grid[0], k), device=x.device, dtype=torch.float32) if partials else empty.float()
    part_b = torch.empty_like(part_g) if partials else empty.float()
    if m:
        _ln_bwd_kernel[grid](
            x, mean, rstd, ln_weight if has_ln else empty, dz, s1, s2, dx if need_x else empty, part_g, part_b,
            m, k, *_geo_args(geo), *_x_args(x), *(dx.stride() if need_x else (0, 0, 0)),
            HAS_LN=has_ln, WRITE_DX=need_x, PARTIALS=partials, R=r, V2=v2,
            BLOCK_R=_TILE_BWD[0], BLOCK_K=_TILE_BWD[1], num_warps=4,
        )  # fmt: skip
    if partials:
        dgamma = part_g.sum(0).to(ln_weight.dtype) if need_g else None
        dbeta = part_b.sum(0).to(ln_weight.dtype) if (need_b and has_beta) else None
    return dx, dgamma, dbeta


def projector_bwd(grad_out, x, ln_weight, ln_bias, w1, w2, b1, b2, mean, rstd, pre, eps, activation, r, v2, cls, needs):
    """Gradients (dx, dγ, dβ, dW1, dW2, db1, db2); ``needs`` says which are wanted (others: None)."""
    need_x, need_g, need_b, need_w1, need_w2, need_b1, need_b2 = needs
    with device_guard(x):
        ln_weight, ln_bias = _unit_stride(ln_weight, ln_bias)
        geo = _geometry(x, r, cls)
        m, k = geo["M"], w1.shape[1]
        dy = grad_out.reshape(m, grad_out.shape[-1]).to(x.dtype)
        dw2 = db2 = None
        if w2 is not None:
            dh = dy @ w2  # [M, N1]: dA, turned into dH in place below
            a = torch.empty_like(dh) if need_w2 else dh.new_empty(0)
            if dh.numel():
                _act_bwd_kernel[_act_grid(dh.numel())](
                    pre, dh, a, dh.numel(), ACT=ACTIVATIONS[activation], WRITE_A=need_w2, BLOCK=_ACT_BLOCK,
                    num_warps=4,
                )  # fmt: skip
            if need_w2:
                dw2 = dy.t() @ a
            del a
            if need_b2:
                db2 = dy.sum(0, dtype=torch.float32).to(x.dtype)
        else:
            dh = dy
        db1 = dh.sum(0, dtype=torch.float32).to(x.dtype) if need_b1 else None
        dw1 = None
        if need_w1:
            dw1 = dh.t() @ _ln_apply(x, geo, ln_weight, ln_bias, mean, rstd, k, r, v2)
        dx = dgamma = dbeta = None
        if need_x or (ln_weight is not None and (need_g or need_b)):
            dx, dgamma, dbeta = _gather_ln_bwd(
                dh @ w1, x, geo, ln_weight, ln_bias is not None, mean, rstd, r, v2, need_x, need_g, need_b
            )
        return dx, dgamma, dbeta, dw1, dw2, db1, db2


# --------------------------------------------------------------------------------------------------
# the unfused backend's gather + LayerNorm step (nvlm_kernels/mlp_projector/unfused.py)


def gather_layer_norm(x, ln_weight, ln_bias, eps, r, v2, cls):
    """(z [M, K] = LayerNorm(drop CLS, pixel-shuffle x) in x's dtype, mean [M], rstd [M] float32):
    one launch of ``_ln_fwd_kernel``."""
    with device_guard(x):
        ln_weight, ln_bias = _unit_stride(ln_weight, ln_bias)
        geo = _geometry(x, r, cls)
        m, k = geo["M"], geo["C"] * r * r
        z = x.new_empty((m, k))
        mean = torch.empty(m, device=x.device, dtype=torch.float32)
        rstd = torch.empty(m, device=x.device, dtype=torch.float32)
        if m:
            block_r, block_k, one_tile, warps = _ln_fwd_config(k)
            _ln_fwd_kernel[_ln_fwd_grid(m, k)](
                x, ln_weight, ln_bias if ln_bias is not None else x.new_empty(0), z, mean, rstd,
                m, k, *_geo_args(geo), eps, *_x_args(x),
                HAS_BETA=ln_bias is not None, R=r, V2=v2, ONE_TILE=one_tile, BLOCK_R=block_r, BLOCK_K=block_k,
                num_warps=warps,
            )  # fmt: skip
        return z, mean, rstd


def gather_layer_norm_bwd(dz, x, ln_weight, ln_bias, mean, rstd, r, v2, cls, needs):
    """(dx, dγ, dβ) of ``gather_layer_norm`` from dz [M, K]; ``needs`` = (dx?, dγ?, dβ?)."""
    with device_guard(x):
        (ln_weight,) = _unit_stride(ln_weight)
        geo = _geometry(x, r, cls)
        return _gather_ln_bwd(dz.contiguous(), x, geo, ln_weight, ln_bias is not None, mean, rstd, r, v2, *needs)


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation (tools/triton_aot.py)


def _signature(fn, dtype: str, fp32: set[str], n_pointers: int) -> dict:
    signature = {}
    for i, name in enumerate(fn.arg_names):
        if i < n_pointers:
            signature[name] = "*fp32" if name in fp32 else f"*{dtype}"
        elif name == "eps":
            signature[name] = "fp32"
        elif not name.isupper() or name in ("M", "N", "K", "C", "M_BUCKET", "L_out"):
            signature[name] = "i32"
    return signature


def aot_specs() -> list[dict]:
    """Every GEMM configuration on its architecture at NVLM's shape (gathered input [N, 1025, 3200]
    with the CLS row dropped and a 0.5 shuffle, LayerNorm with bias, exact GELU, writing the
    pre-activation), bf16 and fp16; then the row and elementwise kernels."""
    fp32 = {"Mean", "Rstd", "S1", "S2", "PartGamma", "PartBeta"}  # the 6 pointers of _ln_fwd_kernel: X..Rstd
    specs = []
    fn = _ln_linear_kernel.fn
    strides = [a for a in fn.arg_names if a.startswith("stride_") and a not in ("stride_xc", "stride_wk")]
    shuffle = {"R": 2, "V2": True, "stride_xc": 1, "stride_wk": 1}
    for hopper, configs in GEMM_TABLE.items():
        for m, n, k, w, stages in configs:
            for dtype in ("bf16", "fp16"):
                specs.append(
                    {
                        "name": f"projector_ln_linear[{dtype},{m}x{n}x{k}w{w}s{stages}]",
                        "fn": fn,
                        "arch": 90 if hopper else 80,
                        "signature": _signature(fn, dtype, fp32, 9),
                        "constexprs": {"HAS_LN": True, "HAS_BETA": True, "HAS_BIAS": False, "ACT": 1,
                                       "WRITE_PRE": True, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k,
                                       "GROUP": GROUP_M, **shuffle},
                        "divisible_by_16": list(fn.arg_names[:9]) + strides + ["K", "N", "C"],
                        "num_warps": w,
                        "num_stages": stages,
                        "expect_ptx": {90: ["wgmma"], 80: ["mma.sync"]},
                    }
                )  # fmt: skip
    plain = [
        ("ln_stats", _ln_stats_kernel, 3, {"BLOCK_R": _ROW_BLOCK, "BLOCK_K": 1024}),
        ("act_bwd", _act_bwd_kernel, 3, {"ACT": 1, "WRITE_A": True, "BLOCK": 1024}),
        ("ln_apply", _ln_apply_kernel, 6, {"HAS_LN": True, "HAS_BETA": True, "BLOCK_R": _TILE[0],
                                           "BLOCK_K": _TILE[1]}),
        ("ln_bwd_rowsum", _ln_bwd_rowsum_kernel, 7, {"BLOCK_R": _ROW_BLOCK, "BLOCK_K": 1024}),
        ("ln_bwd", _ln_bwd_kernel, 10, {"HAS_LN": True, "WRITE_DX": True, "PARTIALS": True,
                                        "BLOCK_R": _TILE_BWD[0], "BLOCK_K": _TILE_BWD[1]}),
    ]  # fmt: skip
    # the unfused backend's gather + LayerNorm: NVLM's K = 12800 in registers, and the looped form
    for label, k in (("ln_fwd", 12800), ("ln_fwd_loop", 4 * _LN_ONE_TILE_MAX)):
        rows, block_k, one_tile, warps = _ln_fwd_config_gpu(k)
        constexprs = {"HAS_BETA": True, "ONE_TILE": one_tile, "BLOCK_R": rows, "BLOCK_K": block_k}
        plain.append((label, _ln_fwd_kernel, 6, constexprs, warps))
    for name, fn, n_pointers, constexprs, *warps in plain:
        names = fn.arg_names
        flags = {"R": 2, "V2": True} if "R" in names else {}
        units = {a: 1 for a in ("stride_xc", "stride_dc") if a in names}
        strides = [a for a in names if a.startswith("stride_") and a not in units]
        for dtype in ("bf16", "fp16"):
            specs.append(
                {
                    "name": f"projector_{name}[{dtype}]",
                    "fn": fn,
                    "signature": _signature(fn, dtype, fp32, n_pointers),
                    "constexprs": {**constexprs, **flags, **units},
                    "divisible_by_16": list(names[:n_pointers]) + strides,
                    "num_warps": warps[0] if warps else 4,
                }
            )
    return specs
