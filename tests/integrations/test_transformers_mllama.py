"""Hugging Face Mllama (Llama-3.2-Vision) patched with ``apply_nvlm_kernels_to_mllama``, against the
unpatched model itself: a tiny random ``MllamaConfig`` of transformers' own classes (vision: 2 + 1
layers, 16 px tiles of 8 px patches, so 1601 tokens per tile become 5 and 1608 become 8, up to 3
tiles; text: 4 layers with cross-attention at 1 and 3, GQA 2/1, head_dim 64), inputs made with the
processor's own mask functions: several images per sample, different tile counts (padding tiles,
a padding image), adjacent images (a group), text before the first image and left padding.

FlashAttention's rule (``out`` = patched, ``ref_lo`` = unpatched in the test dtype, ``ref_hi`` =
unpatched in float64) for logits, loss and every parameter's gradient, on the reference backend
(fp32), on auto (the peers) and on our Triton kernels through the interpreter (fp16); 20 AdamW steps;
generate(); Meta's masking (strict) against Hugging Face's model with the fix of #39379 applied;
class- and instance-level patching, revert, idempotence, bad input; Liger-Kernel alongside.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the transformers integration needs Hugging Face transformers"
)

import nvlm_kernels as nk  # noqa: E402
from nvlm_kernels.integrations.transformers import (  # noqa: E402
    _mllama,
    _patching,
    apply_nvlm_kernels,
    apply_nvlm_kernels_to_mllama,
    nvlm_kernels_patched,
    revert_nvlm_kernels,
)
from nvlm_kernels.testing import HostSyncCounter, OpCalls, assert_close_flash, flash_error_bound  # noqa: E402

CROSS, VIT = "gated_cross_attention", "vit_attention"
IMG = 96  # the image token: vocab_size (the embedding has 8 rows more)
MAX_TILES = 3
RATIOS = [[1, 1], [1, 2], [1, 3], [2, 1], [3, 1]]
CROSS_LAYERS = [1, 3]
VISION_LAYERS = 2 + 1  # transformer + global_transformer
IM = -1  # an <|image|> token in the samples below

# (tokens, tiles of each image): text before the first image, a group of adjacent images with a
# padding tile between their real ones, 3 images vs 2 (a padding image), left padding (sample 2)
SAMPLES = [([5, 6, IM, 7, 8, IM, IM, 9, 10, 11], [2, 1, 3]), ([IM, 12, 13, 14, IM, 15], [1, 2])]
# every sample starts with its image: no text row without an image (Hugging Face is right there)
IMAGE_FIRST = [([IM, 5, 6, 7, IM, IM, 8, 9], [3, 1, 2]), ([IM, 10, 11, 12, 13, 14, 15, 16], [2])]


def _config(**text):
    from transformers import MllamaConfig

    vision = dict(
        hidden_size=64, attention_heads=1, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
        image_size=16, patch_size=8, max_num_tiles=MAX_TILES, intermediate_layers_indices=[0],
        vision_output_dim=128, supported_aspect_ratios=RATIOS, initializer_range=0.1,
    )  # fmt: skip
    text = dict(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128, num_hidden_layers=4,
        cross_attention_layers=CROSS_LAYERS, vocab_size=IMG, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.1, **text,
    )  # fmt: skip
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMG)


def _model(seed: int = 0, **text):
    """An unpatched model; its tanh gates (zero at init, which would hide every cross-attention and
    tile embedding) drawn in [0.3, 1)."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(_config(**text))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate"):
                p.uniform_(0.3, 1.0)
    return model.eval()


def _inputs(samples, seed: int = 0, labels: bool = True) -> dict:
    """The processor's outputs for token lists (left padded) and tile counts: its own
    cross-attention mask functions, its aspect-ratio ids and mask rules (tile 0 always real)."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    gen = torch.Generator().manual_seed(seed)
    batch, length = len(samples), max(len(t) for t, _ in samples)
    images = max(len(n) for _, n in samples)
    ids = torch.zeros(batch, length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    pixels = torch.zeros(batch, images, MAX_TILES, 3, 16, 16)
    ratio_ids = torch.zeros(batch, images, dtype=torch.long)
    ratio_mask = torch.zeros(batch, images, MAX_TILES, dtype=torch.long)
    ratio_mask[:, :, 0] = 1
    for b, (tokens, tiles) in enumerate(samples):
        ids[b, length - len(tokens) :] = torch.tensor([IMG if t == IM else t for t in tokens])
        attention[b, length - len(tokens) :] = 1
        for i, n in enumerate(tiles):
            pixels[b, i, :n] = torch.randn(n, 3, 16, 16, generator=gen)
            ratio_ids[b, i] = RATIOS.index([1, n]) + 1
            ratio_mask[b, i, :n] = 1
    spans = [get_cross_attention_token_mask(row.tolist(), IMG) for row in ids]
    mask = convert_sparse_cross_attention_mask_to_dense(spans, [n for _, n in samples], MAX_TILES, length)
    x = dict(
        input_ids=ids, attention_mask=attention, pixel_values=pixels, aspect_ratio_ids=ratio_ids,
        aspect_ratio_mask=ratio_mask, cross_attention_mask=torch.from_numpy(mask),
    )  # fmt: skip
    if labels:
        x["labels"] = ids.masked_fill((attention == 0) | (ids == IMG), -100)
    return x


def _has_image(x: dict) -> torch.Tensor:
    """[B, S]: the text rows that see some tile (the others: text before the first image, padding)."""
    return (x["cross_attention_mask"] == 1).flatten(2).any(-1)


def _run(model, x: dict, grads: bool = True):
    """(logits, loss or None, {name: gradient of the loss} or {}) in the model's dtype."""
    model.zero_grad(set_to_none=True)
    cast = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in x.items()}
    with torch.set_grad_enabled(grads):
        out = model(**cast)
    loss = None if out.loss is None else out.loss.detach()
    if not grads:
        return out.logits.detach(), loss, {}
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _copy(model, dtype: torch.dtype, patch: bool = False, **options):
    """A copy of ``model`` in ``dtype``, patched (this instance) with ``options`` if ``patch``."""
    twin = copy.deepcopy(model).to(dtype)
    if patch:
        apply_nvlm_kernels_to_mllama(twin, **options)
    return twin


def _assert_matches(out, lo, hi, *, relative_grads: bool = False) -> None:
    """FlashAttention's rule for logits and loss, and for every parameter's gradient. In float16
    (``relative_grads``) a gradient's bound is twice the worst relative error the unpatched fp16
    model makes on any parameter: a scalar gate's gradient sums every token's rounded product, and
    its ref_lo error is one random draw (our fp32-internal reference backend misses twice HF's
    error on such a gate by 4x in fp16), while a masking or layout bug is an O(1) relative error."""
    assert_close_flash(out[0], lo[0], hi[0], name="logits")
    assert_close_flash(out[1], lo[1], hi[1], name="loss")
    assert out[2].keys() == hi[2].keys() == lo[2].keys()
    if not hi[2]:
        return
    if not relative_grads:
        for name in hi[2]:
            assert_close_flash(out[2][name], lo[2][name], hi[2][name], name=f"grad of {name}")
        return

    def relative(a, h):
        return (a.double() - h).abs().max().item() / h.abs().max().item()

    worst_lo = max(relative(lo[2][n], hi[2][n]) for n in hi[2])
    for name in hi[2]:
        floor = flash_error_bound(hi[2][name], hi[2][name], out_dtype=out[2][name].dtype)  # rounding to fp16
        err = (out[2][name].double() - hi[2][name]).abs().max().item()
        assert err <= 2 * worst_lo * hi[2][name].abs().max().item() + floor, f"grad of {name}: {err:.3e}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny GEMMs: one intra-op thread (on a loaded 2-core machine, OpenMP threads waiting on each
    other made a training step 100x slower); restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    return _model()


@pytest.fixture(scope="module")
def references(base):
    """The unpatched model's (logits, loss, grads) on SAMPLES, per dtype (computed once)."""
    cache = {}

    def get(dtype):
        if dtype not in cache:
            cache[dtype] = _run(_copy(base, dtype), _inputs(SAMPLES))
        return cache[dtype]

    return get


# --------------------------------------------------------------------------------------------------
# parity with Hugging Face


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("reference", torch.float32), ("auto", torch.float32), ("triton", torch.float16)],
    ids=["reference-fp32", "auto-fp32", "triton-fp16"],
)
def test_patched_model_matches_hugging_face(base, references, backend, dtype):
    """Logits, loss and every gradient as Hugging Face's (parity masking: the text before the first
    image attends to every key as in HF); every attention ran on our op: one call per
    cross-attention layer and per vision layer, forward and backward."""
    ours = _copy(base, dtype, patch=True)
    with nk.use_backend(backend), OpCalls() as calls:
        out = _run(ours, _inputs(SAMPLES))
    layers = len(CROSS_LAYERS) + VISION_LAYERS
    assert calls.count(CROSS) == layers
    assert calls.count(CROSS, "bwd") == (0 if backend == "auto" else layers)  # a peer's backward is autograd's
    _assert_matches(out, references(dtype), references(torch.float64), relative_grads=dtype == torch.float16)


@pytest.mark.parametrize(
    ("samples", "strict", "tiles"),
    [(IMAGE_FIRST, False, 6), (SAMPLES, True, 6), (SAMPLES, False, 3 * MAX_TILES)],
    ids=["image-first", "strict", "parity-text-before-image"],
)
def test_no_dense_mask_and_no_padding_tiles_in_the_keys(base, monkeypatch, samples, strict, tiles):
    """Hugging Face's mask builder is never called; the cross-attention keys hold only the tiles some
    row sees (IMAGE_FIRST: sample 0 sees 3 + 1 + 2 tiles, sample 1 sees 2: 6 tiles of 5 tokens, not
    3 images x 3 tiles; SAMPLES, strict: 6 and 3), except in parity mode with text before an image,
    where such rows attend to every key, padding tiles included, as in Hugging Face's model."""
    from transformers.models.mllama import modeling_mllama

    def forbidden(*args, **kwargs):
        raise AssertionError("the dense cross-attention mask was built")

    monkeypatch.setattr(modeling_mllama, "_prepare_cross_attention_mask", forbidden)
    seen_keys = []
    ours = _copy(base, torch.float32, patch=True, strict_image_masking=strict)
    for layer in CROSS_LAYERS:
        ours.model.language_model.layers[layer].cross_attn.k_proj.register_forward_hook(
            lambda mod, args, out: seen_keys.append(args[0].shape[1])
        )
    with torch.no_grad():
        ours(**_inputs(samples, labels=False))
    assert seen_keys == [tiles * 5] * len(CROSS_LAYERS)


def test_strict_masking_is_meta_semantics(base):
    """strict_image_masking=True equals Hugging Face's model with the fix proposed for #39379 (a
    hook zeroing the cross-attention output of rows that see no tile, as Meta's reference does),
    under FlashAttention's rule; those rows' cross-attention output is exactly 0, so their logits
    are exactly the text-only model's; Hugging Face (and parity) leak the image into them."""
    x = _inputs(SAMPLES, labels=False)
    has = _has_image(x)
    assert not bool(has.all())

    def fixed(model):
        for layer in CROSS_LAYERS:
            attn = model.model.language_model.layers[layer].cross_attn
            attn.register_forward_hook(lambda mod, args, out: (out[0] * has[..., None].to(out[0].dtype), out[1]))
        return model

    ours = _copy(base, torch.float32, patch=True, strict_image_masking=True)
    captured = []
    for layer in CROSS_LAYERS:
        ours.model.language_model.layers[layer].cross_attn.register_forward_hook(
            lambda mod, args, out: captured.append(out[0])
        )
    out = _run(ours, x, grads=False)
    lo = _run(fixed(_copy(base, torch.float32)), x, grads=False)
    hi = _run(fixed(_copy(base, torch.float64)), x, grads=False)
    assert_close_flash(out[0], lo[0], hi[0], name="strict logits")
    assert all(torch.equal(c[~has], torch.zeros_like(c[~has])) for c in captured) and len(captured) == 2

    text_only = {k: x[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        alone = ours(**text_only).logits
        hf = _copy(base, torch.float32)(**x).logits
    assert torch.equal(out[0][~has], alone[~has])
    assert (hf[~has] - alone[~has]).abs().max() > 1e-2  # the leak strict removes
    parity = _run(_copy(base, torch.float32, patch=True), x, grads=False)[0]
    torch.testing.assert_close(parity, hf)


def test_image_first_batch_is_the_same_in_both_modes(base):
    """Where Hugging Face is right (every row after an image, no left padding), strict, parity and
    Hugging Face agree (logits and loss)."""
    x = _inputs(IMAGE_FIRST)
    assert bool(_has_image(x).all())
    lo, hi = _run(_copy(base, torch.float32), x, grads=False), _run(_copy(base, torch.float64), x, grads=False)
    for strict in (False, True):
        out = _run(_copy(base, torch.float32, patch=True, strict_image_masking=strict), x, grads=False)
        _assert_matches(out, lo, hi)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_cross_attention_without_a_mask_runs_hugging_face(base, impl):
    """No cross_attention_mask: what Hugging Face computes depends on its attention implementation
    (SDPA treats the unmasked cross-attention as causal over the keys, eager attends every key), so
    the patched model runs Hugging Face's code there (exactly its output)."""
    x = _inputs(IMAGE_FIRST, labels=False)
    x.pop("cross_attention_mask")
    ours, ref = _copy(base, torch.float32, patch=True), _copy(base, torch.float32, patch=True, cross_attention=False)
    for model in (ours, ref):
        model.set_attn_implementation(impl)
    with torch.no_grad(), OpCalls() as calls:
        out = ours(**x).logits
    assert calls.count(CROSS) == VISION_LAYERS
    with torch.no_grad():
        assert torch.equal(out, ref(**x).logits)


# --------------------------------------------------------------------------------------------------
# training and decoding


def test_adamw_steps_converge_like_hugging_face(base):
    """20 AdamW steps (lr 1e-4, gradient checkpointing on, two alternating batches): the same loss
    curve, final logits and parameters within Liger-Kernel's fp32 convergence tolerances (loss
    atol 1e-8 / rtol 1e-5, logits and parameters atol 5e-3 / rtol 1e-5: mini_mllama in
    linkedin/Liger-Kernel test/convergence/fp32/test_mini_models_multimodal.py)."""
    batches = [_inputs(SAMPLES), _inputs(IMAGE_FIRST, seed=1)]
    results = []
    for patch in (False, True):
        model = _copy(base, torch.float32, patch=patch).train()
        model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        losses = []
        for step in range(20):
            optimizer.zero_grad()
            out = model(**batches[step % 2])
            out.loss.backward()
            optimizer.step()
            losses.append(out.loss.item())
        results.append((torch.tensor(losses), out.logits.detach(), dict(model.named_parameters())))
    (ref_losses, ref_logits, ref_params), (losses, logits, params) = results
    assert not torch.allclose(ref_losses[:2], ref_losses[-2:])  # it trained
    torch.testing.assert_close(losses, ref_losses, atol=1e-8, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=5e-3, rtol=1e-5)
    for name, p in ref_params.items():
        torch.testing.assert_close(params[name].detach(), p.detach(), atol=5e-3, rtol=1e-5, msg=name)


@pytest.mark.parametrize("strict", [False, True], ids=["parity", "strict"])
def test_generate_gives_the_same_tokens(base, strict):
    """Greedy generate(): the same tokens as Hugging Face (parity), or as Hugging Face with the fix of
    #39379 (strict); decoding steps read the cached compacted keys through the ranges of the
    generated rows (the processor's rule: each new row copies the last one)."""
    x = _inputs(SAMPLES, labels=False)
    ref = _copy(base, torch.float32)
    if strict:
        for layer in CROSS_LAYERS:  # the fix: rows without tiles get no cross-attention (prefill only has such rows)
            attn = ref.model.language_model.layers[layer].cross_attn
            attn.register_forward_hook(
                lambda mod, args, out: (out[0] * _prefill_rows(out[0], x)[..., None].to(out[0].dtype), out[1])
            )
    expected = ref.generate(**x, max_new_tokens=5, do_sample=False)
    ours = _copy(base, torch.float32, patch=True, strict_image_masking=strict)
    with OpCalls() as calls:
        got = ours.generate(**x, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)
    assert calls.count(CROSS) == len(CROSS_LAYERS) + VISION_LAYERS  # the prefill
    assert calls.count(CROSS, "decode") == len(CROSS_LAYERS) * 4  # four decoding steps


@pytest.mark.parametrize("strict", [False, True], ids=["parity", "strict"])
def test_chunked_prefill_reads_the_mask_rows_of_its_tokens(base, strict):
    """A prompt in two calls (the second reads the cached image keys): each call's rows take their
    own rows of the whole mask (row 4 sees image 0, rows 5.. the group of images 1 and 2), so the
    second call's logits are the one-call forward's."""
    x = _inputs(SAMPLES, labels=False)
    ours = _copy(base, torch.float32, patch=True, strict_image_masking=strict)
    split = 4
    first = {k: v for k, v in x.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        whole = ours(**x).logits
        cache = ours(input_ids=x["input_ids"][:, :split], attention_mask=x["attention_mask"][:, :split], **first)
        with OpCalls() as calls:
            rest = ours(
                input_ids=x["input_ids"][:, split:], attention_mask=x["attention_mask"],
                cross_attention_mask=x["cross_attention_mask"], past_key_values=cache.past_key_values,
            ).logits  # fmt: skip
    assert calls.count(CROSS) == len(CROSS_LAYERS)
    torch.testing.assert_close(cache.logits, whole[:, :split])
    torch.testing.assert_close(rest, whole[:, split:])


def test_host_transfers_per_call(base):
    """The patch adds one device->host transfer to a prefill forward for the text layout and one
    for the vision plan (shared by every layer), and one to a decoding step (the layout of the new
    row): no per-layer range checks (the ranges are made trusted)."""
    x = _inputs(SAMPLES, labels=False)
    counts = []
    for patch in (False, True):
        model = _copy(base, torch.float32, patch=patch)
        with torch.no_grad(), HostSyncCounter() as prefill:
            out = model(**x, use_cache=True)
        step = dict(
            input_ids=out.logits[:, -1:].argmax(-1),
            attention_mask=torch.cat([x["attention_mask"], torch.ones_like(x["attention_mask"][:, :1])], 1),
            cross_attention_mask=torch.cat([x["cross_attention_mask"], x["cross_attention_mask"][:, -1:]], 1),
            past_key_values=out.past_key_values,
        )
        with torch.no_grad(), HostSyncCounter() as decode:
            model(**step)
        counts.append((len(prefill.calls), len(decode.calls)))
    (hf_prefill, hf_decode), (prefill, decode) = counts
    assert (prefill, decode) == (hf_prefill + 2, hf_decode + 1)


def _prefill_rows(out: torch.Tensor, x: dict) -> torch.Tensor:
    """has-image rows for a cross-attention output of the prefill (all rows) or of a decoding step
    (one generated row: it copies the last prompt row, which sees an image here)."""
    has = _has_image(x)
    return has if out.shape[1] == has.shape[1] else has[:, -1:].expand(-1, out.shape[1])


# --------------------------------------------------------------------------------------------------
# which calls run our ops


def test_vision_attention_without_padding_runs_vit_attention(base):
    """A vision attention call whose mask masks nothing is plain attention: vit_attention. Hugging
    Face's encoder always has padding patches (5 -> 8 here, 1601 -> 1608 in the checkpoints), which
    the ranged form takes; a call without a mask runs Hugging Face's code (SDPA makes it causal)."""
    from transformers.models.mllama.modeling_mllama import MllamaVisionAttention

    attn = base.model.vision_model.transformer.layers[0].self_attn
    h = torch.randn(2, 24, 64)
    for mask, ours in ((torch.zeros(2, 1, 24, 24), 1), (None, 0)):
        with torch.no_grad():
            expected = MllamaVisionAttention.forward(attn, h, attention_mask=mask)[0]
            with nvlm_kernels_patched(base), OpCalls() as calls:
                got = attn(h, attention_mask=mask)[0]
        assert calls.count(VIT) == ours and calls.count(CROSS) == 0
        torch.testing.assert_close(got, expected)
    assert "forward" not in attn.__dict__


def test_output_attentions_gets_hugging_face_weights(base):
    """Asking for attention weights (eager attention) in parity mode runs Hugging Face's text side,
    so the cross-attention layers' weights are there, exactly; strict mode warns they are not."""
    x = _inputs(SAMPLES, labels=False)
    ref = _copy(base, torch.float32, patch=True, cross_attention=False)  # the same vision side
    ours = _copy(base, torch.float32, patch=True)
    for model in (ref, ours):
        model.set_attn_implementation("eager")
    with torch.no_grad(), OpCalls() as calls:
        got = ours(**x, output_attentions=True).attentions
    with torch.no_grad():
        expected = ref(**x, output_attentions=True).attentions
    assert calls.count(CROSS) == VISION_LAYERS and len(got) == len(expected) == 4
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    strict = _copy(base, torch.float32, patch=True, strict_image_masking=True)
    with torch.no_grad(), pytest.warns(UserWarning, match="weights are not returned"):
        strict(**x, output_attentions=True)


def test_options_turn_parts_off(base):
    x = _inputs(SAMPLES, labels=False)
    for options, cross, vision in [
        (dict(vision_attention=False), len(CROSS_LAYERS), 0),
        (dict(cross_attention=False), 0, VISION_LAYERS),
    ]:
        model = _copy(base, torch.float32, patch=True, **options)
        with torch.no_grad(), OpCalls() as calls:
            model(**x)
        assert calls.count(CROSS) == cross + vision, options


def test_a_mask_that_is_not_one_range_per_row_runs_hugging_face(base):
    """A row that sees images 0 and 2 but not image 1 (which another row sees): not one range even
    after compaction; Hugging Face's code runs (exactly its output), with a warning."""
    x = _inputs(SAMPLES, labels=False)
    x["cross_attention_mask"][0, -1] = 0
    x["cross_attention_mask"][0, -1, 0, :2] = 1
    x["cross_attention_mask"][0, -1, 2, :3] = 1
    ours = _copy(base, torch.float32, patch=True)
    with torch.no_grad(), OpCalls() as calls, pytest.warns(UserWarning, match="not one key range per text row"):
        got = ours(**x).logits
    assert calls.count(CROSS) == VISION_LAYERS  # the text side ran Hugging Face's code
    with torch.no_grad():
        assert torch.equal(got, _copy(base, torch.float32, patch=True, cross_attention=False)(**x).logits)


def test_dropout_in_training_runs_hugging_face_attention():
    """Cross-attention dropout in training: our op has none, so Hugging Face's attention runs (on the
    ranges' mask); in eval our op runs."""
    model = _model(dropout=0.5)
    apply_nvlm_kernels_to_mllama(model, vision_attention=False)
    x = _inputs(IMAGE_FIRST, labels=False)
    with torch.no_grad(), OpCalls() as calls, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train()(**x)
    assert calls.count(CROSS) == 0 and any("dropout" in str(w.message) for w in caught)
    with torch.no_grad(), OpCalls() as calls:
        model.eval()(**x)
    assert calls.count(CROSS) == len(CROSS_LAYERS)


# --------------------------------------------------------------------------------------------------
# patching: class and instance level, revert, idempotence, bad input


def _patched_modules(model) -> list[str]:
    return [
        path for path, m in model.named_modules() if "forward" in m.__dict__ or _patching.PATCHED_ATTR in m.__dict__
    ]


def test_instance_patch_changes_only_that_model_and_reverts_exactly(base):
    x = _inputs(SAMPLES, labels=False)
    model, other = _copy(base, torch.float32), _copy(base, torch.float32)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(**x).logits
    report = apply_nvlm_kernels(model)  # the family dispatch
    assert len(report.replaced) == 2 + len(CROSS_LAYERS) + VISION_LAYERS and not report.unchanged
    assert "model.language_model.layers.1.cross_attn: forward -> nvlm_kernels.gated_cross_attention" in report.replaced
    with torch.no_grad(), OpCalls() as calls:
        model(**x)
        assert calls.count(CROSS) == len(CROSS_LAYERS) + VISION_LAYERS
        other(**x)  # another Mllama model in the process: untouched
        assert calls.count(CROSS) == len(CROSS_LAYERS) + VISION_LAYERS
    again = apply_nvlm_kernels_to_mllama(model)  # idempotent
    assert not again.replaced and len(again.unchanged) == len(report.replaced)
    assert all("already patched" in line for line in again.unchanged)
    with pytest.raises(ValueError, match="strict_image_masking=False"):
        apply_nvlm_kernels_to_mllama(model, strict_image_masking=True)
    restored = revert_nvlm_kernels(model)
    assert len(restored) == len(report.replaced) and _patched_modules(model) == []
    with torch.no_grad(), OpCalls() as calls:
        after = model(**x).logits
    assert calls.labels == [] and torch.equal(after, before)
    assert all(p is params[n] for n, p in model.named_parameters()) and list(model.state_dict()) == keys


def test_the_bare_mllama_model_is_patched_too(base):
    """MllamaModel (no LM head) on its own: the same replacements, the same hidden states."""
    x = _inputs(IMAGE_FIRST, labels=False)
    bare = _copy(base, torch.float32).model
    with torch.no_grad():
        expected = bare(**x).last_hidden_state
    report = apply_nvlm_kernels_to_mllama(bare)
    assert report.target.startswith("MllamaModel") and report.replaced[0].startswith("MllamaModel: forward")
    with torch.no_grad(), OpCalls() as calls:
        got = bare(**x).last_hidden_state
    assert calls.count(CROSS) == len(CROSS_LAYERS) + VISION_LAYERS
    torch.testing.assert_close(got, expected)


def test_class_level_patch_reaches_models_built_after_and_reverts(base):
    x = _inputs(SAMPLES, labels=False)
    with torch.no_grad():
        expected = _model(seed=3)(**x).logits
    try:
        report = apply_nvlm_kernels_to_mllama()
        assert len(report.replaced) == 4 and all("(class level)" in line for line in report.replaced)
        assert not apply_nvlm_kernels_to_mllama().replaced  # idempotent
        with pytest.raises(ValueError, match="class level"):
            apply_nvlm_kernels_to_mllama(strict_image_masking=True)
        model = _model(seed=3)  # built after the patch
        assert _patched_modules(model) == []  # class level: no instance attributes
        with torch.no_grad(), OpCalls() as calls:
            got = model(**x).logits
        assert calls.count(CROSS) == len(CROSS_LAYERS) + VISION_LAYERS
        torch.testing.assert_close(got, expected)
        apply_nvlm_kernels_to_mllama(model, strict_image_masking=True)  # an instance patch on top: it wins
        with torch.no_grad(), OpCalls() as calls:
            strict = model(**x).logits
        assert calls.count(CROSS) == len(CROSS_LAYERS) + VISION_LAYERS
        assert not torch.allclose(strict, expected)  # text before the image: strict differs from HF
        revert_nvlm_kernels(model)
    finally:
        restored = _patching.revert_classes(_mllama.classes())
    assert len(restored) == 4
    with torch.no_grad(), OpCalls() as calls:
        assert torch.equal(model(**x).logits, expected)
    assert calls.labels == []


def test_bad_input(base):
    from transformers import MllamaForCausalLM

    model = _copy(base, torch.float32)
    with pytest.raises(TypeError, match="projector.*Mllama"):
        apply_nvlm_kernels(model, projector=True)
    with pytest.raises(TypeError, match="MllamaForCausalLM is not an Mllama model"):
        apply_nvlm_kernels_to_mllama(MllamaForCausalLM(_config().text_config))
    with pytest.raises(TypeError, match="Linear is not an Mllama model"):
        apply_nvlm_kernels_to_mllama(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="cross_attention must be a bool"):
        _mllama.apply(model, cross_attention="yes")
    with pytest.raises(ValueError, match="needs cross_attention=True"):
        apply_nvlm_kernels_to_mllama(model, cross_attention=False, strict_image_masking=True)
    assert _patched_modules(model) == []
    apply_nvlm_kernels_to_mllama(model)
    x = _inputs(SAMPLES, labels=False)
    x["cross_attention_mask"] = x["cross_attention_mask"][:, :-1]  # shorter than the text
    with pytest.raises(ValueError, match="cross_attention_mask covers 9 text positions"), torch.no_grad():
        model(**x)


# --------------------------------------------------------------------------------------------------
# Liger-Kernel alongside


def _liger():
    pytest.importorskip("liger_kernel", reason="Liger-Kernel is not installed (pip install liger-kernel)")
    from liger_kernel.transformers import apply_liger_kernel_to_mllama
    from transformers.models.mllama import modeling_mllama

    saved = {name: getattr(modeling_mllama, name) for name in ("MllamaTextRMSNorm", "MllamaTextMLP")}
    return apply_liger_kernel_to_mllama, modeling_mllama, saved


@pytest.mark.parametrize("ours_first", [False, True], ids=["liger-then-ours", "ours-then-liger"])
def test_liger_and_ours_patch_the_same_model(base, ours_first):
    """Liger's Mllama patch (norms, SwiGLU, its fused-linear-cross-entropy forward on the top model)
    and ours (attention) on one instance, in either order: each keeps the other's replacements, and
    reverting ours leaves Liger's."""
    apply_liger, modeling_mllama, saved = _liger()
    from liger_kernel.transformers.layer_norm import LigerLayerNorm
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    model = _copy(base, torch.float32)
    try:
        steps = [
            lambda: apply_nvlm_kernels_to_mllama(model),
            lambda: apply_liger(rope=False, layer_norm=True, rms_norm=True, swiglu=True, model=model),
        ]
        for step in steps if ours_first else steps[::-1]:
            step()
        text = model.model.language_model

        def liger_kept():
            return (
                text.norm.forward.__func__ is LigerRMSNorm.forward
                and text.layers[1].mlp.forward.__func__ is LigerSwiGLUMLP.forward
                and model.model.vision_model.layernorm_pre.forward.__func__ is LigerLayerNorm.forward
                and "forward" in model.__dict__  # Liger's lce_forward on the top model
            )

        assert liger_kept()
        assert _patching.is_patched(text.layers[1].cross_attn, "forward") and _patching.is_patched(model.model)
        revert_nvlm_kernels(model)
        assert liger_kept() and not _patching.is_patched(text.layers[1].cross_attn)
    finally:
        for name, value in saved.items():  # Liger also swaps these module attributes
            setattr(modeling_mllama, name, value)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="Liger-Kernel's Triton kernels do not run on CPU tensors: under the Triton interpreter its "
    "RMSNorm / LayerNorm / SwiGLU kernels fail (scalar arguments arrive as Python floats: eps.to(...))",
)
def test_liger_and_ours_run_together_on_a_gpu(base):
    """On a GPU: Liger's norms/SwiGLU and our attention in one forward match the unpatched model."""
    apply_liger, modeling_mllama, saved = _liger()
    x = {k: v.cuda() for k, v in _inputs(SAMPLES, labels=False).items()}
    ref = _copy(base, torch.float32).cuda()
    model = _copy(base, torch.float32).cuda()
    try:
        apply_liger(rope=False, fused_linear_cross_entropy=False, model=model)
        apply_nvlm_kernels_to_mllama(model)
        with torch.no_grad(), OpCalls() as calls:
            got = model(**x).logits
        assert calls.count(CROSS) == len(CROSS_LAYERS) + VISION_LAYERS
        with torch.no_grad():
            torch.testing.assert_close(got, ref(**x).logits, atol=2e-3, rtol=2e-3)
    finally:
        for name, value in saved.items():
            setattr(modeling_mllama, name, value)
