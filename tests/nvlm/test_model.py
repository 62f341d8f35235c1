"""The assembled NVLM-D / X / H models: published sizes, the three data flows, backends, training
stages and bad input. Tiny presets (seconds on a CPU); the 72B presets only on the meta device."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import nvlm_kernels as nk
from nvlm import NVLMConfig, build_model, parameter_counts
from nvlm.processor import NVLMProcessor
from nvlm.tokenizer import ByteTokenizer
from nvlm.training import freeze_for_stage

VARIANTS = ["tiny-d", "tiny-x", "tiny-h"]


def _image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _model(preset: str, dtype=torch.float32, gates: bool = True):
    torch.manual_seed(0)
    model = build_model(preset, dtype=dtype).eval()
    if gates:  # the gates start at 0 (identity blocks): open them so the cross-attention path shows
        with torch.no_grad():
            for block in model.xattn.values():
                for name, param in block.named_parameters():
                    if name.endswith("gate"):
                        param.fill_(0.8)
    return model


def _inputs(model, *, labels=False, images=None, text="Describe <image> briefly."):
    proc = NVLMProcessor(ByteTokenizer(), model.config)
    images = images if images is not None else [_image(120, 60, 1)]
    conv = [{"role": "user", "content": text}]
    if labels:
        conv.append({"role": "assistant", "content": "A picture."})
    return proc(conv, images, add_generation_prompt=not labels, return_labels=labels)


# --------------------------------------------------------------------------------------------------
# sizes


def test_72b_parameter_counts_match_the_published_sizes(capsys):
    d = parameter_counts("nvlm-d-72b")
    assert abs(d["vision"] - 5.54e9) / 5.54e9 < 0.02  # InternViT-6B-448px-V1-5 (25 real heads)
    assert abs(d["llm"] - 72.71e9) / 72.71e9 < 0.01  # Qwen2-72B-Instruct
    # mlp1: LayerNorm(12800) + 12800x29568 + 29568x8192 (spec §5.1: about 620.7M)
    assert d["projector"] == 2 * 12800 + 12800 * 29568 + 29568 * 8192
    assert d["xattn"] == 0 and d["total"] == d["vision"] + d["projector"] + d["llm"]
    x, h = parameter_counts("nvlm-x-72b"), parameter_counts("nvlm-h-72b")
    assert x["projector"] == 12800 * 8192  # one Linear, no bias
    assert x["xattn"] == h["xattn"] > 0 and h["projector"] == d["projector"]
    build_model("nvlm-h-72b", device="meta")
    printed = capsys.readouterr().out
    assert "nvlm-h-72b" in printed and "vision" in printed and "xattn" in printed


def test_cross_attention_blocks_sit_every_k_layers():
    for name, every in (("nvlm-x-72b", 8), ("nvlm-x-34b", 6)):
        cfg = NVLMConfig.from_preset(name)
        assert cfg.xattn.layer_indices(cfg.llm.num_layers) == tuple(range(0, cfg.llm.num_layers, every))
        assert len(cfg.xattn.layer_indices(cfg.llm.num_layers)) == 10  # paper §3.2


# --------------------------------------------------------------------------------------------------
# data flows


def test_nvlm_d_splices_the_image_embeddings_at_the_placeholders():
    model = _model("tiny-d")
    inputs = _inputs(model)
    with torch.no_grad():
        out = model(inputs)
        # the same flow written out: embeddings, then each placeholder row replaced in order
        feats = model.encode_images(inputs.pixel_values).reshape(-1, model.config.llm.hidden_size)
        embeds = model.llm.embed(inputs.input_ids).clone()
        rows = inputs.image_token_mask[0].nonzero().flatten()
        assert len(rows) == feats.shape[0]
        embeds[0, rows] = feats
        positions = torch.arange(inputs.input_ids.shape[1])[None]
        expected = model.llm.logits(model.llm(embeds, positions, attention_mask=inputs.attention_mask))
    torch.testing.assert_close(out.logits, expected)


@pytest.mark.parametrize("preset", ["tiny-x", "tiny-h"])
def test_text_before_the_image_never_sees_it(preset):
    model = _model(preset)
    a = _inputs(model, images=[_image(120, 60, 1)])
    b = _inputs(model, images=[_image(120, 60, 2)])
    with torch.no_grad():
        la, lb = model(a).logits, model(b).logits
    first = int(a.image_positions[0, 0])
    torch.testing.assert_close(la[:, :first], lb[:, :first], rtol=0, atol=0)
    assert not torch.allclose(la[:, -1], lb[:, -1])  # the answer position does see the image


def test_nvlm_x_tag_rows_see_only_their_tile():
    model = _model("tiny-x")
    inputs = _inputs(model, images=[_image(120, 60, 1)])
    cross = model.cross_attention_inputs(inputs, model.encode_images(inputs.pixel_values))
    tag_rows = (inputs.tag_tiles[0] >= 0).nonzero().flatten()
    per_tile = model.config.tokens_per_tile
    for row in tag_rows.tolist():
        tile = int(inputs.tag_tiles[0, row])
        assert (int(cross.kv_start[0, row]), int(cross.kv_end[0, row])) == (tile * per_tile, (tile + 1) * per_tile)


def test_nvlm_h_keys_are_tags_then_regular_tiles():
    model = _model("tiny-h")
    inputs = _inputs(model, images=[_image(120, 60, 1)])
    total = int(inputs.tiles_per_image[0, 0])
    assert total > 1
    with torch.no_grad():
        feats = model.encode_images(inputs.pixel_values)
        cross = model.cross_attention_inputs(inputs, feats)
        tag_len = inputs.tag_tokens_per_tile
        tags = model.llm.embed(inputs.xattn_tag_ids)
    step = tag_len + model.config.tokens_per_tile
    assert cross.image_embeds.shape[1] == (total - 1) * step
    for k in range(total - 1):  # [tag_k ; tile_k] for each regular tile; the thumbnail is not a key
        torch.testing.assert_close(cross.image_embeds[0, k * step : k * step + tag_len], tags[k])
        torch.testing.assert_close(cross.image_embeds[0, k * step + tag_len : (k + 1) * step], feats[k])


@pytest.mark.parametrize("preset", VARIANTS)
def test_batch_rows_match_single_rows(preset):
    """Right padding, rows with 0, 1 and 2 images: each batch row's logits equal the row run alone."""
    model = _model(preset)
    proc = NVLMProcessor(ByteTokenizer(), model.config)
    convs = [
        [{"role": "user", "content": "No image here, just a longer text question?"}],
        [{"role": "user", "content": "<image> What?"}],
        [{"role": "user", "content": "<image> and <image>: compare."}],
    ]
    images = [[], [_image(120, 60, 1)], [_image(60, 60, 2), _image(50, 140, 3)]]
    batch = proc(convs, images)
    with torch.no_grad():
        logits = model(batch).logits
        for i in range(3):
            alone = proc(convs[i], images[i])
            expected = model(alone).logits[0]
            n = expected.shape[0]
            torch.testing.assert_close(logits[i, :n], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", VARIANTS)
def test_reference_and_kernels_agree(preset):
    """fp16 through the Triton kernels (the interpreter on CPU) against the same model on the
    reference backend: design.md's fp16 tolerance relative to the logits' scale."""
    reason = nk.available_backends("vit_attention", "cpu")["triton"]
    if reason:
        pytest.skip(reason)
    model = _model(preset, dtype=torch.float16)
    inputs = _inputs(model)
    inputs.pixel_values = inputs.pixel_values.half()
    with torch.no_grad():
        with nk.use_backend("reference"):
            ref = model(inputs).logits.float()
        with nk.use_backend("triton"):
            got = model(inputs).logits.float()
    scale = ref.abs().max()
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-2 * float(scale))


# --------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
@pytest.mark.parametrize("preset", VARIANTS)
def test_training_steps_lower_the_loss_and_touch_only_the_stage(preset, stage):
    model = _model(preset, gates=False).train()
    trainable = freeze_for_stage(model, stage)
    parts = {name.split(".", 1)[0] for name in trainable}
    assert "vision" not in parts
    assert (
        parts
        == {
            ("tiny-d", "pretrain"): {"projector"},
            ("tiny-x", "pretrain"): {"xattn"},
            ("tiny-h", "pretrain"): {"xattn", "projector"},
            ("tiny-d", "sft"): {"projector", "llm"},
            ("tiny-x", "sft"): {"xattn", "llm"},
            ("tiny-h", "sft"): {"xattn", "projector", "llm"},
        }[(preset, stage)]
    )
    inputs = _inputs(model, labels=True)
    assert (inputs.labels != -100).sum() > 0
    assert (inputs.labels[inputs.image_token_mask] == -100).all()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        if name.split(".", 1)[0] not in parts:
            assert not changed, f"{name} is frozen in {stage} but changed"
    assert any(not torch.equal(before[n], after[n]) for n in trainable)


# --------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_is_rejected_before_any_kernel():
    model = _model("tiny-d")
    inputs = _inputs(model)
    too_many = copy.copy(inputs)
    too_many.tiles_per_image = inputs.tiles_per_image.clone()
    too_many.tiles_per_image[0, 0] = model.config.max_tiles_per_image + 1
    with pytest.raises(ValueError, match="tiles_per_image"):
        model(too_many)
    missing = copy.copy(inputs)
    missing.pixel_values = inputs.pixel_values[:-1]
    with pytest.raises(ValueError, match="pixel_values"):
        model(missing)
    long = copy.copy(inputs)
    long.input_ids = inputs.input_ids.new_zeros((1, model.config.max_seq_len + 1))
    long.attention_mask = torch.ones_like(long.input_ids, dtype=torch.bool)
    with pytest.raises(ValueError, match="maximum"):
        model(long)
    proc = NVLMProcessor(ByteTokenizer(), model.config)
    with pytest.raises(ValueError, match="image"):
        proc([{"role": "user", "content": "<image> <image>"}], [_image(60, 60, 1)])


@pytest.mark.parametrize("preset", ["tiny-x", "tiny-h"])
def test_bad_cross_attention_layout_is_rejected_by_the_one_input_check(preset):
    """The ranges are built without a check of their own (no host sync): the model's input check
    carries the layout rules the range builder would have checked."""
    model = _model(preset)
    inputs = _inputs(model)
    late = copy.copy(inputs)
    late.image_positions = torch.full_like(inputs.image_positions, inputs.input_ids.shape[1])
    with pytest.raises(ValueError, match="image_positions must lie in"):
        model(late)
    if preset == "tiny-x":
        beyond = copy.copy(inputs)
        beyond.tag_tiles = inputs.tag_tiles.clone()
        beyond.tag_tiles[0, 0] = int(inputs.tiles_per_image.sum())
        with pytest.raises(ValueError, match="tag_tiles names a tile beyond"):
            model(beyond)
