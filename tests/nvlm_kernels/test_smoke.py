"""Every op on every backend that can run it here, in the low-precision dtypes, at small shapes:
forward and backward against the op's reference computed in float64 (FlashAttention's rule;
exactly, for data movement and preprocessing).

This is ``bench/gpu_check.sh``'s correctness step: on a GPU it covers each kernel and peer in bf16
and fp16 within seconds; ``gpu_check.sh --dry-run`` runs the same file on a CPU (Triton through
its interpreter in fp16; the peers and the reference in fp32: the interpreter computes bf16
wrongly and the CPU peers are float32 code), and so does ``make test``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels import _backend
from nvlm_kernels.testing import assert_close_flash

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dtypes(backend: str) -> list[torch.dtype]:
    if DEVICE == "cuda":
        # FlexAttention compiles once per dtype (tens of seconds each): bf16, NVLM's dtype, only
        return [torch.bfloat16] if backend == "flex" else [torch.bfloat16, torch.float16]
    return [torch.float16] if backend in ("triton", "hopper") else [torch.float32]  # our Triton kernels: fp16


def _gen() -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(0)


def _rand(*shape, dtype, scale=1.0, gen):
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


# Each maker returns (call(*tensors) -> output, [differentiable tensors]); the tensors are made in
# the test dtype and are re-cast for the float64 reference.


def _vit(dtype):
    gen = _gen()
    return nk.vit_attention, [_rand(2, 97, 3, 64, dtype=dtype, gen=gen) for _ in range(3)]


def _vit_qk_norm(dtype):
    gen = _gen()
    qkv = _rand(2, 65, 3 * 2 * 64, dtype=dtype, gen=gen)
    wq, wk = (1 + _rand(128, dtype=dtype, scale=0.1, gen=gen) for _ in range(2))
    return (lambda a, b, c: nk.vit_qk_norm_attention(a, b, c, num_heads=2, norm_features=100)), [qkv, wq, wk]


def _ranges(b: int, sq: int, skv: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, skv, (b, sq), generator=gen)
    length = torch.randint(0, skv, (b, sq), generator=gen)
    end = torch.minimum(start + length, torch.tensor(skv))
    end[:, : sq // 4] = start[:, : sq // 4]  # some empty rows: they must come out exactly 0
    return start.to(DEVICE, torch.int32), end.to(DEVICE, torch.int32)


def _cross(dtype, sq: int = 40):
    gen = _gen()
    q = _rand(2, sq, 4, 64, dtype=dtype, gen=gen)
    k, v = (_rand(2, 48, 2, 64, dtype=dtype, gen=gen) for _ in range(2))
    gate = torch.full((1,), 0.7, device=DEVICE, dtype=dtype)
    start, end = _ranges(2, sq, 48, gen)
    if sq == 1:
        end = torch.maximum(end, start + 1).clamp(max=48)
    return (lambda q_, k_, v_, g_: nk.gated_cross_attention(q_, k_, v_, start, end, g_)), [q, k, v, gate]


def _projector(dtype):
    gen = _gen()
    x = _rand(2, 65, 16, dtype=dtype, gen=gen)  # 8x8 grid + CLS, 16 channels -> K = 64
    ln_w, ln_b = 1 + _rand(64, dtype=dtype, scale=0.1, gen=gen), _rand(64, dtype=dtype, scale=0.1, gen=gen)
    w1, b1 = _rand(48, 64, dtype=dtype, scale=0.125, gen=gen), _rand(48, dtype=dtype, scale=0.1, gen=gen)
    w2, b2 = _rand(32, 48, dtype=dtype, scale=0.15, gen=gen), _rand(32, dtype=dtype, scale=0.1, gen=gen)

    def call(x_, lw, lb, w1_, b1_, w2_, b2_):
        return nk.mlp_projector(x_, lw, lb, w1_, w2_, b1_, b2_, pixel_shuffle=0.5, drop_cls=True)

    return call, [x, ln_w, ln_b, w1, b1, w2, b2]


MAKERS = {
    "vit_attention": _vit,
    "vit_qk_norm_attention": _vit_qk_norm,
    "gated_cross_attention": _cross,
    "gated_cross_attention[decode]": lambda dtype: _cross(dtype, sq=1),
    "mlp_projector": _projector,
}


def _matrix():
    params = []
    for name in MAKERS:
        op = name.split("[")[0]
        for backend in _backend.registered_ops()[op].backends:
            for dtype in _dtypes(backend):
                params.append(pytest.param(name, backend, dtype, id=f"{name}-{backend}-{str(dtype)[6:]}"))
    return params


def _run(call, tensors, grad_out_seed: int, backward: bool):
    leaves = [t.detach().requires_grad_(backward) for t in tensors]
    out = call(*leaves)
    if not backward:
        return [out]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out)
    return [out, *torch.autograd.grad(out, leaves, grad)]


@pytest.mark.parametrize("name, backend, dtype", _matrix())
def test_backend_against_float64_reference(name, backend, dtype):
    op = name.split("[")[0]
    reason = nk.available_backends(op, DEVICE)[backend]
    if reason is not None:
        pytest.skip(f"{backend} cannot run {op} on {DEVICE} here: {reason}")
    # FlexAttention has no CPU backward in this torch: forward only there (the op raises otherwise)
    backward = not (backend == "flex" and DEVICE == "cpu") and not name.endswith("[decode]")
    call, tensors = MAKERS[name](dtype)
    with nk.use_backend(backend, ops=op):
        got = _run(call, tensors, 1, backward)
    with nk.use_backend("reference", ops=op):
        ref_lo = _run(call, tensors, 1, backward)
        ref_hi = _run(call, [t.double() for t in tensors], 1, backward)
    labels = ["output"] + [f"grad {i}" for i in range(len(got) - 1)]
    for label, g, lo, hi in zip(labels, got, ref_lo, ref_hi, strict=True):
        assert g.dtype == dtype, f"{label}: {g.dtype} != {dtype}"
        assert_close_flash(g, lo, hi, name=f"{name} {backend} {label}")


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_pixel_shuffle_backends_are_exact(backend):
    reason = nk.available_backends("pixel_shuffle", DEVICE)[backend]
    if reason is not None:
        pytest.skip(f"{backend} cannot run pixel_shuffle on {DEVICE} here: {reason}")
    gen = _gen()
    for dtype in _dtypes(backend):
        vit_out = _rand(2, 65, 24, dtype=dtype, gen=gen)
        grad = _rand(2, 16, 96, dtype=dtype, gen=gen)
        with nk.use_backend(backend):
            x = vit_out[:, 1:].detach().requires_grad_()
            out = nk.pixel_shuffle(x)
            (dx,) = torch.autograd.grad(out, x, grad)
        with nk.use_backend("reference"):
            x = vit_out[:, 1:].detach().requires_grad_()
            want = nk.pixel_shuffle(x)
            (want_dx,) = torch.autograd.grad(want, x, grad)
        assert torch.equal(out, want) and torch.equal(dx, want_dx)


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_preprocess_backends_are_exact(backend):
    reason = nk.available_backends("preprocess", DEVICE)[backend]
    if reason is not None:
        pytest.skip(f"{backend} cannot run preprocess on {DEVICE} here: {reason}")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((61, 130), (200, 90))]
    with nk.use_backend(backend):
        got, _ = nk.preprocess_images(images, device=DEVICE, tile_size=56)
    with nk.use_backend("reference"):
        want, _ = nk.preprocess_images(images, device="cpu", tile_size=56)
    assert torch.equal(got.cpu(), want)
