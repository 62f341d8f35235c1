"""gated_cross_attention, cross_attention_ranges and ranges_from_mask.

The attention oracle is a dense-mask attention written here (float64 for ``hi``, the kernel's dtype
for ``lo``); kernels must satisfy FlashAttention's rule for the output and every gradient (gate
included). The layout policies are checked against masks written row by row from each policy's
rule, and the Mllama policy also against a mask built the way Hugging Face's Mllama processor
builds it (sparse per-image spans, expanded per tile).
"""

from __future__ import annotations

import re

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels.cross_attention import gated_cross_attention_bwd_op, gated_cross_attention_op
from nvlm_kernels.testing import assert_close_flash, require_backend

OP = "gated_cross_attention"


# --------------------------------------------------------------------------------------------------
# oracle and inputs


def oracle(q, k, v, kv_start, kv_end, gate, scale, low: bool = False):
    group = q.shape[2] // k.shape[2]
    qh = q.permute(0, 2, 1, 3)
    kh, vh = (x.repeat_interleave(group, dim=2).permute(0, 2, 1, 3) for x in (k, v))
    keys = torch.arange(k.shape[1])
    mask = (keys >= kv_start[..., None].long()) & (keys < kv_end[..., None].long())  # [B, Sq, Skv]
    mask = mask[:, None]
    if not low:
        qh, kh, vh = qh.double(), kh.double(), vh.double()
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores.float() if low else scores
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(empty, 0), dim=-1).masked_fill(empty, 0)
    p = p.to(q.dtype) if low else p
    out = torch.matmul(p, vh).permute(0, 2, 1, 3)
    if gate is not None:
        out = out * torch.tanh(gate.to(out.dtype) if low else gate.double())
    return out


def random_ranges(batch: int, sq: int, skv: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every kind of row: empty, the full key range, one key, ranges ending mid-block, random."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, skv + 1, (batch, sq), generator=gen)
    b = torch.randint(0, skv + 1, (batch, sq), generator=gen)
    start, end = torch.minimum(a, b), torch.maximum(a, b)
    start[:, 0::7], end[:, 0::7] = 5, 5  # empty
    start[:, 1::7], end[:, 1::7] = 0, skv  # everything
    start[:, 2::7] = torch.randint(0, skv, (batch, start[:, 2::7].shape[1]), generator=gen)
    end[:, 2::7] = start[:, 2::7] + 1  # a single key
    start[:, 3::7], end[:, 3::7] = 3, min(skv, 70)  # ends mid-block
    return start.int(), end.int()


def _dtypes(device):
    return [torch.float16] if device == "cpu" else [torch.float16, torch.bfloat16]


def _check(device, dtype, b, sq, skv, hq, hkv, d, with_gate, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=gen).to(device, dtype)
    k, v = (torch.randn(b, skv, hkv, d, generator=gen).to(device, dtype) for _ in range(2))
    start, end = (x.to(device) for x in random_ranges(b, sq, skv, seed))
    gate = torch.tensor([0.7], device=device, dtype=dtype) if with_gate else None
    scale = d**-0.5
    inputs = [q, k, v] + ([gate] if with_gate else [])
    mine = [x.detach().clone().requires_grad_() for x in inputs]
    with nk.use_backend("triton"):
        out = nk.gated_cross_attention(*mine[:3], start, end, mine[3] if with_gate else None)
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    grads = torch.autograd.grad(out, mine, grad)
    hi_in = [x.detach().double().requires_grad_() for x in inputs]
    hi = oracle(*hi_in[:3], start.cpu(), end.cpu(), hi_in[3] if with_gate else None, scale) if device == "cpu" else None
    if device != "cpu":
        hi_in = [x.detach().cpu().double().requires_grad_() for x in inputs]
        hi = oracle(*hi_in[:3], start.cpu(), end.cpu(), hi_in[3] if with_gate else None, scale)
    hi_grads = torch.autograd.grad(hi, hi_in, grad.cpu().double())
    lo_in = [x.detach().cpu().clone().requires_grad_() for x in inputs]
    lo = oracle(*lo_in[:3], start.cpu(), end.cpu(), lo_in[3] if with_gate else None, scale, low=True)
    lo_grads = torch.autograd.grad(lo, lo_in, grad.cpu())
    empty = (end <= start).cpu()
    assert torch.equal(out.detach().cpu()[empty], torch.zeros_like(out.cpu()[empty])), "empty rows must be exactly 0"
    assert_close_flash(out.cpu(), lo, hi, name="output")
    for name, g, g_lo, g_hi in zip(["q", "k", "v", "gate"], grads, lo_grads, hi_grads, strict=False):
        assert_close_flash(g.cpu(), g_lo, g_hi, name=f"d{name}", floor=1e-4 if name == "gate" else 1e-5)
    with torch.no_grad(), nk.use_backend("triton"):  # the no-autograd path (no ungated copy kept)
        fast = nk.gated_cross_attention(q, k, v, start, end, gate)
    assert torch.equal(fast, out.detach())


# --------------------------------------------------------------------------------------------------
# attention


@pytest.mark.parametrize(
    "b, sq, skv, hq, hkv, d, with_gate",
    [
        (2, 97, 130, 4, 2, 64, True),
        (1, 64, 300, 8, 1, 128, True),  # GQA 8
        (2, 33, 257, 2, 2, 64, False),  # GQA 1, no gate
        (1, 40, 64, 2, 1, 80, True),
    ],
)
def test_forward_and_gradients(device, b, sq, skv, hq, hkv, d, with_gate, poison_empty):
    require_backend(OP, "triton", device)
    for dtype in _dtypes(device):
        _check(device, dtype, b, sq, skv, hq, hkv, d, with_gate, seed=sq + skv)


def test_reference_backend_against_the_oracle():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 20, 4, 32, generator=gen)
    k, v = (torch.randn(2, 50, 2, 32, generator=gen) for _ in range(2))
    start, end = random_ranges(2, 20, 50, 1)
    gate = torch.tensor(-0.4, requires_grad=True)
    with nk.use_backend("reference"):
        out = nk.gated_cross_attention(q, k, v, start, end, gate)
    expected = oracle(q, k, v, start, end, gate.detach(), 32**-0.5)
    assert torch.allclose(out.double(), expected, atol=1e-6)
    (g,) = torch.autograd.grad(out.sum(), gate)
    assert torch.allclose(
        g.double(),
        (1 - torch.tanh(torch.tensor(-0.4, dtype=torch.float64)) ** 2)
        * (expected / torch.tanh(torch.tensor(-0.4, dtype=torch.float64))).sum(),
        atol=1e-4,
    )  # noqa: E501


def test_zero_gate_still_has_a_gradient(device):
    """tanh(0) = 0 zeroes the output, but the gate's gradient is Σ dOut ⊙ O_ungated (Flamingo's init)."""
    require_backend(OP, "triton", device)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 16, 2, 64, generator=gen).to(device, torch.float16)
    k, v = (torch.randn(1, 40, 2, 64, generator=gen).to(device, torch.float16) for _ in range(2))
    start = torch.zeros(1, 16, dtype=torch.int32, device=device)
    end = torch.full((1, 16), 40, dtype=torch.int32, device=device)
    gate = torch.zeros(1, device=device, requires_grad=True)
    with nk.use_backend("triton"):
        out = nk.gated_cross_attention(q, k, v, start, end, gate)
    assert torch.equal(out, torch.zeros_like(out))
    (g,) = torch.autograd.grad(out.float().sum(), gate)
    ungated = oracle(q.cpu(), k.cpu(), v.cpu(), start.cpu(), end.cpu(), None, 64**-0.5)
    assert abs(g.item() - ungated.sum().item()) < 0.05 + 1e-3 * ungated.abs().sum().item()


@pytest.mark.parametrize("skv", [200, 700])  # 700: the key range is split across programs
def test_decode_matches_prefill(device, skv):
    """Sq = 1 runs the decode kernel, with or without autograd; with autograd the backward kernels
    run from the decode kernel's log-sum-exp and ungated output. The general forward kernel runs
    the same rows as a two-row prefill."""
    require_backend(OP, "triton", device)
    gen = torch.Generator().manual_seed(skv)
    b, hq, hkv, d = 5, 16, 2, 64
    q = torch.randn(b, 1, hq, d, generator=gen).to(device, torch.float16)
    k, v = (torch.randn(b, skv, hkv, d, generator=gen).to(device, torch.float16) for _ in range(2))
    start = torch.tensor([[0], [10], [3], [0], [7]], dtype=torch.int32, device=device)
    end = torch.tensor([[skv], [190], [3], [1], [skv - 1]], dtype=torch.int32, device=device)  # one empty row
    gate = torch.tensor([0.3], device=device, dtype=torch.float16)
    with torch.no_grad(), nk.use_backend("triton"):
        decoded = nk.gated_cross_attention(q, k, v, start, end, gate)  # the decode kernel
        prefill = nk.gated_cross_attention(q.repeat(1, 2, 1, 1), k, v, start.repeat(1, 2), end.repeat(1, 2), gate)
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v, gate)]
    mine = [x.detach().clone().requires_grad_() for x in (q, k, v, gate)]
    with nk.use_backend("triton"):
        with_grad = nk.gated_cross_attention(*mine[:3], start, end, mine[3])  # decode kernel + backward
    grad = torch.randn(with_grad.shape, generator=gen).to(device, torch.float16)
    grads = torch.autograd.grad(with_grad, mine, grad)
    hi_in = [x.detach().cpu().double().requires_grad_() for x in leaves]
    hi = oracle(*hi_in[:3], start.cpu(), end.cpu(), hi_in[3], d**-0.5)
    hi_grads = torch.autograd.grad(hi, hi_in, grad.cpu().double())
    lo_in = [x.detach().cpu().clone().requires_grad_() for x in (q, k, v, gate)]
    lo = oracle(*lo_in[:3], start.cpu(), end.cpu(), lo_in[3], d**-0.5, low=True)
    lo_grads = torch.autograd.grad(lo, lo_in, grad.cpu())
    assert_close_flash(decoded.cpu(), lo, hi, name="decode")
    assert_close_flash(with_grad.detach().cpu(), lo, hi, name="decode with autograd")
    for i in range(2):
        assert_close_flash(prefill[:, i : i + 1].cpu(), lo, hi, name="prefill")
    for name, g, g_lo, g_hi in zip("qkvg", grads, lo_grads, hi_grads, strict=True):
        assert_close_flash(g.cpu(), g_lo, g_hi, name=f"d{name}", floor=1e-4 if name == "g" else 1e-5)
    assert torch.equal(decoded[2], torch.zeros_like(decoded[2]))


def test_opcheck_and_compile(device, backend):
    if backend == "cuda":
        pytest.skip("gated_cross_attention has no CUDA C++ kernel (Triton is the kernel backend)")
    require_backend(OP, backend, device)
    dtype = torch.float16 if backend == "triton" else torch.float32
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 20, 4, 64, generator=gen).to(device, dtype).requires_grad_()
    k, v = (torch.randn(1, 30, 2, 64, generator=gen).to(device, dtype).requires_grad_() for _ in range(2))
    start, end = (x.to(device) for x in random_ranges(1, 20, 30, 2))
    gate = torch.tensor([0.5], device=device, dtype=dtype, requires_grad=True)
    with nk.use_backend(backend):
        torch.library.opcheck(gated_cross_attention_op, (q, k, v, start, end, gate, 0.125, backend))
        out, lse, ungated = gated_cross_attention_op(q, k, v, start, end, gate, 0.125, backend)
        plain = [x.detach() for x in (torch.randn_like(out), q, k, v)]
        torch.library.opcheck(
            gated_cross_attention_bwd_op,
            (*plain, start, end, gate.detach(), out.detach(), lse, ungated, 0.125, backend),
        )
        torch._dynamo.reset()
        compiled = torch.compile(
            lambda *a: nk.gated_cross_attention(*a).float().square().sum(), fullgraph=True, backend="aot_eager"
        )
        compiled(q, k, v, start, end, gate).backward()
        got = [x.grad.clone() for x in (q, k, v, gate)]
        for x in (q, k, v, gate):
            x.grad = None
        nk.gated_cross_attention(q, k, v, start, end, gate).float().square().sum().backward()
    assert all(torch.equal(a, x.grad) for a, x in zip(got, (q, k, v, gate), strict=True))


def _bad_inputs():
    q = torch.randn(2, 8, 4, 64)
    k = torch.randn(2, 16, 2, 64)
    s = torch.zeros(2, 8, dtype=torch.int32)
    e = torch.full((2, 8), 16, dtype=torch.int32)
    return q, k, s, e


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda q, k, s, e: (q, k, k, s, e.clone().fill_(17)), ["kv_start/kv_end[0, 0]", "[0, 17)"]),
        (lambda q, k, s, e: (q, k, k, s.clone().fill_(-1), e), ["[-1, 16)"]),
        (lambda q, k, s, e: (q, k, k, e, s), ["[16, 0)"]),
        (lambda q, k, s, e: (q, k, k, s.long(), e), ["kv_start", "int32"]),
        (lambda q, k, s, e: (q, k, k, s[:, :4], e), ["kv_start", "shape"]),
        (lambda q, k, s, e: (q[:, :, :3], k, k, s, e), ["multiple"]),
        (lambda q, k, s, e: (q, k[:1], k[:1], s, e), ["batch"]),
        (lambda q, k, s, e: (q, k[..., :32], k[..., :32], s, e), ["head_dim"]),
        (lambda q, k, s, e: (q, k.half(), k.half(), s, e), ["dtype"]),
        (lambda q, k, s, e: (q[0], k, k, s, e), ["q", "4 dims"]),
    ],
)
def test_bad_input(change, words):
    args = change(*_bad_inputs())
    with pytest.raises((ValueError, TypeError)) as info:
        nk.gated_cross_attention(*args)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_bad_gate_and_devices():
    q, k, s, e = _bad_inputs()
    with pytest.raises(ValueError, match="gate"):
        nk.gated_cross_attention(q, k, k, s, e, torch.ones(2))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            nk.gated_cross_attention(q.cuda(), k, k, s, e)


# --------------------------------------------------------------------------------------------------
# ranges from a token layout

TPT = 4  # keys per tile, small so the masks stay readable
# One batch row: text 0..2, image A (7 tiles) at 3, its tags at 4..10 (two tokens each for tiles
# 0 and 6, one for the others: tags may tokenize to several tokens), text, image B (3 tiles) at
# 15 directly followed by its tags 16..18, text after.
SQ = 24
POSITIONS = torch.tensor([[3, 15]])
TILES = torch.tensor([[7, 3]])
TAGS = torch.full((1, SQ), -1)
for _tile, _rows in {
    0: (4, 5),
    1: (6,),
    2: (7,),
    3: (8,),
    4: (9,),
    5: (10,),
    6: (11, 12),
    7: (16,),
    8: (17,),
    9: (18,),
}.items():
    for _row in _rows:
        TAGS[0, _row] = _tile


def _mask_by_rule(rule) -> torch.Tensor:
    """[1, SQ, Skv] from rule(row) -> (start, end) key range, written row by row."""
    skv = int(TILES.sum()) * TPT
    mask = torch.zeros(1, SQ, skv, dtype=torch.bool)
    for row in range(SQ):
        lo, hi = rule(row)
        mask[0, row, lo:hi] = True
    return mask


def _image_of(row: int) -> int | None:
    return None if row < 3 else (0 if row < 15 else 1)


A, B = (0, 7 * TPT), (7 * TPT, 10 * TPT)  # key ranges of the two images


def _latest(row, all_previous=False):
    """The most recent image's keys (or every image's so far); nothing before the first image."""
    image = _image_of(row)
    if image is None:
        return 0, 0
    lo, hi = (A, B)[image]
    return (0 if all_previous else lo), hi


def _nvlm_x(row, all_previous=False):
    tag = int(TAGS[0, row])
    if tag >= 0:
        return tag * TPT, (tag + 1) * TPT
    return _latest(row, all_previous)


@pytest.mark.parametrize(
    "kwargs, rule",
    [
        (dict(policy="nvlm-x", tag_tiles=TAGS), _nvlm_x),
        (dict(policy="nvlm-x", tag_tiles=TAGS, attend_all_previous=True), lambda r: _nvlm_x(r, True)),
        (dict(policy="flamingo"), _latest),
        (dict(policy="flamingo", attend_all_previous=True), lambda r: _latest(r, True)),
        (dict(policy="mllama"), _latest),  # images at 3 and 15 are not adjacent: no group
    ],
)  # fmt: skip
def test_policies_against_hand_written_masks(kwargs, rule):
    start, end = nk.cross_attention_ranges(POSITIONS, TILES, SQ, tokens_per_tile=TPT, **kwargs)
    assert start.dtype == torch.int32 and start.shape == (1, SQ)
    keys = torch.arange(int(TILES.sum()) * TPT)
    got = (keys >= start[..., None]) & (keys < end[..., None])
    assert torch.equal(got, _mask_by_rule(rule))


def test_nvlm_h_interleaves_tags_with_tiles():
    tag_tokens = 2
    per_tile = TPT + tag_tokens
    start, end = nk.cross_attention_ranges(
        POSITIONS, TILES, SQ, policy="nvlm-h", tag_tiles=TAGS, tokens_per_tile=TPT, tag_tokens_per_tile=tag_tokens
    )
    for row in range(SQ):
        tag = int(TAGS[0, row])
        if tag >= 0:
            assert (start[0, row], end[0, row]) == (tag * per_tile, (tag + 1) * per_tile)
        elif _image_of(row) is None:
            assert start[0, row] == end[0, row]
        else:
            image = _image_of(row)
            assert (start[0, row], end[0, row]) == ((0, 7 * per_tile), (7 * per_tile, 10 * per_tile))[image]


def _hf_mllama_mask(token_image_positions: list[int], tiles: list[int], sq: int, max_tiles: int) -> torch.Tensor:
    """Hugging Face's Mllama processor, re-written: per image a [start, end) text span (an image is
    visible up to the next image token; adjacent image tokens share the later end), made dense as
    [Sq, images, max_tiles] with each image's real tiles on, then expanded per tile to keys over the
    padded layout (max_tiles tiles per image)."""
    spans = [[p, n] for p, n in zip(token_image_positions[:-1], token_image_positions[1:], strict=True)]
    spans.append([token_image_positions[-1], sq])
    last_end = spans[-1][1]
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    dense = torch.zeros(sq, len(tiles), max_tiles, dtype=torch.bool)
    for image, ((lo, hi), n_tiles) in enumerate(zip(spans, tiles, strict=True)):
        dense[lo:hi, image, :n_tiles] = True
    return dense.repeat_interleave(TPT, dim=-1).reshape(sq, -1)  # [Sq, images·max_tiles·TPT]


@pytest.mark.parametrize("positions", [[3, 15], [3, 4, 15]])  # 2 images; adjacent images form a group
def test_mllama_policy_agrees_with_the_hf_processor_mask(positions):
    tiles = [7, 3] if len(positions) == 2 else [7, 2, 3]
    max_tiles = max(tiles)
    hf = _hf_mllama_mask(positions, tiles, SQ, max_tiles)
    real = torch.zeros(len(tiles), max_tiles, dtype=torch.bool)  # drop the padded tiles' keys
    for image, n in enumerate(tiles):
        real[image, :n] = True
    hf = hf[:, real.repeat_interleave(TPT, dim=-1).reshape(-1)]
    start, end = nk.cross_attention_ranges(torch.tensor([positions]), torch.tensor([tiles]), SQ, policy="mllama",
                                           tokens_per_tile=TPT)  # fmt: skip
    keys = torch.arange(hf.shape[1])
    assert torch.equal((keys >= start[0, :, None]) & (keys < end[0, :, None]), hf)
    from_mask = nk.ranges_from_mask(hf[None])
    assert torch.equal(from_mask[0], start) and torch.equal(from_mask[1], end)


def test_ranges_builder_runs_on_the_device_and_batches(device):
    positions = torch.tensor([[3, 15], [0, -1]], device=device)
    tiles = torch.tensor([[7, 3], [5, 0]], device=device)
    start, end = nk.cross_attention_ranges(positions, tiles, SQ, tokens_per_tile=TPT)
    assert start.device.type == device
    assert torch.equal(start[1], torch.zeros(SQ, dtype=torch.int32, device=device))  # the image is at 0
    assert torch.equal(end[1], torch.full((SQ,), 5 * TPT, dtype=torch.int32, device=device))


def test_ranges_from_mask_and_errors():
    mask = torch.zeros(2, 3, 10, dtype=torch.bool)
    mask[0, 0, 2:5] = True
    mask[1, 2, :] = True
    start, end = nk.ranges_from_mask(mask)
    assert start.tolist() == [[2, 0, 0], [0, 0, 0]] and end.tolist() == [[5, 0, 0], [0, 0, 10]]
    mask[1, 1, [1, 3]] = True
    with pytest.raises(ValueError, match=re.escape("mask row [1, 1]")):
        nk.ranges_from_mask(mask)
    with pytest.raises(ValueError, match="bool"):
        nk.ranges_from_mask(mask.int())


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(policy="perceiver"), "policy"),
        (dict(policy="mllama", tag_tiles=TAGS), "tag_tiles"),
        (dict(policy="nvlm-x", tag_tokens_per_tile=2), "nvlm-h"),
        (dict(tokens_per_tile=-1), "tokens_per_tile"),
    ],
)
def test_ranges_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        nk.cross_attention_ranges(POSITIONS, TILES, SQ, **kwargs)
    with pytest.raises(ValueError, match="increase"):
        nk.cross_attention_ranges(torch.tensor([[15, 3]]), TILES, SQ)
    with pytest.raises(ValueError, match="beyond"):
        nk.cross_attention_ranges(POSITIONS, TILES, SQ, tag_tiles=torch.full((1, SQ), 10))
