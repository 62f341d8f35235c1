"""nvlm.xattn.GatedCrossAttentionBlock against a plain float64 reference, the identity at zero gates
and on rows that see no image, reference vs Triton backends, decoding with cached k/v, gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels as nk
from nvlm.config import TINY_LLM, CrossAttentionConfig
from nvlm.xattn import GatedCrossAttentionBlock

# GQA 4:2 of head_dim 16 (the reference backend takes any head_dim; the Triton test uses TINY_LLM's 64)
LLM = dataclasses.replace(TINY_LLM, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96)
XATTN = CrossAttentionConfig(every=2)
KV_DIM = 48
TOKENS_PER_TILE = 4
SEQ = 12


def layout() -> tuple[torch.Tensor, torch.Tensor]:
    """Two batch rows. Row 0: text 0-2 before any image, image A (2 tiles) at 3 whose tile tags are
    tokens 4 and 5, image B (1 tile) at 8. Row 1: one image of 2 tiles at 1 (keys 8-11 unused)."""
    positions = torch.tensor([[3, 8], [1, -1]])
    tiles = torch.tensor([[2, 1], [2, 0]])
    tags = torch.full((2, SEQ), -1)
    tags[0, 4], tags[0, 5] = 0, 1
    return nk.cross_attention_ranges(
        positions, tiles, SEQ, policy="nvlm-x", tag_tiles=tags, tokens_per_tile=TOKENS_PER_TILE
    )


def block(llm=LLM, xattn=XATTN, attn_gate=0.7, ffn_gate=-0.4, dtype=torch.float32) -> GatedCrossAttentionBlock:
    torch.manual_seed(0)
    module = GatedCrossAttentionBlock(llm, xattn, KV_DIM, index=3, dtype=dtype)
    with torch.no_grad():
        module.attn_norm.weight.uniform_(0.5, 1.5)
        module.attn_gate.fill_(attn_gate)
        if xattn.gated_ffn:
            module.ffn_norm.weight.uniform_(0.5, 1.5)
            module.ffn_gate.fill_(ffn_gate)
    return module


def inputs(dtype=torch.float32, hidden=LLM.hidden_size) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    h = torch.randn(2, SEQ, hidden, dtype=dtype)
    images = torch.randn(2, 3 * TOKENS_PER_TILE, KV_DIM, dtype=dtype)
    return h, images


def reference_block(module: GatedCrossAttentionBlock, h, images, kv_start, kv_end) -> torch.Tensor:
    """The block written out in float64 with a dense mask, per spec §6.3."""
    p = {name: t.detach().double() for name, t in module.state_dict().items()}
    h, images = h.double(), images.double()
    hq, hkv, d = module.num_heads, module.num_kv_heads, module.head_dim
    eps = LLM.rms_eps

    def rms(x, w):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    q = (rms(h, p["attn_norm.weight"]) @ p["q_proj.weight"].T).unflatten(-1, (hq, d))  # [B, S, Hq, D]
    k = (images @ p["k_proj.weight"].T).unflatten(-1, (hkv, d))
    v = (images @ p["v_proj.weight"].T).unflatten(-1, (hkv, d))
    kv_head = torch.arange(hq) // (hq // hkv)  # query head -> its key/value head
    k, v = k[:, :, kv_head], v[:, :, kv_head]  # [B, N, Hq, D]
    scores = torch.einsum("bshd,bnhd->bhsn", q, k) / d**0.5
    key = torch.arange(images.shape[1])
    allowed = (key >= kv_start[..., None].long()) & (key < kv_end[..., None].long())  # [B, S, N]
    row_valid = allowed.any(-1)  # [B, S]
    weights = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1)
    weights = torch.nan_to_num(weights, nan=0.0)  # rows with no allowed key: softmax of all -inf
    attn = torch.einsum("bhsn,bnhd->bshd", weights, v).flatten(-2)
    h = h + torch.tanh(p["attn_gate"]) * (attn @ p["o_proj.weight"].T)
    x = rms(h, p["ffn_norm.weight"])
    ffn = (F.silu(x @ p["mlp.gate_proj.weight"].T) * (x @ p["mlp.up_proj.weight"].T)) @ p["mlp.down_proj.weight"].T
    return h + torch.tanh(p["ffn_gate"]) * ffn * row_valid[..., None]


def test_matches_a_float64_reference_with_nonzero_gates():
    kv_start, kv_end = layout()
    assert (kv_end[0, :3] == 0).all() and (kv_end[0, 3:] > 0).all()  # the layout is what the test is about
    module = block()
    h, images = inputs()
    with torch.no_grad():
        got = module(h, module.project_kv(images), kv_start, kv_end)
    want = reference_block(module, h, images, kv_start, kv_end)
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0, 3:], h[0, 3:], atol=1e-2)  # the image rows did change


def test_zero_gates_are_the_identity_and_rows_without_an_image_are_unchanged():
    kv_start, kv_end = layout()
    h, images = inputs()
    fresh = GatedCrossAttentionBlock(LLM, XATTN, KV_DIM)  # gates at gate_init = 0
    assert fresh.attn_gate.item() == 0.0 and fresh.ffn_gate.item() == 0.0
    with torch.no_grad():
        assert torch.equal(fresh(h, fresh.project_kv(images), kv_start, kv_end), h)
        gated = block()
        out = gated(h, gated.project_kv(images), kv_start, kv_end)
    empty = kv_end <= kv_start
    assert empty.sum() == 4  # text before row 0's first image, and row 1's first token
    assert torch.equal(out[empty], h[empty])


def test_without_ffn_and_with_own_head_counts():
    xattn = CrossAttentionConfig(gated_ffn=False, num_heads=2, num_kv_heads=1)
    module = block(xattn=xattn)
    assert not hasattr(module, "mlp") and not hasattr(module, "ffn_gate")
    assert tuple(module.q_proj.weight.shape) == (2 * LLM.head_dim, LLM.hidden_size)
    assert tuple(module.k_proj.weight.shape) == (LLM.head_dim, KV_DIM)
    kv_start, kv_end = layout()
    h, images = inputs()
    with torch.no_grad():
        out = module(h, module.project_kv(images), kv_start, kv_end)
        # the attention branch alone: the same block with a gated FFN whose gate is 0
        with_ffn = block(xattn=dataclasses.replace(xattn, gated_ffn=True), ffn_gate=0.0)
        with_ffn.load_state_dict(module.state_dict(), strict=False)
        torch.testing.assert_close(out, with_ffn(h, with_ffn.project_kv(images), kv_start, kv_end))


def test_decoding_one_row_with_cached_kv_equals_the_full_forward():
    kv_start, kv_end = layout()
    module = block()
    h, images = inputs()
    with torch.no_grad():
        kv = module.project_kv(images)
        full = module(h, kv, kv_start, kv_end)
        for t in (2, 5, 11):
            step = module(h[:, t : t + 1], kv, kv_start[:, t : t + 1], kv_end[:, t : t + 1])
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-6, rtol=1e-6)


def test_reference_and_triton_backends_agree_in_float16():
    reason = nk.available_backends("gated_cross_attention", "cpu")["triton"]
    if reason is not None:
        pytest.skip(reason)
    llm = TINY_LLM  # head_dim 64, one of the Triton kernels' head dims; 2 query heads over 1 kv head
    module = block(llm=llm, dtype=torch.float16)
    kv_start, kv_end = layout()
    h, images = inputs(torch.float16, hidden=llm.hidden_size)
    results = {}
    with torch.no_grad():
        for backend in ("reference", "triton"):
            with nk.use_backend(backend):
                kv = module.project_kv(images)
                full = module(h, kv, kv_start, kv_end)
                step = module(h[:, 6:7], kv, kv_start[:, 6:7], kv_end[:, 6:7])  # the one-query decode kernel
                results[backend] = (full, step)
    (ref_full, ref_step), (tri_full, tri_step) = results["reference"], results["triton"]
    torch.testing.assert_close(tri_full, ref_full, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(tri_step, ref_step, atol=2e-3, rtol=2e-3)
    empty = kv_end <= kv_start
    assert torch.equal(tri_full[empty], h[empty])


def test_gradients_reach_the_gates_projections_and_image_embeddings():
    kv_start, kv_end = layout()
    module = block()
    h, images = inputs()
    h.requires_grad_(True)
    images.requires_grad_(True)
    weight = torch.randn(2, SEQ, LLM.hidden_size)
    (module(h, module.project_kv(images), kv_start, kv_end) * weight).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()} | {"images": images.grad}
    names = ["attn_gate", "ffn_gate", "q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "images"]
    names += ["attn_norm.weight", "mlp.up_proj.weight"]
    for name in names:
        assert grads[name] is not None and torch.isfinite(grads[name]).all(), name
        assert grads[name].abs().sum() > 0, name
    # image keys nobody attends (row 1's keys 8-11) get no gradient
    assert torch.equal(images.grad[1, 8:], torch.zeros_like(images.grad[1, 8:]))

    # at init (gates 0) the gates themselves still learn: d out / d gate = branch output ≠ 0
    fresh = GatedCrossAttentionBlock(LLM, XATTN, KV_DIM)
    (fresh(h, fresh.project_kv(images), kv_start, kv_end) * weight).sum().backward()
    assert fresh.attn_gate.grad.abs().item() > 0 and fresh.ffn_gate.grad.abs().item() > 0


def test_builds_the_72b_block_on_meta():
    from nvlm.config import NVLMConfig

    config = NVLMConfig.from_preset("nvlm-x-72b")
    module = GatedCrossAttentionBlock(config.llm, config.xattn, config.llm.hidden_size, device="meta")
    assert tuple(module.k_proj.weight.shape) == (1024, 8192)  # 8 kv heads of 128, as the LLM's
    assert tuple(module.mlp.down_proj.weight.shape) == (8192, 29568)
    q_o, k_v, mlp, norms_and_gates = 2 * 8192 * 8192, 2 * 1024 * 8192, 3 * 8192 * 29568, 2 * 8192 + 2
    assert sum(p.numel() for p in module.parameters()) == q_o + k_v + mlp + norms_and_gates
