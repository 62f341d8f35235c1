"""gated_cross_attention's ``hopper`` backend (sm_90 variants: TMA, mask-free loop + masked rest,
one-pass backward with dQ atomics or the deterministic dQ kernel, TMA-fed split-K decode) against
the float64 oracle of test_cross_attention.py, under FlashAttention's rule (design.md §5).

On CPU the kernels run in the Triton interpreter (descriptors emulated, out-of-bounds zero fill
included) with 64 x 64 blocks, so the NVLM-X / NVLM-H layouts below (tiles of 64 tokens) give whole
mask-free key blocks, and the tag tokens of NVLM-H and the random ranges give the masked rest. fp16
only: the interpreter gets bf16 wrong. Every case runs with TMA-ready tensors (the descriptor path)
and with views TMA cannot read (the pointer fallback); ``hopper.tma_ok`` says which one ran.
"""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels._tma import DETERMINISTIC_ENV_VAR
from nvlm_kernels.cross_attention import gated_cross_attention_bwd_op, gated_cross_attention_op, hopper
from nvlm_kernels.testing import assert_close_flash, require_backend
from tests.nvlm_kernels.test_cross_attention import oracle, random_ranges

OP = "gated_cross_attention"
BACKEND = "hopper"
TPT = 64  # tokens per tile here (NVLM: 256), one interpreter key block


def _layout_ranges(policy: str, sq: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(kv_start, kv_end, Skv) of an NVLM-X or NVLM-H layout: batch row 0 has two images (2 and 1
    tiles), row 1 one image of 3 tiles placed late; NVLM-H puts 8 tag keys before each tile."""
    positions = torch.tensor([[3, sq // 2], [sq - 30, -1]])
    tiles = torch.tensor([[2, 1], [3, 0]])
    tags = 8 if policy == "nvlm-h" else 0
    start, end = nk.cross_attention_ranges(positions, tiles, sq, policy=policy, tokens_per_tile=TPT,
                                           tag_tokens_per_tile=tags)  # fmt: skip
    return start, end, 3 * (TPT + tags)


def _make(device, b, sq, skv, hq, hkv, d, seed, layout: str):
    """q, k, v (fp16) laid out as ``layout``: "contiguous"; "fused" (k and v halves of one [B, Skv,
    2·Hkv, D] projection, q a head slice: strided but TMA-ready); "strided" (head-dim stride 2 and an
    odd head stride: the pointer fallback)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, torch.float16)

    if layout == "contiguous":
        q, k, v = randn(b, sq, hq, d), randn(b, skv, hkv, d), randn(b, skv, hkv, d)
    elif layout == "fused":
        q = randn(b, sq, hq + 2, d)[:, :, 1 : hq + 1]
        kv = randn(b, skv, 2 * hkv, d)
        k, v = kv[:, :, :hkv], kv[:, :, hkv:]
    else:
        q = randn(b, sq, hq, d + 3)[..., :d]
        k, v = randn(b, skv, hkv, 2 * d)[..., ::2], randn(b, skv, hkv, 2 * d)[..., ::2]
    tma = layout != "strided"
    assert all(hopper.tma_ok(x) == tma for x in (q, k, v)), "the layout must pick the intended load path"
    return q, k, v


def _check(q, k, v, start, end, with_gate: bool, seed: int, deterministic: bool = False, monkeypatch=None):
    """Output and every gradient of the hopper backend against the fp64 / fp16 oracles; empty rows
    exactly 0 with exactly zero dq. Returns the kernel's (out, grads)."""
    device = q.device
    gen = torch.Generator().manual_seed(seed + 1)
    d = q.shape[-1]
    gate = torch.tensor([0.6], device=device, dtype=q.dtype) if with_gate else None
    inputs = [q, k, v] + ([gate] if with_gate else [])
    mine = [x.detach().requires_grad_() for x in inputs]
    if monkeypatch is not None:
        monkeypatch.setenv(DETERMINISTIC_ENV_VAR, "1" if deterministic else "0")
    with nk.use_backend(BACKEND):
        out = nk.gated_cross_attention(*mine[:3], start, end, mine[3] if with_gate else None)
    grad = torch.randn(out.shape, generator=gen).to(device, q.dtype)
    grads = torch.autograd.grad(out, mine, grad)
    cpu_start, cpu_end = start.cpu(), end.cpu()
    hi_in = [x.detach().cpu().double().requires_grad_() for x in inputs]
    hi = oracle(*hi_in[:3], cpu_start, cpu_end, hi_in[3] if with_gate else None, d**-0.5)
    hi_grads = torch.autograd.grad(hi, hi_in, grad.cpu().double())
    lo_in = [x.detach().cpu().clone().requires_grad_() for x in inputs]
    lo = oracle(*lo_in[:3], cpu_start, cpu_end, lo_in[3] if with_gate else None, d**-0.5, low=True)
    lo_grads = torch.autograd.grad(lo, lo_in, grad.cpu())
    empty = (cpu_end <= cpu_start).cpu()
    assert torch.equal(out.detach().cpu()[empty], torch.zeros_like(out.cpu()[empty])), "empty rows must be exactly 0"
    assert torch.equal(grads[0].cpu()[empty], torch.zeros_like(grads[0].cpu()[empty])), "empty rows: dq exactly 0"
    assert_close_flash(out.detach().cpu(), lo, hi, name="output")
    for name, g, g_lo, g_hi in zip(["q", "k", "v", "gate"], grads, lo_grads, hi_grads, strict=False):
        assert_close_flash(g.cpu(), g_lo, g_hi, name=f"d{name}", floor=1e-4 if name == "gate" else 1e-5)
    return out.detach(), grads


# --------------------------------------------------------------------------------------------------
# forward and backward


@pytest.mark.parametrize(
    "policy, b, sq, hq, hkv, d, with_gate, layout",
    [
        ("nvlm-x", 2, 97, 4, 2, 64, True, "contiguous"),  # whole mask-free blocks; GQA 2
        ("nvlm-h", 2, 40, 2, 1, 128, True, "fused"),  # tag keys: ranges mid-block
        ("nvlm-x", 2, 50, 2, 2, 80, False, "strided"),  # padded BLOCK_D by pointers (the fallback)
    ],
)
def test_layout_ranges(device, policy, b, sq, hq, hkv, d, with_gate, layout, monkeypatch):
    require_backend(OP, BACKEND, device)
    start, end, skv = _layout_ranges(policy, sq)
    assert (end == start).any() and (end > start).any()  # rows before the first image see nothing
    q, k, v = _make(device, b, sq, skv, hq, hkv, d, seed=sq, layout=layout)
    _check(q, k, v, start.to(device), end.to(device), with_gate, seed=sq, monkeypatch=monkeypatch)


@pytest.mark.parametrize(
    "b, sq, skv, hq, hkv, d, layout",
    [
        (2, 33, 130, 4, 2, 128, "contiguous"),  # empty rows, single keys, ends mid-block, everything
        (1, 33, 257, 2, 1, 96, "fused"),  # padded BLOCK_D by TMA
    ],
)
def test_random_ranges(device, b, sq, skv, hq, hkv, d, layout, monkeypatch):
    require_backend(OP, BACKEND, device)
    start, end = random_ranges(b, sq, skv, seed=skv)
    q, k, v = _make(device, b, sq, skv, hq, hkv, d, seed=skv, layout=layout)
    _check(q, k, v, start.to(device), end.to(device), True, seed=skv, monkeypatch=monkeypatch)


class _LaunchCounter:
    """Stands in for a Triton kernel in hopper's namespace: counts launches, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_deterministic_mode_is_bitwise_reproducible(device, monkeypatch):
    """NVLM_KERNELS_DETERMINISTIC=1: the dQ kernel instead of the atomics; two runs bitwise equal,
    both paths within the oracle's tolerance, and they agree with each other (output, dK, dV
    bitwise: the same kernels make them)."""
    require_backend(OP, BACKEND, device)
    start, end, skv = _layout_ranges("nvlm-h", 40)
    q, k, v = _make(device, 2, 40, skv, 2, 1, 64, seed=3, layout="contiguous")
    start, end = start.to(device), end.to(device)
    dq_kernel = _LaunchCounter(hopper._xattn_hopper_bwd_dq_kernel)
    monkeypatch.setattr(hopper, "_xattn_hopper_bwd_dq_kernel", dq_kernel)
    runs = [_check(q, k, v, start, end, True, seed=3, deterministic=True, monkeypatch=monkeypatch) for _ in range(2)]
    assert dq_kernel.launches == 2
    atomic = _check(q, k, v, start, end, True, seed=3, deterministic=False, monkeypatch=monkeypatch)
    assert dq_kernel.launches == 2, "the default backward makes dQ with atomics, in the one pass"
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(runs[0][0], atomic[0])
    for i in (1, 2, 3):
        assert torch.equal(runs[0][1][i], atomic[1][i])
    assert torch.allclose(runs[0][1][0].float(), atomic[1][0].float(), atol=2e-3, rtol=1e-2)
    assert not hopper.deterministic_requested(None) and hopper.deterministic_requested(True)
    monkeypatch.setenv(DETERMINISTIC_ENV_VAR, "1")
    assert hopper.deterministic_requested(None) and not hopper.deterministic_requested(False)


def test_out_of_range_values_are_clamped(device):
    """The op itself (no host check) with ranges outside [0, Skv]: the kernels clamp them, as the
    reference's mask does."""
    require_backend(OP, BACKEND, device)
    q, k, v = _make(device, 1, 6, 70, 2, 2, 64, seed=9, layout="contiguous")
    start = torch.tensor([[-5, 0, 60, 80, 10, -3]], dtype=torch.int32, device=device)
    end = torch.tensor([[200, 70, 90, 100, 5, 64]], dtype=torch.int32, device=device)
    out = gated_cross_attention_op(q, k, v, start, end, None, 0.125, BACKEND)[0]
    clamped = (start.clamp(0, 70), torch.maximum(end.clamp(0, 70), start.clamp(0, 70)))
    expected = gated_cross_attention_op(q, k, v, *clamped, None, 0.125, "reference")[0]
    assert torch.allclose(out.float(), expected.float(), atol=2e-3)
    assert torch.equal(out[:, 3:5], torch.zeros_like(out[:, 3:5]))


def test_strided_ranges(device):
    """Ranges read through their strides (every other column of a wider tensor; a transposed
    copy's view): the same output and gradients, bitwise, as contiguous ranges."""
    require_backend(OP, BACKEND, device)
    q, k, v = _make(device, 2, 24, 100, 2, 1, 64, seed=4, layout="contiguous")
    start, end = (x.to(device) for x in random_ranges(2, 24, 100, seed=4))
    wide = torch.zeros(2, 48, dtype=torch.int32, device=device)
    wide[:, ::2] = start
    views = (wide[:, ::2], end.t().contiguous().t())
    assert views[0].stride() == (48, 2) and views[1].stride() == (1, 2)
    results = []
    for ranges in ((start, end), views):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        with nk.use_backend(BACKEND):
            out = nk.gated_cross_attention(*leaves, *ranges)
        results.append([out, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


# --------------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("skv, layout", [(200, "contiguous"), (600, "fused"), (300, "strided")])
def test_decode(device, skv, layout):
    """Sq = 1: the TMA-fed split-K kernel (600 keys: two splits under the interpreter) with ranges
    read as a [B, 1] slice of a longer range tensor (strided), an empty row and a single key."""
    require_backend(OP, BACKEND, device)
    b, hq, hkv, d = 4, 8, 2, 64
    q, k, v = _make(device, b, 1, skv, hq, hkv, d, seed=skv, layout=layout)
    full_start = torch.tensor([[0, 9], [10, 9], [3, 9], [7, 9]], dtype=torch.int32, device=device)
    full_end = torch.tensor([[skv, 9], [skv - 70, 9], [3, 9], [8, 9]], dtype=torch.int32, device=device)
    start, end = full_start[:, :1], full_end[:, :1]  # strides (2, 1)
    gate = torch.tensor([0.3], device=device, dtype=torch.float16)
    with torch.no_grad(), nk.use_backend(BACKEND):
        decoded = nk.gated_cross_attention(q, k, v, start, end, gate)
    hi = oracle(q.cpu().double(), k.cpu().double(), v.cpu().double(), start.cpu(), end.cpu(), gate.cpu().double(),
                d**-0.5)  # fmt: skip
    lo = oracle(q.cpu(), k.cpu(), v.cpu(), start.cpu(), end.cpu(), gate.cpu(), d**-0.5, low=True)
    assert_close_flash(decoded.cpu(), lo, hi, name="decode")
    assert torch.equal(decoded[2], torch.zeros_like(decoded[2]))
    if skv == 200:  # with autograd: the backward runs from the decode kernel's lse and ungated output
        _check(q, k, v, start, end, True, seed=skv)


# --------------------------------------------------------------------------------------------------
# the backend's plumbing


def test_auto_never_picks_the_unmeasured_hopper_backend(device):
    require_backend(OP, BACKEND, device)
    assert BACKEND in nk.available_backends(OP, device)
    q, k, v = _make(device, 1, 4, 16, 2, 2, 64, seed=1, layout="contiguous")
    start = torch.zeros(1, 4, dtype=torch.int32, device=device)
    end = torch.full((1, 4), 16, dtype=torch.int32, device=device)
    from nvlm_kernels import _backend

    bucket = "Sq=4,Skv=16,D=64,G=1,BH=2"
    assert _backend.select(OP, q.device, q.dtype, bucket, False, ()) != BACKEND
    with nk.use_backend(BACKEND):
        assert _backend.select(OP, q.device, q.dtype, bucket, False, ()) == BACKEND
    with nk.use_backend(BACKEND), pytest.raises(nk.BackendUnavailableError, match="head_dim"):
        nk.gated_cross_attention(q[..., :48], k[..., :48], v[..., :48], start, end)
    # autotuning on a GPU benchmarks the backward several times: its dQ accumulator is zeroed each time
    assert hopper._xattn_hopper_bwd_kernel.reset_to_zero == ["DQacc"]


def test_opcheck_and_compile(device):
    """The registered ops on the hopper backend pass opcheck (fake kernels, autograd registration),
    and a compiled call (fullgraph) gives the eager call's gradients exactly."""
    require_backend(OP, BACKEND, device)
    q, k, v = (x.requires_grad_() for x in _make(device, 1, 20, 30, 4, 2, 64, seed=5, layout="contiguous"))
    start, end = (x.to(device) for x in random_ranges(1, 20, 30, 2))
    gate = torch.tensor([0.5], device=device, dtype=q.dtype, requires_grad=True)
    with nk.use_backend(BACKEND):
        torch.library.opcheck(gated_cross_attention_op, (q, k, v, start, end, gate, 0.125, BACKEND))
        out, lse, ungated = gated_cross_attention_op(q, k, v, start, end, gate, 0.125, BACKEND)
        args = (torch.randn_like(out), *(x.detach() for x in (q, k, v)), start, end, gate.detach(), out.detach())
        torch.library.opcheck(gated_cross_attention_bwd_op, (*args, lse, ungated, 0.125, BACKEND))
        torch._dynamo.reset()
        loss = torch.compile(lambda *a: nk.gated_cross_attention(*a).float().square().sum(), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
        compiled = torch.autograd.grad(loss(q, k, v, start, end, gate), (q, k, v, gate))
        eager = torch.autograd.grad(nk.gated_cross_attention(q, k, v, start, end, gate).float().square().sum(),
                                    (q, k, v, gate))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager, strict=True))
