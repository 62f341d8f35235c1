"""``NVLMProcessor``: chat conversations + images -> the model inputs of NVLM-D, NVLM-X or NVLM-H.

    processor = NVLMProcessor(tokenizer, NVLMConfig.from_preset("tiny-d"))
    inputs = processor([{"role": "user", "content": "<image>\\nWhat is this?"}], [image])

The prompt is ChatML (nvlm-spec §8.2): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn, an
optional system turn first and ``<|im_start|>assistant\\n`` as the generation prompt. Each
``<image>`` marker of a user message becomes the image segment of the variant, built from the tile
plan of ``nk.preprocess_images`` and ``nk.tile_tags`` (T tiles, thumbnail last; P image tokens per
tile; pad = ``<|vision_pad|>``):

* NVLM-D (§2.2): ``<Image>`` + Σ_k (tag_k + P × pad) + ``</Image>``; the image embeddings later
  fill the pads in order (tile_1 …, thumbnail last).
* NVLM-X (§6.1, §6.3): ``<Image>`` + Σ_k tag_k + ``</Image>``, no pads; all T tiles are
  cross-attention keys and ``tag_tiles`` says which tile each tag token belongs to (a tag row may
  attend only to its tile).
* NVLM-H (§7): the decoder holds the thumbnail, ``<Image>`` + thumbnail tag + P × pad +
  ``</Image>``; the T − 1 regular tiles are cross-attention keys, each preceded by the embeddings
  of its tag, which is tokenized on its own (Megatron style) and returned as ``xattn_tag_ids``.

The prompt is tokenized segment by segment (text pieces, wrappers, tags, pads), so every position
is known as it is written; nothing is searched for in the token stream afterwards. The price: a
BPE tokenizer cannot merge across segment boundaries, which the Hugging Face NVLM-D code (one
string, one ``encode``) can (nvlm-spec §2.2 "Tokenization caveat").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import nvlm_kernels as nk
from nvlm.config import NVLMConfig
from nvlm_kernels import _nvtx

SFT_SYSTEM_PROMPT = "Follow the user's instruction and answer questions."
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class NVLMInputs:
    """A tokenized, padded batch. B samples, S positions, M = max images per sample (at least 1).

    input_ids: [B, S] right-padded with the tokenizer's pad id; attention_mask [B, S] True at real
        tokens.
    pixel_values: [T_all, 3, s, s] float32, all tiles of all images (sample order, image order,
        each image's tiles thumbnail last), or None without images.
    tiles_per_image: [B, M] tiles of each image incl. the thumbnail, 0 where there is no image.
    image_positions: [B, M] position of each image's first ``<Image>`` token, -1 where none.
    image_token_mask: [B, S] positions that receive image embeddings (D: all pads, H: the
        thumbnail pads, X: none).
    tag_tiles: [B, S] X only: at the tokens of a tile tag, the index of that tile among the row's
        cross-attention tiles (image order, thumbnail included); -1 elsewhere and for D and H.
    xattn_tag_ids: [N_regular, L_tag] H only: the tag ids of each regular tile, in pixel_values
        order; ``tag_tokens_per_tile`` = L_tag (0 for D and X).
    labels: [B, S] or None: the token at assistant content and the ``<|im_end|>`` closing an
        assistant turn, -100 elsewhere.
    plans: per sample, the TilePlan of each image; num_images: images per sample.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    tiles_per_image: torch.Tensor
    image_positions: torch.Tensor
    image_token_mask: torch.Tensor
    tag_tiles: torch.Tensor
    xattn_tag_ids: torch.Tensor | None
    tag_tokens_per_tile: int
    labels: torch.Tensor | None
    plans: list[list[nk.TilePlan]]
    num_images: list[int]

    def to(self, device: str | torch.device) -> NVLMInputs:
        """A copy with every tensor on ``device``."""
        moved = {
            field.name: value.to(device)
            for field in dataclasses.fields(self)
            if isinstance(value := getattr(self, field.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)


@dataclass
class _Row:
    """One sample being built: parallel per-token lists."""

    ids: list[int] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    image_token: list[bool] = dataclasses.field(default_factory=list)
    tag_tile: list[int] = dataclasses.field(default_factory=list)
    image_positions: list[int] = dataclasses.field(default_factory=list)
    cross_attention_tiles: int = 0  # X: tiles of this row's images so far

    def add(self, ids: Sequence[int], *, labeled: bool = False, image_token: bool = False, tag_tile: int = -1) -> None:
        self.ids.extend(ids)
        self.labels.extend(ids if labeled else [IGNORE_INDEX] * len(ids))
        self.image_token.extend([image_token] * len(ids))
        self.tag_tile.extend([tag_tile] * len(ids))


class NVLMProcessor:
    """Turns conversations and images into ``NVLMInputs`` for the variant of ``config``.

    ``tokenizer``: any Hugging Face tokenizer (duck typed: ``encode(text, add_special_tokens=False)``,
    ``convert_tokens_to_ids``, ``pad_token_id``, ``decode``) or ``nvlm.ByteTokenizer``; it must know
    the ChatML tokens and the image placeholder of ``config.tokens`` as single tokens.
    ``system_prompt``: a system turn put first in conversations without their own (None or "": none;
    ``SFT_SYSTEM_PROMPT`` is the paper's).
    """

    def __init__(self, tokenizer: Any, config: NVLMConfig, *, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.system_prompt = system_prompt
        self.variant = config.variant
        self.tokens_per_tile = config.tokens_per_tile
        self.tag_style = config.tiling.tag_style
        if self.variant == "H" and not config.tiling.use_thumbnail and config.tiling.max_tiles > 1:
            # The decoder side of NVLM-H is the thumbnail; without one a multi-tile image has none.
            raise ValueError("NVLM-H needs tiling.use_thumbnail=True (its decoder holds the thumbnail tile)")
        tokens = config.tokens
        self.image_pad_id = self._special_id(tokens.image_placeholder)
        self._special_id(tokens.im_start)  # checked here; the chat headers are encoded as text with it
        self.im_end_ids = [self._special_id(tokens.im_end)]
        self.pad_token_id = self._pad_id()
        self._encode_cache: dict[str, list[int]] = {}
        # Every tag this config can produce is tokenized once; H checks that the regular-tile tags
        # all have the same length, as its cross-attention keys hold L_tag tag tokens per tile.
        all_tags = nk.tile_tags(config.tiling.max_tiles + 1, self.tag_style)
        for tag in all_tags:
            self._encode(tag)
        self.tag_tokens_per_tile = 0
        if self.variant == "H":
            lengths = {tag: len(self._encode(tag)) for tag in all_tags[:-1]}
            if len(set(lengths.values())) > 1:
                raise ValueError(
                    "NVLM-H needs every tile tag to tokenize (on its own) to the same number of tokens, "
                    f"but this tokenizer gives {lengths}"
                )
            self.tag_tokens_per_tile = next(iter(lengths.values()), 0)

    # ---------------------------------------------------------------------------------------------
    # configuration views

    @property
    def max_tiles(self) -> int:
        """Regular tiles per image at most (the thumbnail comes on top)."""
        return self.config.tiling.max_tiles

    @property
    def tile_size(self) -> int:
        return self.config.vision.image_size

    # ---------------------------------------------------------------------------------------------
    # tokenizer helpers

    def _special_id(self, token: str) -> int:
        try:
            token_id = self.tokenizer.convert_tokens_to_ids(token)
        except (KeyError, ValueError):
            token_id = None
        unk_token = getattr(self.tokenizer, "unk_token", None)
        unknown = token_id is None or (token != unk_token and token_id == getattr(self.tokenizer, "unk_token_id", None))
        if unknown:
            raise ValueError(f"the tokenizer has no single token {token!r}; add it as a special token")
        return int(token_id)

    def _pad_id(self) -> int:
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = self._special_id(self.config.tokens.pad)
        return int(pad_id)

    def _encode(self, text: str) -> list[int]:
        if text not in self._encode_cache:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            self._encode_cache[text] = [int(i) for i in ids]
        return self._encode_cache[text]

    def _encode_text(self, text: str) -> list[int]:
        """Free text is not cached (it rarely repeats); empty text is no tokens."""
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)] if text else []

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------------------------------------
    # input normalization

    @staticmethod
    def _is_conversation(value: Any) -> bool:
        return (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and len(value) > 0
            and (isinstance(value[0], Mapping))
        )

    def _normalize(self, conversations: Any, images: Any) -> tuple[list[list[Mapping]], list[list[Any]]]:
        if self._is_conversation(conversations):
            batch = [conversations]
            if images is not None:
                if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
                    raise TypeError(f"images must be a list of images, got {type(images).__name__}")
                # A single conversation takes a flat list; a one-sample nested list works too.
                nested = len(images) == 1 and isinstance(images[0], (list, tuple))
                images = list(images) if nested else [images]
        elif isinstance(conversations, Sequence) and not isinstance(conversations, str) and conversations:
            batch = list(conversations)
        else:
            raise TypeError("conversations must be a conversation (a list of messages) or a non-empty list of them")
        if images is None:
            images = [None] * len(batch)
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) != len(batch):
            raise ValueError(f"images must be a list with one list of images per sample ({len(batch)} samples)")
        per_sample = []
        for index, (conversation, sample_images) in enumerate(zip(batch, images, strict=True)):
            if not self._is_conversation(conversation):
                raise TypeError(f"sample {index}: a conversation must be a non-empty list of messages")
            for message in conversation:
                if not isinstance(message, Mapping) or message.get("role") not in ROLES:
                    raise ValueError(f"sample {index}: each message needs a role in {ROLES}, got {message!r}")
                if not isinstance(message.get("content"), str):
                    raise TypeError(f"sample {index}: message content must be a str, got {message!r}")
            if sample_images is None:
                sample_images = []
            elif isinstance(sample_images, (str, bytes)) or not isinstance(sample_images, Sequence):
                raise TypeError(f"sample {index}: images must be a list of images, got {type(sample_images).__name__}")
            per_sample.append(list(sample_images))
        return batch, per_sample

    def _with_image_markers(self, index: int, conversation: list[Mapping], num_images: int) -> list[dict[str, str]]:
        """Copies the messages; puts ``<image>\\n`` before the first user message when a sample has
        images but no marker (Hugging Face NVLM-D ``chat()``), and checks marker count == images.
        Only user messages place images; a marker elsewhere is plain text."""
        marker = self.config.tokens.image_marker
        messages = [{"role": m["role"], "content": m["content"]} for m in conversation]
        user_messages = [m for m in messages if m["role"] == "user"]
        markers = sum(m["content"].count(marker) for m in user_messages)
        if num_images and not markers and user_messages:
            user_messages[0]["content"] = f"{marker}\n" + user_messages[0]["content"]
            markers = 1
        if markers != num_images:
            raise ValueError(
                f"sample {index}: {markers} {marker!r} markers in the user messages but {num_images} images"
            )
        return messages

    # ---------------------------------------------------------------------------------------------
    # building one row

    def _add_image(self, row: _Row, plan: nk.TilePlan, xattn_tag_ids: list[list[int]]) -> None:
        tokens = self.config.tokens
        tags = nk.tile_tags(plan.total, self.tag_style)
        pads = [self.image_pad_id] * self.tokens_per_tile
        row.image_positions.append(len(row.ids))
        row.add(self._encode(tokens.image_start))
        if self.variant == "D":
            for tag in tags:
                row.add(self._encode(tag))
                row.add(pads, image_token=True)
        elif self.variant == "X":
            for tag in tags:
                row.add(self._encode(tag), tag_tile=row.cross_attention_tiles)
                row.cross_attention_tiles += 1
        else:  # H: the thumbnail (the last tile) in the decoder, the regular tiles as keys
            row.add(self._encode(tags[-1]))
            row.add(pads, image_token=True)
            xattn_tag_ids.extend(self._encode(tag) for tag in tags[:-1])
        row.add(self._encode(tokens.image_end))

    def _build_row(
        self,
        messages: list[dict[str, str]],
        plans: list[nk.TilePlan],
        add_generation_prompt: bool,
        xattn_tag_ids: list[list[int]],
    ) -> _Row:
        tokens = self.config.tokens
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        row = _Row()
        next_plan = iter(plans)
        for message in messages:
            role, content = message["role"], message["content"]
            row.add(self._encode(f"{tokens.im_start}{role}\n"))
            if role == "user":
                pieces = content.split(tokens.image_marker)
                for piece_index, piece in enumerate(pieces):
                    if piece_index:
                        self._add_image(row, next(next_plan), xattn_tag_ids)
                    row.add(self._encode_text(piece))
            else:
                row.add(self._encode_text(content), labeled=role == "assistant")
            # The closing <|im_end|> of an assistant turn is trained on: it is how the model stops.
            row.add(self.im_end_ids, labeled=role == "assistant")
            row.add(self._encode("\n"))
        if add_generation_prompt and messages[-1]["role"] != "assistant":
            row.add(self._encode(f"{tokens.im_start}assistant\n"))
        return row

    # ---------------------------------------------------------------------------------------------

    def __call__(
        self,
        conversations: Any,
        images: Any = None,
        *,
        add_generation_prompt: bool = True,
        return_labels: bool = False,
        device: str | torch.device = "cpu",
    ) -> NVLMInputs:
        """Tokenize and pad a conversation or a batch of them, and tile their images.

        ``conversations``: one conversation (a list of ``{"role", "content"}`` messages) or a list of
        them. ``images``: per sample a list of images (anything ``nk.preprocess_images`` takes), or
        for a single conversation a flat list. Raises ValueError when a sample's ``<image>`` markers
        do not match its images.
        """
        batch, images = self._normalize(conversations, images)
        conversations_with_markers = [
            self._with_image_markers(index, conversation, len(sample_images))
            for index, (conversation, sample_images) in enumerate(zip(batch, images, strict=True))
        ]
        num_images = [len(sample_images) for sample_images in images]
        flat_images = [image for sample_images in images for image in sample_images]
        tiling = self.config.tiling
        pixel_values = None
        flat_plans: list[nk.TilePlan] = []
        if flat_images:
            with _nvtx.range("nvlm.preprocess"):
                pixel_values, flat_plans = nk.preprocess_images(
                    flat_images,
                    device=device,
                    min_tiles=tiling.min_tiles,
                    max_tiles=tiling.max_tiles,
                    tile_size=self.tile_size,
                    use_thumbnail=tiling.use_thumbnail,
                    dtype=torch.float32,
                )
        plans: list[list[nk.TilePlan]] = []
        start = 0
        for count in num_images:
            plans.append(flat_plans[start : start + count])
            start += count

        xattn_tag_ids: list[list[int]] = []
        rows = [
            self._build_row(messages, sample_plans, add_generation_prompt, xattn_tag_ids)
            for messages, sample_plans in zip(conversations_with_markers, plans, strict=True)
        ]
        return self._collate(rows, plans, num_images, pixel_values, xattn_tag_ids, return_labels, device)

    def _collate(
        self,
        rows: list[_Row],
        plans: list[list[nk.TilePlan]],
        num_images: list[int],
        pixel_values: torch.Tensor | None,
        xattn_tag_ids: list[list[int]],
        return_labels: bool,
        device: str | torch.device,
    ) -> NVLMInputs:
        batch_size = len(rows)
        seq_len = max(len(row.ids) for row in rows)
        max_images = max(1, *num_images)
        input_ids = torch.full((batch_size, seq_len), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.bool)
        image_token_mask = torch.zeros((batch_size, seq_len), dtype=torch.bool)
        tag_tiles = torch.full((batch_size, seq_len), -1, dtype=torch.long)
        tiles_per_image = torch.zeros((batch_size, max_images), dtype=torch.long)
        image_positions = torch.full((batch_size, max_images), -1, dtype=torch.long)
        for b, row in enumerate(rows):
            length = len(row.ids)
            input_ids[b, :length] = torch.tensor(row.ids, dtype=torch.long)
            labels[b, :length] = torch.tensor(row.labels, dtype=torch.long)
            attention_mask[b, :length] = True
            image_token_mask[b, :length] = torch.tensor(row.image_token, dtype=torch.bool)
            tag_tiles[b, :length] = torch.tensor(row.tag_tile, dtype=torch.long)
            count = num_images[b]
            if count:
                tiles_per_image[b, :count] = torch.tensor([plan.total for plan in plans[b]], dtype=torch.long)
                image_positions[b, :count] = torch.tensor(row.image_positions, dtype=torch.long)
        tag_ids_tensor = None
        if self.variant == "H":
            shape = (len(xattn_tag_ids), self.tag_tokens_per_tile)
            tag_ids_tensor = torch.tensor(xattn_tag_ids, dtype=torch.long).reshape(shape)
        return NVLMInputs(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pixel_values=pixel_values,
            tiles_per_image=tiles_per_image.to(device),
            image_positions=image_positions.to(device),
            image_token_mask=image_token_mask.to(device),
            tag_tiles=tag_tiles.to(device),
            xattn_tag_ids=None if tag_ids_tensor is None else tag_ids_tensor.to(device),
            tag_tokens_per_tile=self.tag_tokens_per_tile,
            labels=labels.to(device) if return_labels else None,
            plans=plans,
            num_images=num_images,
        )
