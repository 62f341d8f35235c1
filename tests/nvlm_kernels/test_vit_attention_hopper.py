"""The ``hopper`` backend of vit_attention / vit_qk_norm_attention (nvlm_kernels/vit_attention/hopper.py).

Through the Triton interpreter on CPU tensors (fp16: the interpreter computes bf16 wrongly), on an
sm_90 GPU in fp16 and bf16. Every output and gradient is held to FlashAttention's rule against a
float64 oracle written here (max|kernel − hi| <= 2·max|lo − hi| + 1e-5, ``assert_close_flash``).
The interpreter runs one pinned block configuration (BLOCK_M = BLOCK_N = 128), so the tail cases
are chosen against 128: S % 128 in {0, 1, other} and S < 128; the forward's key tail and the
backward's query tail are peeled blocks of ``tail_block(S % 128)`` rows.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels import _backend
from nvlm_kernels._tma import DETERMINISTIC_ENV_VAR
from nvlm_kernels.testing import assert_close_flash, require_backend
from nvlm_kernels.vit_attention import (
    vit_attention_bwd_op,
    vit_attention_op,
    vit_qk_norm_attention_op,
    vit_qk_norm_attention_split_op,
)

OP = "vit_attention"
OP_FUSED = "vit_qk_norm_attention"
hopper = importlib.import_module("nvlm_kernels.vit_attention.hopper")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    require_backend(OP, "hopper", request.param)
    return request.param


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]


def oracle_attention(q, k, v, scale, low: bool = False):
    """[T, S, H, D] -> [T, S, H, D]; float64, or (``low``) scores and probabilities rounded to q's dtype."""
    qh, kh, vh = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    if not low:
        qh, kh, vh = qh.double(), kh.double(), vh.double()
    p = torch.softmax((torch.matmul(qh, kh.transpose(-1, -2)) * scale).float() if low else
                      torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)  # fmt: skip
    return torch.matmul(p.to(vh.dtype), vh).permute(0, 2, 1, 3)


def oracle_qk_norm(q, k, v, wq, wk, heads, eps, norm_features, scale, low: bool = False):
    """InternRMSNorm of q and k over the first ``norm_features`` features, then attention."""

    def norm(x, w):
        xf = x.float() if low else x.double()
        rms = torch.rsqrt(xf[..., :norm_features].pow(2).mean(-1, keepdim=True) + eps)
        return w.to(x.dtype) * (xf * rms).to(x.dtype) if low else w.double() * xf * rms

    q, k = norm(q, wq), norm(k, wk)
    v = v if low else v.double()
    t, s, width = q.shape
    return oracle_attention(*(x.reshape(t, s, heads, width // heads) for x in (q, k, v)), scale, low=low)


def _leaves(inputs, dtype=None):
    return [x.detach().to(dtype or x.dtype).clone().requires_grad_(True) for x in inputs]


def _check(run, oracle, inputs, names, seed=0):
    """run(*inputs) and oracle(*inputs, low=...): the output and every input's gradient."""
    mine = _leaves(inputs)
    out = run(*mine)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, mine, grad)
    hi_in, lo_in = _leaves(inputs, torch.float64), _leaves(inputs)
    hi, lo = oracle(*hi_in, low=False), oracle(*lo_in, low=True)
    hi_grads = torch.autograd.grad(hi, hi_in, grad.double())
    lo_grads = torch.autograd.grad(lo, lo_in, grad.to(lo.dtype))
    assert out.dtype == inputs[0].dtype
    assert_close_flash(out, lo, hi, name="output")
    for name, g, g_lo, g_hi in zip(names, grads, lo_grads, hi_grads, strict=True):
        assert_close_flash(g, g_lo, g_hi, name=f"d{name}")
    return out, grads


def _randn(gen, *shape, device="cpu", dtype=torch.float16):
    return torch.randn(*shape, generator=gen).to(device, dtype)


# --------------------------------------------------------------------------------------------------
# vit_attention


SHAPES = [  # (T, S, H, D): S % 128 = 1 (1025-like), 0, other; S < 128; padded head dims 80 and 96
    (1, 257, 1, 128),
    (1, 256, 1, 64),
    (2, 150, 1, 80),
    (1, 40, 2, 96),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_attention_forward_and_gradients(device, shape, deterministic, monkeypatch):
    """Through the public function: the forward, and the single-pass backward with dQ by atomics or
    (NVLM_KERNELS_DETERMINISTIC=1) the pass without dQ plus the dQ kernel."""
    monkeypatch.setenv(DETERMINISTIC_ENV_VAR, "1" if deterministic else "0")
    t, s, h, d = shape
    gen = torch.Generator().manual_seed(s * 7 + d)
    for dtype in _dtypes(device):
        q, k, v = (_randn(gen, t, s, h, d, device=device, dtype=dtype) for _ in range(3))
        with nk.use_backend("hopper"), _backend.record_selections() as calls:
            _check(nk.vit_attention, lambda a, b, c, low: oracle_attention(a, b, c, d**-0.5, low), (q, k, v), "qkv",
                   seed=s)  # fmt: skip
        assert calls and {c["backend"] for c in calls} == {"hopper"}, calls


def test_every_output_element_is_written(device, poison_empty):
    """Outputs allocated with torch.empty are NaN-poisoned; nothing may stay unwritten (the
    fixture also turns on deterministic algorithms: the deterministic backward runs)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (_randn(gen, 1, 129, 2, 80, device=device) for _ in range(3))
    assert hopper.deterministic_requested()
    out, lse = hopper.attention_fwd(q, k, v, 0.1)
    grads = hopper.attention_bwd(torch.randn_like(out), q, k, v, out, lse, 0.1)
    for x in (out, lse, *grads):
        assert torch.isfinite(x).all()


def test_deterministic_dq_is_bitwise_repeatable_and_matches_atomics(device):
    gen = torch.Generator().manual_seed(5)
    t, s, h, d = 1, 150, 1, 64
    q, k, v, g = (_randn(gen, t, s, h, d, device=device) for _ in range(4))
    out, lse = hopper.attention_fwd(q, k, v, 0.125)
    first = hopper.attention_bwd(g, q, k, v, out, lse, 0.125, deterministic=True)
    second = hopper.attention_bwd(g, q, k, v, out, lse, 0.125, deterministic=True)
    atomic = hopper.attention_bwd(g, q, k, v, out, lse, 0.125, deterministic=False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(atomic[0].float(), first[0].float(), atol=2e-3, rtol=1e-2)
    assert torch.equal(atomic[1], first[1]) and torch.equal(atomic[2], first[2])  # dK, dV: the same pass


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2")  # the interpreter's numpy, on purpose
def test_padded_keys_of_the_key_tail_cannot_make_nan(device):
    """Rows whose every score is far below zero: base-2 log-sum-exp < -128, so a padded key's
    exp2(0 - lse) overflows float32; the key tail's program must zero those probabilities before the
    dQ GEMM multiplies them by the padded (zero) keys."""
    t, s, h, d = 1, 129, 1, 64  # the second key block holds 1 key and 127 padded rows
    q = torch.ones(t, s, h, d, device=device, dtype=torch.float16)
    k = torch.full((t, s, h, d), -2.0, device=device, dtype=torch.float16)
    v = torch.randn(t, s, h, d, generator=torch.Generator().manual_seed(4)).to(device, torch.float16)
    out, lse = hopper.attention_fwd(q, k, v, 1.0)
    assert lse.max().item() < -128
    g = torch.randn_like(out)
    dq, dk, dv = hopper.attention_bwd(g, q, k, v, out, lse, 1.0, deterministic=False)
    leaves = _leaves((q, k, v), torch.float64)
    ref = torch.autograd.grad(oracle_attention(*leaves, 1.0), leaves, g.double())
    for name, mine, theirs in zip("qkv", (dq, dk, dv), ref, strict=True):
        assert torch.isfinite(mine).all(), name
        torch.testing.assert_close(mine.double(), theirs, atol=2e-2, rtol=2e-2)


def test_deterministic_request_sources(monkeypatch):
    monkeypatch.delenv(DETERMINISTIC_ENV_VAR, raising=False)
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert not hopper.deterministic_requested()
        assert hopper.deterministic_requested(True)
        monkeypatch.setenv(DETERMINISTIC_ENV_VAR, "1")
        assert hopper.deterministic_requested() and not hopper.deterministic_requested(False)
        monkeypatch.setenv(DETERMINISTIC_ENV_VAR, "0")
        torch.use_deterministic_algorithms(True)
        assert hopper.deterministic_requested()
    finally:
        torch.use_deterministic_algorithms(old)


@pytest.mark.parametrize("aligned", [True, False], ids=["tma", "pointer_fallback"])
def test_strided_views_of_a_fused_projection(device, aligned, monkeypatch):
    """q, k, v (and dO) as views of one [T, S, 3·H·D (+1)] buffer: 16-byte aligned strides take the
    TMA descriptors, a padded (odd) row width the masked pointer loads; both equal contiguous inputs."""
    used = []
    descriptors = hopper._descriptors

    def spy(use_tma, *tensors):
        if len(tensors) == 2:  # q and dO, or k and v (not the dQ accumulator's)
            used.append(use_tma)
        return descriptors(use_tma, *tensors)

    monkeypatch.setattr(hopper, "_descriptors", spy)
    t, s, h, d = 1, 130, 2, 64
    gen = torch.Generator().manual_seed(11)
    width = 3 * h * d + (0 if aligned else 1)
    qkv = _randn(gen, t, s, width, device=device)
    q, k, v = (qkv[..., i * h * d : (i + 1) * h * d].unflatten(-1, (h, d)) for i in range(3))
    assert not q.is_contiguous() and hopper.tma_ok(q) == aligned
    g = _randn(gen, t, s, 2 * h * d, device=device)[..., : h * d].unflatten(-1, (h, d))  # a strided dO
    out, lse = hopper.attention_fwd(q, k, v, 0.125)
    ref_out, ref_lse = hopper.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), 0.125)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    for det in (False, True):
        grads = hopper.attention_bwd(g, q, k, v, out, lse, 0.125, deterministic=det)
        ref = hopper.attention_bwd(g.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, lse, 0.125,
                                   deterministic=det)  # fmt: skip
        for a, b in zip(grads, ref, strict=True):
            assert torch.equal(a, b)
    assert all(used) if aligned else (False in used), used


def test_empty_batch_and_unsupported_calls(device):
    x = torch.randn(0, 16, 2, 64, device=device, dtype=torch.float16)
    with nk.use_backend("hopper"):
        assert nk.vit_attention(x, x, x).shape == (0, 16, 2, 64)
        with pytest.raises(nk.BackendUnavailableError, match="float32"):
            y = torch.randn(1, 8, 2, 64, device=device)
            nk.vit_attention(y, y, y)
        with pytest.raises(nk.BackendUnavailableError, match="head_dim"):
            y = torch.randn(1, 8, 2, 48, device=device, dtype=torch.float16)
            nk.vit_attention(y, y, y)


def test_auto_never_picks_hopper(device):
    assert "hopper" in _backend.backends_of(OP) and "hopper" in _backend.backends_of(OP_FUSED)
    x = torch.randn(1, 8, 2, 64, device=device, dtype=torch.float16)
    with _backend.record_selections() as calls:
        nk.vit_attention(x, x, x)
    assert calls[-1]["backend"] != "hopper"


def test_opcheck(device):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (_randn(gen, 1, 33, 2, 64, device=device).requires_grad_() for _ in range(3))
    torch.library.opcheck(vit_attention_op, (q, k, v, 0.125, "hopper"))
    out, lse = vit_attention_op(q, k, v, 0.125, "hopper")
    plain = [x.detach() for x in (torch.randn_like(out), q, k, v, out)]
    torch.library.opcheck(vit_attention_bwd_op, (*plain, lse, 0.125, "hopper"))


# --------------------------------------------------------------------------------------------------
# vit_qk_norm_attention


def _norm_inputs(gen, t, s, h, d, device):
    qkv = _randn(gen, t, s, 3 * h * d, device=device)
    wq, wk = ((1 + 0.3 * torch.randn(h * d, generator=gen)).to(device, torch.float16) for _ in range(2))
    return qkv, wq, wk


@pytest.mark.parametrize("shape", [(1, 129, 2, 64), (1, 100, 1, 128)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_qk_norm_attention_fused_qkv(device, shape, deterministic, monkeypatch):
    """qkv [T, S, 3·H·D] (the TMA path: aligned views), the statistic over part of the features."""
    monkeypatch.setenv(DETERMINISTIC_ENV_VAR, "1" if deterministic else "0")
    t, s, h, d = shape
    gen = torch.Generator().manual_seed(s + d)
    qkv, wq, wk = _norm_inputs(gen, t, s, h, d, device)
    features = h * d - d // 2
    scale = d**-0.5

    def run(x, a, b):
        with nk.use_backend("hopper"):
            return nk.vit_qk_norm_attention(x, a, b, num_heads=h, eps=1e-5, norm_features=features)

    def oracle(x, a, b, low):
        return oracle_qk_norm(*x.split(h * d, -1), a, b, h, 1e-5, features, scale, low)

    _check(run, oracle, (qkv, wq, wk), ["qkv", "wq", "wk"], seed=s)


def test_qk_norm_attention_split_form_pointer_fallback(device):
    """Three projections' outputs with an odd row stride (no TMA): dq, dk, dv apart."""
    t, s, h, d = 1, 70, 2, 64
    gen = torch.Generator().manual_seed(8)
    q, k, v = (_randn(gen, t, s, h * d + 1, device=device)[..., : h * d] for _ in range(3))
    assert not hopper.tma_ok(q.unflatten(-1, (h, d)))
    wq, wk = ((1 + 0.3 * torch.randn(h * d, generator=gen)).to(device, torch.float16) for _ in range(2))

    def run(a, b, c, x, y):
        with nk.use_backend("hopper"):
            return nk.vit_qk_norm_attention((a, b, c), x, y, num_heads=h)

    def oracle(a, b, c, x, y, low):
        return oracle_qk_norm(a, b, c, x, y, h, 1e-6, h * d, d**-0.5, low)

    _check(run, oracle, (q, k, v, wq, wk), ["q", "k", "v", "wq", "wk"])


def test_qk_norm_opcheck(device):
    gen = torch.Generator().manual_seed(2)
    qkv, wq, wk = (x.requires_grad_() for x in _norm_inputs(gen, 1, 17, 2, 64, device))
    torch.library.opcheck(vit_qk_norm_attention_op, (qkv, wq, wk, 2, 1e-6, 100, 0.125, "hopper"))
    q, k, v = (x.detach().clone().requires_grad_() for x in qkv.split(128, -1))
    torch.library.opcheck(vit_qk_norm_attention_split_op, (q, k, v, wq, wk, 2, 1e-6, 128, 0.125, "hopper"))


# --------------------------------------------------------------------------------------------------
# host-side pieces


def test_tail_block():
    assert [hopper.tail_block(r, 128) for r in (1, 15, 16, 17, 100, 127)] == [16, 16, 16, 32, 128, 128]
    assert hopper.tail_block(1, 64) == 16 and hopper.tail_block(40, 64) == 64


def test_autotuner_restarts_the_dq_accumulator_for_each_timed_configuration():
    """On a GPU the autotuner times several configurations of the backward pass, each adding its dQ
    into the same buffer: it must zero it before each (and once after), and the atomic and the
    deterministic forms (different kernels) must not share one timing."""
    tuner = hopper._vit_hopper_bwd_kernel
    assert tuner.reset_to_zero == ["DQacc"]
    assert {"S", "HEAD_DIM", "QK_NORM", "USE_TMA", "COMPUTE_DQ"} <= set(tuner.keys)


def test_aot_specs_cover_every_table_entry():
    """tools/triton_aot.py compiles these for sm_90: every configuration of the three tables, TMA
    and the pointer fallback, the single-pass backward with and without its dQ."""
    names = [spec["name"] for spec in hopper.aot_specs()]
    assert len(names) == len(set(names))
    for kernel, table in (("fwd", hopper.FWD_TABLE), ("bwd", hopper.BWD_TABLE), ("bwd_dq", hopper.DQ_TABLE)):
        for (d, norm), configs in table.items():
            for m, n, w, st in configs:
                tag = f"D{d}{',norm' if norm else ''}"
                if kernel == "bwd" and not hopper.SINGLE_PASS[(d, norm)]:
                    tag += ",det"  # compiled, and run, only without its dQ
                assert f"vit_hopper_{kernel}[bf16,{tag},{m}x{n}w{w}s{st}]" in names, (kernel, d, norm)
    assert any(",ptr," in x for x in names) and any(",det," in x for x in names)
    assert all(spec["arch"] == 90 and "HGMMA" in spec["expect_sass"][90] for spec in hopper.aot_specs())
    assert hopper._vit_hopper_fwd_kernel.fn.fn.__name__ == "_vit_hopper_fwd_kernel"
