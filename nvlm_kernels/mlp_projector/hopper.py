"""The projector on Hopper (sm_90): one LayerNorm pass, then a persistent TMA-fed first GEMM.

    z   = LayerNorm(gathered x)       [M, K]   ``_ln_fwd_kernel`` of triton.py (the unfused path's pass)
    h   = z · W1ᵀ + b1 -> GELU         [M, N1]  ``_gemm1_kernel`` (below): persistent, TMA, wgmma
    out = GELU(h) · W2ᵀ + b2                    cuBLAS (``F.linear``), as in triton.py

What differs from triton.py's ``_ln_linear_kernel`` (one program per output tile, A gathered from x
with pointer loads and normalized on its way from shared memory to the tensor cores):

* A is z, written once by the memory-bound LayerNorm pass (x read once, z written once: 2·M·K
  elements, ~46 MB at NVLM-72B's 1792 rows), so the GEMM's A tile goes from global memory to
  shared memory by TMA and from there straight into ``wgmma`` (no register round trip, no
  normalization arithmetic issued by the warps that issue the MMAs);
* A and W1 tiles are loaded with host-built TMA tensor descriptors (``TensorDescriptor``: the
  ``CUtensorMap`` is a kernel parameter, nothing is built on the device), whose out-of-bounds
  zero fill replaces every mask of the K loop and of the M / N edges;
* persistent: one program per SM walks the output tiles in grouped order (``GROUP`` row tiles
  share each W1 column tile while it is in L2), and the tile loop and the K loop are flattened
  into one software pipeline (``tl.range(..., flatten=True)``), so the next tile's first TMA loads
  are in flight while this tile's epilogue runs;
* the epilogue (bias, exact or tanh GELU, the pre-activation when autograd needs it) stores through
  a TMA descriptor in two halves of the N tile (half the staging shared memory and half the live
  registers of a full-tile store) when N1 is a multiple of 8 (TMA's 16-byte row stride), with
  masked pointer stores otherwise.

The alternative form, ``ln_on_load``, keeps triton.py's idea inside the same persistent kernel: W1
by TMA, A gathered from x with pointer loads and normalized on load (after a statistics pass that
writes only two floats per row). Why it might win: at small M (one or a few images: M = 256 · tiles)
GEMM1 is bound by reading W1 (757 MB at 72B), not by the tensor cores, so the normalization
arithmetic is hidden, and the separate pass's cost — a launch plus writing and re-reading z
(2·M·K elements) — is not. Where the tensor cores are the limit (many images), the ``ln_pass``
form should win. Nothing here has run on a GPU: the form is chosen by ``form()`` (``ln_pass``
unless ``NVLM_KERNELS_HOPPER_PROJECTOR_FORM=ln_on_load``) until a GPU measurement decides.

Without a LayerNorm (``ln_weight=None``) the ``ln_pass`` form reads x's rows directly by TMA when
they already form a [M, K] matrix with unit feature stride (no shuffle, no CLS drop), and gathers
them once otherwise (``_ln_apply_kernel`` without a LayerNorm).

Requirements of TMA: K % 8 == 0 (z's and W1's rows 16-byte aligned; every NVLM / InternVL
projector has it; the op names it as the reason otherwise); a W1 view whose rows are not
16-byte aligned or whose features are strided is copied once per call.

Backward: triton.py's (``projector_bwd``): cuBLAS for the four GEMMs, its GELU-derivative,
LayerNorm-apply and LayerNorm-backward kernels, from the same saved row statistics and
pre-activation. Under the Triton interpreter (CPU tensors) the same kernel runs with the
interpreter's descriptor emulation (out-of-bounds zero fill and clipped stores included).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from nvlm_kernels._backend import autotune_configs, triton_interpreter_enabled
from nvlm_kernels._device import device_guard
from nvlm_kernels._tma import descriptor, tma_ok
from nvlm_kernels.mlp_projector import triton as _sm80
from nvlm_kernels.mlp_projector.triton import ACTIVATIONS, _col_offset, _gelu, _row_base

_INTERPRET = triton_interpreter_enabled()

FORMS = ("ln_pass", "ln_on_load")
FORM_ENV_VAR = "NVLM_KERNELS_HOPPER_PROJECTOR_FORM"

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per form; BLOCK_M = 128 split across two
# warpgroups (8 warps). Every entry is compiled by `make triton-aot` for sm_90 and must not spill; each
# form's first entry is what NVLM_KERNELS_AUTOTUNE=0 runs. The LN-on-load form keeps the A tile in
# registers for the normalization: a 128 x 256 accumulator beside it takes 255 registers (and a stack
# frame with triton 3.8), so it stays at 128 x 128.
GEMM_TABLE = {
    "ln_pass": [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4)],
    "ln_on_load": [(128, 128, 64, 8, 4)],
}
INTERPRETER_GEMM = (64, 64, 64, 4, 1)
GROUP_M = 8
POINTER_STORE_MAX_N = 128  # widest N tile of the pointer-store epilogue (N1 % 8 != 0) without spills
_INTERPRETER_PROGRAMS = 3  # persistent programs under the interpreter: several tiles each, a ragged last round


def form() -> str:
    """The GEMM1 form that runs: ``ln_pass`` (default) or ``ln_on_load`` (environment variable)."""
    value = os.environ.get(FORM_ENV_VAR, "").strip().lower() or "ln_pass"
    if value not in FORMS:
        raise ValueError(f"{FORM_ENV_VAR} must be one of {FORMS}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# the kernel


def _as_config(entry) -> triton.Config:
    m, n, k, w, s = entry
    return triton.Config(
        {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s, pre_hook=_set_block_shapes
    )


def _set_block_shapes(nargs: dict) -> None:
    """Host descriptors carry their block shape: make them match the configuration being launched."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    shapes = {"A_desc": [bm, bk], "W_desc": [bn, bk], "Out_desc": [bm, bn // 2], "Pre_desc": [bm, bn // 2]}
    for name, shape in shapes.items():
        desc = nargs.get(name)
        if isinstance(desc, TensorDescriptor):
            desc.block_shape = shape


def _gemm_configs() -> list[triton.Config]:
    if _INTERPRET:
        return [_as_config(INTERPRETER_GEMM)]
    return [_as_config(e) for e in dict.fromkeys(e for entries in GEMM_TABLE.values() for e in entries)]


def _prune(configs, named_args, **kwargs):
    if _INTERPRET:
        return configs
    ln_on_load = kwargs.get("LN_ON_LOAD", named_args.get("LN_ON_LOAD"))
    allowed = GEMM_TABLE["ln_on_load" if ln_on_load else "ln_pass"]
    if not kwargs.get("TMA_STORE", named_args.get("TMA_STORE", True)):
        # the pointer-store epilogue keeps its addresses in registers: a 256-wide tile spills
        allowed = [e for e in allowed if e[1] <= POINTER_STORE_MAX_N]
    keep = sorted(
        (c for c in configs if (*c.kwargs.values(), c.num_warps, c.num_stages) in allowed),
        key=lambda c: allowed.index((*c.kwargs.values(), c.num_warps, c.num_stages)),
    )
    return autotune_configs(keep or configs[:1])


@triton.jit
def _tile_coords(tile, grid_m, grid_n, GROUP: tl.constexpr):
    """(row tile, column tile) of output tile ``tile`` in grouped order: GROUP row tiles walk the
    column tiles together, so the W1 tiles in flight are shared through L2."""
    per_group = GROUP * grid_n
    first_m = (tile // per_group) * GROUP
    rows_here = min(grid_m - first_m, GROUP)
    pid_m = first_m + (tile % per_group) % rows_here
    pid_n = (tile % per_group) // rows_here
    return pid_m, pid_n


@triton.jit
def _store_half(Desc, Ptr, value, rows, cols, off_m, off_n, M, N, TMA_STORE: tl.constexpr):
    if TMA_STORE:
        Desc.store([off_m, off_n], value)
    else:
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        tl.store(Ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], value, mask=mask)


@triton.autotune(
    configs=_gemm_configs(),
    key=["M_BUCKET", "N", "K", "LN_ON_LOAD", "TMA_STORE"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _gemm1_kernel(
    A_desc, W_desc, Out_desc, Pre_desc,
    X, Mean, Rstd, Gamma, Beta, Bias, Out, Pre,
    M, N, K, M_BUCKET, L_out, side_out, side, C, cls,
    stride_xn, stride_xl, stride_xc,
    LN_ON_LOAD: tl.constexpr, HAS_LN: tl.constexpr, HAS_BETA: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, WRITE_PRE: tl.constexpr, TMA_STORE: tl.constexpr, R: tl.constexpr, V2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """Out[m, n] = act(sum_k A[m, k] · W[n, k] + bias[n]) over every output tile, one program per SM.

    A: ``A_desc`` over z [M, K] (``LN_ON_LOAD=False``), or x gathered through the shuffle and
    normalized with Mean / Rstd / Gamma / Beta as it is loaded (``LN_ON_LOAD=True``). W: ``W_desc``
    over W1 [N, K]. Pre (``WRITE_PRE``): the pre-activation. Stores by TMA (``Out_desc`` /
    ``Pre_desc``, half a tile wide) when ``TMA_STORE``, else masked pointer stores."""
    dtype: tl.constexpr = Out.dtype.element_ty
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    HALF: tl.constexpr = BLOCK_N // 2
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, tl.num_programs(0), flatten=True):
        pid_m, pid_n = _tile_coords(tile, grid_m, grid_n, GROUP)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if LN_ON_LOAD:
            rows = off_m + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            safe_rows = tl.where(row_ok, rows, 0)
            base = _row_base(safe_rows, L_out, side_out, side, cls, stride_xn, stride_xl, R, V2)
            if HAS_LN:
                mean = tl.load(Mean + safe_rows)
                rstd = tl.load(Rstd + safe_rows)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for ki in range(k_steps):
            k0 = ki * BLOCK_K
            if LN_ON_LOAD:
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                offs = base[:, None] + _col_offset(ks, C, side, stride_xl, stride_xc, R)[None, :]
                a = tl.load(X + offs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if HAS_LN:
                    gamma = tl.load(Gamma + ks, mask=k_ok, other=0.0).to(tl.float32)
                    normed = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :]
                    if HAS_BETA:
                        normed += tl.load(Beta + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                    a = normed.to(dtype)  # rounded as an eager LayerNorm output is
            else:
                a = A_desc.load([off_m, k0])
            w = W_desc.load([off_n, k0])
            acc = tl.dot(a, w.T, acc)
        # epilogue, in two halves of the N tile
        cols = off_n + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        first, second = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        out_rows = off_m + tl.arange(0, BLOCK_M)
        cols0 = off_n + tl.arange(0, HALF)
        if WRITE_PRE:
            _store_half(Pre_desc, Pre, first.to(dtype), out_rows, cols0, off_m, off_n, M, N, TMA_STORE)
            _store_half(Pre_desc, Pre, second.to(dtype), out_rows, cols0 + HALF, off_m, off_n + HALF, M, N, TMA_STORE)
        _store_half(Out_desc, Out, _gelu(first, ACT).to(dtype), out_rows, cols0, off_m, off_n, M, N, TMA_STORE)
        _store_half(Out_desc, Out, _gelu(second, ACT).to(dtype), out_rows, cols0 + HALF, off_m, off_n + HALF, M, N,
                    TMA_STORE)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# launchers


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device, tiles: int) -> int:
    if device.type != "cuda":
        return max(1, min(tiles, _INTERPRETER_PROGRAMS))
    return max(1, min(tiles, _sm_count(device.index if device.index is not None else torch.cuda.current_device())))


def _rows_view(x: torch.Tensor, r: int, cls: int) -> torch.Tensor | None:
    """x's tokens as a [M, K] matrix TMA can read in place (no shuffle, no CLS drop), else None."""
    if r != 1 or cls:
        return None
    try:
        rows = x.view(-1, x.shape[-1])
    except RuntimeError:
        return None
    return rows if tma_ok(rows) else None


def _gemm1(a, x, geo, w1, b1, mean, rstd, ln_weight, ln_bias, act, hidden, pre, r, v2, ln_on_load):
    """hidden (and pre) = act(A · W1ᵀ + b1) for A = ``a`` (TMA) or, ``ln_on_load``, x normalized on load."""
    m, n1, k = hidden.shape[0], w1.shape[0], w1.shape[1]
    if not tma_ok(w1):
        w1 = w1.contiguous()  # a strided or unaligned view of W1: copied once, TMA needs aligned rows
    first = INTERPRETER_GEMM if _INTERPRET else GEMM_TABLE["ln_on_load" if ln_on_load else "ln_pass"][0]
    bm, bn, bk = first[:3]  # the configuration's pre-hook sets them again
    tma_store = n1 % 8 == 0
    empty = hidden.new_empty(0)
    a_desc = descriptor(a, [bm, bk]) if a is not None else None
    out_desc = descriptor(hidden, [bm, bn // 2]) if tma_store else None
    pre_desc = descriptor(pre, [bm, bn // 2]) if (tma_store and pre.numel()) else None
    device = hidden.device

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n1, meta["BLOCK_N"])
        return (_programs(device, tiles),)

    has_ln = ln_weight is not None
    _gemm1_kernel[grid](
        a_desc, descriptor(w1, [bn, bk]), out_desc, pre_desc,
        x if ln_on_load else empty, mean, rstd, ln_weight if has_ln else empty,
        ln_bias if ln_bias is not None else empty, b1 if b1 is not None else empty, hidden, pre,
        m, n1, k, triton.next_power_of_2(max(m, 16)), *_sm80._geo_args(geo), *_sm80._x_args(x),
        LN_ON_LOAD=ln_on_load, HAS_LN=has_ln and ln_on_load, HAS_BETA=ln_bias is not None, HAS_BIAS=b1 is not None,
        ACT=act, WRITE_PRE=pre.numel() > 0, TMA_STORE=tma_store, R=r, V2=v2, GROUP=GROUP_M,
    )  # fmt: skip


def projector_fwd(x, ln_weight, ln_bias, w1, w2, b1, b2, eps, activation, r, v2, cls, save_for_backward):
    """(out [N, L_out, N_out], mean [M] or empty, rstd [M] or empty, pre-activation [M, N1] or empty):
    the same contract as triton.py's."""
    with device_guard(x):
        ln_weight, ln_bias, b1 = _sm80._unit_stride(ln_weight, ln_bias, b1)
        geo = _sm80._geometry(x, r, cls)
        m, k, n1 = geo["M"], w1.shape[1], w1.shape[0]
        has_ln = ln_weight is not None
        ln_on_load = form() == "ln_on_load"
        no_stats = x.new_empty(0, dtype=torch.float32)
        a = None
        if ln_on_load:
            mean, rstd = _sm80._ln_stats(x, geo, k, eps, r, v2) if has_ln else (no_stats, no_stats.clone())
        elif has_ln:
            a, mean, rstd = _sm80.gather_layer_norm(x, ln_weight, ln_bias, eps, r, v2, cls)
        else:
            mean, rstd = no_stats, no_stats.clone()  # distinct: a custom op's outputs must not alias
            a = _rows_view(x, r, cls)
            if a is None:
                a = _sm80._ln_apply(x, geo, None, None, mean, rstd, k, r, v2)
        two_layer = w2 is not None
        act = ACTIVATIONS[activation] if two_layer else 0
        pre = x.new_empty((m, n1)) if (two_layer and save_for_backward) else x.new_empty(0)
        hidden = x.new_empty((m, n1))
        if m:
            _gemm1(a, x, geo, w1, b1, mean, rstd, ln_weight, ln_bias, act, hidden, pre, r, v2, ln_on_load)
        out = F.linear(hidden, w2, b2) if two_layer else hidden
        return out.view(x.shape[0], geo["L_out"], out.shape[-1]), mean, rstd, pre


# The backward: triton.py's, from the same saved statistics and pre-activation.
projector_bwd = _sm80.projector_bwd


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation (tools/triton_aot.py)


_ALIGNED = ("X", "Gamma", "Beta", "Bias", "Out", "Pre", "Mean", "Rstd")


def _aot_spec(dtype: str, entry, form_: str, tma_store: bool = True) -> dict:
    m, n, k, warps, stages = entry
    fn = _gemm1_kernel.fn
    ln_on_load = form_ == "ln_on_load"
    half = n // 2
    signature = {
        "A_desc": f"tensordesc<{dtype}[{m}, {k}]>", "W_desc": f"tensordesc<{dtype}[{n}, {k}]>",
        "Out_desc": f"tensordesc<{dtype}[{m}, {half}]>", "Pre_desc": f"tensordesc<{dtype}[{m}, {half}]>",
        **{p: f"*{dtype}" for p in ("X", "Gamma", "Beta", "Bias", "Out", "Pre")}, "Mean": "*fp32", "Rstd": "*fp32",
        **{a: "i32" for a in ("M", "N", "K", "M_BUCKET", "L_out", "side_out", "side", "C", "cls", "stride_xn",
                              "stride_xl")},
    }  # fmt: skip
    constexprs = {
        "LN_ON_LOAD": ln_on_load, "HAS_LN": ln_on_load, "HAS_BETA": True, "HAS_BIAS": False, "ACT": 1,
        "WRITE_PRE": True, "TMA_STORE": tma_store, "R": 2, "V2": True, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k,
        "GROUP": GROUP_M, "stride_xc": 1,
    }  # fmt: skip
    if ln_on_load:
        constexprs["A_desc"] = None
    if not tma_store:
        constexprs.update(Out_desc=None, Pre_desc=None)
    expect = ["HGMMA", "UTMALDG"] + (["UTMASTG"] if tma_store else [])
    tag = f"{dtype},{form_}{'' if tma_store else ',ptr-store'},{m}x{n}x{k}w{warps}s{stages}"
    return {
        "name": f"projector_hopper_gemm1[{tag}]",
        "fn": fn,
        "arch": 90,
        "signature": {name: signature[name] for name in fn.arg_names if name in signature},
        "constexprs": constexprs,
        "divisible_by_16": [*_ALIGNED, "N", "K", "C", "stride_xn", "stride_xl"],
        "num_warps": warps,
        "num_stages": stages,
        "expect_ptx": {90: ["wgmma"]},
        "expect_sass": {90: expect},
    }


def aot_specs() -> list[dict]:
    """GEMM1 at NVLM's shape (z [M, 12800] from the LayerNorm pass, W1 [29568, 12800], exact GELU,
    writing the pre-activation), sm_90 only: every ``ln_pass`` configuration in bf16 and its first in
    fp16, the ``ln_on_load`` form (x gathered through a 0.5 shuffle, LayerNorm with bias) and the
    pointer-store epilogue (N1 % 8 != 0). The SASS must show TMA loads and HGMMA."""
    specs = [_aot_spec("bf16", entry, "ln_pass") for entry in GEMM_TABLE["ln_pass"]]
    specs.append(_aot_spec("fp16", GEMM_TABLE["ln_pass"][0], "ln_pass"))
    specs.append(_aot_spec("bf16", GEMM_TABLE["ln_on_load"][0], "ln_on_load"))
    pointer_store = next(e for e in GEMM_TABLE["ln_pass"] if e[1] <= POINTER_STORE_MAX_N)
    specs.append(_aot_spec("bf16", pointer_store, "ln_pass", tma_store=False))
    return specs
