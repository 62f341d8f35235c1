"""Triton kernels for gated cross-attention over per-query key ranges (FlashAttention-2 style).

Query row (b, i) attends keys [kv_start, kv_end) of its batch row (GQA: query head h reads
key/value head h // GROUP). The ranges are read through their strides (a [B, 1] slice of a [B, S]
tensor, as a decode cache keeps, or a transposed view are fine) and clamped into [0, Skv], so bad
ranges can never read outside the keys. Forward: one program per (BLOCK_M queries, batch·query head); its key
loop runs only over [min start, max end) of its rows (a block whose rows are all empty writes zeros
and stops there), and element masking happens only in blocks that some row's range does not fully
cover. Empty rows output exactly 0 (and log-sum-exp +inf, so the backward gives them no weight).
tanh(gate) scales the output in the epilogue; with autograd the ungated output is kept too (the
gate's gradient needs it when tanh(gate) = 0, its initial value).

Backward: a row kernel makes rowsum(dO ⊙ O_ungated) (the softmax term, and the gate gradient's
summand); one kernel per key block makes dK, dV by walking the query blocks that reach it (all the
query heads of its key/value head); one per query block makes dQ over its key range.

Decode (one query token per batch row, over cached image keys/values): one program per
(batch·kv head, split) holds all GROUP query heads of that kv head as its rows, so each key block is
read once for the whole group; when batch·kv heads cannot fill the GPU the key range is split
across programs and a combine kernel merges the partial softmaxes (and writes the same log-sum-exp
and ungated output as the forward, so the backward can follow either). The number of splits comes
from Skv, never from the ranges' values: a launch reads nothing back from the device.

Grids are 1-D (``_device.flat_grid``): program id = row · blocks + block, so batch·heads may exceed
CUDA's 65535 limit on grid axis 1. Autotuning keys on SQ_BUCKET / SKV_BUCKET (``seq_bucket``: powers of
two) instead of the exact lengths, so a new (text length, image tokens) pair in the same buckets
reuses the tuned configuration instead of benchmarking every one again. Every launcher enters the
tensors' CUDA device (``_device.device_guard``).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from nvlm_kernels import _device
from nvlm_kernels._backend import autotune_configs, triton_interpreter_enabled

LOG2E = math.log2(math.e)
_INTERPRET = triton_interpreter_enabled()

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (Hopper?, head-dim bucket); spill-free with
# triton 3.6 and 3.8 on that architecture (`make triton-aot` compiles every entry). None is measured
# yet. The flat 1-D grid costs the forward and dK/dV kernels a register or two: on sm_80 at D = 128,
# 128x64 w8 s3 (forward) and 32x64 w4 s2 (dK/dV) began to spill and were replaced by 128x32 w8 s3
# and 32x64 w8 s2.
FWD_TABLE = {
    (True, 128): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 8, 2)],
    (True, 64): [(128, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
    (False, 128): [(128, 32, 8, 3), (64, 128, 8, 2), (64, 64, 8, 2)],
    (False, 64): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2)],
}
DKDV_TABLE = {
    (True, 128): [(64, 64, 8, 2)],
    (True, 64): [(64, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2)],
    (False, 128): [(32, 64, 8, 2), (32, 32, 4, 2)],
    (False, 64): [(32, 64, 8, 2), (64, 32, 4, 2)],  # 32x64 w4: a stack frame with triton 3.8
}
DQ_TABLE = {
    (True, 128): [(128, 64, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3)],
    (True, 64): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (False, 128): [(64, 128, 8, 2), (64, 64, 8, 2)],
    (False, 64): [(128, 64, 8, 3), (64, 64, 4, 3)],
}
INTERPRETER_CONFIG = (64, 64, 4, 1)


def _bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


def _as_config(entry) -> triton.Config:
    m, n, w, s = entry
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def _autotune_configs(table: dict) -> list[triton.Config]:
    if _INTERPRET:
        return [_as_config(INTERPRETER_CONFIG)]
    return [_as_config(e) for e in dict.fromkeys(e for configs in table.values() for e in configs)]


def _pruner(table: dict):
    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 128))
        allowed = set(table[(torch.cuda.get_device_capability()[0] >= 9, _bucket(head_dim))])
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return autotune_configs(keep or configs[:1])

    return prune


def _autotune(table: dict):
    return triton.autotune(
        configs=_autotune_configs(table),
        key=["SQ_BUCKET", "SKV_BUCKET", "HEAD_DIM", "GROUP"],
        prune_configs_by={"early_config_prune": _pruner(table)},
    )


@triton.jit
def _load_block(base, rows, stride_s, offs_d, stride_d, row_mask, d_mask):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + offs_d[None, :] * stride_d
    return tl.load(ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)


def seq_bucket(n: int) -> int:
    """The autotuning bucket of a sequence length: the next power of two, at least 16 (lengths in
    one bucket share a tuned configuration)."""
    return triton.next_power_of_2(max(int(n), 16))


@triton.jit
def _row_ranges(Start, End, b, rows, stride_startb, stride_starts, stride_endb, stride_ends, row_mask, Skv):
    """Ranges of batch row b's query rows ``rows``, read through the ranges' own strides and
    clamped into [0, Skv] (bad input can never index out of bounds), and whether each is non-empty."""
    rows64 = rows.to(tl.int64)
    start = tl.load(Start + b * stride_startb + rows64 * stride_starts, mask=row_mask, other=0)
    end = tl.load(End + b * stride_endb + rows64 * stride_ends, mask=row_mask, other=0)
    start = tl.minimum(tl.maximum(start, 0), Skv)
    end = tl.minimum(tl.maximum(end, start), Skv)
    return start, end, row_mask & (end > start)


@_autotune(FWD_TABLE)
@triton.jit
def _xattn_fwd_kernel(
    Q, K, V, Start, End, GateTanh, Out, Ungated, Lse,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_startb, stride_starts, stride_endb, stride_ends,
    Hq, GROUP, Sq, Skv, SQ_BUCKET, SKV_BUCKET, qk_scale,
    HAS_GATE: tl.constexpr, WRITE_UNGATED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Out and Ungated share strides (both fresh [B, Sq, Hq, D] tensors). SQ_BUCKET and SKV_BUCKET
    only key the autotuner."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = rows < Sq
    d_mask = offs_d < HEAD_DIM
    start, end, nonempty = _row_ranges(
        Start, End, b, rows, stride_startb, stride_starts, stride_endb, stride_ends, m_mask, Skv
    )
    lo = tl.min(tl.where(nonempty, start, Skv), 0)
    hi = tl.max(tl.where(nonempty, end, 0), 0)
    # keys every non-empty row of the block may see: blocks inside it need no element mask
    covered_lo = tl.max(tl.where(nonempty, start, 0), 0)
    covered_hi = tl.min(tl.where(nonempty, end, Skv), 0)

    q = _load_block(Q + b * stride_qb + h * stride_qh, rows, stride_qs, offs_d, stride_qd, m_mask, d_mask)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < Skv
        k = _load_block(k_base, cols, stride_ks, offs_d, stride_kd, n_mask, d_mask)
        v = _load_block(v_base, cols, stride_vs, offs_d, stride_vd, n_mask, d_mask)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        if (start_n < covered_lo) | (start_n + BLOCK_N > covered_hi):
            allowed = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
            qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    valid = nonempty & (l_i > 0)
    out = tl.where(valid[:, None], acc / tl.where(valid, l_i, 1.0)[:, None], 0.0)
    offsets = b * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_os + offs_d[None, :] * stride_od
    out_mask = m_mask[:, None] & d_mask[None, :]
    if WRITE_UNGATED:
        tl.store(Ungated + offsets, out.to(Ungated.dtype.element_ty), mask=out_mask)
    if HAS_GATE:
        out = out * tl.load(GateTanh)
    tl.store(Out + offsets, out.to(Out.dtype.element_ty), mask=out_mask)
    lse = tl.where(valid, m_i + tl.math.log2(tl.where(valid, l_i, 1.0)), float("inf"))
    tl.store(Lse + (b * Hq + h) * Sq + rows, lse, mask=m_mask)


@triton.jit
def _xattn_bwd_rowsum_kernel(
    Ungated, DO, Rowsum,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_db, stride_ds, stride_dh, stride_dd,
    Hq, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """rowsum[b, h, i] = Σ_d O_ungated · dOut (float32)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = rows < Sq
    d_mask = offs_d < HEAD_DIM
    o = _load_block(Ungated + b * stride_ob + h * stride_oh, rows, stride_os, offs_d, stride_od, m_mask, d_mask)
    do = _load_block(DO + b * stride_db + h * stride_dh, rows, stride_ds, offs_d, stride_dd, m_mask, d_mask)
    tl.store(Rowsum + (b * Hq + h) * Sq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=m_mask)


@_autotune(DQ_TABLE)
@triton.jit
def _xattn_bwd_dq_kernel(
    Q, K, V, DO, Start, End, Lse, Delta, GateTanh, DQ,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_gb, stride_gs, stride_gh, stride_gd,
    stride_startb, stride_starts, stride_endb, stride_ends,
    Hq, GROUP, Sq, Skv, SQ_BUCKET, SKV_BUCKET, qk_scale, sm_scale,
    HAS_GATE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ of BLOCK_M query rows over their key range. DO is the gradient of the gated output;
    the ungated output's is tanh(gate) times it."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = rows < Sq
    d_mask = offs_d < HEAD_DIM
    start, end, nonempty = _row_ranges(
        Start, End, b, rows, stride_startb, stride_starts, stride_endb, stride_ends, m_mask, Skv
    )
    lo = tl.min(tl.where(nonempty, start, Skv), 0)
    hi = tl.max(tl.where(nonempty, end, 0), 0)
    covered_lo = tl.max(tl.where(nonempty, start, 0), 0)
    covered_hi = tl.min(tl.where(nonempty, end, Skv), 0)
    gate = 1.0
    if HAS_GATE:
        gate = tl.load(GateTanh)
    q = _load_block(Q + b * stride_qb + h * stride_qh, rows, stride_qs, offs_d, stride_qd, m_mask, d_mask)
    do = _load_block(DO + b * stride_db + h * stride_dh, rows, stride_ds, offs_d, stride_dd, m_mask, d_mask)
    row_base = (b * Hq + h) * Sq
    lse = tl.load(Lse + row_base + rows, mask=m_mask, other=float("inf"))  # empty rows: +inf, p = 0
    delta = tl.load(Delta + row_base + rows, mask=m_mask, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < Skv
        k = _load_block(k_base, cols, stride_ks, offs_d, stride_kd, n_mask, d_mask)
        v = _load_block(v_base, cols, stride_vs, offs_d, stride_vd, n_mask, d_mask)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        if (start_n < covered_lo) | (start_n + BLOCK_N > covered_hi):
            allowed = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v)) * gate
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq *= sm_scale
    offsets = b * stride_gb + h * stride_gh + rows.to(tl.int64)[:, None] * stride_gs + offs_d[None, :] * stride_gd
    tl.store(DQ + offsets, dq.to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@_autotune(DKDV_TABLE)
@triton.jit
def _xattn_bwd_dkdv_kernel(
    Q, K, V, DO, Start, End, Lse, Delta, GateTanh, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_gb, stride_gs, stride_gh, stride_gd,
    stride_startb, stride_starts, stride_endb, stride_ends,
    Hq, GROUP, Sq, Skv, SQ_BUCKET, SKV_BUCKET, qk_scale, sm_scale,
    HAS_GATE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK, dV of BLOCK_N keys of one key/value head: walk the query blocks whose ranges reach these
    keys, for every query head of the group. DK and DV share strides (fresh [B, Skv, Hkv, D])."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(Skv, BLOCK_N)
    pid_n = pid % num_n
    pid_bh = pid // num_n
    hkv = Hq // GROUP
    b = (pid_bh // hkv).to(tl.int64)
    hk = (pid_bh % hkv).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = cols < Skv
    d_mask = offs_d < HEAD_DIM
    block_lo = pid_n * BLOCK_N
    block_hi = block_lo + BLOCK_N
    gate = 1.0
    if HAS_GATE:
        gate = tl.load(GateTanh)
    k = _load_block(K + b * stride_kb + hk * stride_kh, cols, stride_ks, offs_d, stride_kd, n_mask, d_mask)
    v = _load_block(V + b * stride_vb + hk * stride_vh, cols, stride_vs, offs_d, stride_vd, n_mask, d_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Sq, BLOCK_M):
        rows = start_m + offs_m
        m_mask = rows < Sq
        start, end, nonempty = _row_ranges(
            Start, End, b, rows, stride_startb, stride_starts, stride_endb, stride_ends, m_mask, Skv
        )
        reach_lo = tl.min(tl.where(nonempty, start, Skv), 0)
        reach_hi = tl.max(tl.where(nonempty, end, 0), 0)
        if (reach_lo < block_hi) & (reach_hi > block_lo):  # some row of this block sees these keys
            covered = (tl.max(tl.where(nonempty, start, 0), 0) <= block_lo) & (
                tl.min(tl.where(nonempty, end, Skv), 0) >= block_hi
            )
            allowed_t = (cols[:, None] >= start[None, :]) & (cols[:, None] < end[None, :])
            for g in range(GROUP):
                h = hk * GROUP + g
                q = _load_block(Q + b * stride_qb + h * stride_qh, rows, stride_qs, offs_d, stride_qd, m_mask, d_mask)
                do = _load_block(DO + b * stride_db + h * stride_dh, rows, stride_ds, offs_d, stride_dd, m_mask, d_mask)
                row_base = (b * Hq + h) * Sq
                lse = tl.load(Lse + row_base + rows, mask=m_mask, other=float("inf"))
                delta = tl.load(Delta + row_base + rows, mask=m_mask, other=0.0)
                p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
                p_t = tl.where(allowed_t | covered, p_t, 0.0)
                dv += tl.dot(p_t.to(do.dtype), do)
                dp_t = tl.dot(v, tl.trans(do)) * gate
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q)
    dk *= sm_scale
    dv *= gate
    offsets = b * stride_gb + hk * stride_gh + cols.to(tl.int64)[:, None] * stride_gs + offs_d[None, :] * stride_gd
    out_mask = n_mask[:, None] & d_mask[None, :]
    tl.store(DK + offsets, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _xattn_decode_kernel(
    Q, K, V, Start, End, PartAcc, PartM, PartL,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_startb, stride_endb,
    Hq, GROUP, Skv, SPLITS, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One query token per batch row: the GROUP query heads of a key/value head are this
    program's rows; it covers split ``program_id(0) % SPLITS`` of the row's key range and writes
    the partial softmax state (unnormalized acc, max, sum) for the combine kernel. The ranges are
    [B, 1] (their column stride is not needed)."""
    pid = tl.program_id(0)
    split = pid % SPLITS
    pid_bk = pid // SPLITS
    hkv = Hq // GROUP
    b = (pid_bk // hkv).to(tl.int64)
    hk = (pid_bk % hkv).to(tl.int64)
    heads = hk * GROUP + tl.arange(0, BLOCK_G)
    g_mask = tl.arange(0, BLOCK_G) < GROUP
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    start = tl.minimum(tl.maximum(tl.load(Start + b * stride_startb), 0), Skv)
    end = tl.minimum(tl.maximum(tl.load(End + b * stride_endb), start), Skv)
    # this split's share of the range, in whole key blocks
    blocks = tl.cdiv(end - start, BLOCK_N)
    per_split = tl.cdiv(blocks, SPLITS)
    lo = start + split * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, end)
    q = _load_block(Q + b * stride_qb, heads, stride_qh, offs_d, stride_qd, g_mask, d_mask)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < hi
        k = _load_block(k_base, cols, stride_ks, offs_d, stride_kd, n_mask, d_mask)
        v = _load_block(v_base, cols, stride_vs, offs_d, stride_vd, n_mask, d_mask)
        qk = tl.where(n_mask[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = (b * Hq + heads.to(tl.int64)) * SPLITS + split  # [BLOCK_G]
    tl.store(PartAcc + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(PartM + part, m_i, mask=g_mask)
    tl.store(PartL + part, l_i, mask=g_mask)


@triton.jit
def _xattn_decode_combine_kernel(
    PartAcc, PartM, PartL, GateTanh, Out, Ungated, Lse,
    stride_ob, stride_oh, stride_od, Hq, SPLITS,
    HAS_GATE: tl.constexpr, WRITE_UNGATED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """Merge the splits of one (batch row, query head): out = Σ acc·2^(m - M) / Σ l·2^(m - M);
    lse = M + log2 Σ l·2^(m - M) (+inf for an empty range), as the forward kernel writes it. Out and
    Ungated share strides."""
    pid = tl.program_id(0)
    b = (pid // Hq).to(tl.int64)
    h = (pid % Hq).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    s_mask = splits < SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    base = pid.to(tl.int64) * SPLITS
    m = tl.load(PartM + base + splits, mask=s_mask, other=float("-inf"))
    total_l = tl.load(PartL + base + splits, mask=s_mask, other=0.0)
    acc_ptrs = PartAcc + (base + splits)[:, None] * HEAD_DIM + offs_d[None, :]
    acc = tl.load(acc_ptrs, mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.math.exp2(m - m_safe))
    total = tl.sum(total_l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    out = tl.where(total > 0, out, 0.0)
    offsets = b * stride_ob + h * stride_oh + offs_d * stride_od
    if WRITE_UNGATED:
        tl.store(Ungated + offsets, out.to(Ungated.dtype.element_ty), mask=d_mask)
    if HAS_GATE:
        out = out * tl.load(GateTanh)
    tl.store(Out + offsets, out.to(Out.dtype.element_ty), mask=d_mask)
    tl.store(Lse + pid, tl.where(total > 0, m_safe + tl.math.log2(tl.where(total > 0, total, 1.0)), float("inf")))


# --------------------------------------------------------------------------------------------------
# launchers


def _block_d(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim)


def _range_strides(kv_start: torch.Tensor, kv_end: torch.Tensor) -> tuple[int, int, int, int]:
    """(stride_startb, stride_starts, stride_endb, stride_ends): the kernels read the ranges through
    these, so views (a [B, 1] slice of a [B, S] cache, a transposed tensor) need no copy."""
    return (*kv_start.stride(), *kv_end.stride())


def attention_fwd(q, k, v, kv_start, kv_end, gate_tanh, scale, save_ungated: bool):
    """(out [B, Sq, Hq, D], lse [B, Hq, Sq] float32, ungated (or an empty placeholder))."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    with _device.device_guard(q):
        out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        write_ungated = save_ungated and gate_tanh is not None
        ungated = torch.empty_like(out) if write_ungated else out.new_empty((0,))
        if B * Sq == 0:
            return out, lse, ungated
        gate_arg = gate_tanh if gate_tanh is not None else lse  # unused without a gate
        _xattn_fwd_kernel[lambda meta: _device.flat_grid(triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, kv_start, kv_end, gate_arg, out, ungated if write_ungated else out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *_range_strides(kv_start, kv_end),
            Hq, Hq // Hkv, Sq, Skv, seq_bucket(Sq), seq_bucket(Skv), scale * LOG2E,
            HAS_GATE=gate_tanh is not None, WRITE_UNGATED=write_ungated, HEAD_DIM=D, BLOCK_D=_block_d(D),
        )  # fmt: skip
    return out, lse, ungated


_ROWSUM_ROWS = 64


def attention_bwd(grad_out, q, k, v, kv_start, kv_end, gate_tanh, out, lse, ungated, scale):
    """(dq, dk, dv, dgate_tanh_sum): the last is Σ O_ungated ⊙ dOut (float32 scalar tensor; the
    caller multiplies by d tanh / d gate), or an empty tensor without a gate."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    with _device.device_guard(q):
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty((B, Skv, Hkv, D), dtype=k.dtype, device=k.device)
        dv = torch.empty((B, Skv, Hkv, D), dtype=v.dtype, device=v.device)
        has_gate = gate_tanh is not None
        o_ungated = ungated if has_gate else out
        rowsum = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        if B * Sq > 0:
            _xattn_bwd_rowsum_kernel[_device.flat_grid(triton.cdiv(Sq, _ROWSUM_ROWS), B * Hq)](
                o_ungated, grad_out, rowsum, *o_ungated.stride(), *grad_out.stride(), Hq, Sq,
                HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=_ROWSUM_ROWS,
            )  # fmt: skip
        delta = rowsum * gate_tanh.float() if has_gate else rowsum
        dgate_sum = rowsum.sum() if has_gate else q.new_empty((0,), dtype=torch.float32)
        if B * Sq == 0 or Skv == 0:
            dk.zero_()
            dv.zero_()
            dq.zero_()
            return dq, dk, dv, dgate_sum
        gate_arg = gate_tanh if has_gate else rowsum
        common = dict(HAS_GATE=has_gate, HEAD_DIM=D, BLOCK_D=_block_d(D))
        ranges = _range_strides(kv_start, kv_end)
        buckets = (seq_bucket(Sq), seq_bucket(Skv))
        _xattn_bwd_dq_kernel[lambda meta: _device.flat_grid(triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, grad_out, kv_start, kv_end, lse, delta, gate_arg, dq,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *ranges,
            Hq, Hq // Hkv, Sq, Skv, *buckets, scale * LOG2E, scale, **common,
        )  # fmt: skip
        _xattn_bwd_dkdv_kernel[lambda meta: _device.flat_grid(triton.cdiv(Skv, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, grad_out, kv_start, kv_end, lse, delta, gate_arg, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *ranges,
            Hq, Hq // Hkv, Sq, Skv, *buckets, scale * LOG2E, scale, **common,
        )  # fmt: skip
    return dq, dk, dv, dgate_sum


_DECODE_BLOCK_N = 128 if _INTERPRET else 64
_MAX_SPLITS = 64


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(batch_kv_heads: int, kv_len: int, device: torch.device) -> int:
    """Key-range splits so that batch·kv heads·splits programs fill the GPU (about two per SM),
    never more than the key blocks of Skv. Only shapes decide: the ranges' values stay on the device
    (each program takes its share of its own row's range), so a decode step syncs nothing and can be
    captured in a CUDA graph."""
    if device.type != "cuda" or _INTERPRET:
        return 1 if kv_len <= 4 * _DECODE_BLOCK_N else 2  # exercised by the tests on CPU too
    wanted = triton.cdiv(2 * _sm_count(device), max(batch_kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(max(kv_len, 1), _DECODE_BLOCK_N), _MAX_SPLITS))


def attention_decode(q, k, v, kv_start, kv_end, gate_tanh, scale, save_ungated: bool = False):
    """q [B, 1, Hq, D]: one query token per batch row over its key range. Returns the forward's
    outputs: (out [B, 1, Hq, D], lse [B, Hq, 1] float32, ungated (or an empty placeholder))."""
    B, _, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    with _device.device_guard(q):
        out = torch.empty((B, 1, Hq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, 1), dtype=torch.float32, device=q.device)
        write_ungated = save_ungated and gate_tanh is not None
        ungated = torch.empty_like(out) if write_ungated else out.new_empty((0,))
        if B == 0:
            return out, lse, ungated
        splits = decode_splits(B * Hkv, Skv, q.device)
        part_acc = torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
        part_m = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
        q2 = q[:, 0]
        _xattn_decode_kernel[_device.flat_grid(splits, B * Hkv)](
            q2, k, v, kv_start, kv_end, part_acc, part_m, part_l,
            *q2.stride(), *k.stride(), *v.stride(), kv_start.stride(0), kv_end.stride(0),
            Hq, group, Skv, splits, scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_N=_DECODE_BLOCK_N, num_warps=4,
        )  # fmt: skip
        o2 = out[:, 0]
        _xattn_decode_combine_kernel[_device.flat_grid(1, B * Hq)](
            part_acc, part_m, part_l, gate_tanh if gate_tanh is not None else part_m, o2,
            ungated[:, 0] if write_ungated else o2, lse, *o2.stride(), Hq, splits,
            HAS_GATE=gate_tanh is not None, WRITE_UNGATED=write_ungated, HEAD_DIM=D, BLOCK_D=_block_d(D),
            BLOCK_S=triton.next_power_of_2(splits),
        )  # fmt: skip
    return out, lse, ungated


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation (tools/triton_aot.py)


def _signature(fn, dtype: str, fp32_pointers: set[str], int_pointers: set[str], n_pointers: int) -> dict:
    signature = {}
    for i, name in enumerate(fn.arg_names):
        if i < n_pointers:
            signature[name] = "*i32" if name in int_pointers else ("*fp32" if name in fp32_pointers else f"*{dtype}")
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        elif name.startswith("stride_") or name in ("Hq", "GROUP", "Sq", "Skv", "SQ_BUCKET", "SKV_BUCKET", "SPLITS"):
            signature[name] = "i32"
    return signature


# The ranges' strides: a contiguous [B, Sq] tensor's row stride is Sq (no divisibility assumed) and its
# column stride 1 (Triton specializes an int argument equal to 1).
_RANGE_UNIT = ("stride_starts", "stride_ends")
_RANGE_ROW = ("stride_startb", "stride_endb")


def _stride_args(fn) -> tuple[list[str], list[str]]:
    """(unit strides: compiled as the constant 1, strides assumed divisible by 16)."""
    unit = [a for a in fn.arg_names if a.startswith("stride_") and (a.endswith("d") or a in _RANGE_UNIT)]
    strides = [a for a in fn.arg_names if a.startswith("stride_") and a not in unit and a not in _RANGE_ROW]
    return unit, strides


def aot_specs() -> list[dict]:
    """Every configuration the autotuner may pick, on its architecture, at NVLM-X's shape (D = 128,
    GQA 8) and D = 64, bf16 and fp16, gated; then the row-sum and decode kernels."""
    fp32 = {"GateTanh", "Lse", "Delta", "Rowsum", "PartAcc", "PartM", "PartL"}
    ints = {"Start", "End"}
    specs = []
    tuned = [
        ("fwd", _xattn_fwd_kernel, 9, FWD_TABLE, {"HAS_GATE": True, "WRITE_UNGATED": True}),
        ("bwd_dq", _xattn_bwd_dq_kernel, 10, DQ_TABLE, {"HAS_GATE": True}),
        ("bwd_dkdv", _xattn_bwd_dkdv_kernel, 11, DKDV_TABLE, {"HAS_GATE": True}),
    ]
    for name, kernel, n_pointers, table, flags in tuned:
        fn = kernel.fn
        unit, strides = _stride_args(fn)
        for (hopper, head_dim), configs in table.items():
            for m, n, w, stages in configs:
                for dtype in ("bf16", "fp16"):
                    specs.append(
                        {
                            "name": f"xattn_{name}[{dtype},D{head_dim},{m}x{n}w{w}s{stages}]",
                            "fn": fn,
                            "arch": 90 if hopper else 80,
                            "signature": _signature(fn, dtype, fp32, ints, n_pointers),
                            "constexprs": {**flags, "HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_M": m,
                                           "BLOCK_N": n, **dict.fromkeys(unit, 1)},
                            "divisible_by_16": list(fn.arg_names[:n_pointers]) + strides,
                            "num_warps": w,
                            "num_stages": stages,
                            "expect_ptx": {90: ["wgmma"], 80: ["mma.sync"]},
                        }
                    )  # fmt: skip
    plain = [
        ("bwd_rowsum", _xattn_bwd_rowsum_kernel, 3, {"BLOCK_M": _ROWSUM_ROWS}, 4),
        ("decode", _xattn_decode_kernel, 8, {"BLOCK_G": 16, "BLOCK_N": _DECODE_BLOCK_N}, 4),
        ("decode_combine", _xattn_decode_combine_kernel, 7, {"HAS_GATE": True, "WRITE_UNGATED": True, "BLOCK_S": 16},
         4),
    ]  # fmt: skip
    for name, fn, n_pointers, constexprs, warps in plain:
        unit, strides = _stride_args(fn)
        for dtype in ("bf16", "fp16"):
            specs.append(
                {
                    "name": f"xattn_{name}[{dtype}]",
                    "fn": fn,
                    "signature": _signature(fn, dtype, fp32, ints, n_pointers),
                    "constexprs": {**constexprs, "HEAD_DIM": 128, "BLOCK_D": 128, **dict.fromkeys(unit, 1)},
                    "divisible_by_16": list(fn.arg_names[:n_pointers]) + strides,
                    "num_warps": warps,
                }
            )  # fmt: skip
    return specs
