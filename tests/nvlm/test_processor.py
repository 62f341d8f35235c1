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
    processor = processor_for("D", chat_format="megatron")
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
    processor = processor_for("D", chat_format="megatron", system_prompt=SFT_SYSTEM_PROMPT)
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
    processor = processor_for("X", chat_format="megatron")
    inputs = processor([[user("Q"), assistant("Answer")], [user("A much longer question")]], return_labels=True)
    short = int(inputs.attention_mask[0].sum())
    assert (inputs.labels[0, short:] == IGNORE_INDEX).all()
    assert (inputs.labels[1] == IGNORE_INDEX).all()
    assert processor.decode(inputs.input_ids[1]).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_megatron_system_prompt_is_optional_and_a_conversation_system_message_wins():
    default = processor_for("D", chat_format="megatron")
    assert SFT_SYSTEM_PROMPT == "Follow the user's instruction and answer questions."
    assert default.decode(default([user("Hi")]).input_ids[0]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_sft = processor_for("D", chat_format="megatron", system_prompt=SFT_SYSTEM_PROMPT)
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
# a byte-level BPE like Qwen2's, built here: the chat formats, whole-string ids, positions, labels

# Qwen2's tokenizer.json pre-tokenizer: this regex split, then byte-level without its own regex.
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
NEWLINE = "Ċ"  # byte-level BPE's symbol for "\n"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", PAD)

# The non-tool branch of Qwen2.5's chat_template (NVLM-D-72B's tokenizer_config.json carries Qwen2.5's).
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The released chatml template (MPT separators: nothing after <|im_end|>) and Qwen2.5's default system turn.
NVLM_D_SYSTEM_TURN = "<|im_start|>system\nAnswer the questions.<|im_end|>"
QWEN_SYSTEM_TURN = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
)
WIDE_TAGS = ["<tile_1>", "<tile_2>", THUMB]
TALL_TAGS = ["<tile_1>", "<tile_2>", "<tile_3>", THUMB]


def d_segment(tags: list[str]) -> str:
    """NVLM-D's image segment (nvlm-spec §2.2): <Image> + per tile (tag + P placeholders) + </Image>."""
    return "<Image>" + "".join(tag + PAD * P for tag in tags) + "</Image>"


def chain(word: str) -> list[tuple[str, str]]:
    """The merges that build ``word`` left to right: t+i, ti+l, til+e."""
    return [(word[:i], word[i]) for i in range(1, len(word))]


def bpe_tokenizer(*, specials=SPECIALS, bos_token: str | None = None, vocab_entries=(), chat_template=None):
    """Byte-level BPE with Qwen2's pre-tokenizer and merges that give the spec's tokens: ``<Image>``
    + ``<tile_1>`` is [<Image, ><, tile, _, 1, >] in one string, ``</Image>\\n`` ends in ``>\\n``, and
    a tag alone is 5 tokens (<, tile, _global, _thumbnail, >)."""
    pytest.importorskip("tokenizers", reason="the BPE tokenizer tests need `tokenizers`")
    pytest.importorskip("transformers", reason="the BPE tokenizer tests need `transformers`")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    merges = [*chain("tile"), *chain("Image"), *chain("_global"), *chain("_thumbnail")]
    merges += [("<", "Image"), (">", "<"), (">", NEWLINE), ("<", "/")]
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for entry in [left + right for left, right in merges] + list(vocab_entries):
        vocab.setdefault(entry, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    added = [*([bos_token] if bos_token else []), *specials]  # ids independent of the specials that follow
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in added])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", bos_token=bos_token
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer(chat_template=QWEN25_CHAT_TEMPLATE)


def bpe_tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))


def megatron_ids(text: str, tags_per_image: list[list[str]], bos_token: str | None = None) -> list[int]:
    """Megatron's ids: the conversation with ``<Image><image></Image>`` tokenized as one string with
    ``<image>`` an added token, then each ``<image>`` spliced into, per tile, the tag tokenized on
    its own and the image tokens (nvlm-spec §2.2, §9)."""
    tokenizer = bpe_tokenizer(specials=(*SPECIALS, "<image>"), bos_token=bos_token)
    image_id, pad_id = tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids(PAD)
    ids, images = [], iter(tags_per_image)
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        if token_id != image_id:
            ids.append(token_id)
            continue
        for tag in next(images):
            ids += tokenizer.encode(tag, add_special_tokens=False) + [pad_id] * P
    return ids


def labeled_tokens(tokenizer, inputs: NVLMInputs) -> list[str]:
    trained = inputs.labels[0] != IGNORE_INDEX
    assert torch.equal(inputs.labels[0][trained], inputs.input_ids[0][trained])
    return tokenizer.convert_ids_to_tokens(inputs.input_ids[0][trained].tolist())


def test_the_test_bpe_merges_across_joins_as_qwen_does(bpe):
    assert bpe_tokens(bpe, "<Image><tile_1>") == ["<Image", "><", "tile", "_", "1", ">"]
    assert bpe_tokens(bpe, "<Image>") + bpe_tokens(bpe, "<tile_1>") == ["<Image", ">", "<", "tile", "_", "1", ">"]
    assert bpe_tokens(bpe, "</Image>\n") == ["</", "Image", ">" + NEWLINE]
    assert bpe_tokens(bpe, THUMB) == ["<", "tile", "_global", "_thumbnail", ">"]
    assert bpe_tokens(bpe, PAD * 2) == [PAD, PAD]


@pytest.mark.parametrize(
    ("tiling", "size", "tags"),
    [
        ({}, (50, 50), [THUMB]),  # one tile: the image itself, tagged as the thumbnail
        ({"use_thumbnail": False}, (112, 56), ["<tile_1>", THUMB]),  # the released tags: T-1 numbered + thumbnail
        ({}, (100, 60), WIDE_TAGS),  # 2x1 grid + thumbnail
        (
            {"max_tiles": 6},
            (100, 60),
            ["<tile_1>", "<tile_2>", "<tile_3>", "<tile_4>", "<tile_5>", "<tile_6>", THUMB],
        ),  # 3x2 grid + thumbnail
    ],
    ids=["1-tile", "2-tiles", "3-tiles", "7-tiles"],
)
def test_nvlm_d_chat_is_the_released_prompt_and_ids(bpe, tiling, size, tags):
    config = NVLMConfig.from_preset("tiny-d").replace(tiling=tiling)
    image = noise_image(*size, seed=3)
    expected = (
        f"{NVLM_D_SYSTEM_TURN}<|im_start|>user\n{d_segment(tags)}\nWhat is this?<|im_end|><|im_start|>assistant\n"
    )
    byte_processor = NVLMProcessor(ByteTokenizer(), config)  # the default format
    assert byte_processor.decode(byte_processor([user("What is this?")], [image]).input_ids[0]) == expected

    inputs = NVLMProcessor(bpe, config)([user("What is this?")], [image])
    ids = inputs.input_ids[0].tolist()
    assert ids == bpe(expected)["input_ids"]  # the released chat(): tokenizer(query), the whole string
    assert inputs.tiles_per_image.tolist() == [[len(tags)]]
    pad_id = bpe.convert_tokens_to_ids(PAD)
    assert inputs.image_token_mask[0].tolist() == [token_id == pad_id for token_id in ids]
    assert [end - start for start, end in runs(inputs.image_token_mask[0])] == [P] * len(tags)
    assert bpe.convert_ids_to_tokens(ids[int(inputs.image_positions[0, 0])]) == "<Image"


def test_image_segment_tokens_and_positions_per_variant(bpe, wide):
    """The whole-string tokens of one image's segment (tiny presets, 3 tiles), where each variant
    reads its positions: D the placeholders, X the tag tokens per tile (a token shared by two tags
    belongs to the later one, whose tag it opens), H the thumbnail in the decoder and the regular
    tags tokenized on their own."""
    pads, after = [PAD] * P, ["</", "Image", ">" + NEWLINE, "W", "h", "a", "t", "?"]
    segments = {
        "D": (
            ["<Image", "><", "tile", "_", "1", ">", *pads, "<", "tile", "_", "2", ">", *pads]
            + ["<", "tile", "_global", "_thumbnail", ">", *pads, *after]
        ),
        "X": ["<Image", "><", "tile", "_", "1", "><", "tile", "_", "2", "><", "tile", "_global", "_thumbnail", "><"]
        + ["/", "Image", ">" + NEWLINE, "W", "h", "a", "t", "?"],
        "H": ["<Image", "><", "tile", "_global", "_thumbnail", ">", *pads, *after],
    }
    x_tiles = [-1, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, -1, -1, -1, -1, -1, -1, -1, -1]
    for variant, expected in segments.items():
        inputs = processor_for(variant, bpe)([user("What?")], [wide])
        ids = inputs.input_ids[0].tolist()
        start = int(inputs.image_positions[0, 0])
        assert bpe.convert_ids_to_tokens(ids[start - 1 : start + len(expected)]) == [NEWLINE, *expected], variant
        assert not inputs.image_token_mask[0, :start].any()
        mask = inputs.image_token_mask[0, start : start + len(expected)].tolist()
        assert mask == [token == PAD for token in expected], variant
        tag_tiles = inputs.tag_tiles[0].tolist()
        if variant == "X":
            assert tag_tiles[start : start + len(expected)] == x_tiles
            assert set(tag_tiles[:start] + tag_tiles[start + len(expected) :]) == {-1}
        else:
            assert set(tag_tiles) == {-1}
    h_inputs = processor_for("H", bpe)([user("What?")], [wide])
    assert h_inputs.tag_tokens_per_tile == 5  # Megatron's "256 + 5"
    tags = [bpe.convert_ids_to_tokens(row) for row in h_inputs.xattn_tag_ids.tolist()]
    assert tags == [["<", "tile", "_", "1", ">"], ["<", "tile", "_", "2", ">"]]


CONVERSATION = [user("<image>\nLeft, <image>\nright: which is wider?"), assistant("The left."), user("Sure?")]
TWO_IMAGES = f"{d_segment(WIDE_TAGS)}\nLeft, {d_segment(TALL_TAGS)}\nright: which is wider?"
MULTI_TURN = {
    "nvlm-d-chat": (
        f"{NVLM_D_SYSTEM_TURN}<|im_start|>user\n{TWO_IMAGES}<|im_end|><|im_start|>assistant\nThe left.<|im_end|>"
        "<|im_start|>user\nSure?<|im_end|><|im_start|>assistant\n"
    ),
    "tokenizer": (
        f"{QWEN_SYSTEM_TURN}<|im_start|>user\n{TWO_IMAGES}<|im_end|>\n<|im_start|>assistant\nThe left.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "megatron": (
        f"<|im_start|>user\n{TWO_IMAGES}<|im_end|>\n<|im_start|>assistant\nThe left.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n"
    ),
}


@pytest.mark.parametrize("chat_format", ["nvlm-d-chat", "tokenizer", "megatron"])
def test_multi_turn_with_two_images_string_ids_and_labels(bpe, wide, tall, chat_format):
    processor = processor_for("D", bpe, chat_format=chat_format)
    inputs = processor(CONVERSATION, [wide, tall], return_labels=True)
    ids = inputs.input_ids[0].tolist()
    expected = MULTI_TURN[chat_format]
    assert processor.decode(ids) == expected
    if chat_format == "megatron":
        megatron_text = expected.replace(d_segment(WIDE_TAGS), "<Image><image></Image>")
        megatron_text = megatron_text.replace(d_segment(TALL_TAGS), "<Image><image></Image>")
        assert ids == megatron_ids(megatron_text, [WIDE_TAGS, TALL_TAGS])
    else:  # chat(): tokenizer(query); a server's chat path: no special tokens added to the rendered template
        assert ids == bpe(expected, add_special_tokens=chat_format == "nvlm-d-chat")["input_ids"]
        assert ids != megatron_ids(expected.replace(d_segment(WIDE_TAGS), "<Image><image></Image>"), [WIDE_TAGS])
    if chat_format == "tokenizer":  # vLLM's way: render the template, then expand the markers in order
        rendered = bpe.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
        rendered = rendered.replace("<image>", d_segment(WIDE_TAGS), 1).replace("<image>", d_segment(TALL_TAGS), 1)
        assert rendered == expected
    assert labeled_tokens(bpe, inputs) == bpe_tokens(bpe, "The left.<|im_end|>")
    # Each image's first token. After ", " Qwen2's split makes " <" one piece (Ġ, <) and "Image" the next:
    # the second image starts at "<".
    starts = inputs.image_positions[0].tolist()
    assert [bpe.convert_ids_to_tokens(ids[start - 1 : start + 2]) for start in starts] == [
        [NEWLINE, "<Image", ">" if chat_format == "megatron" else "><"],  # Megatron: the tag on its own
        ["Ġ", "<", "Image"],
    ]
    assert [end - start for start, end in runs(inputs.image_token_mask[0])] == [P] * 7
    assert inputs.image_token_mask[0].tolist() == [token_id == processor.image_pad_id for token_id in ids]


def test_nvlm_d_chat_system_turn_history_and_generation_prompt():
    processor = processor_for("D")
    assert processor.chat_format == "nvlm-d-chat"

    def prompt(conversation, proc=processor, **kwargs) -> str:
        return proc.decode(proc(conversation, **kwargs).input_ids[0])

    own = prompt([{"role": "system", "content": "Be brief."}, user("Hi")])
    assert own == "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    # chat_without_sys_prompt: no system turn at all
    bare = prompt([user("Hi")], processor_for("D", system_prompt=None))
    assert bare == "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    # MPT writes a message with empty content (an empty answer in the history) as its header alone
    empty = prompt([user("Hi"), assistant(""), user("Again")])
    assert empty == (
        f"{NVLM_D_SYSTEM_TURN}<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
        "<|im_start|>user\nAgain<|im_end|><|im_start|>assistant\n"
    )
    answered = prompt([user("Hi"), assistant("Yo")])  # the assistant spoke last: no generation prompt
    assert answered == f"{NVLM_D_SYSTEM_TURN}<|im_start|>user\nHi<|im_end|><|im_start|>assistant\nYo<|im_end|>"
    assert prompt([user("Hi")], add_generation_prompt=False) == f"{NVLM_D_SYSTEM_TURN}<|im_start|>user\nHi<|im_end|>"
    with pytest.raises(ValueError, match="sample 0: chat_format 'nvlm-d-chat' has one system turn.*message 2"):
        processor([user("Hi"), assistant("Yo"), {"role": "system", "content": "Late."}])


def test_tokenizer_format_system_prompt_and_template_checks(bpe):
    processor = processor_for("D", bpe, chat_format="tokenizer", system_prompt="Be brief.")
    text = processor.decode(processor([user("Hi")]).input_ids[0])
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    labels = processor([user("Hi"), assistant("Yo")], return_labels=True)
    assert labeled_tokens(bpe, labels) == ["Y", "o", "<|im_end|>"]  # not the "\n" after it

    # A template that rewrites the content cannot have images and labels put in their place.
    trimming = bpe_tokenizer(chat_template="{% for m in messages %}{{ m['content'] | trim }}{% endfor %}")
    with pytest.raises(ValueError, match="sample 0: the tokenizer's chat_template does not write"):
        processor_for("D", trimming, chat_format="tokenizer")([user(" Hi ")])
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        processor_for("D", ByteTokenizer(), chat_format="tokenizer")


def test_megatron_format_of_the_34b_presets_starts_with_bos(square):
    assert all(NVLMConfig.from_preset(f"nvlm-{v}-34b").tiling.tag_style == "nvlm-34b" for v in "dxh")
    config = NVLMConfig.from_preset("tiny-d").replace(tiling={"tag_style": "nvlm-34b"})
    conversation = [user("<image>Hi"), assistant("Yo")]
    expected = (
        f"<|startoftext|><|im_start|>user\n<Image><tile_global>{PAD * P}</Image>Hi<|im_end|>\n"
        "<|im_start|>assistant\nYo<|im_end|>\n"
    )
    byte_tokenizer = ByteTokenizer(bos_token="<|startoftext|>")
    processor = NVLMProcessor(byte_tokenizer, config, chat_format="megatron")
    inputs = processor(conversation, [square], return_labels=True)
    assert processor.decode(inputs.input_ids[0]) == expected
    assert int(inputs.input_ids[0, 0]) == byte_tokenizer.bos_token_id
    assert processor.decode(inputs.input_ids[0][inputs.labels[0] != IGNORE_INDEX]) == "Yo<|im_end|>"

    bpe_yi = bpe_tokenizer(bos_token="<|startoftext|>")
    bpe_inputs = NVLMProcessor(bpe_yi, config, chat_format="megatron")(conversation, [square])
    megatron_text = expected.replace(f"<tile_global>{PAD * P}", "<image>")
    assert bpe_inputs.input_ids[0].tolist() == megatron_ids(megatron_text, [["<tile_global>"]], "<|startoftext|>")
    assert int(bpe_inputs.input_ids[0, 0]) == bpe_yi.bos_token_id

    # Only Megatron's Yi format adds it: not the 72B tag style, not the released chat() format.
    plain = NVLMProcessor(byte_tokenizer, NVLMConfig.from_preset("tiny-d"), chat_format="megatron")
    assert processor.decode(plain(conversation, [square]).input_ids[0]) == expected.replace(
        "<|startoftext|>", ""
    ).replace("<tile_global>", THUMB)
    chat = NVLMProcessor(byte_tokenizer, config)
    assert not chat.decode(chat(conversation, [square]).input_ids[0]).startswith("<|startoftext|>")
    with pytest.raises(ValueError, match="nvlm-yi-34b format, which starts with the tokenizer's BOS"):
        NVLMProcessor(ByteTokenizer(), config, chat_format="megatron")


class _NoOffsets:
    """A tokenizer without offset mappings (as Hugging Face's slow tokenizers)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._tokenizer(text, add_special_tokens=add_special_tokens)


def test_a_tokenizer_without_offsets_is_tokenized_piece_by_piece(bpe, wide):
    inputs = processor_for("X", _NoOffsets(bpe))([user("What?"), assistant("A cat.")], [wide], return_labels=True)
    tokens = bpe.convert_ids_to_tokens(inputs.input_ids[0].tolist())
    start = int(inputs.image_positions[0, 0])
    assert tokens[start : start + 2] == ["<Image", ">"]  # no merge across the piece boundary
    spans = tag_spans(inputs.tag_tiles[0])
    assert [bpe.decode(inputs.input_ids[0, a:b].tolist()) for a, b, _ in spans] == WIDE_TAGS
    assert [tile for _, _, tile in spans] == [0, 1, 2]
    assert labeled_tokens(bpe, inputs) == bpe_tokens(bpe, "A cat.<|im_end|>")


@pytest.mark.parametrize("chat_format", ["nvlm-d-chat", "megatron"])
@pytest.mark.parametrize("variant", ["D", "X", "H"])
def test_bpe_and_byte_tokenizers_give_the_same_text_and_structure(bpe, variant, chat_format, wide, tall):
    conversations = [[user("<image>Say <image>"), assistant("Ok then.")], [user("Hello")]]
    images = [[wide, tall], []]
    byte_processor = processor_for(variant, chat_format=chat_format)
    bpe_processor = processor_for(variant, bpe, chat_format=chat_format)
    ours = byte_processor(conversations, images, return_labels=True)
    theirs = bpe_processor(conversations, images, return_labels=True)

    for row in range(2):
        real = theirs.attention_mask[row]
        assert bpe_processor.decode(theirs.input_ids[row][real]) == byte_processor.decode(
            ours.input_ids[row][ours.attention_mask[row]]
        )
        trained = theirs.labels[row] != IGNORE_INDEX
        expected_answer = "Ok then.<|im_end|>" if row == 0 else ""
        assert bpe_processor.decode(theirs.input_ids[row][trained]) == expected_answer
    assert torch.equal(theirs.tiles_per_image, ours.tiles_per_image)
    assert int(theirs.image_token_mask.sum()) == int(ours.image_token_mask.sum())
    assert (theirs.input_ids[theirs.image_token_mask] == bpe.convert_tokens_to_ids(PAD)).all()
    assert torch.equal(theirs.pixel_values, ours.pixel_values)
    spans = tag_spans(theirs.tag_tiles[0])
    if variant == "X":
        assert [tile for _, _, tile in spans] == list(range(7))
    else:
        assert spans == []
    if variant == "H":
        assert theirs.tag_tokens_per_tile == 5
        decoded = [bpe_processor.decode(row) for row in theirs.xattn_tag_ids]
        assert decoded == ["<tile_1>", "<tile_2>", "<tile_1>", "<tile_2>", "<tile_3>"]


def test_bad_chat_format_and_tokenizers_without_the_special_tokens():
    with pytest.raises(ValueError, match="chat_format must be one of .*'nvlm-d-chat'.*got 'chatml'"):
        processor_for("D", chat_format="chatml")
    with pytest.raises(TypeError, match="system_prompt must be a str or None"):
        processor_for("D", system_prompt=1)
    no_pad = bpe_tokenizer(specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    with pytest.raises(ValueError, match=r"no single token '<\|vision_pad\|>'"):
        processor_for("D", no_pad)
    # In the vocabulary but not an added token: the BPE splits its text like any other.
    # (not <|im_end|>: transformers adds the eos_token as a special token itself)
    plain_im_start = bpe_tokenizer(specials=("<|endoftext|>", "<|im_end|>", PAD), vocab_entries=["<|im_start|>"])
    with pytest.raises(ValueError, match=r"encodes the text '<\|im_start\|>' as .* not as its one token"):
        processor_for("D", plain_im_start)


def test_placeholder_text_in_a_message_is_rejected():
    with pytest.raises(ValueError, match=r"sample 0: message text contains the image placeholder"):
        processor_for("D")([user(f"look: {PAD}")])
