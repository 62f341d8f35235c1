"""vit_attention and vit_qk_norm_attention against an fp64 oracle, with FlashAttention's rule.

The oracle (written here, sharing nothing with nvlm_kernels): attention as softmax(scale·q kᵀ) v
per tile and head, and InternViT-6B's QK-norm (RMS over the whole token's first ``norm_features``
features, weight, then split heads). ``hi`` runs it in float64; ``lo`` in the kernel's dtype
(scores and probabilities rounded to it). A kernel passes when, for the output and every gradient,
max|kernel − hi| <= 2·max|lo − hi| + 1e-5 (design.md §5). Triton runs through the interpreter on
CPU tensors in float16 (its bf16 is wrong there), and on a GPU in float16 and bfloat16.
"""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels.testing import assert_close_flash, require_backend
from nvlm_kernels.vit_attention import vit_attention_bwd_op, vit_attention_op, vit_qk_norm_attention_op

OP = "vit_attention"
OP_FUSED = "vit_qk_norm_attention"


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
        with pytest.raises(nk.BackendUnavailableError, match="no compiled kernel|no CUDA device"):
            nk.vit_attention(q, q, q)
    # auto falls back to the reference for what the kernels do not take
    x = torch.randn(1, 8, 2, 48, device=device, dtype=torch.float32)
    out = nk.vit_attention(x, x, x)
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
    with nk.use_backend(backend):
        torch.library.opcheck(vit_attention_op, (q, k, v, 0.125))
        out, lse = vit_attention_op(q, k, v, 0.125)
        g = torch.randn_like(out)
        # the backward is not differentiable again (no double backward): check it on plain tensors
        plain = [x.detach() for x in (g, q, k, v, out)]
        torch.library.opcheck(vit_attention_bwd_op, (*plain, lse, 0.125))
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
    with nk.use_backend(backend):
        torch.library.opcheck(vit_qk_norm_attention_op, (qkv, wq, wk, 2, 1e-6, 128, 0.125))


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
