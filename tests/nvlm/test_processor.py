"""nvlm.NVLMProcessor and nvlm.ByteTokenizer: ChatML prompts, the image segments of NVLM-D / X / H,
the position tensors the models read, labels, batching, errors, and a real Hugging Face tokenizer.

Tiny presets: 56-pixel tiles, 4 image tokens per tile, up to 4 regular tiles. A 100×60 image takes
the 2×1 grid (3 tiles with the thumbnail), a 30×90 image the 1×3 grid (4 tiles), 50×50 one tile.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import nvlm_kernels as nk
from nvlm.config import NVLMConfig
from nvlm.processor import IGNORE_INDEX, SFT_SYSTEM_PROMPT, NVLMInputs, NVLMProcessor
from nvlm.tokenizer import ByteTokenizer

PAD = "<|vision_pad|>"
P = 4  # image tokens per tile in the tiny presets
THUMB = "<tile_global_thumbnail>"


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy(), "RGB")


@pytest.fixture(scope="module")
def wide() -> Image.Image:
    return noise_image(100, 60, seed=0)  # 2x1 grid + thumbnail: 3 tiles


@pytest.fixture(scope="module")
def tall() -> Image.Image:
    return noise_image(30, 90, seed=1)  # 1x3 grid + thumbnail: 4 tiles


@pytest.fixture(scope="module")
def square() -> Image.Image:
    return noise_image(50, 50, seed=2)  # one tile, no thumbnail


def processor_for(variant: str, tokenizer=None, **kwargs) -> NVLMProcessor:
    config = NVLMConfig.from_preset(f"tiny-{variant.lower()}")
    return NVLMProcessor(tokenizer or ByteTokenizer(), config, **kwargs)


def reference_tiles(images: list) -> torch.Tensor:
    pixel_values, _ = nk.preprocess_images(images, min_tiles=1, max_tiles=4, tile_size=56, use_thumbnail=True)
    return pixel_values


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a 1-D mask."""
    spans, start = [], None
    for position, flag in enumerate([*mask.tolist(), False]):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            spans.append((start, position))
            start = None
    return spans


def tag_spans(tag_tiles: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, tile index) of each run of equal non-negative values in a 1-D ``tag_tiles``."""
    spans: list[tuple[int, int, int]] = []
    for position, tile in enumerate(tag_tiles.tolist()):
        if tile < 0:
            continue
        if spans and spans[-1][1] == position and spans[-1][2] == tile:
            spans[-1] = (spans[-1][0], position + 1, tile)
        else:
            spans.append((position, position + 1, tile))
    return spans


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


# --------------------------------------------------------------------------------------------------
# ByteTokenizer


def test_byte_tokenizer_round_trip_with_specials():
    tokenizer = ByteTokenizer()
    text = "<|im_start|>user\nGrüße <tile_1> 😀<|vision_pad|><|vision_pad|><|im_end|>\n<|endoftext|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert max(ids) < 320 and tokenizer.vocab_size == len(tokenizer) <= 320
    specials = [i for i in ids if i >= 256]
    assert specials == [
        tokenizer.convert_tokens_to_ids(token) for token in ["<|im_start|>", PAD, PAD, "<|im_end|>", "<|endoftext|>"]
    ]
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Tile tags are ordinary text (bytes), as in Qwen's tokenizer.
    assert tokenizer.encode("<tile_1>") == list(b"<tile_1>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nGrüße <tile_1> 😀\n"
    assert tokenizer("ab") == {"input_ids": [97, 98]}


def test_byte_tokenizer_extra_specials_and_unknown_tokens():
    tokenizer = ByteTokenizer(extra_special_tokens=["<extra>"])
    assert tokenizer.encode("a<extra>b") == [97, 260, 98]
    assert tokenizer.decode([260]) == "<extra>"
    with pytest.raises(KeyError):
        tokenizer.convert_tokens_to_ids("<unknown>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([999])
    with pytest.raises(ValueError, match="twice"):
        ByteTokenizer(extra_special_tokens=["<|im_end|>"])


# --------------------------------------------------------------------------------------------------
# NVLM-D


def test_nvlm_d_prompt_pads_and_pixels(wide):
    processor = processor_for("D")
    inputs = processor([user("Describe.")], [wide])  # no marker: "<image>\n" goes first
    tiles = "".join(tag + PAD * P for tag in ["<tile_1>", "<tile_2>", THUMB])
    expected = f"<|im_start|>user\n<Image>{tiles}</Image>\nDescribe.<|im_end|>\n<|im_start|>assistant\n"
    assert processor.decode(inputs.input_ids[0]) == expected
    assert expected.count(PAD) == 3 * P

    pad_id = processor.tokenizer.convert_tokens_to_ids(PAD)
    mask = inputs.image_token_mask[0]
    assert int(mask.sum()) == 3 * P
    assert torch.equal(mask, inputs.input_ids[0] == pad_id)
    # Each tag is followed by exactly P pads (embeddings fill them tile by tile, thumbnail last).
    ids = inputs.input_ids[0].tolist()
    for (start, end), tag in zip(runs(mask), ["<tile_1>", "<tile_2>", THUMB], strict=True):
        assert end - start == P
        assert processor.decode(ids[start - len(tag) : start]) == tag
    start = int(inputs.image_positions[0, 0])
    assert processor.decode(ids[start : start + len("<Image>")]) == "<Image>"

    assert inputs.tiles_per_image.tolist() == [[3]]
    assert (inputs.tag_tiles == -1).all() and inputs.xattn_tag_ids is None and inputs.tag_tokens_per_tile == 0
    assert inputs.pixel_values.dtype == torch.float32
    assert torch.equal(inputs.pixel_values, reference_tiles([wide]))
    assert inputs.labels is None and inputs.num_images == [1]


def test_yi_tag_style_gives_the_short_thumbnail_tag(square):
    config = NVLMConfig.from_preset("tiny-d").replace(tiling={"tag_style": "nvlm-34b"})
    processor = NVLMProcessor(ByteTokenizer(), config)
    prompt = processor.decode(processor([user("<image>")], [square]).input_ids[0])
    assert f"<Image><tile_global>{PAD * P}</Image>" in prompt


# --------------------------------------------------------------------------------------------------
# NVLM-X


def test_nvlm_x_tags_mark_their_tiles_across_images(wide, tall):
    processor = processor_for("X")
    inputs = processor([user("<image>A<image>B")], [wide, tall])
    ids = inputs.input_ids[0].tolist()
    assert processor.tokenizer.convert_tokens_to_ids(PAD) not in ids
    assert not inputs.image_token_mask.any()
    assert processor.decode(ids).count("<Image>") == 2

    spans = tag_spans(inputs.tag_tiles[0])
    expected_tags = ["<tile_1>", "<tile_2>", THUMB, "<tile_1>", "<tile_2>", "<tile_3>", THUMB]
    assert [processor.decode(ids[start:end]) for start, end, _ in spans] == expected_tags
    assert [tile for _, _, tile in spans] == list(range(7))

    assert inputs.tiles_per_image.tolist() == [[3, 4]]
    # Cross-attention keys: the tiles of the first image, then the second, thumbnails included.
    assert torch.equal(inputs.pixel_values, reference_tiles([wide, tall]))
    assert torch.equal(inputs.pixel_values[:3], reference_tiles([wide]))


# --------------------------------------------------------------------------------------------------
# NVLM-H


def test_nvlm_h_thumbnail_in_decoder_tags_for_cross_attention(wide, tall):
    processor = processor_for("H")
    inputs = processor([user("<image>A<image>B")], [wide, tall])
    ids = inputs.input_ids[0].tolist()
    mask = inputs.image_token_mask[0]
    assert int(mask.sum()) == 2 * P
    for start, end in runs(mask):
        assert end - start == P
        assert processor.decode(ids[start - len(THUMB) : start]) == THUMB
    assert "<tile_1>" not in processor.decode(ids)

    assert inputs.tag_tokens_per_tile == len("<tile_1>")
    assert inputs.xattn_tag_ids.shape == (2 + 3, inputs.tag_tokens_per_tile)
    decoded = [processor.decode(row) for row in inputs.xattn_tag_ids]
    assert decoded == ["<tile_1>", "<tile_2>", "<tile_1>", "<tile_2>", "<tile_3>"]
    assert (inputs.tag_tiles == -1).all()
    assert torch.equal(inputs.pixel_values, reference_tiles([wide, tall]))


def test_nvlm_h_single_tile_image_has_no_regular_tiles(square):
    processor = processor_for("H")
    inputs = processor([user("<image>")], [square])
    assert inputs.tiles_per_image.tolist() == [[1]]
    assert inputs.xattn_tag_ids.shape == (0, len("<tile_1>"))
    assert int(inputs.image_token_mask.sum()) == P
    assert f"<Image>{THUMB}{PAD * P}</Image>" in processor.decode(inputs.input_ids[0])


def test_nvlm_h_rejects_tags_of_different_token_lengths():
    tokenizer = ByteTokenizer(extra_special_tokens=["<tile_1>"])  # 1 token, <tile_2> is 8 bytes
    with pytest.raises(ValueError, match="same number of tokens"):
        processor_for("H", tokenizer)


# --------------------------------------------------------------------------------------------------
# batching


def test_batch_with_different_image_counts_pads_right(wide, tall):
    processor = processor_for("D")
    conversations = [[user("Hi")], [user("<image>What is it?")], [user("<image> and <image>, compare them.")]]
    images = [[], [wide], [wide, tall]]
    inputs = processor(conversations, images)

    singles = [
        processor(conversation, sample_images)
        for conversation, sample_images in zip(conversations, images, strict=True)
    ]
    lengths = [single.input_ids.shape[1] for single in singles]
    assert inputs.input_ids.shape == (3, max(lengths))
    assert inputs.attention_mask.sum(dim=1).tolist() == lengths
    for row, (single, length) in enumerate(zip(singles, lengths, strict=True)):
        assert torch.equal(inputs.input_ids[row, :length], single.input_ids[0])
        assert (inputs.input_ids[row, length:] == processor.tokenizer.pad_token_id).all()
        assert not inputs.image_token_mask[row, length:].any()
        assert torch.equal(inputs.image_token_mask[row, :length], single.image_token_mask[0])
        if single.num_images[0]:
            assert torch.equal(inputs.image_positions[row, : single.num_images[0]], single.image_positions[0])

    assert inputs.tiles_per_image.tolist() == [[0, 0], [3, 0], [3, 4]]
    assert inputs.image_positions[0].tolist() == [-1, -1]
    assert inputs.image_positions[1, 1] == -1 and (inputs.image_positions[2] >= 0).all()
    assert inputs.num_images == [0, 1, 2]
    assert [len(plans) for plans in inputs.plans] == [0, 1, 2]
    assert torch.equal(inputs.pixel_values, reference_tiles([wide, wide, tall]))


def test_batch_without_images_has_one_empty_image_column():
    inputs = processor_for("X")([[user("a")], [user("longer")]])
    assert inputs.pixel_values is None
    assert inputs.tiles_per_image.tolist() == [[0], [0]]
    assert inputs.image_positions.tolist() == [[-1], [-1]]


def test_inputs_to_moves_every_tensor(wide):
    inputs = processor_for("H")([user("<image>")], [wide], return_labels=True)
    moved = inputs.to("meta")
    assert isinstance(moved, NVLMInputs)
    for name in ("input_ids", "attention_mask", "pixel_values", "image_token_mask", "tag_tiles", "labels"):
        assert getattr(moved, name).device.type == "meta"
    assert moved.xattn_tag_ids.device.type == "meta"
    assert moved.plans == inputs.plans and inputs.input_ids.device.type == "cpu"


# --------------------------------------------------------------------------------------------------
# labels and the chat template


def test_labels_cover_only_assistant_content_and_its_end(wide):
    processor = processor_for("D", system_prompt=SFT_SYSTEM_PROMPT)
    conversation = [user("<image>What?"), assistant("A cat."), user("Sure?"), assistant("Yes.")]
    inputs = processor(conversation, [wide], return_labels=True, add_generation_prompt=True)
    ids, labels = inputs.input_ids[0], inputs.labels[0]
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])
    spans = runs(trained)
    assert [processor.decode(ids[start:end]) for start, end in spans] == ["A cat.<|im_end|>", "Yes.<|im_end|>"]
    assert not (trained & inputs.image_token_mask[0]).any()
    prompt = processor.decode(ids)
    assert prompt.startswith(f"<|im_start|>system\n{SFT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<Image>")
    # The last turn is the assistant's: no generation prompt after it.
    assert prompt.endswith("<|im_start|>assistant\nYes.<|im_end|>\n")


def test_labels_are_ignored_on_padding_and_prompts_without_answers():
    processor = processor_for("X")
    inputs = processor([[user("Q"), assistant("Answer")], [user("A much longer question")]], return_labels=True)
    short = int(inputs.attention_mask[0].sum())
    assert (inputs.labels[0, short:] == IGNORE_INDEX).all()
    assert (inputs.labels[1] == IGNORE_INDEX).all()
    assert processor.decode(inputs.input_ids[1]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_system_prompt_is_optional_and_a_conversation_system_message_wins():
    default = processor_for("D")
    assert SFT_SYSTEM_PROMPT == "Follow the user's instruction and answer questions."
    assert default.decode(default([user("Hi")]).input_ids[0]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_sft = processor_for("D", system_prompt=SFT_SYSTEM_PROMPT)
    own = with_sft([{"role": "system", "content": "Be brief."}, user("Hi")], add_generation_prompt=False)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert with_sft.decode(own.input_ids[0]) == expected


# --------------------------------------------------------------------------------------------------
# errors


def test_image_marker_count_mismatch_names_the_sample(wide):
    processor = processor_for("D")
    with pytest.raises(ValueError, match=r"sample 1: 2 '<image>' markers .* but 1 images"):
        processor([[user("no images")], [user("<image> vs <image>")]], [[], [wide]])
    with pytest.raises(ValueError, match=r"sample 0: 1 '<image>' markers .* but 0 images"):
        processor([user("<image>")])


def test_tokenizer_without_the_image_placeholder_is_rejected():
    config = NVLMConfig.from_preset("tiny-d").replace(tokens={"image_placeholder": "<|image_pad|>"})
    with pytest.raises(ValueError, match="no single token '<\\|image_pad\\|>'"):
        NVLMProcessor(ByteTokenizer(), config)


# --------------------------------------------------------------------------------------------------
# a real Hugging Face tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer():
    pytest.importorskip("tokenizers", reason="the Hugging Face tokenizer test needs `tokenizers`")
    pytest.importorskip("transformers", reason="the Hugging Face tokenizer test needs `transformers`")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A byte-level BPE like Qwen's, with the merges that make "tile" one token: a tag such as
    # <tile_1> is then 5 tokens (<, tile, _, 1, >), the count Megatron assumes for Qwen.
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("t", "i"), ("ti", "l"), ("til", "e")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", PAD]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>")


@pytest.mark.parametrize("variant", ["D", "X", "H"])
def test_hugging_face_tokenizer_gives_the_same_structure(hf_tokenizer, variant, wide, tall):
    conversations = [[user("<image>Say <image>"), assistant("Ok then.")], [user("Hello")]]
    images = [[wide, tall], []]
    byte_processor = processor_for(variant)
    hf_processor = processor_for(variant, hf_tokenizer)
    ours = byte_processor(conversations, images, return_labels=True)
    theirs = hf_processor(conversations, images, return_labels=True)

    for row in range(2):
        real = theirs.attention_mask[row]
        assert hf_processor.decode(theirs.input_ids[row][real]) == byte_processor.decode(
            ours.input_ids[row][ours.attention_mask[row]]
        )
        trained = theirs.labels[row] != IGNORE_INDEX
        expected_answer = "Ok then.<|im_end|>" if row == 0 else ""
        assert hf_processor.decode(theirs.input_ids[row][trained]) == expected_answer
    assert torch.equal(theirs.tiles_per_image, ours.tiles_per_image)
    assert int(theirs.image_token_mask.sum()) == int(ours.image_token_mask.sum())
    assert (theirs.input_ids[theirs.image_token_mask] == hf_tokenizer.convert_tokens_to_ids(PAD)).all()
    assert torch.equal(theirs.pixel_values, ours.pixel_values)
    spans = tag_spans(theirs.tag_tiles[0])
    if variant == "X":
        tags = [hf_processor.decode(theirs.input_ids[0, start:end]) for start, end, _ in spans]
        assert tags == ["<tile_1>", "<tile_2>", THUMB, "<tile_1>", "<tile_2>", "<tile_3>", THUMB]
        assert [tile for _, _, tile in spans] == list(range(7))
    else:
        assert spans == []
    if variant == "H":
        assert theirs.tag_tokens_per_tile == 5
        decoded = [hf_processor.decode(row) for row in theirs.xattn_tag_ids]
        assert decoded == ["<tile_1>", "<tile_2>", "<tile_1>", "<tile_2>", "<tile_3>"]
