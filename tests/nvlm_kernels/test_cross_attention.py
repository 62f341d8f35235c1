"""gated_cross_attention, cross_attention_ranges and ranges_from_mask.

The attention oracle is a dense-mask attention written here (float64 for ``hi``, the kernel's dtype
for ``lo``); every backend (our Triton kernels, the reference, the sdpa and flex peers) must satisfy
FlashAttention's rule for the output and every gradient (gate included). The layout policies are
checked against masks written row by row from each policy's rule, and the Mllama policy also
against a mask built the way Hugging Face's Mllama processor builds it (sparse per-image spans,
expanded per tile).

The GPU-path defects of issue 14 have host tests here: ranges read through their strides (a [B, 1]
decode slice, a transposed view), no host sync in decode / repeated prefill / the op itself (a
dispatch mode that counts them, inside our ops too), autotuning keyed on length buckets, 1-D grids
past 65535 batch·heads, and the device guard around every launch (the last three with recording
stand-ins for the Triton kernels, on meta tensors).
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels import _backend, _device
from nvlm_kernels.cross_attention import gated_cross_attention_bwd_op, gated_cross_attention_op
from nvlm_kernels.cross_attention.ranges import is_trusted, ranges_from_tile_mask
from nvlm_kernels.testing import HostSyncCounter, assert_close_flash, require_backend

OP = "gated_cross_attention"
CPU_BACKENDS = ["reference", "triton", "sdpa", "flex"]  # every backend that can run on CPU tensors


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
    run from the decode kernel's log-sum-exp and ungated output (checked where the range is split
    across programs, so the merged log-sum-exp is what they use). The general forward kernel runs the
    same rows as a two-row prefill."""
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
    hi = oracle(q.cpu().double(), k.cpu().double(), v.cpu().double(), start, end, gate.cpu().double(), d**-0.5)
    lo = oracle(q.cpu(), k.cpu(), v.cpu(), start.cpu(), end.cpu(), gate.cpu(), d**-0.5, low=True)
    assert_close_flash(decoded.cpu(), lo, hi, name="decode")
    assert torch.equal(decoded[2], torch.zeros_like(decoded[2]))
    if skv < 700:
        with torch.no_grad(), nk.use_backend("triton"):
            prefill = nk.gated_cross_attention(q.repeat(1, 2, 1, 1), k, v, start.repeat(1, 2), end.repeat(1, 2), gate)
        for i in range(2):
            assert_close_flash(prefill[:, i : i + 1].cpu(), lo, hi, name="prefill")
        return
    q, k, v = q[:, :, :4], k[:, :, :1], v[:, :, :1]  # GQA 4 here: the interpreter's backward is slow
    mine = [x.detach().clone().requires_grad_() for x in (q, k, v, gate)]
    with nk.use_backend("triton"):
        with_grad = nk.gated_cross_attention(*mine[:3], start, end, mine[3])  # decode kernel + backward
    assert torch.equal(with_grad.detach(), decoded[:, :, :4])
    grad = torch.randn(with_grad.shape, generator=gen).to(device, torch.float16)
    grads = torch.autograd.grad(with_grad, mine, grad)
    hi_in = [x.detach().cpu().double().requires_grad_() for x in (q, k, v, gate)]
    hi = oracle(*hi_in[:3], start.cpu(), end.cpu(), hi_in[3], d**-0.5)
    lo_in = [x.detach().cpu().clone().requires_grad_() for x in (q, k, v, gate)]
    lo = oracle(*lo_in[:3], start.cpu(), end.cpu(), lo_in[3], d**-0.5, low=True)
    hi_grads = torch.autograd.grad(hi, hi_in, grad.cpu().double())
    lo_grads = torch.autograd.grad(lo, lo_in, grad.cpu())
    for name, g, g_lo, g_hi in zip("qkvg", grads, lo_grads, hi_grads, strict=True):
        assert_close_flash(g.cpu(), g_lo, g_hi, name=f"d{name}", floor=1e-4 if name == "g" else 1e-5)


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


def _tile_mask(positions: list[int], tiles: list[int], max_tiles: int) -> torch.Tensor:
    """Hugging Face's Mllama processor mask at tile level: [SQ, images · max_tiles]."""
    return _hf_mllama_mask(positions, tiles, SQ, max_tiles).view(SQ, len(tiles) * max_tiles, TPT)[..., 0]


def _compacted_token_mask(tile_mask: torch.Tensor, tile_index: torch.Tensor | None, num_tiles: int) -> torch.Tensor:
    """The token-level mask [B, S, num_tiles · TPT] of the keys gathered as tile_index says."""
    if tile_index is None:
        tile_index = torch.arange(num_tiles).expand(tile_mask.shape[0], num_tiles)
    gathered = tile_mask.gather(2, tile_index[:, None, :].expand(-1, tile_mask.shape[1], -1))
    return gathered.repeat_interleave(TPT, dim=-1)


@pytest.mark.parametrize("rows_without_tiles", ["empty", "all"])
def test_ranges_from_tile_mask_compacts_the_padding_tiles(rows_without_tiles):
    """Two batch rows of the HF processor's masks (padding tiles between the images of a group, text
    before the first image): after gathering the keys tile_index names, every row sees exactly its
    tiles' keys as one range; rows with no tile see nothing ("empty") or every key ("all")."""
    max_tiles = 3
    mask = torch.stack([_tile_mask([3, 4, 15], [3, 1, 2], max_tiles), _tile_mask([0, 9, 10], [1, 2, 2], max_tiles)])
    with HostSyncCounter() as counter:
        tr = ranges_from_tile_mask(mask, TPT, rows_without_tiles=rows_without_tiles)
    assert counter.calls == ["Tensor.tolist"]
    keep_all = rows_without_tiles == "all"  # row 0 has text before its first image
    assert tr.num_tiles == (3 * max_tiles if keep_all else 6) and tr.tile_index is not None
    assert tr.tile_index.shape == (2, tr.num_tiles)
    if keep_all:  # a permutation of every tile
        assert torch.equal(tr.tile_index.sort(1).values, torch.arange(9).expand(2, 9))
    expected = _compacted_token_mask(mask, tr.tile_index, tr.num_tiles)
    keys = torch.arange(tr.num_tiles * TPT)
    got = (keys >= tr.kv_start[..., None]) & (keys < tr.kv_end[..., None])
    has = mask.any(-1)
    assert torch.equal(tr.row_has_tiles, has)
    assert torch.equal(got[has], expected[has])
    assert bool(got[~has].all()) if keep_all else not bool(got[~has].any())
    assert is_trusted(tr.kv_start) and is_trusted(tr.kv_end)
    part = ranges_from_tile_mask(mask, TPT, rows_without_tiles=rows_without_tiles, rows=slice(5, 7))
    assert torch.equal(part.kv_start, tr.kv_start[:, 5:7]) and torch.equal(part.kv_end, tr.kv_end[:, 5:7])
    assert part.num_tiles == tr.num_tiles and torch.equal(part.tile_index, tr.tile_index)


def test_ranges_from_tile_mask_keeps_a_prefix_in_place_and_errors():
    """Every row's seen tiles already first (all tiles real): no gather, only a count; a row whose
    tiles are not contiguous even after compaction, and bad arguments, are errors."""
    mask = _tile_mask([0, 1], [2, 2], 2)[None]  # two adjacent images with every tile real
    tr = ranges_from_tile_mask(mask, TPT)
    assert tr.tile_index is None and tr.num_tiles == 4
    assert tr.kv_start[0, 5].item() == 0 and tr.kv_end[0, 5].item() == 4 * TPT
    one = _tile_mask([0], [2], 3)[None]  # one image, 2 of 3 tiles real: the first 2 tiles, in place
    tr = ranges_from_tile_mask(one, TPT)
    assert tr.tile_index is None and tr.num_tiles == 2
    broken = mask.clone()
    broken[0, 7] = torch.tensor([True, False, True, False])  # tiles 0 and 2, tile 1 seen elsewhere
    with pytest.raises(ValueError, match=re.escape("tile_mask row [0, 7]")):
        ranges_from_tile_mask(broken, TPT)
    for kwargs, word in [
        (dict(tokens_per_tile=0), "tokens_per_tile"),
        (dict(rows_without_tiles="leak"), "rows_without_tiles"),
        (dict(rows=slice(0, 4, 2)), "rows"),
    ]:
        with pytest.raises(ValueError, match=word):
            ranges_from_tile_mask(mask, **{"tokens_per_tile": TPT, **kwargs})
    with pytest.raises(ValueError, match="bool"):
        ranges_from_tile_mask(mask.int(), TPT)


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


# --------------------------------------------------------------------------------------------------
# peer backends: sdpa and flex


def _peer_inputs(device, dtype, b, sq, skv, hq, hkv, d, with_gate, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=gen).to(device, dtype)
    k, v = (torch.randn(b, skv, hkv, d, generator=gen).to(device, dtype) for _ in range(2))
    start, end = (x.to(device) for x in random_ranges(b, sq, skv, seed))
    gate = torch.tensor([-0.8], device=device, dtype=dtype) if with_gate else None
    return q, k, v, start, end, gate


def _check_backend_against_oracle(backend, device, dtype, inputs, grads: bool, seed: int = 0):
    """Output (and with ``grads`` every gradient) of ``backend`` under the FlashAttention rule against
    the fp64 oracle; empty rows exactly 0 in the output and in dq."""
    q, k, v, start, end, gate = inputs
    leaves = [x for x in (q, k, v, gate) if x is not None]
    mine = [x.detach().clone().requires_grad_(grads) for x in leaves]
    gate_mine = mine[3] if gate is not None else None
    with nk.use_backend(backend), torch.set_grad_enabled(grads):
        out = nk.gated_cross_attention(*mine[:3], start, end, gate_mine)
    scale = q.shape[-1] ** -0.5
    hi_in = [x.detach().cpu().double().requires_grad_() for x in leaves]
    hi = oracle(*hi_in[:3], start.cpu(), end.cpu(), hi_in[3] if gate is not None else None, scale)
    lo_in = [x.detach().cpu().clone().requires_grad_() for x in leaves]
    lo = oracle(*lo_in[:3], start.cpu(), end.cpu(), lo_in[3] if gate is not None else None, scale, low=True)
    empty = (end <= start).cpu()
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.equal(out.detach().cpu()[empty], torch.zeros_like(out.cpu()[empty])), "empty rows must be exactly 0"
    assert_close_flash(out.detach().cpu(), lo.detach(), hi.detach(), name=f"{backend} output")
    if not grads:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    got = torch.autograd.grad(out, mine, grad)
    hi_grads = torch.autograd.grad(hi, hi_in, grad.cpu().double())
    lo_grads = torch.autograd.grad(lo, lo_in, grad.cpu())
    for name, g, g_lo, g_hi in zip("qkvg", got, lo_grads, hi_grads, strict=False):
        assert torch.isfinite(g).all(), f"{backend} d{name} is not finite"
        assert_close_flash(g.cpu(), g_lo, g_hi, name=f"{backend} d{name}", floor=1e-4 if name == "g" else 1e-5)
    assert torch.equal(got[0].cpu()[empty], torch.zeros_like(got[0].cpu()[empty])), "empty rows: dq exactly 0"


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize(
    "b, sq, skv, hq, hkv, d, with_gate",
    [
        (2, 37, 90, 4, 4, 32, True),  # GQA 1
        (1, 20, 70, 8, 1, 64, False),  # GQA 8, no gate
    ],
)
def test_peer_backends_against_the_fp64_oracle(device, backend, b, sq, skv, hq, hkv, d, with_gate):
    """fp32 on CPU (flex: forward only, torch has no CPU backward for it); fp16 and bf16 on CUDA."""
    require_backend(OP, backend, device)
    dtypes = [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16]
    grads = not (backend == "flex" and device == "cpu")
    for dtype in dtypes:
        inputs = _peer_inputs(device, dtype, b, sq, skv, hq, hkv, d, with_gate, seed=sq + skv)
        _check_backend_against_oracle(backend, device, dtype, inputs, grads=grads, seed=sq)


def test_flex_needs_no_gradients_on_cpu():
    q, k, v, start, end, gate = _peer_inputs("cpu", torch.float32, 1, 9, 20, 2, 1, 32, True, seed=1)
    q.requires_grad_()
    with nk.use_backend("flex"), pytest.raises(nk.BackendUnavailableError, match="backward on CPU"):
        nk.gated_cross_attention(q, k, v, start, end, gate)
    with nk.use_backend("flex"), torch.no_grad():  # the forward runs
        assert nk.gated_cross_attention(q, k, v, start, end, gate).shape == q.shape
    with _backend.record_selections() as calls:  # auto never takes flex on CPU
        nk.gated_cross_attention(q, k, v, start, end, gate)
        with torch.no_grad():
            nk.gated_cross_attention(q, k, v, start, end, gate)
    assert [c["backend"] for c in calls] == ["sdpa", "sdpa"]
    assert [c["pass"] for c in calls] == ["fwd+bwd", "fwd"]
    assert calls[0]["bucket"] == "Sq=16,Skv=32,D=32,G=2,BH=2"


def test_backends_are_listed_and_auto_takes_the_default_peer():
    available = nk.available_backends(OP, "cpu")
    assert available["sdpa"] is None and available["flex"] is None and available["reference"] is None
    assert "cuda" not in available or available["cuda"] is not None
    assert _backend.registered_ops()[OP].default_peer == {"cpu": "sdpa", "cuda": "flex"}
    q, k, v, start, end, _ = _peer_inputs("cpu", torch.float32, 3, 1, 40, 4, 2, 64, False, seed=2)
    with _backend.record_selections() as calls:
        nk.gated_cross_attention(q, k, v, start, end)
    assert len(calls) == 1 and calls[0]["device"].startswith("cpu")  # the device kind, e.g. "cpu:x86_64"
    assert {key: value for key, value in calls[0].items() if key != "device"} == {
        "op": OP, "dtype": "float32", "bucket": "Sq=1,Skv=64,D=64,G=2,BH=16", "pass": "fwd", "backend": "sdpa"
    }  # the decode bucket: Sq = 1  # fmt: skip


@pytest.mark.parametrize("b, sq, skv", [(2, 300, 700), (3, 1, 200), (1, 256, 512), (2, 130, 129)])
def test_flex_block_mask_is_the_one_create_block_mask_builds(b, sq, skv):
    """flex builds its BlockMask from the ranges directly; it must be exactly the one FlexAttention's
    create_block_mask makes from the mask_mod (every table, full and partial, both directions),
    ranges outside [0, Skv] included. It is reused while the same range tensors come back unedited."""
    from torch.nn.attention.flex_attention import create_block_mask

    from nvlm_kernels.cross_attention import flex

    gen = torch.Generator().manual_seed(sq + skv)
    a, c = (torch.randint(-20, skv + 20, (b, sq), generator=gen) for _ in range(2))
    start, end = torch.minimum(a, c).int(), torch.maximum(a, c).int()
    start[:, ::5], end[:, ::5] = 0, skv  # whole rows: full blocks where a query block has only those
    start[:, 1::5], end[:, 1::5] = 100, 100  # empty
    if sq >= 256:
        start[0, :128], end[0, :128] = 0, 256  # a query block whose every row sees two whole key blocks

    def mask_mod(batch, head, q_idx, kv_idx):
        return (kv_idx >= start[batch, q_idx]) & (kv_idx < end[batch, q_idx])

    flex.clear_cache()
    mine = flex.block_mask(start, end, sq, skv)
    theirs = create_block_mask(mask_mod, b, None, sq, skv, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                 "full_q_num_blocks", "full_q_indices"):  # fmt: skip
        got, want = getattr(mine, name), getattr(theirs, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert mine.seq_lengths == theirs.seq_lengths and mine.BLOCK_SIZE == theirs.BLOCK_SIZE
    if sq >= 256:
        assert int(mine.full_kv_num_blocks.sum()) > 0
    assert flex.block_mask(start, end, sq, skv) is mine
    end[0, 0] = 0
    assert flex.block_mask(start, end, sq, skv) is not mine  # edited in place: built again


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_policy_ranges_on_every_backend(backend):
    """NVLM-X ranges (tags see one tile, text before the image nothing) from the layout builder."""
    require_backend(OP, backend, "cpu")
    start, end = nk.cross_attention_ranges(POSITIONS, TILES, SQ, tokens_per_tile=16, tag_tiles=TAGS)
    gen = torch.Generator().manual_seed(9)
    dtype = torch.float16 if backend == "triton" else torch.float32
    q = torch.randn(1, SQ, 4, 64, generator=gen).to(dtype)
    k, v = (torch.randn(1, 160, 2, 64, generator=gen).to(dtype) for _ in range(2))
    gate = torch.tensor([0.4], dtype=dtype)
    _check_backend_against_oracle(backend, "cpu", dtype, (q, k, v, start, end, gate), grads=backend != "flex")


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_opcheck_peers(backend):
    """The op with a peer backend: its forward runs the peer, its backward recomputes the peer's
    forward and differentiates it; lse as the reference writes it. Flex on CPU: forward only."""
    gen = torch.Generator().manual_seed(5)
    grads = backend == "sdpa"
    q = torch.randn(1, 20, 4, 32, generator=gen).requires_grad_(grads)
    k, v = (torch.randn(1, 30, 2, 32, generator=gen).requires_grad_(grads) for _ in range(2))
    start, end = random_ranges(1, 20, 30, 2)
    gate = torch.tensor([0.5], requires_grad=grads)
    args = (q, k, v, start, end, gate, 0.125)
    # FlexAttention's eager (CPU) implementation evaluates the mask through vmap, which the dispatch
    # modes of opcheck's schema, fake-tensor and AOT tests cannot follow ("Cannot access storage of
    # BatchedTensorImpl", inside torch): on CPU flex gets the registration test, and the checks below
    utils = ("test_autograd_registration",) if backend == "flex" else "ALL"
    torch.library.opcheck(gated_cross_attention_op, (*args, backend), test_utils=utils)
    out, lse, ungated = gated_cross_attention_op(*args, backend)
    ref = gated_cross_attention_op(*args, "reference")
    torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref[1], atol=1e-5, rtol=1e-5)  # base 2, +inf for empty rows
    torch.testing.assert_close(ungated, ref[2], atol=1e-5, rtol=1e-5)
    plain = [x.detach() for x in (torch.randn_like(out), q, k, v)]
    bwd_args = (*plain, start, end, gate.detach(), out.detach(), lse, ungated)
    if backend == "flex":
        with pytest.raises(nk.BackendUnavailableError, match="backward on CPU"):
            gated_cross_attention_bwd_op(*bwd_args, 0.125, backend)
        return
    torch.library.opcheck(gated_cross_attention_bwd_op, (*bwd_args, 0.125, backend))
    got = gated_cross_attention_bwd_op(*bwd_args, 0.125, backend)
    expected = gated_cross_attention_bwd_op(*bwd_args, 0.125, "reference")
    for name, a, e in zip(["dq", "dk", "dv", "dgate"], got, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4, msg=name)


def test_compile_fullgraph_through_auto():
    """Auto (sdpa on CPU) under torch.compile(fullgraph=True): no graph break (the host check of the
    range values is not traced), same values and gradients as eager."""
    q, k, v, start, end, gate = _peer_inputs("cpu", torch.float32, 2, 24, 50, 4, 2, 32, True, seed=3)
    leaves = [x.requires_grad_() for x in (q, k, v, gate)]
    torch._dynamo.reset()
    with _backend.record_selections() as calls:
        compiled = torch.compile(
            lambda *a: nk.gated_cross_attention(*a).square().sum(), fullgraph=True, backend="aot_eager"
        )
        compiled(q, k, v, start, end, gate).backward()
    assert {c["backend"] for c in calls} == {"sdpa"}
    got = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    nk.gated_cross_attention(q, k, v, start, end, gate).square().sum().backward()
    for a, x in zip(got, leaves, strict=True):
        torch.testing.assert_close(a, x.grad, atol=1e-5, rtol=1e-5)


def test_flex_compiles_fullgraph():
    """The flex peer (BlockMask built from the ranges inside the graph) under torch.compile(fullgraph=True):
    forward on CPU, as FlexAttention's CPU backward does not exist."""
    q, k, v, start, end, gate = _peer_inputs("cpu", torch.float32, 2, 40, 150, 4, 2, 32, True, seed=8)
    torch._dynamo.reset()
    compiled = torch.compile(nk.gated_cross_attention, fullgraph=True, backend="aot_eager")
    with nk.use_backend("flex"), torch.no_grad():
        got = compiled(q, k, v, start, end, gate)
    with nk.use_backend("reference"):
        want = nk.gated_cross_attention(q, k, v, start, end, gate)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# issue 14: ranges through their strides, clamped everywhere


def _small(dtype, b=3, sq=9, skv=70, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, 4, 64, generator=gen).to(dtype)
    k, v = (torch.randn(b, skv, 2, 64, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


def _run(backend, q, k, v, start, end, gate, grads: bool):
    """(output, gradients of q, k, v, gate or ()) through the public function on ``backend``."""
    leaves = [x.detach().clone().requires_grad_(grads) for x in (q, k, v, gate)]
    with nk.use_backend(backend), torch.set_grad_enabled(grads):
        out = nk.gated_cross_attention(*leaves[:3], start, end, leaves[3])
    if not grads:
        return out, ()
    return out, torch.autograd.grad(out.float().square().sum(), leaves)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_ranges(backend):
    """Ranges read through their strides: a [B, 1] column of a [B, S] tensor (what the decode cache
    keeps; row stride S), and [B, Sq] views with different strides for kv_start (transposed) and
    kv_end (a slice of a wider tensor). Each must equal the same backend on contiguous copies, and
    the oracle. (The Triton kernels used to read them as contiguous: row b read row 0's neighbours.)"""
    require_backend(OP, backend, "cpu")
    dtype = torch.float16 if backend == "triton" else torch.float32
    grads = backend != "flex"
    b, sq, skv = 3, 9, 70
    gen = torch.Generator().manual_seed(11)
    gate = torch.tensor([0.6], dtype=dtype)
    starts = torch.randint(0, 30, (b, sq), generator=gen, dtype=torch.int32)
    ends = starts + torch.randint(1, 40, (b, sq), generator=gen, dtype=torch.int32)
    starts[1, 3], ends[1, 3] = 12, 12  # an empty row
    starts[:, -1] = torch.tensor([0, 20, 40], dtype=torch.int32)  # the decode column: a different range per row
    ends[:, -1] = torch.tensor([10, 64, 41], dtype=torch.int32)

    q1, k, v = _small(dtype, b, 1, skv, seed=1)
    column = (starts[:, -1:], ends[:, -1:])
    assert not column[0].is_contiguous() and column[0].stride() == (sq, 1)
    q, _, _ = _small(dtype, b, sq, skv, seed=2)
    transposed = starts.t().contiguous().t()  # [B, Sq] with strides (1, B)
    wide = torch.zeros(b, sq + 5, dtype=torch.int32)
    wide[:, 2 : 2 + sq] = ends
    sliced = wide[:, 2 : 2 + sq]  # [B, Sq] with row stride Sq + 5
    assert transposed.stride() == (1, b) and sliced.stride() == (sq + 5, 1)

    cases = [(q1, column, False), (q, (transposed, sliced), grads)]  # decode (no autograd: the decode kernel)
    if grads:
        cases.append((q1, column, True))  # decode with autograd: decode kernel, then the backward kernels
    for query, (s, e), with_grads in cases:
        got, got_grads = _run(backend, query, k, v, s, e, gate, with_grads)
        want, want_grads = _run(backend, query, k, v, s.contiguous(), e.contiguous(), gate, with_grads)
        assert torch.equal(got, want), f"{backend}: output differs with strided ranges {s.stride()}, {e.stride()}"
        for g, w in zip(got_grads, want_grads, strict=True):
            assert torch.equal(g, w), f"{backend}: gradient differs with strided ranges"
        hi = oracle(query.double(), k.double(), v.double(), s, e, gate.double(), 64**-0.5)
        lo = oracle(query, k, v, s, e, gate, 64**-0.5, low=True)
        assert_close_flash(got.detach(), lo, hi, name=f"{backend} strided")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_of_range_values_are_clamped(backend):
    """No backend ever reads outside the keys: ranges past [0, Skv] behave as if clamped into it, in
    decoding (where the public function does not check the values) and through the op itself
    (which never checks them: it runs inside compiled graphs)."""
    require_backend(OP, backend, "cpu")
    dtype = torch.float16 if backend == "triton" else torch.float32
    skv = 70
    q1, k, v = _small(dtype, 3, 1, skv, seed=4)
    start = torch.tensor([[-5], [60], [-3]], dtype=torch.int32)
    end = torch.tensor([[skv + 9], [skv + 100], [-1]], dtype=torch.int32)  # the last is empty once clamped
    clamped_start = start.clamp(0, skv)
    clamped_end = torch.maximum(end.clamp(max=skv), clamped_start)
    with torch.no_grad(), nk.use_backend(backend):
        got = nk.gated_cross_attention(q1, k, v, start, end)
        want = nk.gated_cross_attention(q1, k, v, clamped_start, clamped_end)
    assert torch.equal(got, want) and torch.equal(got[2], torch.zeros_like(got[2]))
    if backend == "flex":
        return  # the op path of a peer is covered by test_opcheck_peers
    q, _, _ = _small(dtype, 3, 4, skv, seed=5)
    wide_start, wide_end = start.repeat(1, 4), end.repeat(1, 4)
    got = gated_cross_attention_op(q, k, v, wide_start, wide_end, None, 0.125, backend)[0]
    want = gated_cross_attention_op(q, k, v, clamped_start.repeat(1, 4), clamped_end.repeat(1, 4), None, 0.125,
                                    backend)[0]  # fmt: skip
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------------
# issue 14: no host sync in decode, repeated prefill, compiled graphs (the op) or captured graphs


@contextlib.contextmanager
def _flex_under_a_dispatch_mode(backend, monkeypatch):
    """Eager FlexAttention compiles its higher-order op with dynamo, which does not run under a
    dispatch mode; its debug switch calls the op directly (the same dense CPU implementation)."""
    if backend == "flex":
        import torch.nn.attention.flex_attention as flex_module

        from nvlm_kernels.cross_attention import flex

        monkeypatch.setattr(flex_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
        flex.clear_cache()  # count the BlockMask construction too
    yield


def test_sync_counter_sees_inside_our_ops(monkeypatch):
    from nvlm_kernels.cross_attention import reference

    plain = reference.attention_fwd

    def with_a_sync(q, *args):
        q.sum().item()
        return plain(q, *args)

    monkeypatch.setattr(reference, "attention_fwd", with_a_sync)
    q, k, v = _small(torch.float32, 3, 1, 40)
    start, end = torch.zeros(3, 1, dtype=torch.int32), torch.full((3, 1), 40, dtype=torch.int32)
    with HostSyncCounter() as counter, nk.use_backend("reference"):
        nk.gated_cross_attention(q, k, v, start, end)
    assert counter.calls == ["aten.item.default"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_host_sync_in_decode_or_repeated_prefill(backend, monkeypatch):
    """Decode steps (Sq = 1, batch 3, ranges a [B, 1] column of a [B, S] tensor), a second prefill
    with the same range tensors, a prefill with ranges from cross_attention_ranges, and the op
    itself (what compiled graphs run) make no host sync. (Before: bool(bad.any()) on every call
    and int(max range) in every decode step.)"""
    require_backend(OP, backend, "cpu")
    dtype = torch.float16 if backend == "triton" else torch.float32
    grads = backend not in ("flex",)
    skv = 70
    gate = torch.tensor([0.3], dtype=dtype)
    starts = torch.tensor([[0, 5, 0], [3, 9, 20], [7, 7, 7]], dtype=torch.int32)
    ends = torch.tensor([[10, 30, 70], [40, 50, 64], [7, 8, 7]], dtype=torch.int32)
    q1, k, v = _small(dtype, 3, 1, skv, seed=6)
    q, _, _ = _small(dtype, 3, 3, skv, seed=7)
    nk.gated_cross_attention(q, k, v, starts, ends, gate)  # the first prefill checks the values: one sync
    positions, tiles = torch.tensor([[0], [1], [2]]), torch.tensor([[2], [1], [3]])
    trusted = nk.cross_attention_ranges(positions, tiles, 3, tokens_per_tile=16)
    with _flex_under_a_dispatch_mode(backend, monkeypatch), HostSyncCounter() as counter, nk.use_backend(backend):
        with torch.no_grad():
            for _ in range(2):
                nk.gated_cross_attention(q1, k, v, starts[:, -1:], ends[:, -1:], gate)
            nk.gated_cross_attention(q, k, v, starts, ends, gate)
            nk.gated_cross_attention(q, k, v, *trusted, gate)
        if grads:
            leaf = q.clone().requires_grad_()
            nk.gated_cross_attention(leaf, k, v, starts, ends, gate).float().sum().backward()
    assert counter.calls == []
    if backend != "flex":  # the op checks no values (it runs inside compiled graphs): bad ranges are clamped
        with HostSyncCounter() as counter:
            gated_cross_attention_op(q, k, v, ends, starts, gate, 0.125, backend)
        assert counter.calls == []


def test_ranges_builder_checks_in_one_transfer_or_none():
    """cross_attention_ranges checks its inputs in one device->host transfer, or in none with
    validate=False (for a caller that has checked them: the model's decode and prefill make no other
    sync); unchecked bad inputs still give well-formed ranges."""
    kwargs = dict(tokens_per_tile=TPT, tag_tiles=TAGS)
    with HostSyncCounter() as counter:
        checked = nk.cross_attention_ranges(POSITIONS, TILES, SQ, **kwargs)
    assert counter.calls == ["Tensor.tolist"]
    with HostSyncCounter() as counter:
        unchecked = nk.cross_attention_ranges(POSITIONS, TILES, SQ, validate=False, **kwargs)
    assert counter.calls == []
    assert all(torch.equal(a, b) for a, b in zip(checked, unchecked, strict=True))
    start, end = nk.cross_attention_ranges(torch.tensor([[15, 3]]), torch.tensor([[-2, 3]]), SQ, validate=False)
    assert bool((start >= 0).all()) and bool((start <= end).all())


def test_range_values_are_checked_once_per_tensor():
    """The host check runs once per range tensor; an in-place edit makes it run again (and catch a
    bad value); ranges from cross_attention_ranges are trusted until edited."""
    q, k, v = _small(torch.float32, 2, 4, 20)
    start = torch.zeros(2, 4, dtype=torch.int32)
    end = torch.full((2, 4), 20, dtype=torch.int32)
    with HostSyncCounter() as counter:
        nk.gated_cross_attention(q, k, v, start, end)
    assert counter.calls == ["Tensor.tolist"]  # the check: one transfer
    with HostSyncCounter() as counter:
        nk.gated_cross_attention(q, k, v, start, end)
    assert counter.calls == []
    end[1, 2] = 21
    with pytest.raises(ValueError, match=re.escape("kv_start/kv_end[1, 2] = [0, 21)")):
        nk.gated_cross_attention(q, k, v, start, end)
    with pytest.raises(ValueError, match=re.escape("kv_start/kv_end[1, 2] = [0, 21)")):
        nk.gated_cross_attention(q, k, v, start, end)  # still bad: never remembered as checked
    start, end = nk.cross_attention_ranges(torch.tensor([[1], [0]]), torch.tensor([[1], [1]]), 4, tokens_per_tile=20)
    with HostSyncCounter() as counter:
        nk.gated_cross_attention(q, k, v, start, end)
    assert counter.calls == []
    start[0, 0] = -1
    with pytest.raises(ValueError, match=re.escape("[-1, 0)")):
        nk.gated_cross_attention(q, k, v, start, end)


# --------------------------------------------------------------------------------------------------
# issue 14: autotune keys, grids, device guard (host tests with recording stand-ins for the kernels)


class _RecordingKernel:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the grid (with the
    smallest blocks the tables use), the arguments by name and whether a device guard was active."""

    def __init__(self, name, real, calls, guard):
        self.name, self.calls, self.guard = name, calls, guard
        self.arg_names = real.arg_names if hasattr(real, "arg_names") else real.fn.arg_names
        self.keys = getattr(real, "keys", None)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.arg_names, args, strict=False)) | kwargs
            meta = {"BLOCK_M": 16, "BLOCK_N": 16, **named}
            self.calls.append(
                {"kernel": self.name, "grid": grid(meta) if callable(grid) else grid, "args": named,
                 "key": [named[k] for k in self.keys] if self.keys else None, "guarded": bool(self.guard)}
            )  # fmt: skip

        return launch


@pytest.fixture
def recorded_launches(monkeypatch):
    """Replaces every cross-attention kernel by a _RecordingKernel and ``_device.device_guard`` by one
    that records its tensor; yields (launches, guarded tensors)."""
    from nvlm_kernels.cross_attention import triton as xt

    calls, guards, active = [], [], []

    @contextlib.contextmanager
    def guard(x):
        guards.append(x)
        active.append(True)
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(_device, "device_guard", guard)
    for name in ("_xattn_fwd_kernel", "_xattn_bwd_rowsum_kernel", "_xattn_bwd_dq_kernel", "_xattn_bwd_dkdv_kernel",
                 "_xattn_decode_kernel", "_xattn_decode_combine_kernel"):  # fmt: skip
        monkeypatch.setattr(xt, name, _RecordingKernel(name, getattr(xt, name), calls, active))
    return xt, calls, guards


def _launch_all(xt, b, sq, skv, hq, hkv, d=64):
    """Every launcher on meta tensors (shapes only: nothing is allocated or computed)."""
    meta = dict(device="meta", dtype=torch.float16)
    q, do = torch.empty(b, sq, hq, d, **meta), torch.empty(b, sq, hq, d, **meta)
    k, v = torch.empty(b, skv, hkv, d, **meta), torch.empty(b, skv, hkv, d, **meta)
    start = torch.empty(b, sq, device="meta", dtype=torch.int32)
    gate = torch.empty(1, device="meta", dtype=torch.float32)
    out, lse, ungated = xt.attention_fwd(q, k, v, start, start, gate, 0.1, True)
    xt.attention_bwd(do, q, k, v, start, start, gate, out, lse, ungated, 0.1)
    xt.attention_decode(q[:, :1], k, v, start[:, :1], start[:, :1], gate, 0.1, True)
    return q


def test_grids_are_one_dimensional_past_65535_batch_heads(recorded_launches):
    """B·Hq = 1100·64 = 70400 programs' rows: over the 65535 limit of grid axis 1, where the launches
    used to put them. Every grid is 1-D (``flat_grid``) and has exactly blocks × rows programs."""
    xt, calls, _ = recorded_launches
    b, sq, skv, hq, hkv = 1100, 40, 300, 64, 8
    _launch_all(xt, b, sq, skv, hq, hkv)
    expected = {
        "_xattn_fwd_kernel": -(-sq // 16) * b * hq,
        "_xattn_bwd_rowsum_kernel": -(-sq // 64) * b * hq,
        "_xattn_bwd_dq_kernel": -(-sq // 16) * b * hq,
        "_xattn_bwd_dkdv_kernel": -(-skv // 16) * b * hkv,
        "_xattn_decode_kernel": xt.decode_splits(b * hkv, skv, torch.device("meta")) * b * hkv,
        "_xattn_decode_combine_kernel": b * hq,
    }
    assert {c["kernel"]: tuple(c["grid"]) for c in calls} == {name: (n,) for name, n in expected.items()}
    for c in calls:
        _device.check_grid(tuple(c["grid"]))


def test_every_launch_enters_the_tensors_device(recorded_launches):
    xt, calls, guards = recorded_launches
    q = _launch_all(xt, 2, 20, 50, 4, 2)
    assert len(calls) == 6 and all(c["guarded"] for c in calls), [c["kernel"] for c in calls if not c["guarded"]]
    assert all(g.device == q.device for g in guards)


def test_autotuning_keys_on_length_buckets(recorded_launches):
    """Two (text length, image tokens) pairs in the same power-of-two buckets share the autotuner's
    key (the tuned configuration), so a new pair does not benchmark every configuration again."""
    xt, calls, _ = recorded_launches
    for name in ("_xattn_fwd_kernel", "_xattn_bwd_dq_kernel", "_xattn_bwd_dkdv_kernel"):
        assert getattr(xt, name).keys == ["SQ_BUCKET", "SKV_BUCKET", "HEAD_DIM", "GROUP"]
    _launch_all(xt, 1, 1500, 1300, 4, 2)
    _launch_all(xt, 1, 2048, 1792, 4, 2)
    _launch_all(xt, 1, 2049, 1792, 4, 2)
    keys = {}
    for c in calls:
        if c["key"] is not None:
            keys.setdefault(c["kernel"], []).append(c["key"])
    for name, (first, second, third) in keys.items():
        assert first == second == [2048, 2048, 64, 2], name
        assert third == [4096, 2048, 64, 2], name
    assert xt.seq_bucket(1) == 16 and xt.seq_bucket(17) == 32


def test_sdpa_peer_compiles_with_dynamic_shapes():
    """torch.compile(dynamic=True) through auto (sdpa on CPU): the GQA flag must not become a
    symbolic bool (SDPA's enable_gqa rejects one)."""
    compiled = torch.compile(nk.gated_cross_attention, fullgraph=True, dynamic=True, backend="aot_eager")
    for sq in (8, 12):
        q, k = torch.randn(1, sq, 4, 64), torch.randn(1, 6, 2, 64)
        start = torch.zeros(1, sq, dtype=torch.int32)
        end = torch.full((1, sq), 6, dtype=torch.int32)
        torch.testing.assert_close(compiled(q, k, k, start, end), nk.gated_cross_attention(q, k, k, start, end))
