"""nvlm.llm.Qwen2Decoder: Hugging Face Qwen2 as the outside oracle, the KV cache against a full
forward, the before_layer hook, padding without NaN, and the 72B shapes on the meta device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nvlm.config import QWEN2_72B, TINY_LLM, LLMConfig
from nvlm.llm import Qwen2Decoder, rotary_cos_sin

# TINY_LLM with two layers and GQA 4:2 (two kv heads, so the head grouping is exercised for real)
SMALL = dataclasses.replace(TINY_LLM, num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=96)


def decoder(config: LLMConfig = SMALL, seed: int = 0) -> Qwen2Decoder:
    torch.manual_seed(seed)
    model = Qwen2Decoder(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong name or a missed bias shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def run(model: Qwen2Decoder, ids: torch.Tensor, **kw) -> torch.Tensor:
    positions = kw.pop("position_ids", None)
    if positions is None:
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        return model.logits(model(model.embed(ids), positions, **kw))


@pytest.mark.parametrize("rope_theta", [10_000.0, 1_000_000.0])
def test_matches_hugging_face_qwen2(rope_theta):
    transformers = pytest.importorskip("transformers", reason="Hugging Face Qwen2 is the outside oracle")
    config = dataclasses.replace(SMALL, rope_theta=rope_theta)
    hf_config = transformers.Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.rms_eps, rope_theta=rope_theta,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(1)
    hf = transformers.Qwen2ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    ours = Qwen2Decoder(config).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})  # strict

    ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    torch.testing.assert_close(run(ours, ids), want, atol=1e-4, rtol=1e-4)

    # right padding: row 1 has 7 real tokens; padded query rows still see the real keys before them
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask.long()).logits
    got = run(ours, ids, attention_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and the real tokens of the padded row are those of the row alone
    torch.testing.assert_close(got[1, :7], run(ours, ids[1:, :7])[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_one_full_forward():
    model = decoder()
    ids = torch.randint(0, SMALL.vocab_size, (2, 9))
    full = run(model, ids)
    cache = model.new_cache(2, 12)
    prefill = run(model, ids[:, :6], cache=cache)
    steps = [prefill]
    for t in (6, 7, 8):  # one token at a time, each at its own position
        steps.append(run(model, ids[:, t : t + 1], position_ids=torch.full((2, 1), t), cache=cache))
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)

    # a chunk of two tokens after the prefill takes the explicit causal mask over cached + new keys
    cache = model.new_cache(2, 9)
    run(model, ids[:, :6], cache=cache)
    chunk = run(model, ids[:, 6:8], position_ids=torch.tensor([[6, 7], [6, 7]]), cache=cache)
    torch.testing.assert_close(chunk, full[:, 6:8], atol=1e-5, rtol=1e-5)

    # one more than max_len: a clear error naming the length, and the cache is left as it was
    with pytest.raises(ValueError, match=r"max_len 9.*length 10"):
        run(model, ids[:, 7:9], position_ids=torch.tensor([[8, 9], [8, 9]]), cache=cache)
    assert cache.length == 8


def test_left_padding_with_cache_has_no_nan_and_matches_the_unpadded_rows():
    model = decoder()
    ids = torch.randint(0, SMALL.vocab_size, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False  # row 0: three left-padding tokens, so its first query rows see no real key
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    cache = model.new_cache(2, 10)
    prefill = run(model, ids, position_ids=positions, attention_mask=mask, cache=cache)
    assert torch.isfinite(prefill).all()
    torch.testing.assert_close(prefill[0, 3:], run(model, ids[:1, 3:])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefill[1], run(model, ids[1:])[0], atol=1e-5, rtol=1e-5)

    next_ids = torch.randint(0, SMALL.vocab_size, (2, 1))
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
    step = run(model, next_ids, position_ids=positions[:, -1:] + 1, attention_mask=step_mask, cache=cache)
    torch.testing.assert_close(step[0, 0], run(model, torch.cat([ids[:1, 3:], next_ids[:1]], 1))[0, -1])


def test_before_layer_is_called_in_order_and_its_result_is_used():
    model = decoder()
    ids = torch.randint(0, SMALL.vocab_size, (1, 5))
    plain = run(model, ids)
    calls = []

    def identity(i, h):
        calls.append(i)
        return h

    assert torch.equal(run(model, ids, before_layer=identity), plain)
    assert calls == list(range(SMALL.num_layers))

    def shift_before_last(i, h):
        return h + 1.0 if i == SMALL.num_layers - 1 else h

    shifted = run(model, ids, before_layer=shift_before_last)
    assert not torch.allclose(shifted, plain, atol=1e-3)

    # what the hook returns is what the layer gets: running the last layer by hand agrees
    def replace_by_zero(i, h):
        return torch.zeros_like(h) if i == SMALL.num_layers - 1 else h

    with torch.no_grad():
        h = torch.zeros(1, 5, SMALL.hidden_size)
        rope = rotary_cos_sin(torch.arange(5)[None], SMALL.head_dim, SMALL.rope_theta)
        by_hand = model.logits(model.norm(model.layers[-1](h, rope, None, True, None, SMALL.num_layers - 1)))
    torch.testing.assert_close(run(model, ids, before_layer=replace_by_zero), by_hand)


def test_tied_embeddings_share_one_tensor():
    model = Qwen2Decoder(dataclasses.replace(SMALL, tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert "lm_head.weight" in model.state_dict()  # as Hugging Face's state dicts list it


def test_init_is_seeded_and_builds_qwen2_72b_on_meta():
    first, second = decoder(seed=3), decoder(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))
    torch.manual_seed(0)
    fresh = Qwen2Decoder(SMALL)
    assert abs(float(fresh.layers[0].mlp.up_proj.weight.detach().std()) - 0.02) < 0.002
    assert torch.equal(fresh.layers[0].self_attn.q_proj.bias, torch.zeros(SMALL.hidden_size))
    assert torch.equal(fresh.norm.weight, torch.ones(SMALL.hidden_size))

    big = Qwen2Decoder(QWEN2_72B, device="meta")
    count = sum(p.numel() for p in big.parameters())
    assert abs(count - 72.71e9) / 72.71e9 < 0.01
    assert count == 72_706_203_648  # Qwen2-72B, untied embeddings
    assert tuple(big.layers[0].self_attn.k_proj.weight.shape) == (1024, 8192)  # 8 kv heads of 128


# --------------------------------------------------------------------------------------------------
# dynamic NTK RoPE scaling (NVLM-D-72B's llm_config: {"type": "dynamic", "factor": 3.0})

DYNAMIC = dataclasses.replace(SMALL, max_position_embeddings=16, rope_scaling="dynamic", rope_scaling_factor=3.0)


def _hf_qwen2_config(transformers, config: LLMConfig):
    scaling = {"rope_scaling": {"type": "dynamic", "factor": config.rope_scaling_factor}} if config.rope_scaling else {}
    return transformers.Qwen2Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, rms_norm_eps=config.rms_eps, rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
        attn_implementation="eager", **scaling,
    )  # fmt: skip


def test_dynamic_rope_cos_sin_equal_transformers_bit_for_bit():
    """Against a fresh transformers Qwen2RotaryEmbedding: up to max_position_embeddings (16) the
    unscaled tables exactly; past it (one forward of 40 positions, then growing lengths) the scaled ones."""
    transformers = pytest.importorskip("transformers", reason="Hugging Face's Qwen2 rotary embedding is the oracle")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    head_dim, theta, limit = DYNAMIC.head_dim, DYNAMIC.rope_theta, DYNAMIC.max_position_embeddings
    x = torch.zeros(1, dtype=torch.float32)
    hf = Qwen2RotaryEmbedding(_hf_qwen2_config(transformers, DYNAMIC))
    for length in (7, 16, 17, 40, 41, 64):  # a fresh module's lengths only grow past the limit, as in generation
        positions = torch.arange(length)[None].expand(2, -1)
        want = hf(x, positions)
        got = rotary_cos_sin(positions, head_dim, theta, dynamic_factor=3.0, max_position_embeddings=limit)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), length
        plain = rotary_cos_sin(positions, head_dim, theta)
        assert torch.equal(got[0], plain[0]) == (length <= limit), length
    # a decoding step: one position, scaled by its own length
    step = torch.full((2, 1), 70)
    got = rotary_cos_sin(step, head_dim, theta, dynamic_factor=3.0, max_position_embeddings=limit)
    assert torch.equal(got[0], hf(x, step)[0])


def test_dynamic_rope_scaling_matches_transformers_past_the_limit_and_changes_nothing_before():
    transformers = pytest.importorskip("transformers", reason="Hugging Face Qwen2 is the outside oracle")
    torch.manual_seed(1)
    hf = transformers.Qwen2ForCausalLM(_hf_qwen2_config(transformers, DYNAMIC)).eval()
    ours = Qwen2Decoder(DYNAMIC).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    plain = Qwen2Decoder(dataclasses.replace(DYNAMIC, rope_scaling=None, rope_scaling_factor=1.0)).eval()
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(0, DYNAMIC.vocab_size, (2, 26))

    # within max_position_embeddings: exactly the unscaled model
    assert torch.equal(run(ours, ids[:, :16]), run(plain, ids[:, :16]))
    # past it: transformers' dynamic NTK, for a whole forward ...
    with torch.no_grad():
        want = hf(input_ids=ids).logits
    got = run(ours, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, run(plain, ids), atol=1e-3)  # the scaling does change these logits
    # ... and for a prefill of 20 then decoding steps, each with its own length's base, like
    # transformers' KV cache (keys keep the rotation they were cached with)
    cache = ours.new_cache(2, 26)
    steps = [run(ours, ids[:, :20], cache=cache)]
    steps += [run(ours, ids[:, t : t + 1], position_ids=torch.full((2, 1), t), cache=cache) for t in range(20, 26)]
    with torch.no_grad():
        hf = transformers.Qwen2ForCausalLM(_hf_qwen2_config(transformers, DYNAMIC)).eval()  # a fresh rotary state
        hf.load_state_dict({"model." + k if k != "lm_head.weight" else k: v for k, v in ours.state_dict().items()})
        out = hf(input_ids=ids[:, :20], use_cache=True)
        hf_steps, past = [out.logits], out.past_key_values
        for t in range(20, 26):
            out = hf(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
            hf_steps.append(out.logits)
            past = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), torch.cat(hf_steps, 1), atol=1e-4, rtol=1e-4)
