"""ViT attention on Hopper (sm_90): the FlashAttention-3 techniques that Triton expresses.

Same interface and semantics as triton.py (layout [T, S, H, D] through strides, base-2 log-sum-exp
saved for the backward, the fused QK-norm normalizing q and k as they are used), with these
differences in the kernels:

* FMA-folded scaling: the row max is taken over the raw scores q·kᵀ (the scale is positive, so it
  commutes with the max), and the scale (times log2 e) is folded into the exp2 argument:
  p = exp2(s · c − m), one FFMA per score element where triton.py spends an FMUL (scale), the max,
  and an FADD. With QK-norm the query side (rstd_q · w_q · w_k) is in the pre-scaled q block, as
  in triton.py, and the key side (rstd_k of each key column) and the scale are one column factor
  c_j = rstd_k[j] · scale · log2 e: one FMUL before the max (a per-column factor cannot move
  through a row max) and one FADD, where triton.py spends two FMULs and an FADD.
* A mask-free steady-state key loop over the full BLOCK_N blocks, and one peeled, masked tail of
  TAIL_N keys (the smallest power of two >= 16 that covers S mod BLOCK_N: 16 at S = 1025 and S = 257,
  where a full 128-wide tail block would spend 127/128 of its work on padding).
* K and V of the steady-state loop come through TMA tensor descriptors ([T, S, H, D] as a 4-D
  descriptor with block [1, BLOCK_N, 1, BLOCK_D]: its bounds are the tensor's, so the tail of one
  tile never reads the next, and padded head-dim columns read as zeros) when the strides allow it
  (unit head-dim stride, 16-byte aligned base and strides: every contiguous tensor and every view of
  a fused QKV projection whose H·D is a multiple of 8); masked pointer loads otherwise (``USE_TMA``).
  The loop is software-pipelined by Triton (``num_stages``: TMA loads issued stages ahead, waited on
  mbarriers).
* BLOCK_M = 128 with 8 warps: Triton splits the query block across two warpgroups, each issuing
  64-row wgmma (Triton 3.6 has no warp specialization for this loop on sm_90: the producer is the
  TMA engine itself, issued by one thread).

Backward (``attention_bwd``): delta = rowsum(dO ⊙ O) (triton.py's kernel), then one pass per key
block (``_vit_hopper_bwd_kernel``): the program holds its BLOCK_N keys and values, walks every query
block (q and dO by TMA, mask-free, then one peeled masked tail of TAIL_M queries), makes dK and dV
in registers and dQ's share by float32 reduce-adds into a zeroed [T, S, H, D] float32 buffer (a TMA
reduce, UTMAREDG, per full query block; pointer atomics for the tail block and under the
interpreter, which has no descriptor atomics): five GEMMs per (query block, key block) where
triton.py's two kernels spend seven (the scores and dP are recomputed for dQ there). The program of
the key tail zeroes its padded keys' probabilities (a runtime branch: the other programs' loops stay
mask-free), so an extreme log-sum-exp cannot turn into inf · 0 in the dQ GEMM. Float additions are
not associative, so dQ may differ in its last bits between runs: the deterministic option (the
environment variable NVLM_KERNELS_DETERMINISTIC=1, torch.use_deterministic_algorithms(True), or
``deterministic=True``) runs the same pass without the dQ GEMM, then a dQ kernel per query block (K and
V by TMA, mask-free loop, peeled tail), seven GEMMs and no atomics. At D = 128 with QK-norm every
configuration of the single pass spills (``SINGLE_PASS``), so that bucket always runs the two-pass
form on a GPU, and copies q / dO that TMA cannot read (``BWD_TMA_ONLY``: its pointer form spills).

QK-norm in the backward: the program's keys are normalized once (k · rstd_k · w_k, the normalized
key dQ is made from; times w_q as well for the scores), the streamed q used as loaded with rstd_q as a
column factor folded into the exp2 FFMA; dK and dQ are the gradients of the normalized k and q
(float32), turned into gradients of the raw q, k and the weights by triton.py's row kernel, as there.

Under the Triton interpreter (CPU tensors) the same kernels run, descriptors included (the
interpreter emulates them, out-of-bounds zero fill too), with one pinned 128 x 128 configuration and
the single pass in every bucket. Nothing here has run on a GPU: the sm_90 configuration tables are
spill-free with triton 3.6 and 3.8 (`make triton-aot`) but unmeasured.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nvlm_kernels._backend import autotune_configs, triton_interpreter_enabled
from nvlm_kernels._device import device_guard
from nvlm_kernels._tma import block_shape_hook, deterministic_requested, tma_ok
from nvlm_kernels._tma import head_descriptors as _descriptors
from nvlm_kernels.vit_attention import triton as _sm80
from nvlm_kernels.vit_attention.triton import (
    _DELTA_ROWS,
    _block_d,
    _head_dim_bucket,
    _rows,
    _split,
    attention_grid,
    rms_norm_bwd,
    rms_rstd,
)

LOG2E = math.log2(math.e)
SUPPORTED_HEAD_DIMS = _sm80.SUPPORTED_HEAD_DIMS
SUPPORTED_DTYPES = _sm80.SUPPORTED_DTYPES

_INTERPRET = triton_interpreter_enabled()

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (head-dim bucket, QK_NORM), sm_90 only. BLOCK_M = 128
# with 8 warps: two warpgroups of 64 query rows each. Every entry compiles without spills or a stack
# frame with triton 3.6 and 3.8 (`make triton-aot`); the first is what NVLM_KERNELS_AUTOTUNE=0 runs.
FWD_TABLE = {
    (128, False): [(128, 128, 8, 2), (128, 64, 8, 3)],
    (128, True): [(128, 64, 8, 3), (128, 64, 8, 2)],  # 128 x 128 spills (the rstd_k column factor)
    (64, False): [(128, 128, 8, 3), (128, 64, 8, 3)],
    (64, True): [(128, 128, 8, 3), (128, 64, 8, 3)],
}
# The backward's key blocks: (BLOCK_M = query rows streamed, BLOCK_N = keys held, warps, stages).
BWD_TABLE = {
    (128, False): [(64, 64, 8, 2), (64, 64, 8, 3)],  # 64 x 128 spills with the dQ GEMM and its reduce
    (128, True): [(64, 64, 8, 2)],
    (64, False): [(64, 128, 8, 2), (64, 64, 4, 3)],
    (64, True): [(64, 64, 8, 2), (64, 64, 8, 3)],  # 64 x 128 and 4 warps spill with triton 3.8
}
# Where the single pass (dQ by atomics) fits: at D = 128 with QK-norm every configuration of it
# spills (dK, dV, the dQ tile and both normalized key blocks exceed 255 registers), so that bucket
# always runs the two-pass (deterministic) form: the pass without dQ, then the dQ kernel.
SINGLE_PASS = {(128, False): True, (128, True): False, (64, False): True, (64, True): True}
# Buckets whose backward pass spills with pointer loads of q and dO (D = 128 with QK-norm: 56 bytes of
# stack): there, q and dO that TMA cannot read are copied once (a memory pass, O(S), against the
# backward's O(S²)) so that the TMA form runs.
BWD_TMA_ONLY = {(128, True)}
# The deterministic path's dQ kernel (query rows held, keys streamed).
DQ_TABLE = {
    (128, False): [(128, 64, 8, 2), (64, 64, 4, 3)],
    (128, True): [(128, 64, 8, 2), (64, 64, 4, 3)],
    (64, False): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (64, True): [(128, 64, 8, 3), (64, 64, 4, 3)],
}
INTERPRETER_CONFIG = (128, 128, 4, 1)


def tail_block(rest: int, block: int) -> int:
    """The width of the peeled tail: the smallest power of two >= 16 covering ``rest`` (< block) keys."""
    return min(block, max(16, triton.next_power_of_2(max(rest, 1))))


# descriptor argument -> the meta-parameter of the rows it streams (BLOCK_D columns)
_DESCRIPTOR_ROWS = {"K_desc": "BLOCK_N", "V_desc": "BLOCK_N", "Q_desc": "BLOCK_M", "DO_desc": "BLOCK_M",
                    "DQacc_desc": "BLOCK_M"}  # fmt: skip
_set_block_shapes = block_shape_hook(_DESCRIPTOR_ROWS)


def _as_config(entry) -> triton.Config:
    m, n, w, s = entry
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)


def _autotune_configs(table: dict) -> list[triton.Config]:
    if _INTERPRET:
        return [_as_config(INTERPRETER_CONFIG)]
    return [_as_config(e) for e in dict.fromkeys(e for configs in table.values() for e in configs)]


def _pruner(table: dict):
    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 128))
        qk_norm = bool(kwargs.get("QK_NORM", named_args.get("QK_NORM", False)))
        allowed = set(table[(_head_dim_bucket(head_dim), qk_norm)])
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return autotune_configs(keep or configs[:1])

    return prune


def _autotune(table: dict, key: tuple[str, ...] = (), reset_to_zero: tuple[str, ...] = ()):
    """The autotuner of a kernel with the configurations of ``table``, keyed on S, the head dim, QK_NORM,
    USE_TMA and ``key``; ``reset_to_zero``: buffers the kernel accumulates into, zeroed before each
    timed run of a configuration (and once after)."""
    return triton.autotune(
        configs=_autotune_configs(table),
        key=["S", "HEAD_DIM", "QK_NORM", "USE_TMA", *key],
        prune_configs_by={"early_config_prune": _pruner(table)},
        reset_to_zero=list(reset_to_zero) or None,
    )


def _tail_heuristic(rows: str):
    """TAIL_N / TAIL_M of a launch: ``tail_block`` of S modulo the block the loop walks."""
    return lambda args: tail_block(args["S"] % args[rows], args[rows])


# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _load_rows(base, rows, stride_s, offs_d, stride_d, d_mask, row_mask, MASK_ROWS: tl.constexpr,
               MASK_D: tl.constexpr):  # fmt: skip
    """[len(rows), BLOCK_D] rows of a [S, D] head slice by pointers: rows masked only in a tail
    (``MASK_ROWS``), head-dim columns only when BLOCK_D > HEAD_DIM (``MASK_D``); padding reads 0."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_s + offs_d[None, :] * stride_d
    if MASK_ROWS:
        return tl.load(ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if MASK_D:
        return tl.load(ptrs, mask=d_mask[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _stream_block(desc, base, t, h, start, stride_s, stride_d, S, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):  # fmt: skip
    """A full (unmasked) block of ROWS rows [start, start + ROWS) of head (t, h): by TMA (``desc``,
    block [1, ROWS, 1, BLOCK_D]; padded head-dim columns arrive as zeros) or by pointers."""
    if USE_TMA:
        return desc.load([t.to(tl.int32), start, h.to(tl.int32), 0]).reshape(ROWS, BLOCK_D)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        rows = start + tl.arange(0, ROWS)
        return _load_rows(base, rows, stride_s, offs_d, stride_d, offs_d < HEAD_DIM, rows < S, False,
                          BLOCK_D != HEAD_DIM)  # fmt: skip


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, col_factor, col_ok, qk_scale, QK_NORM: tl.constexpr, MASKED: tl.constexpr):
    """One key block of the online softmax, from the raw scores s = q·kᵀ [M, N] (float32).

    Without QK-norm the max is that of the raw scores, scaled per row, and the scale is folded into
    the exp2 argument: one FFMA per element. With QK-norm, ``col_factor`` = rstd_k · scale · log2 e
    per key column: one FMUL, the max, one FADD. Masked columns (``MASKED``: the tail) score -inf.
    Returns the new (m, l, acc); m is in scaled base-2 units."""
    if QK_NORM:
        s = s * col_factor[None, :]
        if MASKED:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
    else:
        if MASKED:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


@triton.jit
def _query_block(Q, RstdQ, Wq, Wk, stride_qt, stride_qs, stride_qh, stride_qd, S, H, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, QK_NORM: tl.constexpr):  # fmt: skip
    """The (tile, head) and query block this program holds: (t, h, offs_m, offs_d, m_mask, d_mask,
    q), q read with padding 0 and, with QK_NORM, pre-scaled by rstd_q · w_q · w_k (triton.py's
    ``_prescale``)."""
    pid_m, t, h = _sm80._block_tile_head(S, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S
    d_mask = offs_d < HEAD_DIM
    q = _sm80._load_block(Q + t * stride_qt + h * stride_qh, offs_m, stride_qs, offs_d, stride_qd, m_mask, d_mask)
    if QK_NORM:
        q = _sm80._prescale(q, RstdQ, t * S, offs_m, m_mask, Wq, Wk, h * HEAD_DIM, offs_d, d_mask)
    return t, h, offs_m, offs_d, m_mask, d_mask, q


@_autotune(FWD_TABLE)
@triton.heuristics({"TAIL_N": _tail_heuristic("BLOCK_N")})
@triton.jit
def _vit_hopper_fwd_kernel(
    Q, K, V, K_desc, V_desc, Out, Lse, RstdQ, RstdK, Wq, Wk,
    stride_qt, stride_qs, stride_qh, stride_qd,
    stride_kt, stride_ks, stride_kh, stride_kd,
    stride_vt, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_os, stride_oh, stride_od,
    H, S, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
):  # fmt: skip
    """One block of BLOCK_M queries of one (tile, head): the full key blocks unmasked (K_desc and
    V_desc: TMA descriptors over K and V when USE_TMA, else unused), then the tail of S mod BLOCK_N
    keys in one masked block of TAIL_N."""
    t, h, offs_m, offs_d, m_mask, d_mask, q = _query_block(Q, RstdQ, Wq, Wk, stride_qt, stride_qs, stride_qh, stride_qd,
                                                           S, H, HEAD_DIM, BLOCK_D, BLOCK_M, QK_NORM)  # fmt: skip
    rstd_base = t * S
    k_base = K + t * stride_kt + h * stride_kh
    v_base = V + t * stride_vt + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = (S // BLOCK_N) * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):  # steady state: no masks
        k = _stream_block(K_desc, k_base, t, h, start_n, stride_ks, stride_kd, S, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
        v = _stream_block(V_desc, v_base, t, h, start_n, stride_vs, stride_vd, S, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
        factor = qk_scale
        if QK_NORM:
            factor = tl.load(RstdK + rstd_base + start_n + cols) * qk_scale
        s = tl.dot(q, tl.trans(k))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, factor, cols, qk_scale, QK_NORM, False)
    if full_end < S:  # the peeled tail: S mod BLOCK_N keys in one masked block of TAIL_N
        rows = full_end + tl.arange(0, TAIL_N)
        n_mask = rows < S
        k = _load_rows(k_base, rows, stride_ks, offs_d, stride_kd, d_mask, n_mask, True, True)
        v = _load_rows(v_base, rows, stride_vs, offs_d, stride_vd, d_mask, n_mask, True, True)
        factor = qk_scale
        if QK_NORM:
            factor = tl.load(RstdK + rstd_base + rows, mask=n_mask, other=1.0) * qk_scale
        s = tl.dot(q, tl.trans(k))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, factor, n_mask, qk_scale, QK_NORM, True)

    acc = acc / l_i[:, None]
    pid_m, t, h = _sm80._block_tile_head_again(S, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < S
    o_ptrs = Out + t * stride_ot + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_os
    o_ptrs += offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(Lse + (t * H + h) * S + offs_m, m_i + tl.math.log2(l_i), mask=m_mask)


@triton.jit
def _bwd_block(k, k_dq, v, q, do, lse, delta, rq, dk, dv, dq_ptrs, dq_mask, DQacc_desc, dq_coords, qk_scale, sm_scale,
               QK_NORM: tl.constexpr, COMPUTE_DQ: tl.constexpr, DQ_TMA: tl.constexpr, MASK_DQ: tl.constexpr,
               KEY_TAIL: tl.constexpr, key_ok):  # fmt: skip
    """One (query block, key block) step of the single-pass backward, key-major: five GEMMs.

    ``k`` [N, D] scores the streamed raw q (with QK-norm: the normalized key times w_q, and
    ``rq`` = rstd_q of the query columns), ``k_dq`` is the key dQ is made from (the normalized key
    with QK-norm, else k). The scale (times log2 e, and rstd_q) is folded into the exp2 FFMA.
    Padded query rows arrive with lse = +inf (p = 0). In the program of the key tail
    (``KEY_TAIL``), the padded key rows' p is zeroed: their k rows are 0 but p = exp2(-lse) could
    overflow and make inf · 0 in the dQ GEMM. dQ's share goes to float32 atomics (``COMPUTE_DQ``)."""
    s_t = tl.dot(k, tl.trans(q))  # [N, M]
    if QK_NORM:
        p_t = tl.math.exp2(s_t * (rq * qk_scale)[None, :] - lse[None, :])
    else:
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
    if KEY_TAIL:
        p_t = tl.where(key_ok[:, None], p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    if COMPUTE_DQ:
        dq = tl.dot(tl.trans(ds_t.to(k_dq.dtype)), k_dq) * sm_scale
        if DQ_TMA:  # a TMA reduce-add of the tile: no address registers, out-of-bounds rows dropped
            DQacc_desc.atomic_add(dq_coords, dq.reshape(1, dq.shape[0], 1, dq.shape[1]))
        elif MASK_DQ:
            tl.atomic_add(dq_ptrs, dq, mask=dq_mask, sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    if QK_NORM:
        ds_t = ds_t * rq[None, :]
    dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bwd_query_blocks(Q_desc, DO_desc, DQacc_desc, q_base, do_base, Lse, Delta, RstdQ, DQacc, dq_base, k, k_dq, v,
                      dk, dv, t, h, row_base, rstd_base, key_ok, S, qk_scale, sm_scale,
                      stride_qs, stride_qd, stride_dos, stride_dod, stride_as,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr, USE_TMA: tl.constexpr,
                      COMPUTE_DQ: tl.constexpr, DQ_TMA: tl.constexpr, KEY_TAIL: tl.constexpr, BLOCK_M: tl.constexpr,
                      TAIL_M: tl.constexpr):  # fmt: skip
    """Every query block for one held key block: the full blocks mask-free (q, dO by TMA), then the
    tail of S mod BLOCK_M queries in one masked block of TAIL_M."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    full_end = (S // BLOCK_M) * BLOCK_M
    for start_m in range(0, full_end, BLOCK_M):
        q = _stream_block(Q_desc, q_base, t, h, start_m, stride_qs, stride_qd, S, BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA)
        do = _stream_block(DO_desc, do_base, t, h, start_m, stride_dos, stride_dod, S, BLOCK_M, BLOCK_D, HEAD_DIM,
                           USE_TMA)  # fmt: skip
        rows = start_m + tl.arange(0, BLOCK_M)
        lse = tl.load(Lse + row_base + rows)
        delta = tl.load(Delta + row_base + rows)
        rq = lse  # unused without QK_NORM
        if QK_NORM:
            rq = tl.load(RstdQ + rstd_base + rows)
        dq_ptrs = DQacc + dq_base + rows.to(tl.int64)[:, None] * stride_as + offs_d[None, :]
        dk, dv = _bwd_block(k, k_dq, v, q, do, lse, delta, rq, dk, dv, dq_ptrs, d_mask[None, :], DQacc_desc,
                            [t.to(tl.int32), start_m, h.to(tl.int32), 0], qk_scale, sm_scale, QK_NORM, COMPUTE_DQ,
                            DQ_TMA, BLOCK_D != HEAD_DIM, KEY_TAIL, key_ok)  # fmt: skip
    if full_end < S:
        rows = full_end + tl.arange(0, TAIL_M)
        m_mask = rows < S
        q = _load_rows(q_base, rows, stride_qs, offs_d, stride_qd, d_mask, m_mask, True, True)
        do = _load_rows(do_base, rows, stride_dos, offs_d, stride_dod, d_mask, m_mask, True, True)
        lse = tl.load(Lse + row_base + rows, mask=m_mask, other=float("inf"))  # padded rows: p = 0
        delta = tl.load(Delta + row_base + rows, mask=m_mask, other=0.0)
        rq = lse
        if QK_NORM:
            rq = tl.load(RstdQ + rstd_base + rows, mask=m_mask, other=0.0)
        dq_ptrs = DQacc + dq_base + rows.to(tl.int64)[:, None] * stride_as + offs_d[None, :]
        dk, dv = _bwd_block(k, k_dq, v, q, do, lse, delta, rq, dk, dv, dq_ptrs, m_mask[:, None] & d_mask[None, :],
                            DQacc_desc, [t.to(tl.int32), full_end, h.to(tl.int32), 0], qk_scale, sm_scale, QK_NORM,
                            COMPUTE_DQ, False, True, KEY_TAIL, key_ok)  # fmt: skip
    return dk, dv


@_autotune(BWD_TABLE, key=("COMPUTE_DQ",), reset_to_zero=("DQacc",))  # each timed configuration: dQ from 0
@triton.heuristics({"TAIL_M": _tail_heuristic("BLOCK_M")})
@triton.jit
def _vit_hopper_bwd_kernel(
    Q, K, V, DO, Q_desc, DO_desc, DQacc_desc, Lse, Delta, DK, DV, DQacc, RstdQ, RstdK, Wq, Wk,
    stride_qt, stride_qs, stride_qh, stride_qd,
    stride_kt, stride_ks, stride_kh, stride_kd,
    stride_vt, stride_vs, stride_vh, stride_vd,
    stride_dot, stride_dos, stride_doh, stride_dod,
    stride_gt, stride_gs, stride_gh, stride_gd,
    stride_at, stride_as, stride_ah,
    H, S, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr, USE_TMA: tl.constexpr,
    COMPUTE_DQ: tl.constexpr, DQ_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TAIL_M: tl.constexpr,
):  # fmt: skip
    """The single-pass backward of one block of BLOCK_N keys of one (tile, head): dK and dV in
    registers, dQ's share of every query block by float32 atomic adds into DQacc ([T, S, H, D]
    float32, zeroed, unit head-dim stride; ``COMPUTE_DQ``). DK and DV share the strides stride_g*.
    With QK_NORM, dK (and DQacc) are the gradients of the normalized k (and q)."""
    pid_n, t, h = _sm80._block_tile_head(S, H, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < S
    d_mask = offs_d < HEAD_DIM
    rstd_base = t * S
    k = _sm80._load_block(K + t * stride_kt + h * stride_kh, offs_n, stride_ks, offs_d, stride_kd, n_mask, d_mask)
    k_dq = k
    if QK_NORM:  # k_dq = the normalized key; k = the same times w_q (the scores' key side), each rounded once
        r = tl.load(RstdK + rstd_base + offs_n, mask=n_mask, other=0.0)
        wk = tl.load(Wk + h * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        wq = tl.load(Wq + h * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        k_n = k.to(tl.float32) * r[:, None] * wk[None, :]
        k_dq = k_n.to(k.dtype)
        k = (k_n * wq[None, :]).to(k.dtype)
    v = _sm80._load_block(V + t * stride_vt + h * stride_vh, offs_n, stride_vs, offs_d, stride_vd, n_mask, d_mask)
    q_base = Q + t * stride_qt + h * stride_qh
    do_base = DO + t * stride_dot + h * stride_doh
    dq_base = t * stride_at + h * stride_ah
    row_base = (t * H + h) * S
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if COMPUTE_DQ and (pid_n + 1) * BLOCK_N > S:  # the key tail's program: its padded keys' p zeroed
        dk, dv = _bwd_query_blocks(Q_desc, DO_desc, DQacc_desc, q_base, do_base, Lse, Delta, RstdQ, DQacc, dq_base, k,
                                   k_dq, v, dk, dv, t, h, row_base, rstd_base, n_mask, S, qk_scale, sm_scale,
                                   stride_qs, stride_qd, stride_dos, stride_dod, stride_as, HEAD_DIM, BLOCK_D, QK_NORM,
                                   USE_TMA, COMPUTE_DQ, DQ_TMA, True, BLOCK_M, TAIL_M)  # fmt: skip
    else:
        dk, dv = _bwd_query_blocks(Q_desc, DO_desc, DQacc_desc, q_base, do_base, Lse, Delta, RstdQ, DQacc, dq_base, k,
                                   k_dq, v, dk, dv, t, h, row_base, rstd_base, n_mask, S, qk_scale, sm_scale,
                                   stride_qs, stride_qd, stride_dos, stride_dod, stride_as, HEAD_DIM, BLOCK_D, QK_NORM,
                                   USE_TMA, COMPUTE_DQ, DQ_TMA, False, BLOCK_M, TAIL_M)  # fmt: skip
    pid_n, t, h = _sm80._block_tile_head_again(S, H, BLOCK_N)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < S
    if QK_NORM:
        dk *= tl.load(Wq + h * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    dk *= sm_scale
    out_offsets = t * stride_gt + h * stride_gh + offs_n.to(tl.int64)[:, None] * stride_gs + offs_d[None, :] * stride_gd
    out_mask = n_mask[:, None] & d_mask[None, :]
    tl.store(DK + out_offsets, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_step(q, do, k, v, lse, delta, dq, col_factor, rk, qk_scale, col_ok, QK_NORM: tl.constexpr,
             MASKED: tl.constexpr):  # fmt: skip
    """One key block of the deterministic dQ: p from the raw scores with the scale (and rstd_k) in
    the exp2 FFMA; masked key columns (the tail) get p = 0."""
    s = tl.dot(q, tl.trans(k))
    if QK_NORM:
        p = tl.math.exp2(s * col_factor[None, :] - lse[:, None])
    else:
        p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(col_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    if QK_NORM:
        ds = ds * rk[None, :]
    return tl.dot(ds.to(k.dtype), k, dq)


@_autotune(DQ_TABLE)
@triton.heuristics({"TAIL_N": _tail_heuristic("BLOCK_N")})
@triton.jit
def _vit_hopper_bwd_dq_kernel(
    Q, K, V, K_desc, V_desc, DO, Lse, Delta, DQ, RstdQ, RstdK, Wq, Wk,
    stride_qt, stride_qs, stride_qh, stride_qd,
    stride_kt, stride_ks, stride_kh, stride_kd,
    stride_vt, stride_vs, stride_vh, stride_vd,
    stride_dot, stride_dos, stride_doh, stride_dod,
    stride_gt, stride_gs, stride_gh, stride_gd,
    H, S, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_NORM: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
):  # fmt: skip
    """The deterministic mode's dQ of one block of BLOCK_M queries: the full key blocks mask-free
    (K and V by TMA), then the key tail in one masked block of TAIL_N. With QK_NORM, DQ (float32)
    is the gradient of the normalized q."""
    t, h, offs_m, offs_d, m_mask, d_mask, q = _query_block(Q, RstdQ, Wq, Wk, stride_qt, stride_qs, stride_qh, stride_qd,
                                                           S, H, HEAD_DIM, BLOCK_D, BLOCK_M, QK_NORM)  # fmt: skip
    rstd_base = t * S
    do = _sm80._load_block(DO + t * stride_dot + h * stride_doh, offs_m, stride_dos, offs_d, stride_dod, m_mask, d_mask)
    row_base = (t * H + h) * S
    lse = tl.load(Lse + row_base + offs_m, mask=m_mask, other=float("inf"))
    delta = tl.load(Delta + row_base + offs_m, mask=m_mask, other=0.0)
    k_base = K + t * stride_kt + h * stride_kh
    v_base = V + t * stride_vt + h * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_end = (S // BLOCK_N) * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        k = _stream_block(K_desc, k_base, t, h, start_n, stride_ks, stride_kd, S, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
        v = _stream_block(V_desc, v_base, t, h, start_n, stride_vs, stride_vd, S, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA)
        rk = qk_scale
        if QK_NORM:
            rk = tl.load(RstdK + rstd_base + start_n + cols)
        dq = _dq_step(q, do, k, v, lse, delta, dq, rk * qk_scale, rk, qk_scale, cols, QK_NORM, False)
    if full_end < S:
        rows = full_end + tl.arange(0, TAIL_N)
        n_mask = rows < S
        k = _load_rows(k_base, rows, stride_ks, offs_d, stride_kd, d_mask, n_mask, True, True)
        v = _load_rows(v_base, rows, stride_vs, offs_d, stride_vd, d_mask, n_mask, True, True)
        rk = qk_scale
        if QK_NORM:
            rk = tl.load(RstdK + rstd_base + rows, mask=n_mask, other=0.0)
        dq = _dq_step(q, do, k, v, lse, delta, dq, rk * qk_scale, rk, qk_scale, n_mask, QK_NORM, True)
    pid_m, t, h = _sm80._block_tile_head_again(S, H, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < S
    if QK_NORM:
        dq *= tl.load(Wk + h * HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    dq *= sm_scale
    dq_ptrs = DQ + t * stride_gt + h * stride_gh + offs_m.to(tl.int64)[:, None] * stride_gs
    dq_ptrs += offs_d[None, :] * stride_gd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# --------------------------------------------------------------------------------------------------
# launchers


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    norm: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out [T, S, H, D] (contiguous) and the base-2 log-sum-exp [T, H, S] (float32). ``norm`` =
    (rstd_q, rstd_k, w_q, w_k) normalizes q and k as they are used."""
    T, S, H, D = q.shape
    out = torch.empty((T, S, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((T, H, S), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    rstd_q, rstd_k, w_q, w_k = norm if norm is not None else (lse, lse, lse, lse)  # unused placeholders
    use_tma = tma_ok(k) and tma_ok(v)
    with device_guard(q):
        _vit_hopper_fwd_kernel[attention_grid(T, S, H, "BLOCK_M")](
            q, k, v, *_descriptors(use_tma, k, v), out, lse, rstd_q, rstd_k, w_q, w_k,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, S, scale * LOG2E,
            HEAD_DIM=D, BLOCK_D=_block_d(D), QK_NORM=norm is not None, USE_TMA=use_tma,
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
    deterministic: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv [T, S, H, D] (contiguous). With ``norm`` the q and k gradients are those of the
    normalized q and k, in ``grad_dtype`` (float32 for the norm backward). One key-major pass with
    dQ by float32 atomics, or (``deterministic_requested``) that pass without dQ, then a dQ pass."""
    T, S, H, D = q.shape
    qk_dtype = grad_dtype or q.dtype
    dk = torch.empty((T, S, H, D), dtype=qk_dtype, device=q.device)
    dv = torch.empty((T, S, H, D), dtype=v.dtype, device=q.device)
    if T == 0:
        return torch.empty((T, S, H, D), dtype=qk_dtype, device=q.device), dk, dv
    # (the interpreter runs the single pass in every bucket: the kernel is one, whatever the registers)
    single_pass = SINGLE_PASS[(_head_dim_bucket(D), norm is not None)] or _INTERPRET
    deterministic = deterministic_requested(deterministic) or not single_pass
    dq_acc = None if deterministic else torch.zeros((T, S, H, D), dtype=torch.float32, device=q.device)
    delta = torch.empty((T, H, S), dtype=torch.float32, device=q.device)
    rstd_q, rstd_k, w_q, w_k = norm if norm is not None else (lse, lse, lse, lse)  # unused placeholders
    common = dict(HEAD_DIM=D, BLOCK_D=_block_d(D), QK_NORM=norm is not None)
    use_tma = tma_ok(q) and tma_ok(grad_out)
    if not use_tma and (_head_dim_bucket(D), norm is not None) in BWD_TMA_ONLY and not _INTERPRET:
        q, grad_out, use_tma = q.contiguous(), grad_out.contiguous(), True
    # unused when deterministic (a buffer of its own: the autotuner zeroes this argument)
    dq_target = dq_acc if dq_acc is not None else lse.new_zeros(1)
    acc_strides = dq_acc.stride()[:3] if dq_acc is not None else (0, 0, 0)
    # dQ's TMA reduce-add (the interpreter has no descriptor atomics: pointer atomics there)
    dq_tma = dq_acc is not None and not _INTERPRET
    with device_guard(q):
        _sm80._vit_attn_bwd_delta_kernel[attention_grid(T, S, H, "BLOCK_M")](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), H, S,
            HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=_DELTA_ROWS,
        )  # fmt: skip
        _vit_hopper_bwd_kernel[attention_grid(T, S, H, "BLOCK_N")](
            q, k, v, grad_out, *_descriptors(use_tma, q, grad_out), *_descriptors(dq_tma, dq_target), lse, delta,
            dk, dv, dq_target, rstd_q, rstd_k, w_q, w_k,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *acc_strides,
            H, S, scale * LOG2E, scale, USE_TMA=use_tma, COMPUTE_DQ=not deterministic, DQ_TMA=dq_tma, **common,
        )  # fmt: skip
        if not deterministic:
            return (dq_acc if qk_dtype == torch.float32 else dq_acc.to(qk_dtype)), dk, dv
        dq = torch.empty((T, S, H, D), dtype=qk_dtype, device=q.device)
        use_tma = tma_ok(k) and tma_ok(v)
        _vit_hopper_bwd_dq_kernel[attention_grid(T, S, H, "BLOCK_M")](
            q, k, v, *_descriptors(use_tma, k, v), grad_out, lse, delta, dq, rstd_q, rstd_k, w_q, w_k,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            H, S, scale * LOG2E, scale, USE_TMA=use_tma, **common,
        )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# QK-norm: triton.py's row kernels (rstd, the norm backward) around the attention kernels above


def _heads(num_heads: int, *tensors: torch.Tensor):
    return [x.unflatten(-1, (num_heads, x.shape[-1] // num_heads)) for x in tensors]


def qk_norm_attention_split_fwd(q, k, v, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale):
    """(out [T, S, H, D], lse, rstd_q, rstd_k) from q, k, v [T, S, H·D] each, read in place."""
    q, k = _rows(q), _rows(k)
    rstd = [rms_rstd(x, eps, norm_features) for x in (q, k)]
    norm = (*rstd, q_norm_weight.contiguous(), k_norm_weight.contiguous())
    return (*attention_fwd(*_heads(num_heads, q, k, v), scale, norm=norm), *rstd)


def qk_norm_attention_fwd(qkv, q_norm_weight, k_norm_weight, num_heads, eps, norm_features, scale):
    return qk_norm_attention_split_fwd(*_split(_rows(qkv)), q_norm_weight, k_norm_weight, num_heads, eps,
                                       norm_features, scale)  # fmt: skip


def _norm_backward(grad_out, q, k, v, wq, wk, out, lse, rstd_q, rstd_k, num_heads, norm_features, scale, dq, dk):
    """The attention backward for the normalized q, k (float32 gradients), then triton.py's norm
    backward into ``dq`` / ``dk`` [T, S, H·D]. Returns (dv [T, S, H, D], dwq, dwk)."""
    wq, wk = wq.contiguous(), wk.contiguous()
    norm = (rstd_q, rstd_k, wq, wk)
    g_q, g_k, dv = attention_bwd(grad_out, *_heads(num_heads, q, k, v), out, lse, scale, norm, torch.float32)
    dwq = rms_norm_bwd(q, g_q, rstd_q, wq, norm_features, dq).to(wq.dtype)
    return dv, dwq, rms_norm_bwd(k, g_k, rstd_k, wk, norm_features, dk).to(wk.dtype)


def qk_norm_attention_split_bwd(grad_out, q, k, v, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, num_heads,
                                eps, norm_features, scale):  # fmt: skip
    """(dq, dk, dv [T, S, H·D] contiguous, dq_norm_weight, dk_norm_weight)."""
    q, k = _rows(q), _rows(k)
    dq, dk = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv, dwq, dwk = _norm_backward(grad_out, q, k, v, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k,
                                  num_heads, norm_features, scale, dq, dk)  # fmt: skip
    return dq, dk, dv.flatten(-2), dwq, dwk


def qk_norm_attention_bwd(grad_out, qkv, q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k, num_heads, eps,
                          norm_features, scale):  # fmt: skip
    """(dqkv, dq_norm_weight, dk_norm_weight): the norm backward writes dq and dk straight into dqkv."""
    qkv = _rows(qkv)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    dq, dk, dv_slot = _split(dqkv)
    dv, dwq, dwk = _norm_backward(grad_out, *_split(qkv), q_norm_weight, k_norm_weight, out, lse, rstd_q, rstd_k,
                                  num_heads, norm_features, scale, dq, dk)  # fmt: skip
    dv_slot.copy_(dv.flatten(-2))
    return dqkv, dwq, dwk


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation (tools/triton_aot.py)

_FP32_POINTERS = {"Lse", "Delta", "RstdQ", "RstdK", "DQacc"}


def _signature(fn, dtype: str, n_tensors: int, blocks: dict, use_tma: bool, tma_dq: bool, fp32: set) -> dict:
    """Pointer types for the first ``n_tensors`` arguments (descriptors ``*_desc`` when ``use_tma``,
    the dQ accumulator's when ``tma_dq``, with the block the pre-hook gives them), i32 strides and
    sizes, fp32 scales; constexprs are added by tools/triton_aot.py."""
    signature = {}
    for i, name in enumerate(fn.arg_names):
        if i < n_tensors:
            elem = "fp32" if name.removesuffix("_desc") in _FP32_POINTERS | fp32 else dtype
            if name.endswith("_desc") and (tma_dq if name == "DQacc_desc" else use_tma):
                rows = blocks[_DESCRIPTOR_ROWS[name]]
                signature[name] = f"tensordesc<{elem}[1, {rows}, 1, {blocks['BLOCK_D']}]>"
            else:
                signature[name] = f"*{elem}"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        elif name.startswith("stride_") or name in ("H", "S"):
            signature[name] = "i32"
    return signature


# the kernels' tails at InternViT's S = 1025 (and 257): one key (or query) past the full blocks
_AOT_TAIL = 16


def _aot_kernels() -> list[tuple]:
    """(name, jit function, number of pointer/descriptor arguments, table, extra constexprs)."""
    return [
        ("fwd", _vit_hopper_fwd_kernel, 11, FWD_TABLE, {"TAIL_N": _AOT_TAIL}),
        ("bwd", _vit_hopper_bwd_kernel, 16, BWD_TABLE, {"TAIL_M": _AOT_TAIL}),
        ("bwd_dq", _vit_hopper_bwd_dq_kernel, 13, DQ_TABLE, {"TAIL_N": _AOT_TAIL}),
    ]


def aot_specs() -> list[dict]:
    """Every configuration of the sm_90 tables at InternViT's shapes (S = 1025; D = 128 for 6B, 64
    for 300M), bf16 and fp16, with TMA (the descriptor form) and, for each table's first entry, the
    pointer fallback; the single-pass backward also without its dQ (the deterministic mode's first
    pass). The TMA main loops must load by UTMALDG and multiply by HGMMA."""
    specs = []
    for name, kernel, n_tensors, table, extra in _aot_kernels():
        fn = kernel.fn.fn  # under the autotuner and the heuristics
        unit = [a for a in fn.arg_names if a.startswith("stride_") and a.endswith("d")]
        divisible = [a for a in fn.arg_names[:n_tensors] if not a.endswith("_desc")] + [
            a for a in fn.arg_names if a.startswith("stride_") and a not in unit
        ]
        for (head_dim, qk_norm), configs in table.items():
            for i, (m, n, w, stages) in enumerate(configs):
                variants = [(True, True), (False, True)] if i == 0 else [(True, True)]
                if name == "bwd" and (head_dim, qk_norm) in BWD_TMA_ONLY:
                    variants = [v for v in variants if v[0]]
                if name == "bwd" and not SINGLE_PASS[(head_dim, qk_norm)]:  # only ever runs without dQ
                    variants = [(use_tma, False) for use_tma, _ in variants]
                elif name == "bwd" and i == 0:
                    variants.append((True, False))
                for dtype in ("bf16", "fp16"):
                    for use_tma, dq in variants:
                        blocks = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": head_dim}
                        constexprs = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "QK_NORM": qk_norm,
                                      "USE_TMA": use_tma, **blocks, **extra, **dict.fromkeys(unit, 1)}  # fmt: skip
                        tma_dq = name == "bwd" and dq  # dQ by TMA reduce-adds (UTMAREDG) into a fresh buffer
                        if name == "bwd":
                            constexprs.update(COMPUTE_DQ=dq, DQ_TMA=tma_dq)
                        fp32 = {"DQ"} if (name == "bwd_dq" and qk_norm) else set()
                        tag = f"{dtype},D{head_dim}{',norm' if qk_norm else ''}{'' if use_tma else ',ptr'}"
                        tag += "" if dq else ",det"
                        specs.append(
                            {
                                "name": f"vit_hopper_{name}[{tag},{m}x{n}w{w}s{stages}]",
                                "fn": fn,
                                "arch": 90,
                                "signature": _signature(fn, dtype, n_tensors, blocks, use_tma, tma_dq, fp32),
                                "constexprs": constexprs,
                                "divisible_by_16": divisible,
                                "num_warps": w,
                                "num_stages": stages,
                                "expect_ptx": {90: ["wgmma"]},
                                "expect_sass": {90: ["UTMALDG", "HGMMA"][not use_tma :] + ["UTMAREDG"] * tma_dq},
                            }
                        )  # fmt: skip
    return specs
