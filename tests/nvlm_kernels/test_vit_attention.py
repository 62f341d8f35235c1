"""vit_attention and vit_qk_norm_attention against an fp64 oracle, with FlashAttention's rule.

The oracle (written here, sharing nothing with nvlm_kernels): attention as softmax(scale·q kᵀ) v
per tile and head, and InternViT-6B's QK-norm (RMS over the whole token's first ``norm_features``
features, weight, then split heads). ``hi`` runs it in float64; ``lo`` in the kernel's dtype
(scores and probabilities rounded to it). A kernel passes when, for the output and every gradient,
max|kernel − hi| <= 2·max|lo − hi| + 1e-5 (design.md §5). Triton runs through the interpreter on
CPU tensors in float16 (its bf16 is wrong there), and on a GPU in float16 and bfloat16; the ``sdpa``
peer runs on CPU tensors in float32 (and on a GPU in float16 and bfloat16).

Every test names the backend it tests: ``auto`` on CPU is now the ``sdpa`` peer, not the reference.
"""

from __future__ import annotations

import contextlib
import importlib
import json

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels import _backend, _device, _dispatch, _nvtx
from nvlm_kernels.testing import assert_close_flash, require_backend
from nvlm_kernels.vit_attention import (
    vit_attention_bwd_op,
    vit_attention_op,
    vit_qk_norm_attention_bwd_op,
    vit_qk_norm_attention_op,
    vit_qk_norm_attention_split_bwd_op,
    vit_qk_norm_attention_split_op,
)

OP = "vit_attention"
OP_FUSED = "vit_qk_norm_attention"
vit_triton = importlib.import_module("nvlm_kernels.vit_attention.triton")
vit_sdpa = importlib.import_module("nvlm_kernels.vit_attention.sdpa")


def oracle_attention(q, k, v, scale, low: bool = False):
    """[T, S, H, D] in, [T, S, H, D] out. ``low``: round scores and probabilities to q's dtype."""
    qh, kh, vh = (x.permute(0, 2, 1, 3) for x in (q, k, v))
    if low:
        scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
        p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.matmul(p, vh).permute(0, 2, 1, 3)
    qh, kh, vh = qh.double(), kh.double(), vh.double()
    p = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(p, vh).permute(0, 2, 1, 3)


def oracle_qk_norm_attention(qkv, wq, wk, heads, eps, norm_features, scale, low: bool = False):
    t, s, width = qkv.shape
    q, k, v = qkv.split(width // 3, dim=-1)

    def norm(x, w):
        xf = x.float() if low else x.double()
        rms = torch.rsqrt(xf[..., :norm_features].pow(2).mean(-1, keepdim=True) + eps)
        return (w.to(x.dtype) * (xf * rms).to(x.dtype)) if low else (w.double() * xf * rms)

    q, k = norm(q, wq), norm(k, wk)
    if not low:
        v = v.double()
    head_dim = width // 3 // heads
    q, k, v = (x.reshape(t, s, heads, head_dim) for x in (q, k, v))
    return oracle_attention(q, k, v, scale, low=low)


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]


def _leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    return x.detach().to(dtype or x.dtype).clone().requires_grad_(True)


def _check_against_oracle(run, oracle, inputs, names, dtype):
    """run(*inputs) and oracle(*inputs, low) -> output; compares output and every input gradient."""
    gen = torch.Generator().manual_seed(123)
    mine = [_leaf(x) for x in inputs]
    out = run(*mine)
    grad = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, mine, grad)
    hi_in = [_leaf(x, torch.float64) for x in inputs]
    hi = oracle(*hi_in, low=False)
    hi_grads = torch.autograd.grad(hi, hi_in, grad.double())
    lo_in = [_leaf(x) for x in inputs]
    lo = oracle(*lo_in, low=True)
    lo_grads = torch.autograd.grad(lo, lo_in, grad.to(lo.dtype))
    assert out.dtype == dtype
    assert_close_flash(out, lo, hi, name="output")
    for name, g, g_lo, g_hi in zip(names, grads, lo_grads, hi_grads, strict=True):
        assert_close_flash(g, g_lo, g_hi, name=f"d{name}")


# --------------------------------------------------------------------------------------------------
# vit_attention

SHAPES = [  # (T, S, H, D): S = 1 and S = 1025 (no block multiple), 25 heads, every head dim
    (1, 1, 1, 64),
    (1, 97, 25, 64),
    (7, 257, 3, 64),
    (1, 1025, 1, 128),
    (7, 97, 1, 128),
    (1, 97, 3, 80),
    (1, 97, 2, 96),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_forward_and_gradients(device, shape, poison_empty):
    require_backend(OP, "triton", device)
    t, s, h, d = shape
    gen = torch.Generator().manual_seed(s * 31 + h)
    for dtype in _dtypes(device):
        q, k, v = (torch.randn(t, s, h, d, generator=gen).to(device, dtype) for _ in range(3))
        scale = d**-0.5

        def run(q, k, v):
            with nk.use_backend("triton"):
                return nk.vit_attention(q, k, v)

        def oracle(q, k, v, low, scale=scale):
            return oracle_attention(q, k, v, scale, low)

        _check_against_oracle(run, oracle, (q, k, v), "qkv", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_reference_backend(dtype):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 33, 3, 40, generator=gen).to(dtype) for _ in range(3))

    def run(q, k, v):
        with nk.use_backend("reference"):
            return nk.vit_attention(q, k, v, softmax_scale=0.3)

    _check_against_oracle(run, lambda q, k, v, low: oracle_attention(q, k, v, 0.3, low), (q, k, v), "qkv", dtype)


def test_strided_inputs_from_a_fused_projection(device):
    """q, k, v as views of one [T, S, 3, H, D] buffer (strides, no copies) equal contiguous inputs."""
    require_backend(OP, "triton", device)
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 65, 3, 4, 64, generator=gen).to(device, torch.float16)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    with nk.use_backend("triton"):
        strided = nk.vit_attention(q, k, v)
        contiguous = nk.vit_attention(q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(strided, contiguous)


def test_unsupported_calls_name_the_reason(device):
    q = torch.randn(1, 8, 2, 48, device=device, dtype=torch.float16)
    with nk.use_backend("triton"):
        if nk.available_backends(OP, device)["triton"] is None:
            with pytest.raises(nk.BackendUnavailableError, match="head_dim"):
                nk.vit_attention(q, q, q)
            with pytest.raises(nk.BackendUnavailableError, match="float32"):
                x = torch.randn(1, 8, 2, 64, device=device)
                nk.vit_attention(x, x, x)
    with nk.use_backend("cuda"):
        with pytest.raises(nk.BackendUnavailableError, match="has no 'cuda' backend"):
            nk.vit_attention(q, q, q)
    # auto runs a backend that takes what the kernels do not (the sdpa peer where nothing was measured)
    x = torch.randn(1, 8, 2, 48, device=device, dtype=torch.float32)
    with _backend.record_selections() as calls:
        out = nk.vit_attention(x, x, x)
    assert calls and calls[-1]["backend"] != "triton", calls
    assert torch.allclose(out.double(), oracle_attention(x, x, x, 48**-0.5), atol=1e-5)


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: (torch.randn(1, 8, 64), torch.randn(1, 8, 64), torch.randn(1, 8, 64)), ValueError, ["q", "4 dims"]),
        (
            lambda: (torch.randn(1, 8, 2, 64), torch.randn(1, 9, 2, 64), torch.randn(1, 8, 2, 64)),
            ValueError,
            ["same shape"],
        ),
        (
            lambda: (torch.randn(1, 8, 2, 64), torch.randn(1, 8, 2, 64).half(), torch.randn(1, 8, 2, 64)),
            TypeError,
            ["same dtype"],
        ),
        (lambda: (torch.randn(1, 0, 2, 64),) * 3, ValueError, ["S, H and D"]),
        (lambda: (torch.randint(0, 3, (1, 8, 2, 64)),) * 3, TypeError, ["q", "float"]),
    ],
)
def test_bad_input(make, exc, words):
    with pytest.raises(exc) as info:
        nk.vit_attention(*make())
    assert all(w in str(info.value) for w in words), str(info.value)
    with pytest.raises(ValueError, match="softmax_scale"):
        x = torch.randn(1, 4, 1, 64)
        nk.vit_attention(x, x, x, softmax_scale=-1.0)


def test_empty_batch(device):
    require_backend(OP, "triton", device)
    x = torch.randn(0, 16, 2, 64, device=device, dtype=torch.float16)
    with nk.use_backend("triton"):
        assert nk.vit_attention(x, x, x).shape == (0, 16, 2, 64)


def test_opcheck_and_compile(device, backend):
    if backend == "cuda":
        pytest.skip("vit_attention has no CUDA C++ kernel (Triton is the kernel backend)")
    require_backend(OP, backend, device)
    dtype = torch.float16 if backend == "triton" else torch.float32
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 33, 2, 64, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    torch.library.opcheck(vit_attention_op, (q, k, v, 0.125, backend))
    out, lse = vit_attention_op(q, k, v, 0.125, backend)
    g = torch.randn_like(out)
    # the backward is not differentiable again (no double backward): check it on plain tensors
    plain = [x.detach() for x in (g, q, k, v, out)]
    torch.library.opcheck(vit_attention_bwd_op, (*plain, lse, 0.125, backend))
    with nk.use_backend(backend):
        torch._dynamo.reset()
        compiled = torch.compile(lambda a, b, c: nk.vit_attention(a, b, c).float().square().sum(), fullgraph=True,
                                 backend="aot_eager")  # fmt: skip
        loss = compiled(q, k, v)
        loss.backward()
        eager = [x.grad.clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
        nk.vit_attention(q, k, v).float().square().sum().backward()
    assert all(torch.equal(a, x.grad) for a, x in zip(eager, (q, k, v), strict=True))


# --------------------------------------------------------------------------------------------------
# vit_qk_norm_attention

FUSED = [  # (T, S, H, D, norm_features): NVLM pads dummy heads and normalizes over the real ones
    (1, 97, 3, 64, None),
    (2, 65, 4, 64, 128),
    (1, 257, 2, 128, None),
    (1, 1, 2, 128, None),
]


@pytest.mark.parametrize("shape", FUSED, ids=lambda s: "x".join(map(str, s)))
def test_qk_norm_attention_against_norm_then_attention(device, shape, poison_empty):
    require_backend(OP_FUSED, "triton", device)
    t, s, h, d, norm_features = shape
    features = h * d
    gen = torch.Generator().manual_seed(s + h)
    for dtype in _dtypes(device):
        qkv = torch.randn(t, s, 3 * features, generator=gen)
        if norm_features is not None:  # dummy heads hold zeros, as in NVLM's padded checkpoint
            qkv.view(t, s, 3, features)[..., norm_features:] = 0
        qkv = qkv.to(device, dtype)
        wq, wk = ((1 + 0.3 * torch.randn(features, generator=gen)).to(device, dtype) for _ in range(2))
        nf = norm_features or features

        def run(x, a, b):
            with nk.use_backend("triton"):
                return nk.vit_qk_norm_attention(x, a, b, num_heads=h, norm_features=norm_features)

        def oracle(x, a, b, low, nf=nf):
            return oracle_qk_norm_attention(x, a, b, h, 1e-6, nf, d**-0.5, low)

        _check_against_oracle(run, oracle, (qkv, wq, wk), ["qkv", "q_norm_weight", "k_norm_weight"], dtype)


def test_qk_norm_reference_backend():
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 17, 3 * 2 * 40, generator=gen)
    wq, wk = (1 + 0.3 * torch.randn(80, generator=gen) for _ in range(2))

    def run(x, a, b):
        with nk.use_backend("reference"):
            return nk.vit_qk_norm_attention(x, a, b, num_heads=2, norm_features=60, eps=1e-5)

    def oracle(x, a, b, low):
        return oracle_qk_norm_attention(x, a, b, 2, 1e-5, 60, 40**-0.5, low)

    _check_against_oracle(run, oracle, (qkv, wq, wk), ["qkv", "wq", "wk"], torch.float32)


def test_qk_norm_opcheck(device, backend):
    if backend == "cuda":
        pytest.skip("vit_qk_norm_attention has no CUDA C++ kernel (Triton is the kernel backend)")
    require_backend(OP_FUSED, backend, device)
    dtype = torch.float16 if backend == "triton" else torch.float32
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(1, 17, 3 * 128, generator=gen).to(device, dtype).requires_grad_()
    wq, wk = (torch.ones(128, device=device, dtype=dtype).requires_grad_() for _ in range(2))
    torch.library.opcheck(vit_qk_norm_attention_op, (qkv, wq, wk, 2, 1e-6, 128, 0.125, backend))


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(num_heads=5), ValueError, "num_heads"),
        (dict(num_heads=0), ValueError, "num_heads"),
        (dict(num_heads=2, norm_features=0), ValueError, "norm_features"),
        (dict(num_heads=2, norm_features=129), ValueError, "norm_features"),
        (dict(num_heads=2, eps=0.0), ValueError, "eps"),
        (dict(num_heads=2, q_norm_weight=torch.ones(64)), ValueError, "q_norm_weight"),
    ],
)
def test_qk_norm_bad_input(kwargs, exc, word):
    args = dict(qkv=torch.randn(1, 4, 3 * 128), q_norm_weight=torch.ones(128), k_norm_weight=torch.ones(128))
    for name in ("q_norm_weight", "k_norm_weight"):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    with pytest.raises(exc, match=word):
        nk.vit_qk_norm_attention(args["qkv"], args["q_norm_weight"], args["k_norm_weight"], **kwargs)


# --------------------------------------------------------------------------------------------------
# vit_qk_norm_attention from three projections: (q, k, v) [T, S, H·D] each (issue 15: Hugging Face
# InternVL's q_proj / k_proj / v_proj, read in place; the backward returns dq, dk, dv apart)

SPLIT_CASES = [  # (backend, T, S, H, D, norm_features, dtype on CPU)
    ("reference", 2, 17, 2, 40, 60, torch.float32),
    ("sdpa", 2, 33, 3, 64, 150, torch.float32),
    ("triton", 2, 65, 2, 64, 100, torch.float16),
    ("triton", 1, 33, 2, 128, None, torch.float16),
]


def _split_inputs(t, s, h, d, norm_features, gen):
    features = h * d
    q, k, v = (torch.randn(t, s, features, generator=gen) for _ in range(3))
    if norm_features is not None:  # dummy heads hold zeros (NVLM's padded checkpoint)
        for x in (q, k, v):
            x[..., norm_features:] = 0
    wq, wk = (1 + 0.3 * torch.randn(features, generator=gen) for _ in range(2))
    return q, k, v, wq, wk


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"{c[0]}-" + "x".join(map(str, c[1:6])))
def test_qk_norm_split_form_against_oracle(device, case):
    backend, t, s, h, d, norm_features, cpu_dtype = case
    require_backend(OP_FUSED, backend, device)
    gen = torch.Generator().manual_seed(t * s + h)
    dtypes = [cpu_dtype] if device == "cpu" else ([torch.float16, torch.bfloat16])
    nf = norm_features or h * d
    for dtype in dtypes:
        q, k, v, wq, wk = (x.to(device, dtype) for x in _split_inputs(t, s, h, d, norm_features, gen))

        def run(q, k, v, a, b, nf=nf):
            with nk.use_backend(backend):
                out = nk.vit_qk_norm_attention((q, k, v), a, b, num_heads=h, norm_features=nf, eps=1e-5)
            assert out.shape == (q.shape[0], q.shape[1], h, d) and out.is_contiguous()
            return out

        def oracle(q, k, v, a, b, low, nf=nf):
            return oracle_qk_norm_attention(torch.cat([q, k, v], -1), a, b, h, 1e-5, nf, d**-0.5, low)

        _check_against_oracle(run, oracle, (q, k, v, wq, wk), ["q", "k", "v", "q_norm_weight", "k_norm_weight"], dtype)


@pytest.mark.parametrize("backend_name", ["reference", "sdpa", "triton"])
def test_qk_norm_split_form_equals_the_qkv_form(device, backend_name):
    """(q, k, v) from three projections and the same numbers in one fused qkv give the same output
    and the same gradients (dq, dk, dv are the blocks of dqkv) on every backend."""
    require_backend(OP_FUSED, backend_name, device)
    dtype = torch.float16 if backend_name == "triton" else torch.float32
    gen = torch.Generator().manual_seed(21)
    qkv = torch.randn(2, 33, 3 * 128, generator=gen).to(device, dtype)
    wq, wk = ((1 + 0.3 * torch.randn(128, generator=gen)).to(device, dtype) for _ in range(2))
    g = torch.randn(2, 33, 2, 64, generator=gen).to(device, dtype)
    fused = [_leaf(x) for x in (qkv, wq, wk)]
    split = [_leaf(x) for x in (*qkv.split(128, -1), wq, wk)]
    with nk.use_backend(backend_name):
        out_fused = nk.vit_qk_norm_attention(fused[0], fused[1], fused[2], num_heads=2, norm_features=96)
        out_split = nk.vit_qk_norm_attention(tuple(split[:3]), split[3], split[4], num_heads=2, norm_features=96)
    grads_fused = torch.autograd.grad(out_fused, fused, g)
    grads_split = torch.autograd.grad(out_split, split, g)
    assert torch.equal(out_fused, out_split)
    assert torch.equal(grads_fused[0], torch.cat(grads_split[:3], -1))
    assert torch.equal(grads_fused[1], grads_split[3]) and torch.equal(grads_fused[2], grads_split[4])


def test_qk_norm_split_form_reads_strided_projections(device):
    """q, k, v as strided views (features contiguous, tokens not) equal contiguous copies, forward and
    backward; and outputs of three Linear layers go in as they are."""
    require_backend(OP_FUSED, "triton", device)
    gen = torch.Generator().manual_seed(22)
    big = torch.randn(2, 33, 5 * 128, generator=gen).to(device, torch.float16)
    q, k, v = big[..., :128], big[..., 256:384], big[..., 512:]
    assert not q.is_contiguous()
    wq, wk = ((1 + 0.3 * torch.randn(128, generator=gen)).to(device, torch.float16) for _ in range(2))
    with nk.use_backend("triton"):
        strided = nk.vit_qk_norm_attention((q, k, v), wq, wk, num_heads=2)
        contiguous = nk.vit_qk_norm_attention((q.contiguous(), k.contiguous(), v.contiguous()), wq, wk, num_heads=2)
    assert torch.equal(strided, contiguous)


def test_qk_norm_split_opcheck(device, backend):
    if backend == "cuda":
        pytest.skip("vit_qk_norm_attention has no CUDA C++ kernel (Triton is the kernel backend)")
    for name in (backend, "sdpa") if backend == "reference" else (backend,):  # the peer once
        require_backend(OP_FUSED, name, device)
        dtype = torch.float16 if name == "triton" else torch.float32
        gen = torch.Generator().manual_seed(23)
        q, k, v = (torch.randn(1, 17, 128, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
        wq, wk = ((1 + 0.3 * torch.randn(128, generator=gen)).to(device, dtype).requires_grad_() for _ in range(2))
        args = (q, k, v, wq, wk, 2, 1e-6, 100, 0.125)
        torch.library.opcheck(vit_qk_norm_attention_split_op, (*args, name))
        outs = vit_qk_norm_attention_split_op(*args, name)
        plain = [x.detach() for x in (torch.randn_like(outs[0]), q, k, v, wq, wk, *outs)]
        torch.library.opcheck(vit_qk_norm_attention_split_bwd_op, (*plain, *args[5:], name))


def test_qk_norm_split_compile_fullgraph(device, backend):
    if backend == "cuda":
        pytest.skip("vit_qk_norm_attention has no CUDA C++ kernel (Triton is the kernel backend)")
    require_backend(OP_FUSED, backend, device)
    dtype = torch.float16 if backend == "triton" else torch.float32
    gen = torch.Generator().manual_seed(24)
    leaves = [torch.randn(1, 17, 128, generator=gen).to(device, dtype).requires_grad_() for _ in range(3)]
    leaves += [(1 + 0.3 * torch.randn(128, generator=gen)).to(device, dtype).requires_grad_() for _ in range(2)]

    def loss(q, k, v, a, b):
        return nk.vit_qk_norm_attention((q, k, v), a, b, num_heads=2).float().square().sum()

    with nk.use_backend(backend):
        torch._dynamo.reset()
        compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves), leaves)
        eager = torch.autograd.grad(loss(*leaves), leaves)
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True))


@pytest.mark.parametrize(
    "make, exc, word",
    [
        (lambda x: (x, x), ValueError, "(q, k, v)"),
        (lambda x: (x, x[:, :3], x), ValueError, "same shape"),
        (lambda x: (x, x.half(), x), TypeError, "same dtype"),
        (lambda x: (x[0], x[0], x[0]), ValueError, "3 dims"),
        (lambda x: (x[..., :96], x[..., :96], x[..., :96]), ValueError, "q_norm_weight"),
    ],
)
def test_qk_norm_split_bad_input(make, exc, word):
    x = torch.randn(1, 4, 128)
    with pytest.raises(exc) as info:
        nk.vit_qk_norm_attention(make(x), torch.ones(128), torch.ones(128), num_heads=2)
    assert word in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="num_heads"):
        nk.vit_qk_norm_attention((x, x, x), torch.ones(128), torch.ones(128), num_heads=3)


# --------------------------------------------------------------------------------------------------
# the sdpa peer backend (issue 14)


def _peer_dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16]


PEER_SHAPES = [  # (T, S, H, D): odd S, 3 and 25 heads, D = 64 and 80
    (2, 97, 3, 64),
    (1, 97, 25, 80),
    (3, 33, 3, 80),
    (1, 1, 25, 64),
]


@pytest.mark.parametrize("shape", PEER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_backend_forward_and_gradients(device, shape):
    require_backend(OP, "sdpa", device)
    t, s, h, d = shape
    gen = torch.Generator().manual_seed(s * 7 + h)
    for dtype in _peer_dtypes(device):
        q, k, v = (torch.randn(t, s, h, d, generator=gen).to(device, dtype) for _ in range(3))
        scale = 0.7 * d**-0.5

        def run(q, k, v, scale=scale):
            with nk.use_backend("sdpa"):
                out = nk.vit_attention(q, k, v, softmax_scale=scale)
            assert out.is_contiguous()
            return out

        def oracle(q, k, v, low, scale=scale):
            return oracle_attention(q, k, v, scale, low)

        _check_against_oracle(run, oracle, (q, k, v), "qkv", dtype)


def test_sdpa_backend_reads_strided_views_and_returns_contiguous(device):
    require_backend(OP, "sdpa", device)
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(2, 97, 3, 3, 64, generator=gen).to(device)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    with nk.use_backend("sdpa"):
        strided = nk.vit_attention(q, k, v)
    assert strided.is_contiguous() and strided.shape == (2, 97, 3, 64)
    torch.testing.assert_close(strided.double(), oracle_attention(q, k, v, 64**-0.5), rtol=1e-5, atol=1e-5)


PEER_FUSED = [  # (T, S, H, D, norm_features): norm_features < H·D as in NVLM's padded checkpoint
    (2, 97, 3, 64, 150),
    (1, 97, 25, 80, 1760),
    (1, 33, 3, 80, None),
]


@pytest.mark.parametrize("shape", PEER_FUSED, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_qk_norm_forward_and_gradients(device, shape):
    require_backend(OP_FUSED, "sdpa", device)
    t, s, h, d, norm_features = shape
    features = h * d
    gen = torch.Generator().manual_seed(s + 3 * h)
    for dtype in _peer_dtypes(device):
        qkv = torch.randn(t, s, 3 * features, generator=gen).to(device, dtype)  # dummy features not zero
        wq, wk = ((1 + 0.3 * torch.randn(features, generator=gen)).to(device, dtype) for _ in range(2))
        nf = norm_features or features

        def run(x, a, b, nf=nf):
            with nk.use_backend("sdpa"):
                return nk.vit_qk_norm_attention(x, a, b, num_heads=h, norm_features=nf, eps=1e-5)

        def oracle(x, a, b, low, nf=nf):
            return oracle_qk_norm_attention(x, a, b, h, 1e-5, nf, d**-0.5, low)

        _check_against_oracle(run, oracle, (qkv, wq, wk), ["qkv", "q_norm_weight", "k_norm_weight"], dtype)


def test_sdpa_qk_norm_is_intern_rms_norm_then_sdpa():
    """The peer's normalization is InternRMSNorm to the bit (variance in float32 over the real
    features, the normalized value cast to the input dtype, then the weight) and the attention is
    SDPA on those values: float16 on CPU, against a transcription of InternViT's module."""
    gen = torch.Generator().manual_seed(4)
    h, d, nf = 4, 64, 192
    qkv = torch.randn(2, 17, 3 * h * d, generator=gen).half()
    wq, wk = ((1 + 0.3 * torch.randn(h * d, generator=gen)).half() for _ in range(2))

    def intern_rms_norm(x, weight, eps=1e-6):  # InternViT's InternRMSNorm, over the real features only
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x[..., :nf].pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + eps)
        return weight * x.to(input_dtype)

    q, k, v = qkv.split(h * d, -1)
    q, k, v = (y.unflatten(-1, (h, d)).transpose(1, 2) for y in (intern_rms_norm(q, wq), intern_rms_norm(k, wk), v))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    with nk.use_backend("sdpa"):
        out = nk.vit_qk_norm_attention(qkv, wq, wk, num_heads=h, norm_features=nf)
    assert torch.equal(out, expected)


def test_sdpa_opcheck_both_ops():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 17, 3, 80, generator=gen).requires_grad_() for _ in range(3))
    torch.library.opcheck(vit_attention_op, (q, k, v, 0.2, "sdpa"))
    out, lse = vit_attention_op(q, k, v, 0.2, "sdpa")
    _, ref_lse = vit_attention_op(q, k, v, 0.2, "reference")  # the schema's lse, as every backend returns it
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    plain = [x.detach() for x in (torch.randn_like(out), q, k, v, out)]
    torch.library.opcheck(vit_attention_bwd_op, (*plain, lse, 0.2, "sdpa"))

    qkv = torch.randn(2, 17, 3 * 3 * 64, generator=gen).requires_grad_()
    wq, wk = ((1 + 0.3 * torch.randn(192, generator=gen)).requires_grad_() for _ in range(2))
    args = (qkv, wq, wk, 3, 1e-6, 150, 0.125)
    torch.library.opcheck(vit_qk_norm_attention_op, (*args, "sdpa"))
    outs = vit_qk_norm_attention_op(*args, "sdpa")
    for mine, ref in zip(outs[1:], vit_qk_norm_attention_op(*args, "reference")[1:], strict=True):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)  # lse, rstd_q, rstd_k
    plain = [x.detach() for x in (torch.randn_like(outs[0]), qkv, wq, wk, *outs)]
    torch.library.opcheck(vit_qk_norm_attention_bwd_op, (*plain, *args[3:], "sdpa"))


def test_op_level_sdpa_backward_recomputes_through_autograd():
    """The registered op with backend "sdpa" (opcheck's path; the public function never takes it)
    differentiates like the public peer path."""
    gen = torch.Generator().manual_seed(8)
    qkv = torch.randn(1, 33, 3 * 2 * 64, generator=gen).requires_grad_()
    wq, wk = ((1 + 0.3 * torch.randn(128, generator=gen)).requires_grad_() for _ in range(2))
    g = torch.randn(1, 33, 2, 64, generator=gen)
    op_out = vit_qk_norm_attention_op(qkv, wq, wk, 2, 1e-6, 100, 0.125, "sdpa")[0]
    op_grads = torch.autograd.grad(op_out, (qkv, wq, wk), g)
    with nk.use_backend("sdpa"):
        out = nk.vit_qk_norm_attention(qkv, wq, wk, num_heads=2, norm_features=100, softmax_scale=0.125)
    grads = torch.autograd.grad(out, (qkv, wq, wk), g)
    assert torch.equal(op_out, out)
    for a, b in zip(op_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@contextlib.contextmanager
def _empty_dispatch_table(tmp_path, monkeypatch):
    """No measurement anywhere: auto takes the default peer."""
    empty = tmp_path / "dispatch_table.json"
    empty.write_text(json.dumps({"format": 1, "entries": []}))
    monkeypatch.setattr(_dispatch, "SHIPPED", empty)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend.reset_caches()
    try:
        yield
    finally:
        monkeypatch.undo()
        _backend.reset_caches()


def test_auto_runs_sdpa_on_cpu(tmp_path, monkeypatch):
    """Regression (issue 14, CPU auto): auto ran the explicit-matmul reference on CPU tensors; with
    no measurement it now runs the sdpa peer (torch's fused CPU kernel), also in float16 where our
    Triton kernels would take the call."""
    ran = []
    real_attention = vit_sdpa.attention

    def spy(*args):
        ran.append(args[0].dtype)
        return real_attention(*args)

    gen = torch.Generator().manual_seed(12)
    with _empty_dispatch_table(tmp_path, monkeypatch):
        monkeypatch.setattr(vit_sdpa, "attention", spy)
        for dtype in (torch.float32, torch.float16):
            q, k, v = (torch.randn(1, 65, 4, 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
            qkv = torch.randn(1, 65, 3 * 256, generator=gen).to(dtype).requires_grad_()
            w = torch.ones(256, dtype=dtype)
            with _backend.record_selections() as calls:
                out = nk.vit_attention(q, k, v)
                fused = nk.vit_qk_norm_attention(qkv, w, w, num_heads=4)
            assert [(c["op"], c["backend"], c["pass"]) for c in calls] == [
                (OP, "sdpa", "fwd+bwd"), (OP_FUSED, "sdpa", "fwd+bwd")
            ]  # fmt: skip
            assert calls[0]["bucket"] == "S=128,D=64,TH=4"
            explained = _backend.explain(OP, "cpu", dtype, calls[0]["bucket"], grad=True)
            assert explained.backend == "sdpa" and "no measurement" in explained.reason
            (out.sum() + fused.sum()).backward()
            assert q.grad is not None and qkv.grad is not None
        assert ran == [torch.float32, torch.float32, torch.float16, torch.float16]


@pytest.mark.parametrize("peer", ["flex", "unfused"])
def test_peers_these_ops_lack_raise_naming_why(peer):
    x = torch.randn(1, 8, 2, 64)
    qkv, w = torch.randn(1, 8, 3 * 128), torch.ones(128)
    with nk.use_backend(peer):
        with pytest.raises(nk.BackendUnavailableError, match=f"has no '{peer}' backend.*sdpa"):
            nk.vit_attention(x, x, x)
        with pytest.raises(nk.BackendUnavailableError, match=f"has no '{peer}' backend.*sdpa"):
            nk.vit_qk_norm_attention(qkv, w, w, num_heads=2)
    with pytest.raises(nk.BackendUnavailableError, match=f"has no '{peer}' backend"):
        vit_attention_op(x, x, x, 0.125, peer)
    for op in (OP, OP_FUSED):
        assert nk.available_backends(op, "cpu")["sdpa"] is None
        assert "no" in nk.available_backends(op, "cpu")[peer]


def test_compile_fullgraph_through_auto_runs_sdpa(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 33, 3, 64, generator=gen).requires_grad_() for _ in range(3))
    qkv = torch.randn(2, 33, 3 * 192, generator=gen).requires_grad_()
    wq, wk = ((1 + 0.3 * torch.randn(192, generator=gen)).requires_grad_() for _ in range(2))
    leaves = (q, k, v, qkv, wq, wk)

    def loss(q, k, v, qkv, wq, wk):
        a = nk.vit_attention(q, k, v).square().sum()
        return a + nk.vit_qk_norm_attention(qkv, wq, wk, num_heads=3, norm_features=150).square().sum()

    with _empty_dispatch_table(tmp_path, monkeypatch):
        torch._dynamo.reset()
        with _backend.record_selections() as calls:
            compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves)
        assert {c["backend"] for c in calls} == {"sdpa"} and len(calls) == 2, calls
        grads = torch.autograd.grad(compiled, leaves)
        eager = loss(*leaves)
        eager_grads = torch.autograd.grad(eager, leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_peer_path_has_the_op_range():
    """The profile CLI and StageTimer find the ops by their NVTX forward range, whichever backend ran."""

    class Observer:
        def __init__(self):
            self.labels = []

        def range_enter(self, label):
            self.labels.append(label)

        def range_exit(self, label):
            pass

    observer = Observer()
    _nvtx.add_observer(observer)
    try:
        x = torch.randn(1, 9, 2, 64)
        with nk.use_backend("sdpa"):
            nk.vit_attention(x, x, x)
            nk.vit_qk_norm_attention(torch.randn(1, 9, 384), torch.ones(128), torch.ones(128), num_heads=2)
    finally:
        _nvtx.remove_observer(observer)
    assert observer.labels == [f"nvlm.kernels.{OP}.fwd", f"nvlm.kernels.{OP_FUSED}.fwd"]


# --------------------------------------------------------------------------------------------------
# launch defects (issue 14): grid limits and the device guard

_ATTENTION_KERNELS = ("_vit_attn_fwd_kernel", "_vit_attn_bwd_dkdv_kernel", "_vit_attn_bwd_dq_kernel")
_ROW_KERNELS = ("_vit_attn_bwd_delta_kernel", "_rms_rstd_kernel", "_rms_norm_bwd_kernel")
_TABLES = {
    "_vit_attn_fwd_kernel": vit_triton.FWD_TABLE,
    "_vit_attn_bwd_dkdv_kernel": vit_triton.DKDV_TABLE,
    "_vit_attn_bwd_dq_kernel": vit_triton.DQ_TABLE,
}


class _Launch:
    """Stands in for a Triton kernel: records each launch's grid and keyword arguments, then runs the
    real kernel (``forward``) or nothing (a host-only check)."""

    def __init__(self, name, kernel, log, forward: bool, on_launch=None):
        self.name, self.kernel, self.log, self.forward, self.on_launch = name, kernel, log, forward, on_launch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, grid, args, kwargs))
            if self.on_launch is not None:
                self.on_launch(self.name, args)
            if self.forward:
                return self.kernel[grid](*args, **kwargs)

        return launch


def _patch_kernels(monkeypatch, log, forward: bool, on_launch=None):
    for name in _ATTENTION_KERNELS + _ROW_KERNELS:
        monkeypatch.setattr(vit_triton, name, _Launch(name, getattr(vit_triton, name), log, forward, on_launch))


def _run_both_ops_forward_and_backward(t, s, h, d, device, dtype, nf=None):
    """The triton launchers of both ops, forward and backward, as the registered ops call them."""
    q, k, v = (torch.randn(t, s, h, d, device=device, dtype=dtype) for _ in range(3))
    out, lse = vit_triton.attention_fwd(q, k, v, 0.125)
    vit_triton.attention_bwd(torch.randn_like(out) if device != "meta" else out, q, k, v, out, lse, 0.125)
    qkv = torch.randn(t, s, 3 * h * d, device=device, dtype=dtype)
    w = torch.ones(h * d, device=device, dtype=dtype)
    nf = nf or h * d
    out, lse, rq, rk = vit_triton.qk_norm_attention_fwd(qkv, w, w, h, 1e-6, nf, 0.125)
    vit_triton.qk_norm_attention_bwd(out, qkv, w, w, out, lse, rq, rk, h, 1e-6, nf, 0.125)


def test_grids_fit_cuda_limits_at_4000_tiles(monkeypatch):
    """Regression (issue 14, grid limits): the grids put T·H on axis 1, at most 65535 programs, so a
    launch failed from about 2622 tiles of 25 heads. At T = 4000, H = 25, S = 1025 every launcher's
    grid (for every block size the autotuner may pick) passes ``_device.check_grid`` and has one
    program per (row block, tile·head). Meta tensors: no kernel runs, nothing is allocated."""
    t, s, h, d = 4000, 1025, 25, 128
    log = []
    _patch_kernels(monkeypatch, log, forward=False)
    _run_both_ops_forward_and_backward(t, s, h, d, "meta", torch.bfloat16, nf=3000)
    assert {name for name, *_ in log} == set(_ATTENTION_KERNELS + _ROW_KERNELS)
    blocks = {(m, n) for table in _TABLES.values() for c in table.values() for m, n, _, _ in c}
    blocks.add(vit_triton.INTERPRETER_CONFIG[:2])
    for name, grid, _, kwargs in log:
        metas = [dict(kwargs, BLOCK_M=m, BLOCK_N=n) for m, n in blocks] if name in _TABLES else [kwargs]
        for meta in metas:
            shape = grid(meta) if callable(grid) else grid
            _device.check_grid(shape)
            if name in _ATTENTION_KERNELS + ("_vit_attn_bwd_delta_kernel",):
                rows = meta["BLOCK_N"] if name == "_vit_attn_bwd_dkdv_kernel" else meta["BLOCK_M"]
                assert shape == (-(-s // rows) * t * h,), (name, meta, shape)


def test_every_launcher_enters_the_tensors_device(monkeypatch):
    """Regression (issue 14, device guard): Triton launches on the current CUDA device, not the
    tensors'. Every kernel launch of both ops, forward and backward, must happen inside
    ``device_guard`` entered with its tensors' device (interpreter on CPU; on a GPU, the real run)."""
    entered = []  # the devices of the guards open now

    @contextlib.contextmanager
    def guard(x):
        entered.append(x.device if isinstance(x, torch.Tensor) else torch.device(x))
        try:
            with _device.device_guard(x):
                yield
        finally:
            entered.pop()

    launches = []

    def check(name, args):
        tensor_device = next(a.device for a in args if isinstance(a, torch.Tensor))
        launches.append((name, list(entered), tensor_device))

    monkeypatch.setattr(vit_triton, "device_guard", guard)
    _patch_kernels(monkeypatch, [], forward=True, on_launch=check)
    devices = ["cpu"] if nk.available_backends(OP, "cpu")["triton"] is None else []
    devices += ["cuda"] if nk.available_backends(OP, "cuda")["triton"] is None else []
    if not devices:
        pytest.skip("the triton backend runs nowhere here (no interpreter, no GPU)")
    for device in devices:
        launches.clear()
        _run_both_ops_forward_and_backward(1, 17, 2, 64, device, torch.float16, nf=100)
        assert {name for name, *_ in launches} == set(_ATTENTION_KERNELS + _ROW_KERNELS)
        for name, guards, tensor_device in launches:
            assert guards and guards[-1] == tensor_device, (name, guards, tensor_device)
