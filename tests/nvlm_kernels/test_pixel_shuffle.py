"""pixel_shuffle: exact against two independent implementations, on every backend that can run here.

Independent oracles (neither shares code with nvlm_kernels):
* ``shuffle_by_index_map``: the published index map (nvlm-spec §4.2) written as a plain loop over
  the r×r blocks, in torch, exact in every dtype;
* ``internvl_numpy``: InternVL's reshape/permute sequence re-written in numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nvlm_kernels
from nvlm_kernels.pixel_shuffle import pixel_shuffle_op
from nvlm_kernels.testing import require_backend

OP = "pixel_shuffle"


def shuffle_by_index_map(x: torch.Tensor, r: int, v2: bool) -> torch.Tensor:
    """out[n, (side/r)·i + j, C·(r·dr + dc) + ch] = in[n, side·(r·i + dr) + r·j + dc, ch] (v2);
    v1 puts block (i, j) at output token (side/r)·j + i."""
    n, length, channels = x.shape
    side = math.isqrt(length)
    so = side // r
    out = torch.empty(n, length // (r * r), channels * r * r, dtype=x.dtype, device=x.device)
    for i in range(so):
        for j in range(so):
            out_token = so * i + j if v2 else so * j + i
            for dr in range(r):
                for dc in range(r):
                    seg = r * dr + dc
                    out[:, out_token, channels * seg : channels * (seg + 1)] = x[:, side * (r * i + dr) + r * j + dc]
    return out


def unshuffle_by_index_map(g: torch.Tensor, r: int, v2: bool) -> torch.Tensor:
    """The gradient of ``shuffle_by_index_map``: each input token gets its slice of the output row back."""
    n, out_length, out_channels = g.shape
    channels = out_channels // (r * r)
    so = math.isqrt(out_length)
    side = so * r
    grad_in = torch.empty(n, side * side, channels, dtype=g.dtype, device=g.device)
    for i in range(so):
        for j in range(so):
            out_token = so * i + j if v2 else so * j + i
            for dr in range(r):
                for dc in range(r):
                    seg = r * dr + dc
                    grad_in[:, side * (r * i + dr) + r * j + dc] = g[
                        :, out_token, channels * seg : channels * (seg + 1)
                    ]
    return grad_in


def internvl_numpy(x: np.ndarray, scale: float, v2: bool) -> np.ndarray:
    """InternVL's pixel_shuffle (modeling_internvl_chat.py) on [N, L, C], in numpy."""
    n, length, c = x.shape
    side = math.isqrt(length)
    g = x.reshape(n, side, side, c)
    n, w, h, c = g.shape
    g = g.reshape(n, w, int(h * scale), int(c / scale))
    g = g.transpose(0, 2, 1, 3)
    g = g.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if v2:
        g = g.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(g).reshape(n, -1, g.shape[-1])


def make_input(n: int, length: int, channels: int, *, cls: bool, dtype=torch.float32, device="cpu", seed=0):
    """Fresh random tokens; with ``cls`` a [N, 1 + L, C] tensor whose view [:, 1:] is returned too."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(n, length + int(cls), channels, generator=gen).to(dtype=dtype, device=device)
    return full, (full[:, 1:] if cls else full)


# --------------------------------------------------------------------------------------------------
# forward and backward, exact


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("length", [16, 64, 1024])
@pytest.mark.parametrize("channels", [8, 3200])
@pytest.mark.parametrize("cls", [False, True], ids=["no_cls", "cls_view"])
def test_forward_backward_exact(device, backend, version, n, length, channels, cls, poison_empty):
    require_backend(OP, backend, device)
    v2 = version == "v2"
    full, x = make_input(n, length, channels, cls=cls, device=device, seed=length + channels + n)
    full.requires_grad_(True)
    x = full[:, 1:] if cls else full
    with nvlm_kernels.use_backend(backend):
        y = nvlm_kernels.pixel_shuffle(x, 0.5, version)
        expected = shuffle_by_index_map(x.detach(), 2, v2)
        assert y.shape == (n, length // 4, channels * 4)
        assert y.is_contiguous()
        assert torch.equal(y, expected)
        if channels == 8:  # the numpy oracle is an O(size) copy; keep it to the small channel count
            assert torch.equal(y.cpu(), torch.from_numpy(internvl_numpy(x.detach().cpu().numpy(), 0.5, v2)))

        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
        y.backward(g)
    expected_grad = unshuffle_by_index_map(g, 2, v2)
    if cls:
        assert torch.equal(full.grad[:, 0], torch.zeros_like(full.grad[:, 0]))
        assert torch.equal(full.grad[:, 1:], expected_grad)
    else:
        assert torch.equal(full.grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_dtypes_exact(device, backend, dtype, version, poison_empty):
    require_backend(OP, backend, device)
    v2 = version == "v2"
    _, x = make_input(3, 256, 40, cls=True, dtype=dtype, device=device, seed=7)
    with nvlm_kernels.use_backend(backend):
        y = nvlm_kernels.pixel_shuffle(x, 0.5, version)
        g = torch.randn(y.shape, dtype=torch.float32).to(dtype=dtype, device=device)
        grad_in = torch.ops.nvlm_kernels.pixel_shuffle_bwd(g, 2, v2)
    assert y.dtype == dtype and grad_in.dtype == dtype
    assert torch.equal(y, shuffle_by_index_map(x, 2, v2))
    assert torch.equal(grad_in, unshuffle_by_index_map(g, 2, v2))


@pytest.mark.parametrize("r", [2, 4])
def test_other_scale_factors(device, backend, r):
    """InternVL's sequence is defined for any 1/r; r = 4 checks the general index math."""
    require_backend(OP, backend, device)
    _, x = make_input(2, 64, 12, cls=False, device=device, seed=r)
    with nvlm_kernels.use_backend(backend):
        for version in ("v1", "v2"):
            y = nvlm_kernels.pixel_shuffle(x, 1.0 / r, version)
            assert torch.equal(y, shuffle_by_index_map(x, r, version == "v2"))
            assert torch.equal(y.cpu(), torch.from_numpy(internvl_numpy(x.cpu().numpy(), 1.0 / r, version == "v2")))


def test_strided_inputs(device, backend, poison_empty):
    """Channel stride != 1 (a transposed view) and a non-contiguous gradient."""
    require_backend(OP, backend, device)
    base = torch.randn(2, 24, 65, device=device)  # [N, C, 1 + L]
    x = base.transpose(1, 2)[:, 1:]  # [N, 64, 24], channel stride 65, storage offset 1
    assert x.stride(2) != 1
    with nvlm_kernels.use_backend(backend):
        y = nvlm_kernels.pixel_shuffle(x)
        assert torch.equal(y, shuffle_by_index_map(x, 2, True))
        g = torch.randn(y.shape[0], y.shape[2], y.shape[1], device=device).transpose(1, 2)
        grad_in = torch.ops.nvlm_kernels.pixel_shuffle_bwd(g, 2, True)
    assert torch.equal(grad_in, unshuffle_by_index_map(g, 2, True))


def test_double_backward(device, backend):
    """The backward is itself differentiable (its gradient is the forward), exactly."""
    require_backend(OP, backend, device)
    x = torch.randn(2, 16, 4, device=device, requires_grad=True)
    g = torch.randn(2, 4, 16, device=device, requires_grad=True)
    w = torch.randn(2, 16, 4, device=device)
    with nvlm_kernels.use_backend(backend):
        (grad_x,) = torch.autograd.grad(nvlm_kernels.pixel_shuffle(x), x, g, create_graph=True)
        (grad_g,) = torch.autograd.grad(grad_x, g, w)
    assert torch.equal(grad_x, unshuffle_by_index_map(g.detach(), 2, True))
    assert torch.equal(grad_g, shuffle_by_index_map(w, 2, True))


def test_empty_batch(device, backend):
    require_backend(OP, backend, device)
    x = torch.randn(0, 64, 8, device=device)
    with nvlm_kernels.use_backend(backend):
        y = nvlm_kernels.pixel_shuffle(x)
    assert y.shape == (0, 16, 32)


# --------------------------------------------------------------------------------------------------
# torch integration: opcheck, torch.compile


@pytest.mark.parametrize("v2", [True, False])
def test_opcheck(device, backend, v2):
    require_backend(OP, backend, device)
    x = torch.randn(2, 64, 12, device=device, requires_grad=True)
    with nvlm_kernels.use_backend(backend):
        torch.library.opcheck(pixel_shuffle_op, (x, 2, v2))
        g = torch.randn(2, 16, 48, device=device, requires_grad=True)
        torch.library.opcheck(torch.ops.nvlm_kernels.pixel_shuffle_bwd.default, (g, 2, v2))


def test_torch_compile_fullgraph(device, backend):
    require_backend(OP, backend, device)
    torch._dynamo.reset()

    def vision_tail(vit_out: torch.Tensor) -> torch.Tensor:
        return nvlm_kernels.pixel_shuffle(vit_out[:, 1:], 0.5).square().sum()

    compiled = torch.compile(vision_tail, fullgraph=True, backend="aot_eager")
    vit_out = torch.randn(3, 65, 16, device=device, requires_grad=True)
    with nvlm_kernels.use_backend(backend):
        loss = compiled(vit_out)
        loss.backward()
    expected = shuffle_by_index_map(vit_out.detach()[:, 1:], 2, True)
    assert torch.equal(loss.detach(), expected.square().sum())
    expected_grad = torch.zeros_like(vit_out)
    expected_grad[:, 1:] = unshuffle_by_index_map(2 * expected, 2, True)
    assert torch.equal(vit_out.grad, expected_grad)


def test_torch_compile_inductor_cpu():
    """The default inductor backend treats the op as opaque and still gets exact results."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: nvlm_kernels.pixel_shuffle(t[:, 1:]) * 2, fullgraph=True)
    x = torch.randn(2, 17, 8)
    assert torch.equal(compiled(x), shuffle_by_index_map(x[:, 1:], 2, True) * 2)


# --------------------------------------------------------------------------------------------------
# bad input: a clear Python error naming the argument


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: (torch.randn(64, 8), 0.5, "v2"), ValueError, ["x", "3 dims"]),
        (lambda: (torch.randn(1, 2, 64, 8), 0.5, "v2"), ValueError, ["x", "3 dims"]),
        (lambda: (torch.randn(1, 65, 8), 0.5, "v2"), ValueError, ["x.shape[1]", "square", "CLS"]),
        (lambda: (torch.randn(1, 60, 8), 0.5, "v2"), ValueError, ["x.shape[1]", "square"]),
        (lambda: (torch.randn(1, 49, 8), 0.5, "v2"), ValueError, ["divisible"]),
        (lambda: (torch.randn(1, 36, 8), 0.25, "v2"), ValueError, ["divisible"]),
        (lambda: (torch.randint(0, 9, (1, 64, 8)), 0.5, "v2"), TypeError, ["x", "floating"]),
        (lambda: (torch.randn(1, 64, 8).numpy(), 0.5, "v2"), TypeError, ["x", "torch.Tensor"]),
        (lambda: (torch.randn(1, 64, 8), 0.3, "v2"), ValueError, ["scale_factor"]),
        (lambda: (torch.randn(1, 64, 8), 1.0, "v2"), ValueError, ["scale_factor"]),
        (lambda: (torch.randn(1, 64, 8), 2, "v2"), ValueError, ["scale_factor"]),
        (lambda: (torch.randn(1, 64, 8), "0.5", "v2"), TypeError, ["scale_factor"]),
        (lambda: (torch.randn(1, 64, 8), 0.5, "v3"), ValueError, ["version"]),
    ],
)
def test_bad_input_errors(make, exc, words):
    args = make()
    with pytest.raises(exc) as info:
        nvlm_kernels.pixel_shuffle(*args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_raw_op_validates_too():
    """Calling the registered op directly (as torch.compile does) gets the same checks."""
    with pytest.raises(ValueError, match="square"):
        torch.ops.nvlm_kernels.pixel_shuffle(torch.randn(1, 65, 8), 2, True)
    with pytest.raises(ValueError, match="downscale"):
        torch.ops.nvlm_kernels.pixel_shuffle(torch.randn(1, 64, 8), 1, True)
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.nvlm_kernels.pixel_shuffle_bwd(torch.randn(1, 16, 30), 2, True)


# --------------------------------------------------------------------------------------------------
# the compiled kernel's copy-unit choice (16-byte vectors where the addresses allow it)


def _copy_unit(x: torch.Tensor) -> int:
    from nvlm_kernels.pixel_shuffle import cuda as ext

    return ext.copy_unit_bytes(x, 2, True)


@pytest.mark.parametrize(
    "dtype, channels, view, unit",
    [
        (torch.bfloat16, 3200, "cls", 16),  # NVLM: the CLS-dropped view of [T, 1025, 3200] is vectorized
        (torch.float16, 1024, "cls", 16),  # InternViT-300M
        (torch.float32, 3200, "cls", 16),
        (torch.float64, 3, "full", 8),  # 24-byte rows: 8-byte units
        (torch.float16, 6, "full", 4),  # 12-byte rows: 4-byte units
        (torch.float16, 5, "full", 2),  # 10-byte rows: element-wise
        (torch.float16, 8, "offset", 2),  # storage offset of one element: element-wise
        (torch.float32, 8, "transposed", 4),  # strided channels: element-wise
    ],
)
def test_copy_unit_choice_and_exactness(device, dtype, channels, view, unit):
    """Each copy-unit path of the compiled kernel is taken where expected, and each is exact."""
    require_backend(OP, "cuda", device)
    gen = torch.Generator().manual_seed(channels)
    if view == "cls":
        x = torch.randn(2, 65, channels, generator=gen).to(dtype=dtype, device=device)[:, 1:]
    elif view == "offset":
        x = torch.randn(2 * 64 * channels + 1, generator=gen).to(dtype=dtype, device=device)[1:].view(2, 64, channels)
    elif view == "transposed":
        x = torch.randn(2, channels, 64, generator=gen).to(dtype=dtype, device=device).transpose(1, 2)
    else:
        x = torch.randn(2, 64, channels, generator=gen).to(dtype=dtype, device=device)
    assert _copy_unit(x) == unit
    with nvlm_kernels.use_backend("cuda"):
        for version in ("v1", "v2"):
            v2 = version == "v2"
            y = nvlm_kernels.pixel_shuffle(x, 0.5, version)
            assert torch.equal(y, shuffle_by_index_map(x, 2, v2))
            g = torch.randn(y.shape, generator=gen).to(dtype=dtype, device=device)
            if view == "transposed":
                g = g.transpose(1, 2).contiguous().transpose(1, 2)
            assert torch.equal(torch.ops.nvlm_kernels.pixel_shuffle_bwd(g, 2, v2), unshuffle_by_index_map(g, 2, v2))


def test_nvlm_shape_uses_16_byte_units(device):
    require_backend(OP, "cuda", device)
    vit_out = torch.empty(7, 1025, 3200, dtype=torch.bfloat16, device=device)
    assert _copy_unit(vit_out[:, 1:]) == 16


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda ops: ops.pixel_shuffle_fwd(torch.randn(64, 8), 2, True), ["'x'", "3 dims"]),
        (lambda ops: ops.pixel_shuffle_fwd(torch.randn(1, 65, 8), 2, True), ["'x'", "square"]),
        (lambda ops: ops.pixel_shuffle_fwd(torch.randn(1, 36, 8), 4, True), ["'x'", "divisible"]),
        (lambda ops: ops.pixel_shuffle_fwd(torch.randn(1, 64, 8), 1, True), ["'downscale'"]),
        (lambda ops: ops.pixel_shuffle_bwd(torch.randn(1, 16, 30), 2, True), ["'grad_out'"]),
    ],
)
def test_compiled_ops_validate_their_arguments(call, words):
    """The private nvlm_C ops reject bad input with a ValueError naming the argument, never a crash."""
    require_backend(OP, "cuda", "cpu")
    with pytest.raises(ValueError) as info:
        call(torch.ops.nvlm_C)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    with pytest.raises(TypeError, match="'x'"):
        torch.ops.nvlm_C.pixel_shuffle_fwd(torch.randint(0, 9, (1, 64, 8)), 2, True)


@pytest.mark.gpu
def test_int64_offsets_on_gpu(backend):
    """More than 2^31 elements: offsets must not wrap. Sampled tokens are checked against the index map."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device with ~10 GB free (two 4.3 GB tensors)")
    require_backend(OP, backend, "cuda")
    if backend == "reference":
        pytest.skip("the reference is torch's own permute; the int64 concern is the kernels'")
    n, length, channels = 1040, 1024, 2048  # 2.18e9 elements > 2^31; images from 1024 on lie past it
    x = torch.empty(n, length, channels, dtype=torch.bfloat16, device="cuda")
    x.view(torch.int16).random_()  # random bits: a read from any wrong address shows
    with nvlm_kernels.use_backend(backend):
        y = nvlm_kernels.pixel_shuffle(x)
    for image in (0, n // 2, n - 1):  # compared as bit patterns: some are bf16 NaNs
        expected = shuffle_by_index_map(x[image : image + 1], 2, True)[0]
        assert torch.equal(y[image].view(torch.int16), expected.view(torch.int16))
    del x, y
    torch.cuda.empty_cache()
