"""Triton kernels for tile-batched ViT attention (FlashAttention-2 style), with an optional fused
full-width QK-RMSNorm.

Layout [T, S, H, D] through explicit strides (a fused QKV projection's output needs no copy).
Forward: one program per (block of BLOCK_M queries, tile·head), all on grid axis 0 with the block
index fastest (``_device.flat_grid``; axis 1 would cap T·H at 65535, about 2622 tiles of 25 heads);
keys and values stream through in BLOCK_N blocks with an online softmax in float32 on exp2 (the
scale is folded with log2 e); full key blocks run unmasked and only the tail block (S = 1025 is not
a multiple of any block) is masked. Saved for the backward: the base-2 log-sum-exp of each row.

Backward (recompute with the saved log-sum-exp): delta = rowsum(dO ⊙ O); one kernel per key block
makes dK and dV by walking the query blocks, one per query block makes dQ by walking the key blocks.

QK-norm: InternViT-6B normalizes q and k with one RMSNorm over all H·D features of a token (over
the first ``norm_features`` only when NVLM's checkpoint pads dummy heads). q, k, v come as views of
one fused qkv or as three projections' outputs (``*_split_*``), read in place either way. A first kernel writes
only the per-token reciprocal RMS of q and k ([T, S] float32 each); the attention kernels then
normalize q and k as they load them (x · rstd · weight), so no normalized copy is written. In the
backward, the attention kernels give the gradients of the normalized q and k (float32), and a
row kernel turns them into gradients of the raw q, k and of the two weights.

Every launcher enters the tensors' CUDA device first (Triton launches on the current device).
Offsets are int64. bf16 is exact only on a GPU (the Triton interpreter computes bf16 wrongly).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nvlm_kernels._backend import autotune_configs, triton_interpreter_enabled
from nvlm_kernels._device import device_guard, flat_grid

LOG2E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

_INTERPRET = triton_interpreter_enabled()


# Block configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and per
# (Hopper?, head-dim bucket, QK_NORM): only configurations that compile without register spills
# or a stack frame on that architecture with triton 3.6 and 3.8 (`make triton-aot` compiles every
# entry, through aot_specs() below). D = 80 and 96 run with BLOCK_D = 128 and share its bucket.
FWD_TABLE = {
    (True, 128, False): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 2), (128, 128, 8, 2)],
    (True, 128, True): [(128, 64, 8, 3), (64, 128, 8, 2), (128, 128, 8, 2)],
    (True, 64, False): [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    (True, 64, True): [(128, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    (False, 128, False): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3)],
    (False, 128, True): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3)],
    (False, 64, False): [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    (False, 64, True): [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
}
DKDV_TABLE = {
    (True, 128, False): [(64, 128, 8, 2), (64, 64, 8, 2)],
    (True, 128, True): [(64, 64, 8, 2), (32, 64, 4, 2)],
    (True, 64, False): [(64, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2)],
    (True, 64, True): [(64, 128, 8, 2), (64, 64, 4, 3)],  # 128x64w8s2 spills since the flat grid
    (False, 128, False): [(128, 64, 8, 2), (64, 64, 8, 2)],
    (False, 128, True): [(128, 64, 8, 2), (64, 64, 8, 2)],
    (False, 64, False): [(32, 128, 4, 2), (32, 64, 4, 2)],
    (False, 64, True): [(32, 64, 4, 2)],
}
DQ_TABLE = {
    (True, 128, False): [(128, 64, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)],
    (True, 128, True): [(128, 64, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3)],
    (True, 64, False): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    (True, 64, True): [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    (False, 128, False): [(64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2)],
    (False, 128, True): [(64, 64, 4, 3), (64, 128, 8, 2), (64, 64, 8, 2)],
    (False, 64, False): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
    (False, 64, True): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
}
# Under the interpreter: one pinned config (its autotuner cannot time several), big blocks
# because its cost is per program.
INTERPRETER_CONFIG = (128, 128, 4, 1)


def _head_dim_bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def _as_config(entry: tuple[int, int, int, int]) -> triton.Config:
    m, n, w, s = entry
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _autotune_configs(table: dict) -> list[triton.Config]:
    if _INTERPRET:
        return [_as_config(INTERPRETER_CONFIG)]
    entries = list(dict.fromkeys(e for configs in table.values() for e in configs))
    return [_as_config(e) for e in entries]


def _pruner(table: dict):
    """Keeps the configurations of ``table`` for this GPU, head dim and QK_NORM."""

    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 128))
        qk_norm = bool(kwargs.get("QK_NORM", named_args.get("QK_NORM", False)))
        hopper = torch.cuda.get_device_capability()[0] >= 9
        allowed = set(table[(hopper, _head_dim_bucket(head_dim), qk_norm)])
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return autotune_configs(keep or configs[:1])

    return prune


@triton.jit
def _load_block(base, rows, stride_s, offs_d, stride_d, row_mask, d_mask):
    """[len(rows), BLOCK_D] rows of a [S, D] head slice (padded rows and columns read as 0)."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _block_tile_head(S, H, BLOCK: tl.constexpr):
    """(block, t, h) of this program in a ``flat_grid(cdiv(S, BLOCK), T·H)`` launch (program id =
    (t·H + h) · blocks + block); t and h as int64 for the offsets.

    With a 2-D grid the compiler read the block and the tile·head straight from the (non-negative)
    block indices; here they come from divisions. Telling it S is positive (the launchers never
    launch otherwise) keeps the decode as cheap, and ``_block_tile_head_again`` recomputes it after
    the main loop: without both, the largest configurations of the tables grew a stack frame
    (tools/triton_aot.py)."""
    tl.assume(S > 0)
    pid = tl.program_id(0)
    blocks = tl.cdiv(S, BLOCK)
    pid_th = pid // blocks
    return pid % blocks, (pid_th // H).to(tl.int64), (pid_th % H).to(tl.int64)


@triton.jit
def _block_tile_head_again(S, H, BLOCK: tl.constexpr):
    """``_block_tile_head`` computed another way, so that the compiler does not merge the two and
    keep the first alive through the main loop: the stores after the loop use this one."""
    pid = tl.program_id(0)
    per_tile = tl.cdiv(S, BLOCK) * H
    t = pid // per_tile
    rest = pid - t * per_tile
    h = rest // tl.cdiv(S, BLOCK)
    return rest - h * tl.cdiv(S, BLOCK), t.to(tl.int64), h.to(tl.int64)


@triton.jit
def _prescale(x, RSTD, rstd_base, rows, row_mask, WA, WB, w_base, offs_d, d_mask):
    """x · rstd[row] · wa[d] · wb[d] in float32, rounded once to x's dtype.

    With QK-norm, q_n·k_n = rstd_q·rstd_k·Σ_d q·w_q·w_k·k: a program scales its own block of q (or
    of k) by its rows' rstd and by both weights once, and multiplies each score column by the
    streamed rows' rstd. Streamed blocks are used as loaded, which keeps the inner loops as light
    (in registers and work) as without the norm."""
    r = tl.load(RSTD + rstd_base + rows, mask=row_mask, other=0.0)
    wa = tl.load(WA + w_base + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    wb = tl.load(WB + w_base + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    return (x.to(tl.float32) * r[:, None] * (wa * wb)[None, :]).to(x.dtype)


@triton.autotune(
    configs=_autotune_configs(FWD_TABLE),
    key=["S", "HEAD_DIM", "QK_NORM"],
    prune_configs_by={"early_config_prune": _pruner(FWD_TABLE)},
)
@triton.jit
def _vit_attn_fwd_kernel(
    Q, K, V, Out, Lse, RstdQ, RstdK, Wq, Wk,
    stride_qt, stride_qs, stride_qh, stride_qd,
    stride_kt, stride_ks, stride_kh, stride_kd,
    stride_vt, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_os, stride_oh, stride_od,
    H, S, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m, t, h = _block_tile_head(S, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S
    d_mask = offs_d < HEAD_DIM
    rstd_base = t * S
    q = _load_block(Q + t * stride_qt + h * stride_qh, offs_m, stride_qs, offs_d, stride_qd, m_mask, d_mask)
    if QK_NORM:
        q = _prescale(q, RstdQ, rstd_base, offs_m, m_mask, Wq, Wk, h * HEAD_DIM, offs_d, d_mask)
    k_base = K + t * stride_kt + h * stride_kh
    v_base = V + t * stride_vt + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = (S // BLOCK_N) * BLOCK_N
    for start_n in range(0, S, BLOCK_N):
        rows = start_n + offs_n
        n_mask = rows < S
        k = _load_block(k_base, rows, stride_ks, offs_d, stride_kd, n_mask, d_mask)
        v = _load_block(v_base, rows, stride_vs, offs_d, stride_vd, n_mask, d_mask)
        qk = tl.dot(q, tl.trans(k))
        if QK_NORM:
            qk *= tl.load(RstdK + rstd_base + rows, mask=n_mask, other=0.0)[None, :]
        qk *= qk_scale
        if start_n >= full_end:  # only the tail block (S = 1025 is no block multiple) is masked
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    pid_m, t, h = _block_tile_head_again(S, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < S
    o_ptrs = Out + t * stride_ot + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_os
    o_ptrs += offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(Lse + (t * H + h) * S + offs_m, m_i + tl.math.log2(l_i), mask=m_mask)


@triton.autotune(
    configs=_autotune_configs(DKDV_TABLE),
    key=["S", "HEAD_DIM", "QK_NORM"],
    prune_configs_by={"early_config_prune": _pruner(DKDV_TABLE)},
)
@triton.jit
def _vit_attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, RstdQ, RstdK, Wq, Wk,
    stride_qt, stride_qs, stride_qh, stride_qd,
    stride_kt, stride_ks, stride_kh, stride_kd,
    stride_vt, stride_vs, stride_vh, stride_vd,
    stride_dot, stride_dos, stride_doh, stride_dod,
    stride_gt, stride_gs, stride_gh, stride_gd,
    H, S, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK, dV of one block of BLOCK_N keys: walk every query block. DK and DV share the strides
    stride_g* (both are fresh [T, S, H, D] tensors). With QK_NORM, dK is the gradient of the
    normalized k."""
    pid_n, t, h = _block_tile_head(S, H, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < S
    d_mask = offs_d < HEAD_DIM
    rstd_base = t * S
    k = _load_block(K + t * stride_kt + h * stride_kh, offs_n, stride_ks, offs_d, stride_kd, n_mask, d_mask)
    if QK_NORM:
        k = _prescale(k, RstdK, rstd_base, offs_n, n_mask, Wk, Wq, h * HEAD_DIM, offs_d, d_mask)
    v = _load_block(V + t * stride_vt + h * stride_vh, offs_n, stride_vs, offs_d, stride_vd, n_mask, d_mask)
    q_base = Q + t * stride_qt + h * stride_qh
    do_base = DO + t * stride_dot + h * stride_doh
    row_base = (t * H + h) * S
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, S, BLOCK_M):
        rows = start_m + offs_m
        m_mask = rows < S
        q = _load_block(q_base, rows, stride_qs, offs_d, stride_qd, m_mask, d_mask)
        do = _load_block(do_base, rows, stride_dos, offs_d, stride_dod, m_mask, d_mask)
        lse = tl.load(Lse + row_base + rows, mask=m_mask, other=float("inf"))  # padded rows: p = 0
        delta = tl.load(Delta + row_base + rows, mask=m_mask, other=0.0)
        qk_t = tl.dot(k, tl.trans(q))  # [BLOCK_N, BLOCK_M]
        if QK_NORM:
            r = tl.load(RstdQ + rstd_base + rows, mask=m_mask, other=0.0)
            qk_t *= r[None, :]
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        if QK_NORM:
            ds_t *= r[None, :]
        dk += tl.dot(ds_t.to(q.dtype), q)
    pid_n, t, h = _block_tile_head_again(S, H, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < S
    if QK_NORM:
        dk *= tl.load(Wq + h * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    dk *= sm_scale
    out_offsets = t * stride_gt + h * stride_gh + offs_n.to(tl.int64)[:, None] * stride_gs + offs_d[None, :] * stride_gd
    out_mask = n_mask[:, None] & d_mask[None, :]
    tl.store(DK + out_offsets, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.autotune(
    configs=_autotune_configs(DQ_TABLE),
    key=["S", "HEAD_DIM", "QK_NORM"],
    prune_configs_by={"early_config_prune": _pruner(DQ_TABLE)},
)
@triton.jit
def _vit_attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, RstdQ, RstdK, Wq, Wk,
    stride_qt, stride_qs, stride_qh, stride_qd,
    stride_kt, stride_ks, stride_kh, stride_kd,
    stride_vt, stride_vs, stride_vh, stride_vd,
    stride_dot, stride_dos, stride_doh, stride_dod,
    stride_gt, stride_gs, stride_gh, stride_gd,
    H, S, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ of one block of BLOCK_M queries: walk every key block. With QK_NORM, dQ is the gradient
    of the normalized q."""
    pid_m, t, h = _block_tile_head(S, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S
    d_mask = offs_d < HEAD_DIM
    rstd_base = t * S
    q = _load_block(Q + t * stride_qt + h * stride_qh, offs_m, stride_qs, offs_d, stride_qd, m_mask, d_mask)
    if QK_NORM:
        q = _prescale(q, RstdQ, rstd_base, offs_m, m_mask, Wq, Wk, h * HEAD_DIM, offs_d, d_mask)
    do = _load_block(DO + t * stride_dot + h * stride_doh, offs_m, stride_dos, offs_d, stride_dod, m_mask, d_mask)
    row_base = (t * H + h) * S
    lse = tl.load(Lse + row_base + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=m_mask, other=0.0)
    k_base = K + t * stride_kt + h * stride_kh
    v_base = V + t * stride_vt + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, S, BLOCK_N):
        rows = start_n + offs_n
        n_mask = rows < S
        k = _load_block(k_base, rows, stride_ks, offs_d, stride_kd, n_mask, d_mask)
        v = _load_block(v_base, rows, stride_vs, offs_d, stride_vd, n_mask, d_mask)
        qk = tl.dot(q, tl.trans(k))
        if QK_NORM:
            r = tl.load(RstdK + rstd_base + rows, mask=n_mask, other=0.0)
            qk *= r[None, :]
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if QK_NORM:
            ds *= r[None, :]
        dq += tl.dot(ds.to(k.dtype), k)
    pid_m, t, h = _block_tile_head_again(S, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < S
    if QK_NORM:
        dq *= tl.load(Wk + h * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    dq *= sm_scale
    dq_ptrs = DQ + t * stride_gt + h * stride_gh + offs_m.to(tl.int64)[:, None] * stride_gs
    dq_ptrs += offs_d[None, :] * stride_gd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _vit_attn_bwd_delta_kernel(
    Out, DO, Delta,
    stride_ot, stride_os, stride_oh, stride_od,
    stride_dot, stride_dos, stride_doh, stride_dod,
    H, S,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta[t, h, s] = Σ_d O·dO (float32): the row term of the softmax backward."""
    pid_m, t, h = _block_tile_head(S, H, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = rows < S
    d_mask = offs_d < HEAD_DIM
    o = _load_block(Out + t * stride_ot + h * stride_oh, rows, stride_os, offs_d, stride_od, m_mask, d_mask)
    do = _load_block(DO + t * stride_dot + h * stride_doh, rows, stride_dos, offs_d, stride_dod, m_mask, d_mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (t * H + h) * S + rows, delta, mask=m_mask)


@triton.jit
def _rms_rstd_kernel(
    X, Rstd, stride_xt, stride_xs, S, total_rows, eps,
    NORM_FEATURES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """rstd[t, s] = 1 / sqrt(mean(x[t, s, :NORM_FEATURES]²) + eps) for BLOCK_R token rows (features
    contiguous: X is the q or k slice of the fused QKV output)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < total_rows
    t = (rows // S).to(tl.int64)
    s = (rows % S).to(tl.int64)
    base = t * stride_xt + s * stride_xs
    offs_f = tl.arange(0, BLOCK_F)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, NORM_FEATURES, BLOCK_F):
        f = start + offs_f
        x = tl.load(X + base[:, None] + f[None, :], mask=row_mask[:, None] & (f < NORM_FEATURES)[None, :], other=0.0)
        x = x.to(tl.float32)
        total += tl.sum(x * x, 1)
    tl.store(Rstd + rows, 1.0 / tl.sqrt(total / NORM_FEATURES + eps), mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    X, G, Rstd, W, DX, DWPartial,
    stride_xt, stride_xs, stride_dt, stride_ds, S, total_rows, norm_features,
    WIDTH: tl.constexpr, BLOCK_F: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    """Gradients through x_n = x · rstd · w for ROWS_PER_PROGRAM token rows, given G = dL/dx_n
    (float32, [T·S, WIDTH] contiguous): dx = rstd·(g⊙w) − [f < norm_features]·x·rstd³·Σ(g⊙w⊙x)/n,
    and this program's part of dw = Σ_rows g ⊙ x ⊙ rstd."""
    pid = tl.program_id(0)
    offs_f = tl.arange(0, BLOCK_F)
    f_mask = offs_f < WIDTH
    in_norm = offs_f < norm_features
    w = tl.load(W + offs_f, mask=f_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_F], dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = pid * ROWS_PER_PROGRAM + i
        if row < total_rows:
            t = (row // S).to(tl.int64)
            s = (row % S).to(tl.int64)
            x = tl.load(X + t * stride_xt + s * stride_xs + offs_f, mask=f_mask, other=0.0).to(tl.float32)
            g = tl.load(G + row.to(tl.int64) * WIDTH + offs_f, mask=f_mask, other=0.0)
            r = tl.load(Rstd + row)
            gw = g * w
            dot = tl.sum(gw * x, 0)
            dx = r * gw - tl.where(in_norm, x * (r * r * r) * dot / norm_features, 0.0)
            tl.store(DX + t * stride_dt + s * stride_ds + offs_f, dx.to(DX.dtype.element_ty), mask=f_mask)
            dw += g * x * r
    tl.store(DWPartial + pid.to(tl.int64) * WIDTH + offs_f, dw, mask=f_mask)


# --------------------------------------------------------------------------------------------------
# launchers


def _block_d(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim)


def attention_grid(T: int, S: int, H: int, block: str):
    """The launch grid of an attention kernel (forward, dK/dV, dQ, delta): one program per (block of
    ``meta[block]`` rows, tile·head), all on axis 0 (``_device.flat_grid``; the kernels recover the
    block, tile and head with ``_block_tile_head``). A function of the autotuner's meta-parameters."""
    return lambda meta: flat_grid(triton.cdiv(S, meta[block]), T * H)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    norm: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [T, S, H, D] (contiguous) and the base-2 log-sum-exp [T, H, S] (float32). ``norm`` =
    (rstd_q, rstd_k, w_q, w_k) normalizes q and k on load."""
    T, S, H, D = q.shape
    out = torch.empty((T, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((T, H, S), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    rstd_q, rstd_k, w_q, w_k = norm if norm is not None else (lse, lse, lse, lse)  # unused placeholders
    with device_guard(q):
        _vit_attn_fwd_kernel[attention_grid(T, S, H, "BLOCK_M")](
            q, k, v, out, lse, rstd_q, rstd_k, w_q, w_k,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, S, scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=_block_d(D), QK_NORM=norm is not None,
        )  # fmt: skip
    return out, lse


def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    norm: tuple | None = None,
    grad_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv [T, S, H, D]. With ``norm`` the q and k gradients are those of the normalized q
    and k, in ``grad_dtype`` (float32 for the norm backward)."""
    T, S, H, D = q.shape
    qk_dtype = grad_dtype or q.dtype
    dq = torch.empty((T, S, H, D), dtype=qk_dtype, device=q.device)
    dk = torch.empty((T, S, H, D), dtype=qk_dtype, device=q.device)
    dv = torch.empty((T, S, H, D), dtype=v.dtype, device=q.device)
    if T == 0:
        return dq, dk, dv
    delta = torch.empty((T, H, S), dtype=torch.float32, device=q.device)
    rstd_q, rstd_k, w_q, w_k = norm if norm is not None else (lse, lse, lse, lse)
    common = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), QK_NORM=norm is not None)
    if dk.stride() != dv.stride():
        raise AssertionError("dk and dv must share strides")
    with device_guard(q):
        _vit_attn_bwd_delta_kernel[attention_grid(T, S, H, "BLOCK_M")](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), H, S,
            HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=_DELTA_ROWS,
        )  # fmt: skip
        _vit_attn_bwd_dkdv_kernel[attention_grid(T, S, H, "BLOCK_N")](
            q, k, v, grad_out, lse, delta, dk, dv, rstd_q, rstd_k, w_q, w_k,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(),
            H, S, scale * LOG2E, scale, **common,
        )  # fmt: skip
        _vit_attn_bwd_dq_kernel[attention_grid(T, S, H, "BLOCK_M")](
            q, k, v, grad_out, lse, delta, dq, rstd_q, rstd_k, w_q, w_k,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            H, S, scale * LOG2E, scale, **common,
        )  # fmt: skip
    return dq, dk, dv


_DELTA_ROWS = 128 if _INTERPRET else 64
_RSTD_ROWS = 128 if _INTERPRET else 16
_RSTD_FEATURES = 1024 if _INTERPRET else 512


def rms_rstd(x: torch.Tensor, eps: float, norm_features: int) -> torch.Tensor:
    """[T, S] float32 reciprocal RMS of x [T, S, F] (features contiguous) over its first norm_features."""
    T, S, _ = x.shape
    rstd = torch.empty((T, S), dtype=torch.float32, device=x.device)
    rows = T * S
    if rows:
        with device_guard(x):
            _rms_rstd_kernel[flat_grid(triton.cdiv(rows, _RSTD_ROWS), 1)](
                x, rstd, x.stride(0), x.stride(1), S, rows, eps,
                NORM_FEATURES=norm_features, BLOCK_R=_RSTD_ROWS, BLOCK_F=_RSTD_FEATURES,
            )  # fmt: skip
    return rstd


_NORM_BWD_ROWS = 64


def rms_norm_bwd(
    x: torch.Tensor,
    grad_normed: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor,
    norm_features: int,
    dx: torch.Tensor,
) -> torch.Tensor:
    """Writes dL/dx into ``dx`` [T, S, F] and returns dL/dweight [F] (float32)."""
    T, S, F = x.shape
    rows = T * S
    programs = triton.cdiv(rows, _NORM_BWD_ROWS)
    partial = torch.empty((max(programs, 1), F), dtype=torch.float32, device=x.device)
    if rows:
        with device_guard(x):
            _rms_norm_bwd_kernel[flat_grid(programs, 1)](
                x, grad_normed, rstd, weight, dx, partial,
                x.stride(0), x.stride(1), dx.stride(0), dx.stride(1), S, rows, norm_features,
                WIDTH=F, BLOCK_F=triton.next_power_of_2(F), ROWS_PER_PROGRAM=_NORM_BWD_ROWS,
                num_warps=8 if F > 2048 else 4,
            )  # fmt: skip
    else:
        partial.zero_()
    return partial.sum(0)


def _split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k, v blocks [T, S, H·D] of qkv [T, S, 3·H·D] (views, no copies)."""
    features = qkv.shape[-1] // 3
    return tuple(qkv[..., i * features : (i + 1) * features] for i in range(3))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, S, F] with unit feature stride (the norm kernels read features contiguously)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def qk_norm_attention_split_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [T, S, H·D] each (three projections' outputs, or views of one fused qkv), read in
    place through their strides."""
    q, k = _rows(q), _rows(k)
    head_dim = q.shape[-1] // num_heads
    rstd_q = rms_rstd(q, eps, norm_features)
    rstd_k = rms_rstd(k, eps, norm_features)
    norm = (rstd_q, rstd_k, q_norm_weight.contiguous(), k_norm_weight.contiguous())
    heads = (x.unflatten(-1, (num_heads, head_dim)) for x in (q, k, v))
    out, lse = attention_fwd(*heads, scale, norm=norm)
    return out, lse, rstd_q, rstd_k


def qk_norm_attention_fwd(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float,
    norm_features: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv = _rows(qkv)
    return qk_norm_attention_split_fwd(*_split(qkv), q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale)


def _qk_norm_bwd_into(grad_out, q, k, v, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, num_heads,
                      norm_features, scale, dq, dk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The attention backward (gradients of the normalized q, k in float32, and dv), then the norm
    backward writing dL/dq and dL/dk into ``dq`` and ``dk`` ([T, S, H·D], unit feature stride: fresh
    tensors or views of one dqkv). Returns (dv [T, S, H, D] contiguous, dwq, dwk)."""
    head_dim = q.shape[-1] // num_heads
    norm = (rstd_q, rstd_k, q_norm_weight, k_norm_weight)
    heads = (x.unflatten(-1, (num_heads, head_dim)) for x in (q, k, v))
    dq_normed, dk_normed, dv = attention_bwd(grad_out, *heads, out, lse, scale, norm=norm, grad_dtype=torch.float32)
    dwq = rms_norm_bwd(q, dq_normed, rstd_q, q_norm_weight, norm_features, dq)
    dwk = rms_norm_bwd(k, dk_normed, rstd_k, k_norm_weight, norm_features, dk)
    return dv, dwq.to(q_norm_weight.dtype), dwk.to(k_norm_weight.dtype)


def qk_norm_attention_split_bwd(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv [T, S, H·D] contiguous, dq_norm_weight, dk_norm_weight)."""
    q, k = _rows(q), _rows(k)
    weights = (q_norm_weight.contiguous(), k_norm_weight.contiguous())
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv, dwq, dwk = _qk_norm_bwd_into(grad_out, q, k, v, *weights, out, lse, rstd_q, rstd_k, num_heads,
                                     norm_features, scale, dq, dk)  # fmt: skip
    return dq, dk, dv.flatten(-2), dwq, dwk


def qk_norm_attention_bwd(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dqkv, dq_norm_weight, dk_norm_weight): the norm backward writes dq and dk straight into dqkv."""
    qkv = _rows(qkv)
    weights = (q_norm_weight.contiguous(), k_norm_weight.contiguous())
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    dq, dk, dv_slot = _split(dqkv)
    dv, dwq, dwk = _qk_norm_bwd_into(grad_out, *_split(qkv), *weights, out, lse, rstd_q, rstd_k, num_heads,
                                     norm_features, scale, dq, dk)  # fmt: skip
    dv_slot.copy_(dv.flatten(-2))
    return dqkv, dwq, dwk


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation (tools/triton_aot.py)


def _attention_signature(fn, dtype: str, n_tensors: int) -> dict:
    """Pointer types for the first ``n_tensors`` arguments, i32 strides and sizes, fp32 scales;
    constexprs are added by tools/triton_aot.py."""
    fp32_pointers = {"Lse", "Delta", "RstdQ", "RstdK"}
    signature = {}
    for i, name in enumerate(fn.arg_names):
        if i < n_tensors:
            signature[name] = "*fp32" if name in fp32_pointers else f"*{dtype}"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        elif name.startswith("stride_") or name in ("H", "S"):
            signature[name] = "i32"
    return signature


def aot_specs() -> list[dict]:
    """Every configuration the autotuner may pick, on the architecture it is picked for, at
    InternViT's shapes (S = 1025; D = 128 for 6B, 64 for 300M), in bf16 and fp16; then the norm
    kernels. On sm_90 the matrix products must compile to wgmma."""
    specs = []
    attention = [
        ("fwd", _vit_attn_fwd_kernel, 9, FWD_TABLE),
        ("bwd_dkdv", _vit_attn_bwd_dkdv_kernel, 12, DKDV_TABLE),
        ("bwd_dq", _vit_attn_bwd_dq_kernel, 11, DQ_TABLE),
    ]
    for name, kernel, n_tensors, table in attention:
        fn = kernel.fn  # the jit function under the autotuner
        unit = [a for a in fn.arg_names if a.startswith("stride_") and a.endswith("d")]
        divisible = list(fn.arg_names[:n_tensors]) + [
            a for a in fn.arg_names if a.startswith("stride_") and a not in unit
        ]
        for (hopper, head_dim, qk_norm), configs in table.items():
            for m, n, w, stages in configs:
                for dtype in ("bf16", "fp16"):
                    tag = f"{dtype},D{head_dim}{',norm' if qk_norm else ''},{m}x{n}w{w}s{stages}"
                    specs.append(
                        {
                            "name": f"vit_attn_{name}[{tag}]",
                            "fn": fn,
                            "arch": 90 if hopper else 80,
                            "signature": _attention_signature(fn, dtype, n_tensors),
                            "constexprs": {
                                "HEAD_DIM": head_dim, "BLOCK_D": head_dim, "QK_NORM": qk_norm,
                                "BLOCK_M": m, "BLOCK_N": n, **dict.fromkeys(unit, 1),
                            },
                            "divisible_by_16": divisible,
                            "num_warps": w,
                            "num_stages": stages,
                            "expect_ptx": {90: ["wgmma"], 80: ["mma.sync"]},
                        }
                    )  # fmt: skip
    for dtype in ("bf16", "fp16"):
        delta = _vit_attn_bwd_delta_kernel
        unit = [a for a in delta.arg_names if a.startswith("stride_") and a.endswith("d")]
        specs.append(
            {
                "name": f"vit_attn_bwd_delta[{dtype}]",
                "fn": delta,
                "signature": {"Out": f"*{dtype}", "DO": f"*{dtype}", "Delta": "*fp32", "H": "i32", "S": "i32",
                              **{a: "i32" for a in delta.arg_names if a.startswith("stride_")}},
                "constexprs": {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_M": _DELTA_ROWS, **dict.fromkeys(unit, 1)},
                "divisible_by_16": ["Out", "DO", "Delta"]
                + [a for a in delta.arg_names if a.startswith("stride_") and a not in unit],
                "num_warps": 4,
            }
        )  # fmt: skip
        specs.append(
            {
                "name": f"rms_rstd[{dtype}]",
                "fn": _rms_rstd_kernel,
                "signature": {"X": f"*{dtype}", "Rstd": "*fp32", "stride_xt": "i32", "stride_xs": "i32",
                              "S": "i32", "total_rows": "i32", "eps": "fp32"},
                "constexprs": {"NORM_FEATURES": 3200, "BLOCK_R": _RSTD_ROWS, "BLOCK_F": _RSTD_FEATURES},
                "divisible_by_16": ["X", "Rstd", "stride_xt", "stride_xs"],
                "num_warps": 4,
            }
        )  # fmt: skip
        specs.append(
            {
                "name": f"rms_norm_bwd[{dtype}]",
                "fn": _rms_norm_bwd_kernel,
                "signature": {"X": f"*{dtype}", "G": "*fp32", "Rstd": "*fp32", "W": f"*{dtype}",
                              "DX": f"*{dtype}", "DWPartial": "*fp32", "stride_xt": "i32", "stride_xs": "i32",
                              "stride_dt": "i32", "stride_ds": "i32", "S": "i32", "total_rows": "i32",
                              "norm_features": "i32"},
                "constexprs": {"WIDTH": 3200, "BLOCK_F": 4096, "ROWS_PER_PROGRAM": _NORM_BWD_ROWS},
                "divisible_by_16": ["X", "G", "Rstd", "W", "DX", "DWPartial", "stride_xt", "stride_xs",
                                    "stride_dt", "stride_ds"],
                "num_warps": 8,
            }
        )  # fmt: skip
    return specs
