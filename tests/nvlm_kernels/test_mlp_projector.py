"""mlp_projector against the projector written the way InternVL / NVLM write it.

The oracle is the published sequence, written here: drop CLS, InternVL's pixel-shuffle reshapes,
LayerNorm, Linear, GELU, Linear, in float64 (``hi``) and in the kernel's dtype (``lo``); the op's
output and every gradient must satisfy FlashAttention's rule. Channel sizes are small through the
Triton interpreter (4·80 -> 96 -> 64); the real NVLM sizes run on a GPU. Every backend is checked
this way: ``triton`` (fp16 through the interpreter on CPU), the ``unfused`` peer (fp32 on CPU with
torch's ops; fp16 through the interpreter with its Triton gather + LayerNorm kernels) and the
``reference``.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels as nk
from nvlm_kernels import _backend, _device
from nvlm_kernels.mlp_projector import mlp_projector_bwd_op, mlp_projector_op, unfused
from nvlm_kernels.testing import assert_close_flash, require_backend

OP = "mlp_projector"
NAMES = ("x", "ln_weight", "ln_bias", "w1", "w2", "b1", "b2")

# variant -> (LayerNorm?, two layers?, biases?, activation)
VARIANTS = {
    "nvlm-d/h": (True, True, False, "gelu"),
    "nvlm-x": (False, False, False, "gelu"),
    "internvl": (True, True, True, "gelu"),
    "gelu_tanh+ln-x": (True, False, True, "gelu_tanh"),
}


def internvl_pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """InternVL's ``pixel_shuffle`` on [N, h, w, C], as published (the oracle of the gather)."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def oracle(x, ln_weight, ln_bias, w1, w2, b1, b2, *, eps, activation, shuffle, drop_cls, version="v2"):
    if drop_cls:
        x = x[:, 1:]
    if shuffle:
        side = int(x.shape[1] ** 0.5)
        x = internvl_pixel_shuffle(x.reshape(x.shape[0], side, side, -1), 0.5, version)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    if ln_weight is not None:
        x = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    h = F.linear(x, w1, b1)
    if w2 is None:
        return h
    return F.linear(F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none"), w2, b2)


def make_inputs(variant, images, side, channels, hidden, out, dtype, device, *, shuffle, drop_cls, seed=0):
    has_ln, two_layer, biases, _ = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    features = channels * 4 if shuffle else channels
    tokens = side * side if shuffle else side
    # ViT outputs are not centred: a mean offset makes the LayerNorm's centring matter
    x = torch.randn(images, tokens + drop_cls, channels, generator=gen) * 2 + 0.5
    w1 = torch.randn(hidden, features, generator=gen) / features**0.5
    params = {
        "x": x,
        "ln_weight": 1 + 0.2 * torch.randn(features, generator=gen) if has_ln else None,
        "ln_bias": 0.2 * torch.randn(features, generator=gen) if has_ln else None,
        "w1": w1,
        "w2": torch.randn(out, hidden, generator=gen) / hidden**0.5 if two_layer else None,
        "b1": 0.3 * torch.randn(hidden, generator=gen) if biases else None,
        "b2": 0.3 * torch.randn(out, generator=gen) if (biases and two_layer) else None,
    }
    return {k: (v.to(device, dtype) if v is not None else None) for k, v in params.items()}


def strided(v: torch.Tensor, step: int = 3) -> torch.Tensor:
    """A copy of the vector ``v`` whose elements lie ``step`` apart (a leaf when ``v`` is one)."""
    out = torch.empty_strided(v.shape, (step,), dtype=v.dtype, device=v.device)
    return out.copy_(v.detach()).requires_grad_(v.requires_grad)


VECTORS = ("ln_weight", "ln_bias", "b1", "b2")


def check(variant, images, side, channels, hidden, out, dtype, device, *, shuffle, drop_cls, version="v2",
          x_grad=True, eps=1e-5, backend="triton", strided_vectors=False):  # fmt: skip
    """``backend``'s output and gradients vs the oracle (fp64 and ``dtype``) under FlashAttention's
    rule; ``strided_vectors``: γ, β and the biases are given as non-unit-stride leaves."""
    activation = VARIANTS[variant][3]
    params = make_inputs(
        variant, images, side, channels, hidden, out, dtype, device, shuffle=shuffle, drop_cls=drop_cls
    )
    kwargs = {"eps": eps, "activation": activation}
    mine = {k: (v.clone().requires_grad_(k != "x" or x_grad) if v is not None else None) for k, v in params.items()}
    if strided_vectors:
        mine = {k: strided(v) if (k in VECTORS and v is not None) else v for k, v in mine.items()}
        assert all(mine[k].stride() == (3,) for k in VECTORS if mine[k] is not None)
    with nk.use_backend(backend):
        y = nk.mlp_projector(*mine.values(), **kwargs, pixel_shuffle=0.5 if shuffle else None, drop_cls=drop_cls,
                             version=version)  # fmt: skip
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    leaves = [k for k, v in mine.items() if v is not None and v.requires_grad]
    grads = dict(zip(leaves, torch.autograd.grad(y, [mine[k] for k in leaves], grad), strict=True))
    refs = {}
    for tag, cast in (("hi", torch.float64), ("lo", dtype)):
        # the oracle on the CPU: float16 matmuls there round like the GPU's (fp32 accumulation)
        ins = {k: (v.detach().cpu().to(cast).requires_grad_() if v is not None else None) for k, v in params.items()}
        ref = oracle(*ins.values(), **kwargs, shuffle=shuffle, drop_cls=drop_cls, version=version)
        refs[tag] = (ref, dict(zip(leaves, torch.autograd.grad(ref, [ins[k] for k in leaves], grad.cpu().to(cast)),
                                   strict=True)))  # fmt: skip
    assert_close_flash(y.detach().cpu(), refs["lo"][0], refs["hi"][0], name="output")
    for k in leaves:
        assert_close_flash(grads[k].cpu(), refs["lo"][1][k], refs["hi"][1][k], name=f"d{k}")
    with torch.no_grad(), nk.use_backend(backend):  # the eager fast path (nothing saved)
        fast = nk.mlp_projector(*params.values(), **kwargs, pixel_shuffle=0.5 if shuffle else None,
                                drop_cls=drop_cls, version=version)  # fmt: skip
    assert torch.equal(fast, y.detach())


def _dtypes(device):
    return [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]


# (images, grid side or tokens): 1 token, 27 (odd), 256, 1792 (7 tiles) output tokens
TOKENS = [(1, 2), (3, 6), (1, 32), (7, 32)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("images, side", TOKENS, ids=["1tok", "27tok", "256tok", "1792tok"])
def test_fused_shuffle_and_cls_drop(device, variant, images, side, poison_empty):
    require_backend(OP, "triton", device)
    if device == "cpu" and images * side * side > 256 and variant != "nvlm-d/h":
        pytest.skip("the interpreter is slow: the 1792-token case runs for one variant on CPU (all on a GPU)")
    for dtype in _dtypes(device):
        check(variant, images, side, 80, 96, 64, dtype, device, shuffle=True, drop_cls=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tokens", [1, 27, 256])
def test_already_shuffled_tokens(device, variant, tokens, poison_empty):
    require_backend(OP, "triton", device)
    for dtype in _dtypes(device):
        check(variant, 2, tokens, 320, 96, 64, dtype, device, shuffle=False, drop_cls=False)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_shuffle_versions_without_cls(device, version):
    require_backend(OP, "triton", device)
    check("nvlm-d/h", 2, 4, 48, 40, 24, torch.float16, device, shuffle=True, drop_cls=False, version=version, eps=1e-6)


def test_frozen_input_gets_no_dx(device):
    """dx is computed only when x requires grad; the weights' gradients are the same either way."""
    require_backend(OP, "triton", device)
    check("internvl", 2, 4, 48, 40, 24, torch.float16, device, shuffle=True, drop_cls=True, x_grad=False)
    params = make_inputs("nvlm-d/h", 1, 4, 48, 40, 24, torch.float16, device, shuffle=True, drop_cls=True)
    args = (*params.values(), 1e-5, "gelu", 2, True, 1, True, "triton")
    _, mean, rstd, pre = mlp_projector_op(*args)
    grad = torch.ones(1, 4, 24, device=device, dtype=torch.float16)
    grads = mlp_projector_bwd_op(grad, *params.values(), mean, rstd, pre, 1e-5, "gelu", 2, True, 1, 0b1000, "triton")
    assert [g.numel() > 0 for g in grads] == [False, False, False, True, False, False, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real NVLM sizes need a GPU (fp64 oracle of 12800x29568)")
@pytest.mark.parametrize("variant, hidden, out", [("nvlm-d/h", 29568, 8192), ("nvlm-x", 8192, 8192)])
def test_real_nvlm_sizes(variant, hidden, out):
    require_backend(OP, "triton", "cuda")
    params = make_inputs(variant, 1, 16, 3200, hidden, out, torch.bfloat16, "cuda", shuffle=True, drop_cls=True)
    with nk.use_backend("triton"):
        y = nk.mlp_projector(*params.values(), pixel_shuffle=0.5, drop_cls=True)
    kwargs = {"eps": 1e-5, "activation": "gelu", "shuffle": True, "drop_cls": True}
    hi = oracle(*(v.double() if v is not None else None for v in params.values()), **kwargs)
    lo = oracle(*params.values(), **kwargs)
    assert_close_flash(y, lo, hi)


def test_reference_backend_matches_the_oracle():
    params = make_inputs("internvl", 2, 4, 24, 40, 16, torch.float64, "cpu", shuffle=True, drop_cls=True)
    ins = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in params.items()}
    with nk.use_backend("reference"):
        y = nk.mlp_projector(*ins.values(), pixel_shuffle=0.5, drop_cls=True)
    ref_ins = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in params.items()}
    ref = oracle(*ref_ins.values(), eps=1e-5, activation="gelu", shuffle=True, drop_cls=True)
    torch.testing.assert_close(y, ref)
    grad = torch.randn_like(y)
    mine = torch.autograd.grad(y, list(ins.values()), grad)
    theirs = torch.autograd.grad(ref, list(ref_ins.values()), grad)
    for name, a, b in zip(NAMES, mine, theirs, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["triton", "reference", "unfused"])
def test_opcheck_and_compile(device, backend):
    require_backend(OP, backend, device)
    dtype = torch.float16 if backend == "triton" else torch.float32
    params = make_inputs("internvl", 2, 4, 32, 48, 16, dtype, device, shuffle=True, drop_cls=True)
    leaves = [v.requires_grad_() for v in params.values()]
    args = (*leaves, 1e-5, "gelu", 2, True, 1, True)
    torch.library.opcheck(mlp_projector_op, (*args, backend))
    out, mean, rstd, pre = mlp_projector_op(*args, backend)
    plain = [v.detach() for v in leaves]
    torch.library.opcheck(
        mlp_projector_bwd_op,
        (torch.randn_like(out).detach(), *plain, mean, rstd, pre, 1e-5, "gelu", 2, True, 1, 0b1111111, backend),
    )
    torch._dynamo.reset()

    def loss(*a):
        return nk.mlp_projector(*a, pixel_shuffle=0.5, drop_cls=True).float().square().sum()

    with nk.use_backend(backend):
        torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves).backward()
        got = [v.grad.clone() for v in leaves]
        for v in leaves:
            v.grad = None
        loss(*leaves).backward()
    for name, a, v in zip(NAMES, got, leaves, strict=True):
        assert torch.equal(a, v.grad), f"d{name} differs under torch.compile"


def _good():
    return make_inputs("nvlm-d/h", 2, 4, 8, 12, 6, torch.float32, "cpu", shuffle=True, drop_cls=True)


@pytest.mark.parametrize(
    "change, kwargs, words",
    [
        (lambda p: {**p, "w1": p["w1"][:, :-1]}, {}, ["w1", "[hidden, 32]", "x 4 from the pixel shuffle"]),
        (lambda p: {**p, "ln_weight": p["ln_weight"][:-1]}, {}, ["ln_weight", "(32,)"]),
        (lambda p: {**p, "ln_weight": None}, {}, ["ln_bias needs ln_weight"]),
        (lambda p: {**p, "w2": p["w2"][:, :-1]}, {}, ["w2", "[out, 12]"]),
        (lambda p: {**p, "w2": None, "b2": torch.zeros(6)}, {}, ["b2 needs w2"]),
        (lambda p: {**p, "b1": torch.zeros(3)}, {}, ["b1", "(12,)"]),
        (lambda p: {**p, "w1": p["w1"].double()}, {}, ["w1", "dtype"]),
        (lambda p: {**p, "x": p["x"][0]}, {}, ["x", "3 dims"]),
        (lambda p: {**p, "x": p["x"].long()}, {}, ["x", "dtype"]),
        (lambda p: p, {"drop_cls": False}, ["square", "drop_cls=True"]),
        (lambda p: {**p, "x": p["x"][:, :-1]}, {}, ["square"]),
        (lambda p: p, {"pixel_shuffle": 0.3}, ["scale_factor"]),
        (lambda p: p, {"activation": "relu"}, ["activation"]),
        (lambda p: p, {"eps": 0.0}, ["eps"]),
        (lambda p: p, {"version": "v3"}, ["version"]),
    ],
)
def test_bad_input(change, kwargs, words):
    params = change(_good())
    kwargs = {"pixel_shuffle": 0.5, "drop_cls": True, **kwargs}
    with pytest.raises((ValueError, TypeError)) as info:
        nk.mlp_projector(*params.values(), **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device to mix")
def test_mixed_devices():
    params = _good()
    params["w1"] = params["w1"].cuda()
    with pytest.raises(ValueError, match="w1 is on cuda"):
        nk.mlp_projector(*params.values(), pixel_shuffle=0.5, drop_cls=True)


@pytest.mark.parametrize("backend", ["triton", "reference", "unfused"])
def test_empty_batch(device, backend):
    dtype = torch.float16 if backend == "triton" else torch.float32
    require_backend(OP, backend, device)
    params = make_inputs("nvlm-d/h", 0, 4, 8, 12, 6, dtype, device, shuffle=True, drop_cls=True)
    with nk.use_backend(backend):
        y = nk.mlp_projector(*params.values(), pixel_shuffle=0.5, drop_cls=True)
    assert y.shape == (0, 4, 6)


# --------------------------------------------------------------------------------------------------
# the unfused peer backend


def _float_dtypes(device):
    return [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize(
    "shuffle, drop_cls, version", [(True, True, "v2"), (True, False, "v1"), (True, True, "v1"), (False, False, "v2")]
)
def test_unfused_matches_the_oracle(device, variant, shuffle, drop_cls, version):
    """The peer, forward and every gradient, with and without LayerNorm / second layer / biases,
    both shuffle orders, with and without the CLS token, and on already-shuffled tokens."""
    require_backend(OP, "unfused", device)
    side = 4 if shuffle else 27
    for dtype in _float_dtypes(device):
        check(variant, 2, side, 24, 40, 16, dtype, device, shuffle=shuffle, drop_cls=drop_cls, version=version,
              backend="unfused")  # fmt: skip


@pytest.fixture
def unfused_kernels(monkeypatch):
    """Run the unfused backend's gather + LayerNorm step through its Triton kernels on CPU tensors
    (the interpreter), as it does on CUDA tensors in float16 / bfloat16."""
    require_backend(OP, "triton", "cpu")
    monkeypatch.setattr(unfused, "_use_kernels", lambda x: x.dtype in unfused.KERNEL_DTYPES)
    return _backend.implementation("nvlm_kernels.mlp_projector", "triton")


@pytest.mark.parametrize("width", ["one tile", "loop"])
@pytest.mark.parametrize("variant, shuffle, drop_cls", [("internvl", True, True), ("nvlm-d/h", False, False)])
def test_unfused_triton_gather_layer_norm(
    unfused_kernels, monkeypatch, width, variant, shuffle, drop_cls, poison_empty
):
    """The Triton gather + LayerNorm kernels of the unfused path (fp16, interpreter): rows held in
    registers, and rows walked in steps (forced here with small steps: K = 320 in 10 steps, K = 80 in
    3 with a ragged last one)."""
    if width == "loop":
        monkeypatch.setattr(unfused_kernels, "_LN_ONE_TILE_MAX", 16)
        monkeypatch.setattr(unfused_kernels, "_LN_LOOP_BLOCK", 32)
    calls = []
    real = unfused_kernels._ln_fwd_config
    monkeypatch.setattr(unfused_kernels, "_ln_fwd_config", lambda k: calls.append(real(k)) or calls[-1])
    side = 4 if shuffle else 9
    check(variant, 2, side, 80, 40, 16, torch.float16, "cpu", shuffle=shuffle, drop_cls=drop_cls, backend="unfused")
    assert calls and all(one_tile == (width == "one tile") for _, _, one_tile, _ in calls), calls


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton"])
def test_unfused_gather_layer_norm_opcheck(request, kernels):
    """The peer's internal gather + LayerNorm op and its backward op: schema, fake kernels, autograd."""
    dtype = torch.float32
    if kernels:
        request.getfixturevalue("unfused_kernels")
        dtype = torch.float16
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 17, 8, generator=gen) * 2 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(32, generator=gen)).to(dtype).requires_grad_()
    b = (0.2 * torch.randn(32, generator=gen)).to(dtype).requires_grad_()
    for bias in (b, None):
        torch.library.opcheck(unfused.gather_ln_op, (x, w, bias, 1e-5, 2, True, 1))
        z, mean, rstd = unfused.gather_ln_op(x, w, bias, 1e-5, 2, True, 1)
        plain = [t.detach() if t is not None else None for t in (x, w, bias)]
        args = (torch.randn_like(z).detach(), *plain, mean.detach(), rstd.detach(), 1e-5, 2, True, 1)
        for needs in (0b111, 0b001, 0b110):
            torch.library.opcheck(unfused.gather_ln_bwd_op, (*args, needs))


def test_auto_runs_the_unfused_peer_on_cpu(monkeypatch):
    """With no measurement for the CPU, auto runs the peer (fp32 and fp16 alike); the bucket is
    M (projector rows), K, N1, N2 as powers of two; the peer is plain PyTorch in the public function
    (not the registered op)."""
    params = make_inputs("internvl", 3, 6, 24, 40, 16, torch.float32, "cpu", shuffle=True, drop_cls=True)
    assert nk.available_backends(OP, "cpu")["unfused"] is None
    ops = []
    real_op = mlp_projector_op

    def recording_op(*a):
        ops.append(a[-1])
        return real_op(*a)

    monkeypatch.setattr(sys.modules["nvlm_kernels.mlp_projector"], "mlp_projector_op", recording_op)
    with _backend.record_selections() as calls:
        nk.mlp_projector(*params.values(), pixel_shuffle=0.5, drop_cls=True)
        with torch.no_grad():
            nk.mlp_projector(*(v.half() for v in params.values()), pixel_shuffle=0.5, drop_cls=True)
    assert [c["backend"] for c in calls] == ["unfused", "unfused"], calls
    assert calls[0]["bucket"] == "M=32,K=128,N1=64,N2=16", calls[0]  # 3 images x 9 rows, K = 96
    assert calls[1]["pass"] == "fwd" and calls[1]["dtype"] == "float16"
    assert ops == []
    one_layer = make_inputs("nvlm-x", 1, 4, 24, 40, 16, torch.float32, "cpu", shuffle=True, drop_cls=True)
    with _backend.record_selections() as calls:
        nk.mlp_projector(*one_layer.values(), pixel_shuffle=0.5, drop_cls=True)
    assert calls[0]["bucket"] == "M=4,K=128,N1=64,N2=0", calls[0]


def test_kernel_dtype_and_unknown_backend_errors():
    """An explicit triton request for float32 names the reason; the op refuses backends it lacks."""
    params = make_inputs("nvlm-d/h", 1, 4, 8, 12, 6, torch.float32, "cpu", shuffle=True, drop_cls=True)
    with nk.use_backend("triton"), pytest.raises(_backend.BackendUnavailableError, match="float16 or bfloat16"):
        nk.mlp_projector(*params.values(), pixel_shuffle=0.5, drop_cls=True)
    with nk.use_backend("sdpa"), pytest.raises(_backend.BackendUnavailableError, match="has no 'sdpa' backend"):
        nk.mlp_projector(*params.values(), pixel_shuffle=0.5, drop_cls=True)
    args = (*params.values(), 1e-5, "gelu", 2, True, 1, False)
    with pytest.raises(_backend.BackendUnavailableError, match="unknown backend 'flash'"):
        mlp_projector_op(*args, "flash")
    with pytest.raises(_backend.BackendUnavailableError, match="float16 or bfloat16"):
        mlp_projector_op(*args, "triton")
    auto = mlp_projector_op(*args, "auto")[0]
    torch.testing.assert_close(auto, mlp_projector_op(*args, "unfused")[0], rtol=0, atol=0)


def test_compile_through_auto_runs_the_peer():
    """torch.compile(fullgraph=True) of the public function with auto: the peer is chosen at trace
    time and its gather + LayerNorm step is one opaque op; forward and gradients equal eager's."""
    params = make_inputs("internvl", 2, 4, 24, 40, 16, torch.float32, "cpu", shuffle=True, drop_cls=True)
    leaves = [v.requires_grad_() for v in params.values()]

    def loss(*a):
        return nk.mlp_projector(*a, pixel_shuffle=0.5, drop_cls=True).square().sum()

    torch._dynamo.reset()
    seen = []

    def compiler(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    with _backend.record_selections() as calls:
        value = torch.compile(loss, fullgraph=True, backend=compiler)(*leaves)
    value.backward()
    got = [v.grad.clone() for v in leaves]
    for v in leaves:
        v.grad = None
    expected = loss(*leaves)
    expected.backward()
    assert [c["backend"] for c in calls] == ["unfused"], calls
    assert any("mlp_projector_gather_ln" in t for t in seen), seen
    torch.testing.assert_close(value, expected)
    for name, a, v in zip(NAMES, got, leaves, strict=True):
        torch.testing.assert_close(a, v.grad, msg=lambda m, name=name: f"d{name}: {m}")


# --------------------------------------------------------------------------------------------------
# GPU-path defects (issue 14)


@pytest.mark.parametrize("backend", ["triton", "unfused", "reference"])
def test_strided_layer_norm_parameters_and_biases(device, backend, request):
    """γ, β, b1 and b2 as views with stride 3 (e.g. parameters sliced out of a bigger buffer): the
    kernels read them as unit-stride before the fix (the triton backend then used every third
    element's neighbours), forward and backward."""
    require_backend(OP, backend, device)
    dtype = torch.float32 if backend != "triton" else torch.float16
    if backend == "unfused" and device == "cpu":
        request.getfixturevalue("unfused_kernels")  # its Triton gather + LayerNorm kernels
        dtype = torch.float16
    check("internvl", 2, 4, 48, 40, 24, dtype, device, shuffle=True, drop_cls=True, backend=backend,
          strided_vectors=True)  # fmt: skip


def test_launchers_enter_the_tensors_device(monkeypatch, unfused_kernels):
    """Every launcher enters the tensors' device (Triton and cuBLAS launch on the current one):
    recorded through the module's ``device_guard`` during a triton forward + backward and an unfused
    one through its Triton gather + LayerNorm kernels."""
    entered = []

    def recording(name, real):
        return lambda t: entered.append((name, t.device)) or real(t)

    monkeypatch.setattr(unfused_kernels, "device_guard", recording("triton", unfused_kernels.device_guard))
    monkeypatch.setattr(unfused, "device_guard", recording("unfused", unfused.device_guard))
    params = make_inputs("internvl", 1, 4, 16, 24, 8, torch.float16, "cpu", shuffle=True, drop_cls=True)
    leaves = [v.requires_grad_() for v in params.values()]
    for backend, expected in (("triton", ["triton"] * 2), ("unfused", ["unfused", "triton", "triton"])):
        entered.clear()
        with nk.use_backend(backend):
            nk.mlp_projector(*leaves, pixel_shuffle=0.5, drop_cls=True).float().sum().backward()
        assert [name for name, _ in entered] == expected, (backend, entered)
        assert all(d == leaves[0].device for _, d in entered)


def test_launch_grids_fit_cuda_limits(monkeypatch):
    """Every launch's grid at M = 7·256·64 projector rows (64 requests of 7 tiles), NVLM's K and
    N1, with the GPU block sizes: within CUDA's limits (axis 0 < 2^31, axes 1 and 2 <= 65535)."""
    require_backend(OP, "triton", "cpu")
    kernels = _backend.implementation("nvlm_kernels.mlp_projector", "triton")
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    grids = kernels.launch_grids(7 * 256 * 64, 12800, 29568)
    assert set(grids) == {"ln_stats", "ln_linear", "act_bwd", "ln_apply", "ln_bwd_rowsum", "ln_bwd", "ln_fwd"}
    for name, grid in grids.items():
        _device.check_grid(grid)
        assert all(size >= 1 for size in grid), (name, grid)
    assert grids["ln_fwd"] == (7 * 256 * 64,)  # one 12800-wide row per program, in registers
    with pytest.raises(ValueError, match="axis 1"):
        _device.check_grid((1, 65536))
