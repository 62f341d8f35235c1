"""The zero-patch route, ``attn_implementation="nvlm"``: tiny random configs of transformers' own
classes (InternVL's vision tower and whole model, Llama, Whisper), compared with the same model on
``"sdpa"`` (and an fp64 ``"eager"`` copy for FlashAttention's rule); OpCalls shows which layers our
ops served and that causal text layers fell back; every fallback case; registration."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the transformers integration needs Hugging Face transformers"
)

import nvlm_kernels as nk  # noqa: E402
from nvlm_kernels.integrations.transformers import _attention, register_nvlm_attention  # noqa: E402
from nvlm_kernels.testing import HostSyncCounter, OpCalls, assert_close_flash  # noqa: E402

VIT, CROSS = "vit_attention", "gated_cross_attention"
# (our backend, test dtype): the fp32 oracle and our Triton kernels (fp16, through the interpreter)
BACKENDS = [("reference", torch.float32), ("triton", torch.float16)]


@pytest.fixture(scope="module", autouse=True)
def registered():
    return register_nvlm_attention()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny GEMMs: one intra-op thread (a loaded 2-core machine runs them far slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vision_config(**overrides):
    from transformers import InternVLVisionConfig

    kw = dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
        image_size=56, patch_size=14, use_qk_norm=True,
    )  # fmt: skip
    return InternVLVisionConfig(**{**kw, **overrides})


def _internvl_config():
    from transformers import InternVLConfig

    text = dict(
        model_type="qwen2", hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=256, vocab_size=256, max_position_embeddings=128,
    )  # fmt: skip
    return InternVLConfig(
        vision_config=_vision_config().to_dict(), text_config=text, image_token_id=255, image_seq_length=4
    )


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
        vocab_size=256, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip


def _whisper_config():
    from transformers import WhisperConfig

    return WhisperConfig(
        d_model=128, encoder_attention_heads=2, decoder_attention_heads=2, encoder_layers=2, decoder_layers=2,
        encoder_ffn_dim=256, decoder_ffn_dim=256, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip


def _models(cls, config, impls, dtypes):
    """One model per (attn_implementation, dtype), all with the weights of the first (each on its
    own copy of the config: transformers records the implementation in the config it is given)."""
    torch.manual_seed(0)
    state = cls._from_config(copy.deepcopy(config), attn_implementation=impls[0]).state_dict()
    out = []
    for impl, dtype in zip(impls, dtypes, strict=True):
        model = cls._from_config(copy.deepcopy(config), attn_implementation=impl)
        model.load_state_dict(state)
        out.append(model.to(dtype))
    return out


def _forward_backward(model, inputs: dict, output: str, seed: int = 1):
    """(output, loss-free gradients of every parameter): d/dθ of sum(output · g) with a fixed random g."""
    model.zero_grad(set_to_none=True)
    cast = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    out = getattr(model(**cast), output)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out.double() * g).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_model_close(ours, lo, hi, name: str = "output") -> None:
    (out, grads), (ref_lo, grads_lo), (ref_hi, grads_hi) = ours, lo, hi
    assert_close_flash(out, ref_lo, ref_hi, name=name)
    assert grads.keys() == grads_lo.keys() == grads_hi.keys() and grads
    for pname in grads:
        assert_close_flash(grads[pname], grads_lo[pname], grads_hi[pname], name=f"grad of {pname}")


# --------------------------------------------------------------------------------------------------
# registration


def test_register_is_idempotent_and_registers_both_interfaces():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sizes = len(ALL_ATTENTION_FUNCTIONS), len(ALL_MASK_ATTENTION_FUNCTIONS)
    assert register_nvlm_attention() == "nvlm" == _attention.register()
    assert (len(ALL_ATTENTION_FUNCTIONS), len(ALL_MASK_ATTENTION_FUNCTIONS)) == sizes
    assert ALL_ATTENTION_FUNCTIONS["nvlm"] is _attention.attention_forward
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward  # nothing of transformers' replaced
    assert ALL_MASK_ATTENTION_FUNCTIONS["nvlm"] is sdpa_mask is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]


# --------------------------------------------------------------------------------------------------
# InternVL's vision tower: every layer on vit_attention, outputs and gradients as SDPA's


@pytest.mark.parametrize(("backend", "dtype"), BACKENDS, ids=[b for b, _ in BACKENDS])
def test_internvl_vision_tower_matches_sdpa(backend, dtype):
    from transformers import InternVLVisionModel

    config = _vision_config()
    ours, sdpa, eager64 = _models(InternVLVisionModel, config, ["nvlm", "sdpa", "eager"], [dtype, dtype, torch.float64])
    inputs = {"pixel_values": torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))}
    with nk.use_backend(backend), OpCalls() as calls:
        got = _forward_backward(ours, inputs, "last_hidden_state")
    layers = config.num_hidden_layers
    assert calls.count(VIT) == layers and calls.count(VIT, "bwd") == layers
    assert calls.count(CROSS, "") == 0 and len(calls.labels) == 2 * layers
    _assert_model_close(
        got,
        _forward_backward(sdpa, inputs, "last_hidden_state"),
        _forward_backward(eager64, inputs, "last_hidden_state"),
    )


def test_from_pretrained_and_set_attn_implementation(tmp_path):
    from transformers import InternVLVisionModel

    (sdpa,) = _models(InternVLVisionModel, _vision_config(), ["sdpa"], [torch.float32])
    sdpa.save_pretrained(tmp_path)
    loaded = InternVLVisionModel.from_pretrained(tmp_path, attn_implementation="nvlm")
    assert loaded.config._attn_implementation == "nvlm"
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad(), OpCalls() as calls:
        out = loaded(x).last_hidden_state
    assert calls.count(VIT) == 2
    torch.testing.assert_close(out, sdpa(x).last_hidden_state.detach())

    sdpa.set_attn_implementation("nvlm")  # an existing model switches too
    with torch.no_grad(), OpCalls() as calls:
        sdpa(x)
    assert calls.count(VIT) == 2


# --------------------------------------------------------------------------------------------------
# the whole InternVL model: vision on our op, the causal Qwen2 text layers on SDPA


def _internvl_inputs(batch: int = 2, text: int = 12):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 250, (batch, text), generator=gen)
    ids[:, 2:6] = 255  # 4 image tokens per sample (one 56 px tile: 16 patches, pixel shuffle 0.5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second sample: the text layers' mask is a real tensor
    labels = ids.masked_fill(ids == 255, -100)
    pixels = torch.randn(batch, 3, 56, 56, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


@pytest.mark.parametrize("impl", ["nvlm", "per-sub-config"])
def test_internvl_model_vision_served_text_falls_back(impl):
    from transformers import InternVLForConditionalGeneration

    config = _internvl_config()
    requested = "nvlm" if impl == "nvlm" else {"vision_config": "nvlm", "text_config": "sdpa"}
    ours, sdpa, eager64 = _models(
        InternVLForConditionalGeneration, config, [requested, "sdpa", "eager"],
        [torch.float32, torch.float32, torch.float64],
    )  # fmt: skip
    assert ours.config.vision_config._attn_implementation == "nvlm"
    assert ours.config.text_config._attn_implementation == ("nvlm" if impl == "nvlm" else "sdpa")
    inputs = _internvl_inputs()

    def run(model):
        model.zero_grad(set_to_none=True)
        cast = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        out = model(**cast)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return out.logits.detach(), out.loss.detach(), grads

    with nk.use_backend("reference"), OpCalls() as calls:
        logits, loss, grads = run(ours)
    vision_layers = config.vision_config.num_hidden_layers
    assert calls.count(VIT) == vision_layers and calls.count(VIT, "bwd") == vision_layers
    assert calls.count(CROSS, "") == 0  # the causal text layers (GQA 2:1) fell back to SDPA
    lo, hi = run(sdpa), run(eager64)
    assert_close_flash(logits, lo[0], hi[0], name="logits")
    assert_close_flash(loss, lo[1], hi[1], name="loss")
    assert grads.keys() == lo[2].keys() == hi[2].keys()
    for name in grads:
        assert_close_flash(grads[name], lo[2][name], hi[2][name], name=f"grad of {name}")


# --------------------------------------------------------------------------------------------------
# a causal text model: every layer falls back, exactly SDPA's result, masks kept


def test_llama_text_model_falls_back_exactly():
    from transformers import LlamaForCausalLM

    ours, sdpa = _models(LlamaForCausalLM, _llama_config(), ["nvlm", "sdpa"], [torch.float32] * 2)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 256, (2, 9), generator=gen)
    padded = torch.ones_like(ids)
    padded[0, :3] = 0  # left padding: the causal + padding mask must reach the layers
    for mask in (None, padded):
        with OpCalls() as calls:
            got = ours(input_ids=ids, attention_mask=mask).logits
        assert calls.labels == []
        torch.testing.assert_close(got, sdpa(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)
    # the mask entry is SDPA's: without it the padded row's logits would differ from SDPA's
    unmasked = sdpa(input_ids=ids).logits
    assert not torch.allclose(unmasked[0, 3:], sdpa(input_ids=ids, attention_mask=padded).logits[0, 3:])

    with OpCalls() as calls:  # prefill and every decode step (Sq = 1) stay on SDPA
        tokens = ours.generate(ids, attention_mask=padded, max_new_tokens=4, do_sample=False)
    assert calls.labels == []
    assert torch.equal(tokens, sdpa.generate(ids, attention_mask=padded, max_new_tokens=4, do_sample=False))


# --------------------------------------------------------------------------------------------------
# Whisper: all three routes in one real model


def test_whisper_encoder_cross_attention_and_causal_decoder():
    from transformers import WhisperModel

    config = _whisper_config()
    ours, sdpa, eager64 = _models(
        WhisperModel, config, ["nvlm", "sdpa", "eager"], [torch.float32, torch.float32, torch.float64]
    )
    gen = torch.Generator().manual_seed(5)
    inputs = {
        "input_features": torch.randn(2, 8, 32, generator=gen),
        "decoder_input_ids": torch.randint(3, 100, (2, 7), generator=gen),
    }
    with nk.use_backend("reference"), OpCalls() as calls:
        got = _forward_backward(ours, inputs, "last_hidden_state")
    assert calls.count(VIT) == config.encoder_layers  # encoder self-attention
    assert calls.count(CROSS) == config.decoder_layers  # decoder cross-attention over the encoder's states
    assert len(calls.labels) == 2 * (config.encoder_layers + config.decoder_layers)  # fwd + bwd, nothing else
    _assert_model_close(
        got,
        _forward_backward(sdpa, inputs, "last_hidden_state"),
        _forward_backward(eager64, inputs, "last_hidden_state"),
    )
    # our route adds no host sync: the same (mask-building) syncs as the SDPA model
    with torch.no_grad(), HostSyncCounter() as ours_syncs:
        ours(**inputs)
    with torch.no_grad(), HostSyncCounter() as sdpa_syncs:
        sdpa(**inputs)
    assert ours_syncs.calls == sdpa_syncs.calls


def test_mllama_is_not_reached():
    """Mllama's vision attention always has its aspect-ratio padding mask, its cross-attention its
    image mask, its text self-attention is causal: on "nvlm" every call is SDPA's, exactly."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    vision = dict(
        hidden_size=128, num_hidden_layers=1, num_global_layers=1, attention_heads=2, intermediate_size=256,
        vision_output_dim=256, image_size=28, patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )  # fmt: skip
    text = dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256,
        vocab_size=64, cross_attention_layers=[1], bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=63)
    ours, sdpa = _models(MllamaForConditionalGeneration, config, ["nvlm", "sdpa"], [torch.float32] * 2)
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 63, (2, 8), generator=gen)
    ids[:, 2] = 63
    cross_mask = torch.zeros(2, 8, 1, 2, dtype=torch.long)
    cross_mask[0, 2:, 0, :2] = 1  # two tiles
    cross_mask[1, 2:, 0, :1] = 1  # one tile and a padding tile
    inputs = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), cross_attention_mask=cross_mask,
        pixel_values=torch.randn(2, 1, 2, 3, 28, 28, generator=gen), aspect_ratio_ids=torch.tensor([[2], [1]]),
        aspect_ratio_mask=torch.tensor([[[1, 1]], [[1, 0]]]),
    )  # fmt: skip
    with torch.no_grad(), OpCalls() as calls:
        got = ours(**inputs).logits
    assert calls.labels == []
    torch.testing.assert_close(got, sdpa(**inputs).logits.detach(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# direct calls: served cases (GQA cross-attention on the Triton kernels too) and every fallback


class _Attention(torch.nn.Module):
    """The attributes transformers' attention modules carry that the attention functions read."""

    def __init__(self, is_causal: bool | None = False, groups: int = 1) -> None:
        super().__init__()
        if is_causal is not None:
            self.is_causal = is_causal
        self.num_key_value_groups = groups


def _qkv(b, hq, hkv, sq, skv, d, dtype=torch.float32, seed=6):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, skv, d, generator=gen, dtype=torch.float64) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize(("backend", "dtype"), BACKENDS, ids=[b for b, _ in BACKENDS])
@pytest.mark.parametrize(
    ("hq", "hkv", "sq", "skv", "op"),
    [(3, 3, 11, 11, VIT), (4, 2, 5, 19, CROSS), (2, 2, 6, 13, CROSS), (4, 1, 1, 9, CROSS)],
    ids=["self", "gqa-cross", "cross", "gqa-one-query"],
)
def test_served_calls_match_sdpa(backend, dtype, hq, hkv, sq, skv, op):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Attention(groups=hq // hkv)
    q, k, v = _qkv(2, hq, hkv, sq, skv, 64, dtype)
    assert _attention.route(module, q, k, v, None, 0.0, None)[0] == op

    def run(fn, *tensors, **kw):
        leaves = [t.detach().requires_grad_() for t in tensors]
        out, weights = fn(module, *leaves, None, dropout=0.0, scaling=0.1, **kw)
        assert weights is None and out.shape == (2, sq, hq, 64) and out.is_contiguous()
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        (out.double() * g).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    with nk.use_backend(backend), OpCalls() as calls, HostSyncCounter() as syncs:
        out, grads = run(_attention.attention_forward, q, k, v, is_causal=False)
    # forward ("fwd", or "decode" for one query on the Triton kernels' split-K path) and backward
    assert calls.count(op, "") == 2 and calls.count(op, "bwd") == 1 and len(calls.labels) == 2
    assert syncs.calls == []  # no host sync in a served call (ranges made on the device)
    lo_out, lo_grads = run(sdpa_attention_forward, q, k, v, is_causal=False)
    hi_out, hi_grads = run(sdpa_attention_forward, *(t.double() for t in (q, k, v)), is_causal=False)
    assert_close_flash(out, lo_out, hi_out)
    for name, g, lo, hi in zip("qkv", grads, lo_grads, hi_grads, strict=True):
        assert_close_flash(g, lo, hi, name=f"d{name}")


def _fallback_cases():
    """(id, module, (b, hq, hkv, sq, skv, d), mask, extra kwargs, the reason's key words)."""
    causal_mask = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7)
    dims = (2, 2, 2, 7, 7, 64)
    return [
        ("causal-module", _Attention(is_causal=True), dims, None, {}, "causal"),
        ("no-is_causal-attribute", _Attention(is_causal=None), dims, None, {}, "causal"),
        ("causal-decode", _Attention(is_causal=True, groups=2), (2, 4, 2, 1, 7, 64), None, {}, "causal"),
        ("is_causal-kwarg", _Attention(is_causal=False), dims, None, {"is_causal": True}, "causal"),
        ("bool-mask", _Attention(), dims, causal_mask, {}, "mask"),
        ("all-true-mask", _Attention(), dims, torch.ones(2, 1, 7, 7, dtype=torch.bool), {}, "mask"),
        ("float-mask", _Attention(groups=2), (2, 4, 2, 5, 7, 64), torch.zeros(2, 1, 5, 7), {}, "mask"),
        ("head-dim-32", _Attention(), (2, 2, 2, 7, 7, 32), None, {}, "head dim"),
        ("position-bias", _Attention(), dims, None, {"position_bias": torch.randn(1, 2, 7, 7)}, "position_bias"),
        ("output-attentions", _Attention(), dims, None, {"output_attentions": True}, "output_attentions"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _fallback_cases(), ids=lambda c: c[0])
def test_fallbacks_are_sdpa_exactly(case):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _, module, dims, mask, extra, reason = case
    b, hq, hkv, sq, skv, d = dims
    q, k, v = _qkv(b, hq, hkv, sq, skv, d)
    op, why = _attention.route(module, q, k, v, mask, 0.0, **extra)
    assert op == "sdpa" and reason in why, why
    with OpCalls() as calls:
        got, _ = _attention.attention_forward(module, q, k, v, mask, scaling=0.2, **extra)
    assert calls.labels == []
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2, **extra)
    assert torch.equal(got, want)


def test_dropout_falls_back_with_sdpa_randomness():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Attention()
    q, k, v = _qkv(2, 2, 2, 7, 7, 64)
    assert "dropout" in _attention.route(module, q, k, v, None, 0.5)[1]
    torch.manual_seed(8)
    with OpCalls() as calls:
        got, _ = _attention.attention_forward(module, q, k, v, None, dropout=0.5)
    assert calls.labels == []
    torch.manual_seed(8)
    assert torch.equal(got, sdpa_attention_forward(module, q, k, v, None, dropout=0.5)[0])


def test_route_reads_no_values():
    """The decision needs shapes and flags only: it works on meta tensors (no data to read)."""
    q, k, v = (torch.empty(2, h, s, 64, device="meta") for h, s in ((4, 5), (2, 9), (2, 9)))
    assert _attention.route(_Attention(groups=2), q, k, v, None, 0.0, False)[0] == CROSS
    assert _attention.route(_Attention(), q, q, q, None, 0.0, False)[0] == VIT
    mask = torch.empty(2, 1, 5, 9, dtype=torch.bool, device="meta")
    assert _attention.route(_Attention(groups=2), q, k, v, mask, 0.0, False)[0] == "sdpa"
    assert _attention.route(_Attention(), q, k.half(), v, None, 0.0, False)[0] == "sdpa"  # mixed dtypes
    k3 = torch.empty(2, 3, 9, 64, device="meta")
    assert _attention.route(_Attention(), q, k3, k3, None)[0] == "sdpa"  # 4 query heads, 3 key/value heads


def test_cross_route_compiles_fullgraph():
    """The routing, the ranges made on the device and the op trace into one graph (no break, no sync)."""
    module = _Attention(groups=2)
    q, k, v = _qkv(2, 4, 2, 5, 9, 64)
    compiled = torch.compile(
        lambda q, k, v: _attention.attention_forward(module, q, k, v, None, scaling=0.1)[0],
        fullgraph=True,
        dynamic=False,
    )
    torch.testing.assert_close(compiled(q, k, v), _attention.attention_forward(module, q, k, v, None, scaling=0.1)[0])
