"""Gated cross-attention over per-query key ranges on Hopper (sm_90): forward, backward, decode.

Same interface and semantics as triton.py (q [B, Sq, Hq, D], k/v [B, Skv, Hkv, D] through their
strides, GQA, ranges read through their strides and clamped into [0, Skv], empty rows exactly 0
with log-sum-exp +inf and zero gradients, tanh(gate) in the epilogue, the ungated output kept for
the gate's gradient, base-2 log-sum-exp), with these differences in the kernels:

* FMA-folded scaling: the row max is taken over the raw scores q·kᵀ (the scale is positive, so it
  commutes with the max) and the scale (times log2 e) is folded into the exp2 argument,
  p = exp2(s · c − m): one FFMA per score element where triton.py spends an FMUL, then an FADD.
* A mask-free steady-state key loop and one masked remainder loop. A key block is mask-free when it
  lies inside every non-empty row's range of the query block: the span [max start, min end) of the
  block's rows, walked from its start in whole BLOCK_N blocks. What the block's rows see outside it
  ([min start, span start) and the span's last partial block up to max end) is walked afterwards in
  masked blocks (the online softmax does not care about the order). With NVLM-X / NVLM-H ranges
  (whole images of 256-token tiles, every row of a query block seeing the same image) the masked
  loop has no iterations; a range ending mid-block costs one masked block. Key blocks no row of
  the query block sees are never visited.
* K and V come through TMA tensor descriptors ([B, Skv, Hkv, D] as a 4-D descriptor with block
  [1, BLOCK_N, 1, BLOCK_D]; its bounds are the tensor's, so keys past Skv and padded head-dim
  columns read zero, and a block may start at any key: the span need not be block aligned) when
  the strides allow it (``tma_ok``: unit head-dim stride, 16-byte aligned base and strides); masked
  pointer loads otherwise (``USE_TMA`` = False, the same kernels). Triton software-pipelines the
  steady-state loop (``num_stages`` TMA loads in flight, waited on mbarriers).
* BLOCK_M = 128 with 8 warps: Triton splits the query block across two consumer warpgroups, each
  issuing 64-row wgmma. Triton 3.6's warp specialization (``tl.range(warp_specialize=True)``) is
  for Blackwell only, so there is no separate producer warpgroup: the TMA engine is the producer,
  issued by one thread; nor can a Triton program overlap one block's softmax with the next block's
  wgmma by hand (FlashAttention-3's ping-pong): each wgmma result is awaited before its softmax.

Backward (``attention_bwd``): triton.py's row-sum kernel (rowsum(dO ⊙ O_ungated), the gate's
gradient term), then by default one pass per key block (``_xattn_hopper_bwd_kernel``, BLOCK_N = 128
keys where triton.py's dK/dV kernel holds 64 at D = 128, so every query head's q and dO are read
half as often; the streamed query blocks are 16 rows there, see BWD_TABLE): it holds its keys and
values, walks the query blocks whose ranges reach them (for each, every query head of the GQA group
in a pipelined loop, q and dO by TMA), and makes dK and dV in registers and dQ's share by float32
atomic adds: five GEMMs per
(query block, key block, head) where triton.py's separate dQ and dK/dV kernels spend seven. A
(query block, key block) pair inside every row's range is not masked at all. Float additions are
not associative, so dQ may differ in its last bits between runs: the deterministic mode
(``NVLM_KERNELS_DETERMINISTIC=1``, ``torch.use_deterministic_algorithms(True)``, or
``deterministic=True``) runs the same kernel without the dQ GEMM, then a dQ kernel per query block
(``_xattn_hopper_bwd_dq_kernel``: K and V by TMA, the forward's mask-free loop and masked
remainder), seven GEMMs and no atomics: bitwise reproducible.

Decode (Sq = 1, ``attention_decode``): triton.py's split-K layout (one program per batch·kv head
and split, the GROUP query heads of a kv head as its rows, triton.py's combine kernel) with the
split's whole key blocks by TMA in a mask-free, pipelined loop and one masked tail block. Decode is
memory bound; what TMA saves there is the address arithmetic and predication of the pointer loads
and the register staging (the copy engine writes shared memory directly, several blocks ahead), so
the gain, if any, is for a GPU measurement to show. Its rows are GROUP (8 in NVLM-X) padded to 16:
too few for a 64-row wgmma, so its products are mma.sync (HMMA), as in triton.py.

Under the Triton interpreter (CPU tensors) the same kernels run, descriptors included (the
interpreter emulates them, out-of-bounds zero fill too). Nothing here has run on a GPU: the sm_90
configuration tables are spill-free with triton 3.6 and 3.8 (`make triton-aot`) but unmeasured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nvlm_kernels._backend import autotune_configs, triton_interpreter_enabled
from nvlm_kernels._device import device_guard, flat_grid
from nvlm_kernels._tma import block_shape_hook, deterministic_requested, tma_ok
from nvlm_kernels._tma import head_descriptors as _descriptors
from nvlm_kernels.cross_attention import triton as _sm80
from nvlm_kernels.cross_attention.triton import LOG2E, _block_d, _range_strides, _row_ranges, decode_splits, seq_bucket

_INTERPRET = triton_interpreter_enabled()

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per (head-dim bucket, kind), sm_90 only. BLOCK_M = 128
# with 8 warps: two warpgroups of 64 query rows each; BLOCK_N divides NVLM's 256-token tiles. Every
# entry compiles without spills or a stack frame with triton 3.6 and 3.8 (`make triton-aot`); the
# first is what NVLM_KERNELS_AUTOTUNE=0 runs and the only one the pointer fallback (USE_TMA = False)
# runs (the others are checked with TMA only).
FWD_TABLE = {  # D = 128: 128 x 128 spills with triton 3.8 (fp16, and the pointer form)
    (128, None): [(128, 64, 8, 3), (128, 64, 8, 4)],
    (64, None): [(128, 128, 8, 3), (128, 64, 8, 3)],
}
# The one-pass backward's key blocks: (BLOCK_M = query rows streamed, BLOCK_N = keys held, warps,
# stages), per (head-dim bucket, COMPUTE_DQ). BLOCK_N = 128 keys over two warpgroups. dK and dV
# ([BLOCK_N, D] float32 each) hold 128 of the 255 registers per thread at D = 128 (FlashAttention-3
# gets its 64 x 128 tiles there by moving registers from the producer warpgroup to the consumers,
# which Triton cannot do), so the streamed query block is 16 rows there: 32 and 64 spill with
# triton 3.6 or 3.8 in the TMA or the pointer form (32 x 64 keys is the TMA-only alternative).
BWD_TABLE = {
    (128, True): [(16, 128, 8, 2), (32, 64, 8, 2)],
    (128, False): [(16, 128, 8, 2), (32, 128, 8, 3)],
    (64, True): [(32, 128, 8, 2), (64, 128, 8, 2)],
    (64, False): [(64, 128, 8, 2), (32, 128, 8, 2)],
}
# The deterministic mode's dQ kernel (query rows held, keys streamed).
DQ_TABLE = {
    (128, None): [(128, 64, 8, 2), (64, 64, 4, 3)],
    (64, None): [(128, 64, 8, 3), (64, 64, 4, 3)],
}
INTERPRETER_CONFIG = (64, 64, 4, 1)
DECODE_BLOCK_N = 64
DECODE_STAGES = 4


def _head_dim_bucket(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128


# descriptor argument -> the meta-parameter of the rows it streams (BLOCK_D columns)
_DESCRIPTOR_ROWS = {"K_desc": "BLOCK_N", "V_desc": "BLOCK_N", "Q_desc": "BLOCK_M", "DO_desc": "BLOCK_M"}
_set_block_shapes = block_shape_hook(_DESCRIPTOR_ROWS)


def _as_config(entry) -> triton.Config:
    m, n, w, s = entry
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes)


def _entry(config: triton.Config) -> tuple:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _table_key(table: dict, args: dict) -> tuple:
    """(head-dim bucket, COMPUTE_DQ or None): the table entry of a launch."""
    kind = args.get("COMPUTE_DQ") if any(k[1] is not None for k in table) else None
    return _head_dim_bucket(args.get("HEAD_DIM", 128)), None if kind is None else bool(kind)


def _autotune(table: dict, reset_to_zero: list[str] | None = None):
    """The autotuner over ``table``'s configurations; ``reset_to_zero``: accumulators zeroed before
    every benchmarked run and before the real one (atomics would add the benchmark runs' shares)."""
    if _INTERPRET:
        configs = [_as_config(INTERPRETER_CONFIG)]
    else:
        configs = [_as_config(e) for e in dict.fromkeys(e for entries in table.values() for e in entries)]

    def prune(configs, named_args, **kwargs):
        if _INTERPRET:
            return configs
        args = {**named_args, **kwargs}
        allowed = table[_table_key(table, args)]
        if not args.get("USE_TMA", True):
            allowed = allowed[:1]  # the pointer fallback's one checked configuration
        keep = sorted((c for c in configs if _entry(c) in allowed), key=lambda c: allowed.index(_entry(c)))
        return autotune_configs(keep or configs[:1])

    return triton.autotune(
        configs=configs,
        key=["SQ_BUCKET", "SKV_BUCKET", "HEAD_DIM", "GROUP", "USE_TMA"],
        prune_configs_by={"early_config_prune": prune},
        reset_to_zero=reset_to_zero,
    )


# --------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _stream_block(desc, base, b, h, start, stride_s, stride_d, S,
                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr,
                  MASKED: tl.constexpr):  # fmt: skip
    """Rows [start, start + ROWS) of head (b, h) of a [B, S, H, D] tensor, [ROWS, BLOCK_D]: by TMA
    (``desc``, block [1, ROWS, 1, BLOCK_D]; rows past S and padded head-dim columns arrive as zeros)
    or by pointers (``base`` = the head's first row), rows masked only where ``MASKED``, head-dim
    columns only where BLOCK_D > HEAD_DIM."""
    if USE_TMA:
        return desc.load([b.to(tl.int32), start, h.to(tl.int32), 0]).reshape(ROWS, BLOCK_D)
    else:
        rows = start + tl.arange(0, ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = base + rows.to(tl.int64)[:, None] * stride_s + offs_d[None, :] * stride_d
        if MASKED:
            return tl.load(ptrs, mask=(rows < S)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        elif BLOCK_D != HEAD_DIM:
            return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _key_spans(start, end, nonempty, Skv, BLOCK_N: tl.constexpr):
    """The key walk of one query block: (free_lo, free_hi), whole BLOCK_N blocks inside every
    non-empty row's range (mask-free), and the masked rest: n_head blocks from lo up to free_lo,
    then n_tail blocks from free_hi up to hi ([lo, hi): the union of the rows' ranges)."""
    lo = tl.min(tl.where(nonempty, start, Skv), 0)
    hi = tl.max(tl.where(nonempty, end, 0), 0)
    hi = tl.maximum(hi, lo)  # no non-empty row: nothing to walk
    covered_lo = tl.max(tl.where(nonempty, start, 0), 0)
    covered_hi = tl.min(tl.where(nonempty, end, Skv), 0)
    n_free = tl.maximum(covered_hi - covered_lo, 0) // BLOCK_N
    n_free = tl.where(hi > lo, n_free, 0)
    free_lo = tl.where(n_free > 0, covered_lo, hi)
    free_hi = free_lo + n_free * BLOCK_N
    n_head = tl.cdiv(free_lo - lo, BLOCK_N)
    n_tail = tl.cdiv(hi - free_hi, BLOCK_N)
    return lo, hi, free_lo, free_hi, n_head, n_tail


@triton.jit
def _masked_block(i, lo, free_lo, free_hi, hi, n_head, BLOCK_N: tl.constexpr):
    """(first key, key limit) of masked block i: the head blocks [lo, free_lo), then the tail [free_hi, hi)."""
    in_head = i < n_head
    start_n = tl.where(in_head, lo + i * BLOCK_N, free_hi + (i - n_head) * BLOCK_N)
    limit = tl.where(in_head, free_lo, hi)
    return start_n, limit


@triton.jit
def _query_block(Start, End, stride_startb, stride_starts, stride_endb, stride_ends, Hq, GROUP, Sq, Skv,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """This program's (batch row b, query head h, its kv head hk, rows, row mask, the rows' clamped
    ranges and non-emptiness) and its key walk (``_key_spans``), for the programs that hold
    BLOCK_M query rows (program id = (b·Hq + h) · blocks + block)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(Sq, BLOCK_M)
    pid_bh = pid // num_m
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    rows = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rows < Sq
    start, end, nonempty = _row_ranges(
        Start, End, b, rows, stride_startb, stride_starts, stride_endb, stride_ends, m_mask, Skv
    )
    lo, hi, free_lo, free_hi, n_head, n_tail = _key_spans(start, end, nonempty, Skv, BLOCK_N)
    return b, h, h // GROUP, rows, m_mask, start, end, nonempty, lo, hi, free_lo, free_hi, n_head, n_tail


@triton.jit
def _kv_blocks(K_desc, V_desc, k_base, v_base, b, hk, start_n, stride_ks, stride_kd, stride_vs, stride_vd, Skv,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr,
               MASKED: tl.constexpr):  # fmt: skip
    """Keys and values [start_n, start_n + BLOCK_N) of kv head (b, hk) (``_stream_block``)."""
    k = _stream_block(K_desc, k_base, b, hk, start_n, stride_ks, stride_kd, Skv, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA,
                      MASKED)  # fmt: skip
    v = _stream_block(V_desc, v_base, b, hk, start_n, stride_vs, stride_vd, Skv, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA,
                      MASKED)  # fmt: skip
    return k, v


@triton.jit
def _softmax_update(s, v, m_i, l_i, acc, qk_scale, MAY_BE_EMPTY: tl.constexpr):
    """One key block of the online softmax from the raw scores s = q·kᵀ (float32, -inf where
    masked): the max of the raw scores, scaled per row, and the scale folded into the exp2 argument
    (one FFMA per element). ``MAY_BE_EMPTY``: a row may have seen no key yet (its max is -inf).
    Returns the new (m, l, acc); m is in scaled base-2 units."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_use = m_new
    if MAY_BE_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@_autotune(FWD_TABLE)
@triton.jit
def _xattn_hopper_fwd_kernel(
    Q, K, V, K_desc, V_desc, Start, End, GateTanh, Out, Ungated, Lse,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_startb, stride_starts, stride_endb, stride_ends,
    Hq, GROUP, Sq, Skv, SQ_BUCKET, SKV_BUCKET, qk_scale,
    HAS_GATE: tl.constexpr, WRITE_UNGATED: tl.constexpr, USE_TMA: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """BLOCK_M queries of one (batch row, query head): the mask-free key blocks (K_desc / V_desc:
    TMA descriptors over K and V when USE_TMA, else unused), then the masked rest of the rows'
    ranges. Out and Ungated share strides (fresh [B, Sq, Hq, D] tensors)."""
    b, h, hk, rows, m_mask, start, end, nonempty, lo, hi, free_lo, free_hi, n_head, n_tail = _query_block(
        Start, End, stride_startb, stride_starts, stride_endb, stride_ends, Hq, GROUP, Sq, Skv, BLOCK_M, BLOCK_N
    )
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = _sm80._load_block(Q + b * stride_qb + h * stride_qh, rows, stride_qs, offs_d, stride_qd, m_mask, d_mask)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # steady state: every row (empty rows too: their output is discarded) sees every key, so the
    # running max is finite after the first block and nothing is masked
    for start_n in tl.range(free_lo, free_hi, BLOCK_N):
        k, v = _kv_blocks(K_desc, V_desc, k_base, v_base, b, hk, start_n, stride_ks, stride_kd, stride_vs, stride_vd,
                          Skv, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, False)  # fmt: skip
        m_i, l_i, acc = _softmax_update(tl.dot(q, tl.trans(k)), v, m_i, l_i, acc, qk_scale, False)
    # the masked rest: key blocks some row of the block does not see in full
    for i in range(n_head + n_tail):
        start_n, limit = _masked_block(i, lo, free_lo, free_hi, hi, n_head, BLOCK_N)
        cols = start_n + offs_n
        k, v = _kv_blocks(K_desc, V_desc, k_base, v_base, b, hk, start_n, stride_ks, stride_kd, stride_vs, stride_vd,
                          Skv, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, True)  # fmt: skip
        v = tl.where((cols < hi)[:, None], v, 0.0)  # keys no row sees may hold anything (p = 0 there, 0·NaN not)
        allowed = (cols[None, :] >= start[:, None]) & (cols[None, :] < tl.minimum(end, limit)[:, None])
        s = tl.where(allowed, tl.dot(q, tl.trans(k)), float("-inf"))
        m_i, l_i, acc = _softmax_update(s, v, m_i, l_i, acc, qk_scale, True)

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


@_autotune(BWD_TABLE, reset_to_zero=["DQacc"])
@triton.jit
def _xattn_hopper_bwd_kernel(
    Q, K, V, DO, Q_desc, DO_desc, Start, End, Lse, Delta, GateTanh, DK, DV, DQacc,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_gb, stride_gs, stride_gh, stride_gd,
    stride_startb, stride_starts, stride_endb, stride_ends,
    Hq, GROUP, Sq, Skv, SQ_BUCKET, SKV_BUCKET, qk_scale, sm_scale,
    HAS_GATE: tl.constexpr, COMPUTE_DQ: tl.constexpr, USE_TMA: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """BLOCK_N keys of one key/value head: dK, dV over the query blocks whose ranges reach them,
    for every query head of the group (q, dO by TMA through Q_desc / DO_desc when USE_TMA), and
    (COMPUTE_DQ) each pair's share of dQ added atomically into DQacc (float32, contiguous
    [B, Sq, Hq, HEAD_DIM], zeroed). DO is the gated output's gradient; DK and DV share strides."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(Skv, BLOCK_N)
    pid_n = pid % num_n
    pid_bh = pid // num_n
    hkv = Hq // GROUP
    b = (pid_bh // hkv).to(tl.int64)
    hk = (pid_bh % hkv).to(tl.int64)
    block_lo = pid_n * BLOCK_N
    block_hi = block_lo + BLOCK_N
    cols = block_lo + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = cols < Skv
    d_mask = offs_d < HEAD_DIM
    gate = 1.0
    if HAS_GATE:
        gate = tl.load(GateTanh)
    k = _sm80._load_block(K + b * stride_kb + hk * stride_kh, cols, stride_ks, offs_d, stride_kd, n_mask, d_mask)
    v = _sm80._load_block(V + b * stride_vb + hk * stride_vh, cols, stride_vs, offs_d, stride_vd, n_mask, d_mask)
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
            # not inside every non-empty row's range: mask (keys past Skv are outside every range)
            partial = (tl.max(tl.where(nonempty, start, 0), 0) > block_lo) | (
                tl.min(tl.where(nonempty, end, Skv), 0) < block_hi
            )
            for g in tl.range(0, GROUP):
                h = hk * GROUP + g
                q = _stream_block(Q_desc, Q + b * stride_qb + h * stride_qh, b, h, start_m, stride_qs, stride_qd, Sq,
                                  BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA, True)  # fmt: skip
                do = _stream_block(DO_desc, DO + b * stride_db + h * stride_dh, b, h, start_m, stride_ds, stride_dd,
                                   Sq, BLOCK_M, BLOCK_D, HEAD_DIM, USE_TMA, True)  # fmt: skip
                row_base = (b * Hq + h) * Sq
                lse = tl.load(Lse + row_base + rows, mask=m_mask, other=float("inf"))  # empty rows: +inf, p = 0
                delta = tl.load(Delta + row_base + rows, mask=m_mask, other=0.0)
                p_t = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
                if partial:  # the mask made here, not held across the loop (registers)
                    allowed_t = (cols[:, None] >= start[None, :]) & (cols[:, None] < end[None, :])
                    p_t = tl.where(allowed_t, p_t, 0.0)
                dv = tl.dot(p_t.to(do.dtype), do, dv)
                dp_t = tl.dot(v, tl.trans(do))
                ds_t = p_t * (dp_t * gate - delta[None, :])
                dk = tl.dot(ds_t.to(q.dtype), q, dk)
                if COMPUTE_DQ:
                    dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k) * sm_scale  # [BLOCK_M, BLOCK_D]
                    # a 64-bit base and 32-bit offsets within the tile: fewer live address registers
                    dq_base = DQacc + ((b * Sq + start_m) * Hq + h) * HEAD_DIM
                    dq_offs = offs_m[:, None] * (Hq * HEAD_DIM) + offs_d[None, :]
                    tl.atomic_add(dq_base + dq_offs, dq, mask=m_mask[:, None] & d_mask[None, :], sem="relaxed")
    dk *= sm_scale
    dv *= gate
    offsets = b * stride_gb + hk * stride_gh + cols.to(tl.int64)[:, None] * stride_gs + offs_d[None, :] * stride_gd
    out_mask = n_mask[:, None] & d_mask[None, :]
    tl.store(DK + offsets, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + offsets, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_update(q, do, k, v, lse, delta, gate, dq, qk_scale, allowed, MASKED: tl.constexpr):
    """dq += dS · k over one key block (dS = P ⊙ (dO·vᵀ·gate − delta), P from the saved lse; masked
    entries of ``allowed`` out where ``MASKED``)."""
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    ds = p * (tl.dot(do, tl.trans(v)) * gate - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@_autotune(DQ_TABLE)
@triton.jit
def _xattn_hopper_bwd_dq_kernel(
    Q, K, V, DO, K_desc, V_desc, Start, End, Lse, Delta, GateTanh, DQ,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_gb, stride_gs, stride_gh, stride_gd,
    stride_startb, stride_starts, stride_endb, stride_ends,
    Hq, GROUP, Sq, Skv, SQ_BUCKET, SKV_BUCKET, qk_scale, sm_scale,
    HAS_GATE: tl.constexpr, USE_TMA: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The deterministic mode's dQ of BLOCK_M query rows: the forward's key walk (mask-free blocks
    by TMA, then the masked rest), no atomics."""
    b, h, hk, rows, m_mask, start, end, nonempty, lo, hi, free_lo, free_hi, n_head, n_tail = _query_block(
        Start, End, stride_startb, stride_starts, stride_endb, stride_ends, Hq, GROUP, Sq, Skv, BLOCK_M, BLOCK_N
    )
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    gate = 1.0
    if HAS_GATE:
        gate = tl.load(GateTanh)
    q = _sm80._load_block(Q + b * stride_qb + h * stride_qh, rows, stride_qs, offs_d, stride_qd, m_mask, d_mask)
    do = _sm80._load_block(DO + b * stride_db + h * stride_dh, rows, stride_ds, offs_d, stride_dd, m_mask, d_mask)
    row_base = (b * Hq + h) * Sq
    lse = tl.load(Lse + row_base + rows, mask=m_mask, other=float("inf"))  # empty rows: +inf, p = 0
    delta = tl.load(Delta + row_base + rows, mask=m_mask, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in tl.range(free_lo, free_hi, BLOCK_N):
        k, v = _kv_blocks(K_desc, V_desc, k_base, v_base, b, hk, start_n, stride_ks, stride_kd, stride_vs, stride_vd,
                          Skv, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, False)  # fmt: skip
        dq = _dq_update(q, do, k, v, lse, delta, gate, dq, qk_scale, m_mask, False)
    for i in range(n_head + n_tail):
        start_n, limit = _masked_block(i, lo, free_lo, free_hi, hi, n_head, BLOCK_N)
        cols = start_n + offs_n
        k, v = _kv_blocks(K_desc, V_desc, k_base, v_base, b, hk, start_n, stride_ks, stride_kd, stride_vs, stride_vd,
                          Skv, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, True)  # fmt: skip
        v = tl.where((cols < hi)[:, None], v, 0.0)
        allowed = (cols[None, :] >= start[:, None]) & (cols[None, :] < tl.minimum(end, limit)[:, None])
        dq = _dq_update(q, do, k, v, lse, delta, gate, dq, qk_scale, allowed, True)
    dq *= sm_scale
    offsets = b * stride_gb + h * stride_gh + rows.to(tl.int64)[:, None] * stride_gs + offs_d[None, :] * stride_gd
    tl.store(DQ + offsets, dq.to(DQ.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _xattn_hopper_decode_kernel(
    Q, K, V, K_desc, V_desc, Start, End, PartAcc, PartM, PartL,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_startb, stride_endb,
    Hq, GROUP, Skv, SPLITS, qk_scale,
    USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """triton.py's split-K decode program (the GROUP query heads of a key/value head as rows, split
    ``program_id(0) % SPLITS`` of the row's key range, partial softmax state out) with the split's
    whole key blocks by TMA, unmasked, and its last partial block masked."""
    pid = tl.program_id(0)
    split = pid % SPLITS
    hkv = Hq // GROUP
    b = (pid // SPLITS // hkv).to(tl.int64)
    hk = (pid // SPLITS % hkv).to(tl.int64)
    heads = hk * GROUP + tl.arange(0, BLOCK_G)
    g_mask = tl.arange(0, BLOCK_G) < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    start = tl.minimum(tl.maximum(tl.load(Start + b * stride_startb), 0), Skv)
    end = tl.minimum(tl.maximum(tl.load(End + b * stride_endb), start), Skv)
    per_split = tl.cdiv(tl.cdiv(end - start, BLOCK_N), SPLITS)  # whole key blocks per split
    lo = start + split * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, end)
    full_hi = lo + (tl.maximum(hi - lo, 0) // BLOCK_N) * BLOCK_N
    q = _sm80._load_block(Q + b * stride_qb, heads, stride_qh, offs_d, stride_qd, g_mask, d_mask)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start_n in tl.range(lo, full_hi, BLOCK_N):
        k, v = _kv_blocks(K_desc, V_desc, k_base, v_base, b, hk, start_n, stride_ks, stride_kd, stride_vs, stride_vd,
                          Skv, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, False)  # fmt: skip
        m_i, l_i, acc = _softmax_update(tl.dot(q, tl.trans(k)), v, m_i, l_i, acc, qk_scale, False)
    if full_hi < hi:  # the split's last partial block (at least one key: the max stays finite)
        n_mask = full_hi + tl.arange(0, BLOCK_N) < hi
        k, v = _kv_blocks(K_desc, V_desc, k_base, v_base, b, hk, full_hi, stride_ks, stride_kd, stride_vs, stride_vd,
                          Skv, BLOCK_N, BLOCK_D, HEAD_DIM, USE_TMA, True)  # fmt: skip
        v = tl.where(n_mask[:, None], v, 0.0)  # keys past the range may hold anything
        s = tl.where(n_mask[None, :], tl.dot(q, tl.trans(k)), float("-inf"))
        m_i, l_i, acc = _softmax_update(s, v, m_i, l_i, acc, qk_scale, False)
    part = (b * Hq + heads.to(tl.int64)) * SPLITS + split  # [BLOCK_G]
    tl.store(PartAcc + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(PartM + part, m_i, mask=g_mask)
    tl.store(PartL + part, l_i, mask=g_mask)


# --------------------------------------------------------------------------------------------------
# launchers


def attention_fwd(q, k, v, kv_start, kv_end, gate_tanh, scale, save_ungated: bool):
    """(out [B, Sq, Hq, D], lse [B, Hq, Sq] float32, ungated (or an empty placeholder))."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    with device_guard(q):
        out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        write_ungated = save_ungated and gate_tanh is not None
        ungated = torch.empty_like(out) if write_ungated else out.new_empty((0,))
        if B * Sq == 0:
            return out, lse, ungated
        use_tma = tma_ok(k) and tma_ok(v)
        gate_arg = gate_tanh if gate_tanh is not None else lse  # unused without a gate
        _xattn_hopper_fwd_kernel[lambda meta: flat_grid(triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, *_descriptors(use_tma, k, v), kv_start, kv_end, gate_arg, out,
            ungated if write_ungated else out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *_range_strides(kv_start, kv_end),
            Hq, Hq // Hkv, Sq, Skv, seq_bucket(Sq), seq_bucket(Skv), scale * LOG2E,
            HAS_GATE=gate_tanh is not None, WRITE_UNGATED=write_ungated, USE_TMA=use_tma,
            HEAD_DIM=D, BLOCK_D=_block_d(D),
        )  # fmt: skip
    return out, lse, ungated


def attention_bwd(grad_out, q, k, v, kv_start, kv_end, gate_tanh, out, lse, ungated, scale,
                  deterministic: bool | None = None):  # fmt: skip
    """(dq, dk, dv, dgate_tanh_sum) as triton.py's: the last is Σ O_ungated ⊙ dOut (float32 scalar
    tensor), or an empty tensor without a gate. dQ by float32 atomics unless ``deterministic``
    (``deterministic_requested``)."""
    B, Sq, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    with device_guard(q):
        dk = torch.empty((B, Skv, Hkv, D), dtype=k.dtype, device=k.device)
        dv = torch.empty((B, Skv, Hkv, D), dtype=v.dtype, device=v.device)
        has_gate = gate_tanh is not None
        o_ungated = ungated if has_gate else out
        rowsum = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
        if B * Sq > 0:
            rows = _sm80._ROWSUM_ROWS
            _sm80._xattn_bwd_rowsum_kernel[flat_grid(triton.cdiv(Sq, rows), B * Hq)](
                o_ungated, grad_out, rowsum, *o_ungated.stride(), *grad_out.stride(), Hq, Sq,
                HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_M=rows,
            )  # fmt: skip
        delta = rowsum * gate_tanh.float() if has_gate else rowsum
        dgate_sum = rowsum.sum() if has_gate else q.new_empty((0,), dtype=torch.float32)
        if B * Sq == 0 or Skv == 0:
            return torch.zeros_like(q, memory_format=torch.contiguous_format), dk.zero_(), dv.zero_(), dgate_sum
        deterministic = deterministic_requested(deterministic)
        if deterministic:
            dq = torch.empty_like(q, memory_format=torch.contiguous_format)
            dq_acc = torch.empty((1,), dtype=torch.float32, device=q.device)  # unused (the autotuner zeroes it)
        else:
            dq_acc = torch.zeros((B, Sq, Hq, D), dtype=torch.float32, device=q.device)
        gate_arg = gate_tanh if has_gate else rowsum
        ranges = _range_strides(kv_start, kv_end)
        buckets = (seq_bucket(Sq), seq_bucket(Skv))
        use_tma = tma_ok(q) and tma_ok(grad_out)
        _xattn_hopper_bwd_kernel[lambda meta: flat_grid(triton.cdiv(Skv, meta["BLOCK_N"]), B * Hkv)](
            q, k, v, grad_out, *_descriptors(use_tma, q, grad_out), kv_start, kv_end, lse, delta, gate_arg,
            dk, dv, dq_acc,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *ranges,
            Hq, Hq // Hkv, Sq, Skv, *buckets, scale * LOG2E, scale,
            HAS_GATE=has_gate, COMPUTE_DQ=not deterministic, USE_TMA=use_tma, HEAD_DIM=D, BLOCK_D=_block_d(D),
        )  # fmt: skip
        if not deterministic:
            return dq_acc.to(q.dtype), dk, dv, dgate_sum
        use_tma = tma_ok(k) and tma_ok(v)
        _xattn_hopper_bwd_dq_kernel[lambda meta: flat_grid(triton.cdiv(Sq, meta["BLOCK_M"]), B * Hq)](
            q, k, v, grad_out, *_descriptors(use_tma, k, v), kv_start, kv_end, lse, delta, gate_arg, dq,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *ranges,
            Hq, Hq // Hkv, Sq, Skv, *buckets, scale * LOG2E, scale,
            HAS_GATE=has_gate, USE_TMA=use_tma, HEAD_DIM=D, BLOCK_D=_block_d(D),
        )  # fmt: skip
    return dq, dk, dv, dgate_sum


def attention_decode(q, k, v, kv_start, kv_end, gate_tanh, scale, save_ungated: bool = False):
    """q [B, 1, Hq, D]: one query token per batch row over its key range; the forward's outputs
    (out [B, 1, Hq, D], lse [B, Hq, 1] float32, ungated (or an empty placeholder))."""
    B, _, Hq, D = q.shape
    Skv, Hkv = k.shape[1], k.shape[2]
    group = Hq // Hkv
    with device_guard(q):
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
        use_tma = tma_ok(k) and tma_ok(v)
        _xattn_hopper_decode_kernel[flat_grid(splits, B * Hkv)](
            q2, k, v, *_descriptors(use_tma, k, v, rows=DECODE_BLOCK_N), kv_start, kv_end, part_acc, part_m, part_l,
            *q2.stride(), *k.stride(), *v.stride(), kv_start.stride(0), kv_end.stride(0),
            Hq, group, Skv, splits, scale * LOG2E,
            USE_TMA=use_tma, HEAD_DIM=D, BLOCK_D=_block_d(D), BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_N=DECODE_BLOCK_N, num_warps=4, num_stages=DECODE_STAGES,
        )  # fmt: skip
        o2 = out[:, 0]
        _sm80._xattn_decode_combine_kernel[flat_grid(1, B * Hq)](
            part_acc, part_m, part_l, gate_tanh if gate_tanh is not None else part_m, o2,
            ungated[:, 0] if write_ungated else o2, lse, *o2.stride(), Hq, splits,
            HAS_GATE=gate_tanh is not None, WRITE_UNGATED=write_ungated, HEAD_DIM=D, BLOCK_D=_block_d(D),
            BLOCK_S=triton.next_power_of_2(splits),
        )  # fmt: skip
    return out, lse, ungated


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation (tools/triton_aot.py)

_FP32_POINTERS = {"GateTanh", "Lse", "Delta", "DQacc", "PartAcc", "PartM", "PartL"}
_INT_POINTERS = {"Start", "End"}
_INT_ARGS = ("Hq", "GROUP", "Sq", "Skv", "SQ_BUCKET", "SKV_BUCKET", "SPLITS")
# a contiguous [B, Sq] range tensor's column stride is 1 (Triton specializes it), its row stride Sq
_RANGE_UNIT = ("stride_starts", "stride_ends")
_RANGE_ROW = ("stride_startb", "stride_endb")


def _signature(fn, dtype: str, n_tensors: int, blocks: dict, use_tma: bool) -> dict:
    """Pointer types for the first ``n_tensors`` arguments (descriptors ``*_desc`` when ``use_tma``,
    with the block the pre-hook gives them), i32 strides and sizes, fp32 scales; constexprs are
    added by tools/triton_aot.py."""
    signature = {}
    for i, name in enumerate(fn.arg_names):
        if i < n_tensors:
            elem = "i32" if name in _INT_POINTERS else ("fp32" if name in _FP32_POINTERS else dtype)
            if name.endswith("_desc") and use_tma:
                rows = blocks[_DESCRIPTOR_ROWS[name]]
                signature[name] = f"tensordesc<{elem}[1, {rows}, 1, {blocks['BLOCK_D']}]>"
            else:
                signature[name] = f"*{elem}"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        elif name.startswith("stride_") or name in _INT_ARGS:
            signature[name] = "i32"
    return signature


def _spec(name: str, fn, n_tensors: int, dtype: str, blocks: dict, use_tma: bool, constexprs: dict, warps: int,
          stages: int, sass: list[str]) -> dict:  # fmt: skip
    unit = [a for a in fn.arg_names if a.startswith("stride_") and (a.endswith("d") or a in _RANGE_UNIT)]
    strides = [a for a in fn.arg_names if a.startswith("stride_") and a not in unit and a not in _RANGE_ROW]
    return {
        "name": name,
        "fn": fn,
        "arch": 90,
        "signature": _signature(fn, dtype, n_tensors, blocks, use_tma),
        "constexprs": {**constexprs, "USE_TMA": use_tma, **blocks, **dict.fromkeys(unit, 1)},
        "divisible_by_16": [a for a in fn.arg_names[:n_tensors] if not a.endswith("_desc")] + strides,
        "num_warps": warps,
        "num_stages": stages,
        "expect_ptx": {90: ["wgmma"]} if "HGMMA" in sass else {},
        "expect_sass": {90: (["UTMALDG"] if use_tma else []) + sass},
    }


def aot_specs() -> list[dict]:
    """Every configuration of the sm_90 tables at NVLM-X's shape (D = 128, GQA 8) and D = 64, bf16
    and fp16, gated, with TMA (the descriptor form) and, for each table's first entry, the pointer
    fallback; the backward with and without the dQ atomics; then the decode kernel. The TMA main
    loops must load by UTMALDG and multiply by HGMMA (decode: 16 rows, mma.sync)."""
    specs = []
    tuned = [
        ("fwd", _xattn_hopper_fwd_kernel, 11, FWD_TABLE, {"HAS_GATE": True, "WRITE_UNGATED": True}),
        ("bwd", _xattn_hopper_bwd_kernel, 14, BWD_TABLE, {"HAS_GATE": True}),
        ("bwd_dq", _xattn_hopper_bwd_dq_kernel, 12, DQ_TABLE, {"HAS_GATE": True}),
    ]
    for name, kernel, n_tensors, table, flags in tuned:
        fn = kernel.fn
        for (head_dim, compute_dq), configs in table.items():
            extra = {} if compute_dq is None else {"COMPUTE_DQ": compute_dq}
            for i, (m, n, w, stages) in enumerate(configs):
                for dtype in ("bf16", "fp16"):
                    for use_tma in (True, False) if i == 0 else (True,):
                        blocks = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": head_dim}
                        tag = f"{dtype},D{head_dim}{'' if use_tma else ',ptr'}{',det' if compute_dq is False else ''}"
                        specs.append(
                            _spec(f"xattn_hopper_{name}[{tag},{m}x{n}w{w}s{stages}]", fn, n_tensors, dtype, blocks,
                                  use_tma, {**flags, **extra, "HEAD_DIM": head_dim}, w, stages, ["HGMMA"])
                        )  # fmt: skip
    # a padded head dim (D = 80: BLOCK_D = 128, TMA fills the columns past 80 with zeros)
    m, n, w, stages = FWD_TABLE[(128, None)][0]
    fn = _xattn_hopper_fwd_kernel.fn
    for dtype in ("bf16", "fp16"):
        specs.append(
            _spec(f"xattn_hopper_fwd[{dtype},D80,{m}x{n}w{w}s{stages}]", fn, 11, dtype,
                  {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": 128}, True,
                  {"HAS_GATE": True, "WRITE_UNGATED": True, "HEAD_DIM": 80}, w, stages, ["HGMMA"])
        )  # fmt: skip
    fn = _xattn_hopper_decode_kernel
    for head_dim in (128, 64):
        for dtype in ("bf16", "fp16"):
            for use_tma in (True, False):
                blocks = {"BLOCK_G": 16, "BLOCK_N": DECODE_BLOCK_N, "BLOCK_D": head_dim}
                tag = f"{dtype},D{head_dim}{'' if use_tma else ',ptr'}"
                specs.append(
                    _spec(f"xattn_hopper_decode[{tag},16x{DECODE_BLOCK_N}w4s{DECODE_STAGES}]", fn, 10, dtype, blocks,
                          use_tma, {"HEAD_DIM": head_dim}, 4, DECODE_STAGES, [])
                )  # fmt: skip
    return specs
