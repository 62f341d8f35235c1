"""Generation: the cached decoding loop against recomputing the whole sequence, cross-attention keys
projected once per request, sampling, stop tokens and the length limit. Tiny presets in float32."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import nvlm_kernels as nk
from nvlm import NVLMConfig, build_model
from nvlm.generate import generate, left_padded, sample_next_token
from nvlm.processor import NVLMProcessor
from nvlm.tokenizer import ByteTokenizer
from nvlm_kernels.testing import HostSyncCounter, require_backend

NEW_TOKENS = 6
CONVERSATIONS = [  # different lengths and 0, 1, 2 images: right padding in the middle of the batch
    [{"role": "user", "content": "No image here, just a longer text question?"}],
    [{"role": "user", "content": "<image> What?"}],
    [{"role": "user", "content": "<image> and <image>: compare."}],
]


def _image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def _model(preset: str):
    """Random weights (seed 0), float32, the cross-attention gates opened: they start at 0, which
    makes the blocks the identity and would leave the cross-attention path untested."""
    if preset == "tiny-x-all-previous":  # text attends every image so far: generated tokens' range starts at 0
        config = NVLMConfig.from_preset("tiny-x").replace(xattn={"attend_all_previous": True})
    else:
        config = NVLMConfig.from_preset(preset)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate"):
                param.fill_(0.8)
    return model


def _batch(model):
    images = [[], [_image(120, 60, 1)], [_image(60, 60, 2), _image(50, 140, 3)]]
    return NVLMProcessor(ByteTokenizer(), model.config)(CONVERSATIONS, images)


def _append(inputs, tokens: torch.Tensor):
    """``inputs`` with one more column: ``tokens`` [B] as real text (no image slot, no tag)."""
    longer = copy.copy(inputs)
    column = torch.ones_like(tokens, dtype=torch.bool)[:, None]
    longer.input_ids = torch.cat([inputs.input_ids, tokens[:, None]], 1)
    longer.attention_mask = torch.cat([inputs.attention_mask.to(torch.bool), column], 1)
    longer.image_token_mask = torch.cat([inputs.image_token_mask, ~column], 1)
    longer.tag_tiles = torch.cat([inputs.tag_tiles, torch.full_like(tokens, -1)[:, None]], 1)
    return longer


def _greedy_by_recomputing(model, inputs, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding with no cache at all: the full (right-padded) sequence is run again for every
    token. The new tokens are appended after the padding of shorter rows, which the attention mask
    hides, so each row's last real position is its prompt's last token, then the last column."""
    last = inputs.attention_mask.sum(1) - 1
    tokens, logits = [], []
    with torch.no_grad():
        for _ in range(steps):
            step_logits = model(inputs).logits[torch.arange(len(last)), last]  # [B, V]
            logits.append(step_logits)
            tokens.append(step_logits.argmax(-1))
            inputs = _append(inputs, tokens[-1])
            last = torch.full_like(last, inputs.input_ids.shape[1] - 1)
    return torch.stack(tokens, 1), logits


# --------------------------------------------------------------------------------------------------
# the caches change nothing


@pytest.mark.parametrize("preset", ["tiny-d", "tiny-x", "tiny-h", "tiny-x-all-previous"])
def test_cached_greedy_generation_equals_recomputing_the_sequence(preset, monkeypatch):
    model = _model(preset)
    inputs = _batch(model)
    expected_tokens, expected_logits = _greedy_by_recomputing(model, inputs, NEW_TOKENS)

    # every logits the cached loop computes: the prefill's last position, then one per decoding step
    seen = []
    lm_logits = model.llm.logits
    monkeypatch.setattr(model.llm, "logits", lambda hidden: seen.append(lm_logits(hidden)) or seen[-1])
    out = model.generate(inputs, max_new_tokens=NEW_TOKENS)

    torch.testing.assert_close(out.sequences, expected_tokens, rtol=0, atol=0)
    assert out.lengths.tolist() == [NEW_TOKENS] * 3 and not out.finished.any()
    assert len(seen) == NEW_TOKENS  # the last token is chosen, not fed back
    for step, (got, want) in enumerate(zip(seen, expected_logits, strict=True)):
        torch.testing.assert_close(got[:, -1], want, rtol=1e-4, atol=1e-4, msg=f"step {step}")


def test_left_padding_moves_every_per_position_field_with_its_row():
    model = _model("tiny-x")
    inputs = _batch(model)
    moved = left_padded(inputs)
    lengths = inputs.attention_mask.sum(1)
    width = int(lengths.max())
    assert moved.input_ids.shape == (3, width) and moved.attention_mask[:, -1].all()
    for b, n in enumerate(lengths.tolist()):
        assert moved.attention_mask[b].sum() == n and not moved.attention_mask[b, : width - n].any()
        torch.testing.assert_close(moved.input_ids[b, width - n :], inputs.input_ids[b, :n])
        torch.testing.assert_close(moved.tag_tiles[b, width - n :], inputs.tag_tiles[b, :n])
        assert (moved.tag_tiles[b, : width - n] == -1).all()
        present = inputs.image_positions[b] >= 0
        assert (moved.image_positions[b, present] == inputs.image_positions[b, present] + width - n).all()
        assert (moved.image_positions[b, ~present] == -1).all()
        # each image position still holds the image's <Image> token
        torch.testing.assert_close(
            moved.input_ids[b, moved.image_positions[b, present]],
            inputs.input_ids[b, inputs.image_positions[b, present]],
        )
    h_inputs = _batch(_model("tiny-h"))
    h_moved = left_padded(h_inputs)
    width = h_moved.input_ids.shape[1]
    for b, n in enumerate(h_inputs.attention_mask.sum(1).tolist()):
        torch.testing.assert_close(h_moved.image_token_mask[b, width - n :], h_inputs.image_token_mask[b, :n])


@pytest.mark.parametrize("preset", ["tiny-x", "tiny-h"])
def test_cross_attention_keys_are_projected_once_per_request(preset, monkeypatch):
    model = _model(preset)
    calls = {index: 0 for index in model.xattn}
    for index, block in model.xattn.items():

        def counting(image_embeds, index=index, project=block.project_kv):
            calls[index] += 1
            return project(image_embeds)

        monkeypatch.setattr(block, "project_kv", counting)
    out = model.generate(_batch(model), max_new_tokens=5)
    assert out.sequences.shape[1] == 5  # four decoding steps after the prefill
    assert calls == {index: 1 for index in model.xattn}


# --------------------------------------------------------------------------------------------------
# sampling


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = _model("tiny-h")
    inputs = _batch(model)
    options = {"max_new_tokens": NEW_TOKENS, "do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95}
    first = model.generate(inputs, generator=torch.Generator().manual_seed(1), **options).sequences
    again = model.generate(inputs, generator=torch.Generator().manual_seed(1), **options).sequences
    other = model.generate(inputs, generator=torch.Generator().manual_seed(2), **options).sequences
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)
    greedy = model.generate(inputs, max_new_tokens=NEW_TOKENS).sequences
    assert not torch.equal(first, greedy)  # it does sample: random weights give flat distributions


@pytest.mark.parametrize("cut", [{"top_k": 1}, {"top_p": 1e-6}])
def test_sampling_from_a_single_token_is_greedy(cut):
    model = _model("tiny-x")
    inputs = _batch(model)
    greedy = model.generate(inputs, max_new_tokens=NEW_TOKENS).sequences
    sampled = model.generate(
        inputs,
        max_new_tokens=NEW_TOKENS,
        do_sample=True,
        temperature=1.5,
        generator=torch.Generator().manual_seed(0),
        **cut,
    ).sequences
    torch.testing.assert_close(sampled, greedy, rtol=0, atol=0)


def _draws(logits: list[float], count: int = 4000, **options) -> torch.Tensor:
    rows = torch.tensor(logits).log().expand(count, -1) if options.pop("as_probs", False) else None
    rows = rows if rows is not None else torch.tensor(logits).expand(count, -1)
    return sample_next_token(rows, do_sample=True, generator=torch.Generator().manual_seed(0), **options)


def test_top_k_draws_only_the_k_most_likely_tokens():
    logits = [0.3, 2.0, -1.0, 1.5, 0.0, 1.9, -0.5, 0.1]
    drawn = set(_draws(logits, top_k=3).tolist())
    assert drawn == {1, 3, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.05, 0.5, 0.15, 0.3]  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    assert set(_draws(probs, as_probs=True, top_p=0.45).tolist()) == {1}
    kept = _draws(probs, as_probs=True, top_p=0.75)
    assert set(kept.tolist()) == {1, 3}
    # renormalized over the nucleus: 0.5 / 0.8
    assert abs((kept == 1).float().mean().item() - 0.625) < 0.04
    assert set(_draws(probs, as_probs=True, top_p=0.85).tolist()) == {1, 3, 2}


def test_temperature_comes_before_top_p():
    probs = [0.05, 0.5, 0.15, 0.3]
    # a high temperature flattens the distribution first, so the 0.75 nucleus needs three tokens
    assert set(_draws(probs, as_probs=True, temperature=100.0, top_p=0.75).tolist()) == {1, 3, 2}


def test_bad_sampling_options_are_rejected():
    model = _model("tiny-d")
    inputs = _batch(model)
    for options in ({"max_new_tokens": 0}, {"do_sample": True, "temperature": 0.0}, {"do_sample": True, "top_k": 0}):
        with pytest.raises(ValueError):
            generate(model, inputs, **options)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, inputs, do_sample=True, top_p=1.5)


# --------------------------------------------------------------------------------------------------
# stopping and length


def test_a_stop_token_ends_its_row_which_is_padded_after_it():
    model = _model("tiny-d")
    inputs = _batch(model)
    free = model.generate(inputs, max_new_tokens=NEW_TOKENS).sequences
    stop = int(free[0, 0])
    out = model.generate(inputs, max_new_tokens=NEW_TOKENS, stop_token_ids=[stop], pad_token_id=-1)
    assert out.lengths[0] == 1 and out.finished[0]
    assert out.sequences[0, 0] == stop and (out.sequences[0, 1:] == -1).all()
    for b in range(1, 3):  # the other rows run on, and stop where they emit the stop token too
        hits = (free[b] == stop).nonzero().flatten().tolist()
        length = hits[0] + 1 if hits else NEW_TOKENS
        assert out.lengths[b] == length and bool(out.finished[b]) == bool(hits)
        torch.testing.assert_close(out.sequences[b, :length], free[b, :length])
        assert (out.sequences[b, length:] == -1).all()


def test_generation_ends_when_every_row_has_stopped():
    model = _model("tiny-x")
    inputs = _batch(model)
    first = model.generate(inputs, max_new_tokens=1).sequences[:, 0]
    out = model.generate(inputs, max_new_tokens=NEW_TOKENS, stop_token_ids=first.tolist())
    assert out.sequences.shape == (3, 1) and out.finished.all() and out.lengths.tolist() == [1, 1, 1]
    torch.testing.assert_close(out.sequences[:, 0], first)


def test_prompt_plus_new_tokens_must_fit_max_seq_len(monkeypatch):
    prompt_model = _model("tiny-h")
    inputs = _batch(prompt_model)
    width = int(inputs.attention_mask.sum(1).max())
    model = build_model(prompt_model.config.replace(max_seq_len=width + 3)).eval()
    assert model.generate(inputs, max_new_tokens=3).sequences.shape == (3, 3)  # exactly at the limit

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the length check")

    monkeypatch.setattr(model, "encode_images", no_kernel)
    monkeypatch.setattr(model.llm, "forward", no_kernel)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(inputs, max_new_tokens=4)


# --------------------------------------------------------------------------------------------------
# host syncs: none per decoding step, one per prefill


def _prefilled(model, extra: int = 2):
    """A left-padded batch of 3 prompts after the prefill: (next tokens [3, 1], cache, cross cache,
    the decoding mask for the next step)."""
    from nvlm.model import CrossAttentionCache

    prompts = left_padded(_batch(model))
    width = prompts.input_ids.shape[1]
    cache = model.llm.new_cache(3, width + extra)
    cross_cache = CrossAttentionCache()
    with torch.no_grad():
        hidden = model.hidden_states(prompts, cache=cache, cross_cache=cross_cache)
    token = model.llm.logits(hidden[:, -1:]).argmax(-1)
    mask = torch.cat([prompts.attention_mask, torch.ones((3, 1), dtype=torch.bool)], 1)
    return token, cache, cross_cache, mask


@pytest.mark.parametrize("preset", ["tiny-x", "tiny-h"])
@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_decode_step_makes_no_host_sync(preset, backend):
    """A decoding step of batch 3 (left padding, per-row cross-attention ranges kept in the cache as
    [B, 1] views) brings nothing from the device to the host: no int(), bool() or .item() of a
    tensor, no nonzero, inside our ops included (nvlm_kernels.testing.HostSyncCounter). On a GPU
    each would stall the CPU once per layer per token and break CUDA-graph capture."""
    if backend != "auto":
        require_backend("gated_cross_attention", backend, "cpu")
    dtype = torch.float16 if backend == "triton" else torch.float32  # the kernels take fp16 / bf16
    model = _model(preset).to(dtype)
    ops = None if backend == "auto" else "gated_cross_attention"
    with nk.use_backend(backend, ops=ops):
        token, cache, cross_cache, mask = _prefilled(model)
        assert cross_cache.kv, "the prefill kept no cross-attention keys: nothing would be tested"
        with torch.no_grad(), HostSyncCounter() as syncs:
            model.decode_step(token, cache, cross_cache, mask)
    assert syncs.calls == [], f"decode_step synced with the device: {syncs.calls}"


def test_host_sync_counter_sees_inside_our_ops(monkeypatch):
    """The counter is only worth its zero if it would see a sync inside an op's implementation."""
    from nvlm_kernels.cross_attention import reference

    q = torch.randn(2, 1, 2, 8)
    k = v = torch.randn(2, 4, 2, 8)
    start = torch.zeros((2, 1), dtype=torch.int32)
    end = torch.full((2, 1), 4, dtype=torch.int32)
    counts = []
    for inject in (False, True):
        if inject:
            real = reference.attention_fwd
            monkeypatch.setattr(reference, "attention_fwd", lambda q, *a, f=real: (int(q.abs().sum() > 0), f(q, *a))[1])
        with nk.use_backend("reference"), HostSyncCounter() as syncs:
            nk.gated_cross_attention(q, k, v, start, end)
        counts.append(len(syncs.calls))
    assert counts[1] == counts[0] + 1


@pytest.mark.parametrize("preset", ["tiny-d", "tiny-x", "tiny-h"])
def test_forward_brings_device_values_to_the_host_once(preset, monkeypatch):
    """check_inputs merges its checks into one transfer, and the rest of the forward reuses it."""

    model = _model(preset)
    inputs = _batch(model)
    with torch.no_grad(), HostSyncCounter() as syncs:
        model(inputs)
    assert syncs.calls == ["Tensor.tolist"]
