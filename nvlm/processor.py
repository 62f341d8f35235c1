"""``NVLMProcessor``: chat conversations + images -> the model inputs of NVLM-D, NVLM-X or NVLM-H.

    processor = NVLMProcessor(tokenizer, NVLMConfig.from_preset("nvlm-d-72b"))  # chat_format="nvlm-d-chat"
    inputs = processor([{"role": "user", "content": "What is this?"}], [image])

Chat formats (``chat_format=``; nvlm-spec §8.2, "Checked against the released files"):

* ``"nvlm-d-chat"`` (the default): exactly what the released NVLM-D-72B ``chat()`` builds, i.e.
  InternVL's ``chatml`` conversation template: MPT separators, no newline after ``<|im_end|>``, a
  system turn always present with "Answer the questions." (a conversation's own first system
  message, or ``system_prompt``, replaces the text; ``system_prompt=None`` drops the turn, as
  ``chat_without_sys_prompt`` does)::

      <|im_start|>system\\nAnswer the questions.<|im_end|><|im_start|>user\\n<Image>…</Image>\\nWhat is this?
      <|im_end|><|im_start|>assistant\\n     (one line)

  Several turns are its conversation history: each message is ``<|im_start|>{role}\\n{content}<|im_end|>``
  with nothing between them; a message with empty content is its header alone (MPT's ``if message``).
* ``"tokenizer"``: the tokenizer's own ``chat_template`` through ``apply_chat_template`` (for
  NVLM-D-72B Qwen2.5's: ``\\n`` after every ``<|im_end|>``, "You are Qwen, …" when the conversation
  has no system message): the prompt OpenAI-style servers such as vLLM build. ``system_prompt``
  (a str) is put first as a system message when the conversation has none.
* ``"megatron"``: Megatron-LM's training format ``qwen2p0`` (the format NVLM was fine-tuned in, and
  what the labels of training runs use): ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn,
  a system turn only from the conversation or ``system_prompt`` (``SFT_SYSTEM_PROMPT`` is the
  paper's), ``<|im_start|>assistant\\n`` as the generation prompt. With the 34B (Yi) tag style it is
  Megatron's ``nvlm-yi-34b`` format, which also starts with the tokenizer's BOS token: Megatron's
  ``--prompt-format nvlm-yi-34b`` sets both the ``<tile_global>`` thumbnail tag and the BOS, so the
  config's ``tiling.tag_style == "nvlm-34b"`` stands for that format.

Why ``"nvlm-d-chat"`` is the default: the one NVLM-1.0 model with released weights is NVLM-D-72B,
and a user who loads them compares against its published inference code; this format gives that
code's prompt and token ids, so the same weights give the same outputs. The model was fine-tuned in
Megatron's format, which differs in the newline after ``<|im_end|>`` and the system message: pass
``chat_format="megatron"`` for training (and to reproduce Megatron's evaluation), and to run a model
trained that way (the NVLM-X / NVLM-H layouts have no released inference code).

In every format a user message's ``<image>`` markers place its images (``<image>\\n`` is put before
the first user message when a sample has images but no marker, as ``chat()`` does); each becomes
the image segment of the variant, built from the tile plan of ``nk.preprocess_images`` and
``nk.tile_tags`` (T tiles, thumbnail last; P image tokens per tile; pad = ``<|vision_pad|>``):

* NVLM-D (§2.2): ``<Image>`` + Σ_k (tag_k + P × pad) + ``</Image>``; the image embeddings later
  fill the pads in order (tile_1 …, thumbnail last).
* NVLM-X (§6.1, §6.3): ``<Image>`` + Σ_k tag_k + ``</Image>``, no pads; all T tiles are
  cross-attention keys and ``tag_tiles`` says which tile each tag token belongs to (a tag row may
  attend only to its tile).
* NVLM-H (§7): the decoder holds the thumbnail, ``<Image>`` + thumbnail tag + P × pad +
  ``</Image>``; the T − 1 regular tiles are cross-attention keys, each preceded by the embeddings
  of its tag, which is tokenized on its own (Megatron style) and returned as ``xattn_tag_ids``.

Token ids: the prompt is one string, tokenized as a whole, as the released ``chat()`` (``tokenizer(
query)``, the tokenizer's default special tokens included) and vLLM do. A byte-level BPE merges
across the joins: ``<Image><tile_1>`` is ``<Image`` ``><`` ``tile`` ``_`` ``1`` ``>``, and
``</Image>\\n`` ends in the one token ``>\\n``. ``"megatron"`` keeps Megatron's own split: its model
splices each tile tag's embeddings, tokenized on its own, next to the tile's, and tokenizes the
text around the ``<image>`` token as whole strings; so there the tokenization restarts at every tag
boundary. Every position is then read off the encoding's character offsets
(``return_offsets_mapping``): a token is an image token, a tag token or a labeled token when its
characters overlap the placeholders, the tag or the labeled text. A token that spans two tags (the
``><`` between ``<tile_1>`` and ``<tile_2>``) belongs to the later one, whose tag it opens. A
tokenizer without offsets (a slow Hugging Face tokenizer) is tokenized piece by piece at those
boundaries instead: the positions stay exact, the ids may differ at the joins; ``ByteTokenizer``
has offsets (and no merges, so both ways give the same ids).

Labels: the tokens of each assistant message's content and of the ``<|im_end|>`` (or the
tokenizer's EOS) that closes it, -100 elsewhere (headers, system and user turns, image tokens, the
BOS, a separator after ``<|im_end|>``): what the model must produce, including how it stops.
(Megatron's targets, the assistant turn less its header, also keep the ``\\n`` after ``<|im_end|>``;
generation stops at the end token, so nothing is learned from that ``\\n`` that inference uses.)
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import nvlm_kernels as nk
from nvlm.config import NVLMConfig
from nvlm_kernels import _nvtx

CHAT_FORMATS = ("nvlm-d-chat", "tokenizer", "megatron")
DEFAULT_CHAT_FORMAT = "nvlm-d-chat"
NVLM_D_CHAT_SYSTEM_MESSAGE = "Answer the questions."  # the released chatml template's system_message
SFT_SYSTEM_PROMPT = "Follow the user's instruction and answer questions."  # the paper's SFT example
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class _FormatDefault:
    """The type of ``FORMAT_DEFAULT``."""

    def __repr__(self) -> str:
        return "FORMAT_DEFAULT"


FORMAT_DEFAULT: Any = _FormatDefault()
"""``system_prompt``'s default: the chat format's own (nvlm-d-chat: "Answer the questions.";
tokenizer: whatever the template does without a system message; megatron: no system turn)."""

# Stand-ins for the message contents when the chat template is rendered (tokenizer format): private
# use characters, which no template writes, so each content's place in the output can be found.
_SENTINEL = "\ue000nvlm-message-{}\ue001"


@dataclass
class NVLMInputs:
    """A tokenized, padded batch. B samples, S positions, M = max images per sample (at least 1).

    input_ids: [B, S] right-padded with the tokenizer's pad id; attention_mask [B, S] True at real
        tokens.
    pixel_values: [T_all, 3, s, s] float32, all tiles of all images (sample order, image order,
        each image's tiles thumbnail last), or None without images.
    tiles_per_image: [B, M] tiles of each image incl. the thumbnail, 0 where there is no image.
    image_positions: [B, M] position of each image's first token (the first that covers a character
        of its ``<Image>``), -1 where none.
    image_token_mask: [B, S] positions that receive image embeddings (D: all pads, H: the
        thumbnail pads, X: none).
    tag_tiles: [B, S] X only: at the tokens of a tile tag (each token that covers a character of it;
        one shared by two tags: the later), the index of that tile among the row's cross-attention
        tiles (image order, thumbnail included); -1 elsewhere and for D and H.
    xattn_tag_ids: [N_regular, L_tag] H only: the tag ids of each regular tile, in pixel_values
        order; ``tag_tokens_per_tile`` = L_tag (0 for D and X).
    labels: [B, S] or None: the token at assistant content and at the ``<|im_end|>`` closing an
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
class _Prompt:
    """One sample's prompt text, written piece by piece, and the character spans [start, end) that
    the model inputs are read from once the whole text is tokenized."""

    pieces: list[str] = dataclasses.field(default_factory=list)
    length: int = 0
    labels: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # assistant content, end token
    images: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # each image's <Image>
    pads: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # (start, end, count) per run
    tags: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # X: (start, end, tile)
    splits: list[int] = dataclasses.field(default_factory=list)  # megatron: tokenization restarts here
    cross_attention_tiles: int = 0  # X: tiles of this sample's images so far

    def add(self, text: str) -> tuple[int, int]:
        start = self.length
        self.pieces.append(text)
        self.length += len(text)
        return start, self.length

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def boundaries(self) -> list[int]:
        """Every span's ends: where a tokenizer without offsets is cut into pieces."""
        spans = [*self.labels, *self.images, *((a, b) for a, b, _ in self.pads), *((a, b) for a, b, _ in self.tags)]
        return [offset for span in spans for offset in span]


class _TokenSpans:
    """The tokens whose characters overlap a span, from the encoding's offsets. Zero-width tokens
    (special tokens the tokenizer adds, such as a BOS, at (0, 0)) overlap nothing."""

    def __init__(self, offsets: Sequence[tuple[int, int]]) -> None:
        self.indices = [i for i, (start, end) in enumerate(offsets) if end > start]
        self.starts = [offsets[i][0] for i in self.indices]
        self.ends = [offsets[i][1] for i in self.indices]
        increasing = all(a <= b for a, b in zip(self.starts, self.starts[1:], strict=False)) and all(
            a <= b for a, b in zip(self.ends, self.ends[1:], strict=False)
        )
        if not increasing:
            raise ValueError("the tokenizer's offset mapping does not increase along the text")

    def overlapping(self, start: int, end: int) -> list[int]:
        if end <= start:
            return []
        first = bisect.bisect_right(self.ends, start)  # tokens ending after the span starts
        stop = bisect.bisect_left(self.starts, end)  # tokens starting before the span ends
        return self.indices[first:stop]


@dataclass
class _Row:
    """One tokenized sample: parallel per-token lists."""

    ids: list[int]
    labels: list[int]
    image_token: list[bool]
    tag_tile: list[int]
    image_positions: list[int]


def _supports_offsets(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text, return_offsets_mapping=True)`` gives character offsets (fast Hugging
    Face tokenizers and ``ByteTokenizer`` do; slow ones raise NotImplementedError)."""
    if not callable(tokenizer):
        return False
    try:
        encoding = tokenizer("a", add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError):
        return False
    return "offset_mapping" in encoding


class NVLMProcessor:
    """Turns conversations and images into ``NVLMInputs`` for the variant of ``config``.

    ``tokenizer``: a Hugging Face tokenizer (``tokenizer(text, return_offsets_mapping=True)``,
    ``encode``, ``convert_tokens_to_ids``, ``pad_token_id``, ``decode``; ``apply_chat_template`` for
    the tokenizer format) or ``nvlm.ByteTokenizer``; it must encode the ChatML tokens and the image
    placeholder of ``config.tokens`` as single tokens.
    ``chat_format``: ``"nvlm-d-chat"`` (default), ``"tokenizer"`` or ``"megatron"`` (module docstring).
    ``system_prompt``: the system message of conversations without their own; ``FORMAT_DEFAULT``
    is the format's (see there), None none.
    """

    def __init__(
        self,
        tokenizer: Any,
        config: NVLMConfig,
        *,
        chat_format: str = DEFAULT_CHAT_FORMAT,
        system_prompt: str | None = FORMAT_DEFAULT,
    ) -> None:
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"chat_format must be one of {CHAT_FORMATS}, got {chat_format!r}")
        if system_prompt is FORMAT_DEFAULT:
            system_prompt = NVLM_D_CHAT_SYSTEM_MESSAGE if chat_format == "nvlm-d-chat" else None
        elif system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a str or None, got {type(system_prompt).__name__}")
        self.tokenizer = tokenizer
        self.config = config
        self.chat_format = chat_format
        self.system_prompt = system_prompt
        self.variant = config.variant
        self.tokens_per_tile = config.tokens_per_tile
        self.tag_style = config.tiling.tag_style
        if self.variant == "H" and not config.tiling.use_thumbnail and config.tiling.max_tiles > 1:
            # The decoder side of NVLM-H is the thumbnail; without one a multi-tile image has none.
            raise ValueError("NVLM-H needs tiling.use_thumbnail=True (its decoder holds the thumbnail tile)")
        if chat_format == "tokenizer" and not (
            getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template")
        ):
            raise ValueError(
                "chat_format 'tokenizer' needs a tokenizer with a chat_template (a Hugging Face tokenizer's "
                "apply_chat_template); this one has none: use chat_format 'nvlm-d-chat' or 'megatron'"
            )
        tokens = config.tokens
        self.image_pad_id = self._single_token(tokens.image_placeholder)
        self._single_token(tokens.im_start)
        self.im_end_ids = [self._single_token(tokens.im_end)]
        self.pad_token_id = self._pad_id()
        # Megatron's nvlm-yi-34b format (the 34B tag style) starts with {{ bos_token }}.
        self.bos_token: str | None = None
        if chat_format == "megatron" and self.tag_style == "nvlm-34b":
            bos = getattr(tokenizer, "bos_token", None)
            if not bos:
                raise ValueError(
                    "chat_format 'megatron' with the 34B (Yi) tag style is Megatron's nvlm-yi-34b format, which "
                    "starts with the tokenizer's BOS token, but this tokenizer has no bos_token"
                )
            self._single_token(bos)
            self.bos_token = bos
        # The token that closes an assistant turn, trained on with it (tokenizer format: the template's).
        eos = getattr(tokenizer, "eos_token", None)
        self._end_tokens = tuple(dict.fromkeys(t for t in (tokens.im_end, eos) if isinstance(t, str) and t))
        # nvlm-d-chat encodes as the released chat() does, tokenizer(query): with the tokenizer's
        # default special tokens (none for Qwen2's). The other formats render their own (a template's
        # BOS, the Yi BOS) and encode without, as vLLM's chat path and Megatron do.
        self._add_special_tokens = chat_format == "nvlm-d-chat"
        self._has_offsets = _supports_offsets(tokenizer)
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

    def _single_token(self, token: str) -> int:
        """The id of ``token``, checked to be what encoding its text gives: a vocabulary entry that
        is not an added token would be split by the BPE like any text."""
        token_id = self._special_id(token)
        encoded = [int(i) for i in self.tokenizer.encode(token + token, add_special_tokens=False)]
        if encoded != [token_id, token_id]:
            raise ValueError(
                f"the tokenizer encodes the text {token!r} as {encoded[: len(encoded) // 2]}, not as its one token "
                f"{token_id}; add it as a special token"
            )
        return token_id

    def _pad_id(self) -> int:
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            pad_id = self._special_id(self.config.tokens.pad)
        return int(pad_id)

    def _encode(self, text: str) -> list[int]:
        """A short string on its own (tags, Megatron style), cached."""
        if text not in self._encode_cache:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            self._encode_cache[text] = [int(i) for i in ids]
        return self._encode_cache[text]

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
        placeholder = self.config.tokens.image_placeholder
        per_sample = []
        for index, (conversation, sample_images) in enumerate(zip(batch, images, strict=True)):
            if not self._is_conversation(conversation):
                raise TypeError(f"sample {index}: a conversation must be a non-empty list of messages")
            for message in conversation:
                if not isinstance(message, Mapping) or message.get("role") not in ROLES:
                    raise ValueError(f"sample {index}: each message needs a role in {ROLES}, got {message!r}")
                if not isinstance(message.get("content"), str):
                    raise TypeError(f"sample {index}: message content must be a str, got {message!r}")
                if placeholder in message["content"]:
                    # It would be an image token no image fills (the released code finds images by it).
                    raise ValueError(
                        f"sample {index}: message text contains the image placeholder {placeholder!r}; "
                        f"images go in with the {self.config.tokens.image_marker!r} marker"
                    )
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
    # writing one prompt

    def _add_image(self, prompt: _Prompt, plan: nk.TilePlan, xattn_tag_ids: list[list[int]]) -> None:
        tokens = self.config.tokens
        tags = nk.tile_tags(plan.total, self.tag_style)
        pads = tokens.image_placeholder * self.tokens_per_tile
        prompt.images.append(prompt.add(tokens.image_start))
        # H: the thumbnail (the last tile) in the decoder, the regular tiles as cross-attention keys
        for tag in tags[-1:] if self.variant == "H" else tags:
            start, end = prompt.add(tag)
            if self.chat_format == "megatron":
                prompt.splits += [start, end]
            if self.variant == "X":
                prompt.tags.append((start, end, prompt.cross_attention_tiles))
                prompt.cross_attention_tiles += 1
            else:
                prompt.pads.append((*prompt.add(pads), self.tokens_per_tile))
        if self.variant == "H":
            xattn_tag_ids.extend(self._encode(tag) for tag in tags[:-1])
        prompt.add(tokens.image_end)

    def _add_content(
        self, prompt: _Prompt, message: Mapping[str, str], plans: Iterator[nk.TilePlan], xattn_tag_ids: list[list[int]]
    ) -> None:
        role, content = message["role"], message["content"]
        if role == "user":
            for piece_index, piece in enumerate(content.split(self.config.tokens.image_marker)):
                if piece_index:
                    self._add_image(prompt, next(plans), xattn_tag_ids)
                prompt.add(piece)
        elif role == "assistant":
            prompt.labels.append(prompt.add(content))
        else:
            prompt.add(content)

    def _add_end(self, prompt: _Prompt, role: str) -> None:
        """The ``<|im_end|>`` closing a turn; an assistant's is trained on: it is how the model stops."""
        span = prompt.add(self.config.tokens.im_end)
        if role == "assistant":
            prompt.labels.append(span)

    def _nvlm_d_chat_prompt(self, index: int, messages: list[dict[str, str]], **kw: Any) -> _Prompt:
        tokens = self.config.tokens
        for position, message in enumerate(messages[1:], start=1):
            if message["role"] == "system":
                raise ValueError(
                    f"sample {index}: chat_format 'nvlm-d-chat' has one system turn, the first message; "
                    f"message {position} is a system message"
                )
        system = self.system_prompt
        if messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        prompt = _Prompt()
        if system is not None:
            prompt.add(f"{tokens.im_start}system\n{system}{tokens.im_end}")
        for message in messages:
            prompt.add(f"{tokens.im_start}{message['role']}\n")
            if message["content"]:  # MPT writes a message with empty content as its header alone
                self._add_content(prompt, message, kw["plans"], kw["xattn_tag_ids"])
                self._add_end(prompt, message["role"])
        if kw["add_generation_prompt"] and (not messages or messages[-1]["role"] != "assistant"):
            prompt.add(f"{tokens.im_start}assistant\n")
        return prompt

    def _megatron_prompt(self, index: int, messages: list[dict[str, str]], **kw: Any) -> _Prompt:
        tokens = self.config.tokens
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        prompt = _Prompt()
        if self.bos_token:
            prompt.add(self.bos_token)
        for message in messages:
            prompt.add(f"{tokens.im_start}{message['role']}\n")
            self._add_content(prompt, message, kw["plans"], kw["xattn_tag_ids"])
            self._add_end(prompt, message["role"])
            prompt.add("\n")
        if kw["add_generation_prompt"] and messages[-1]["role"] != "assistant":
            prompt.add(f"{tokens.im_start}assistant\n")
        return prompt

    def _render_template(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not a str")
        return text

    def _tokenizer_prompt(self, index: int, messages: list[dict[str, str]], **kw: Any) -> _Prompt:
        """The template rendered with a sentinel for each message's content locates the contents;
        the image segments and the labels are then written in their place."""
        if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        generation = kw["add_generation_prompt"] and messages[-1]["role"] != "assistant"
        sentinels = [_SENTINEL.format(i) for i in range(len(messages))]
        rendered = self._render_template(
            [{"role": m["role"], "content": s} for m, s in zip(messages, sentinels, strict=True)], generation
        )
        between, position = [], 0  # the template's text before each content, and after the last
        for sentinel in sentinels:
            found = rendered.find(sentinel, position)
            if found < 0 or rendered.count(sentinel) != 1:
                between = None
                break
            between.append(rendered[position:found])
            position = found + len(sentinel)
        if between is not None:
            between.append(rendered[position:])
            rebuilt = between[0] + "".join(m["content"] + after for m, after in zip(messages, between[1:], strict=True))
        if between is None or rebuilt != self._render_template(messages, generation):
            raise ValueError(
                f"sample {index}: the tokenizer's chat_template does not write each message's content once, "
                "verbatim and in order, so the images and labels cannot be placed in it; use chat_format "
                "'nvlm-d-chat' or 'megatron'"
            )
        prompt = _Prompt()
        prompt.add(between[0])
        for message, after in zip(messages, between[1:], strict=True):
            self._add_content(prompt, message, kw["plans"], kw["xattn_tag_ids"])
            end = next((token for token in self._end_tokens if after.startswith(token)), "")
            if message["role"] == "assistant" and end:
                prompt.labels.append(prompt.add(end))
                after = after[len(end) :]
            prompt.add(after)
        return prompt

    # ---------------------------------------------------------------------------------------------
    # tokenizing one prompt

    def _tokenize(self, prompt: _Prompt) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and character offsets of the whole text (of each piece between ``prompt.splits``).
        Without offsets: each piece between span boundaries on its own, every token of a piece
        given the piece's span."""
        text = prompt.text
        cuts = prompt.splits if self._has_offsets else [*prompt.splits, *prompt.boundaries()]
        bounds = sorted({0, len(text), *cuts})
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for start, end in zip(bounds, bounds[1:], strict=False):
            piece = text[start:end]
            add_special_tokens = self._add_special_tokens and start == 0
            if self._has_offsets:
                encoding = self.tokenizer(piece, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
                piece_ids = [int(i) for i in encoding["input_ids"]]
                piece_offsets = [(start + int(a), start + int(b)) for a, b in encoding["offset_mapping"]]
            else:
                piece_ids = [int(i) for i in self.tokenizer.encode(piece, add_special_tokens=add_special_tokens)]
                piece_offsets = [(start, end)] * len(piece_ids)
            ids += piece_ids
            offsets += piece_offsets
        return ids, offsets

    def _row(self, index: int, prompt: _Prompt) -> _Row:
        ids, offsets = self._tokenize(prompt)
        spans = _TokenSpans(offsets)
        labeled = [False] * len(ids)
        image_token = [False] * len(ids)
        tag_tile = [-1] * len(ids)
        for start, end in prompt.labels:
            for token in spans.overlapping(start, end):
                labeled[token] = True
        for start, end, count in prompt.pads:
            tokens = spans.overlapping(start, end)
            if len(tokens) != count or any(ids[token] != self.image_pad_id for token in tokens):
                raise ValueError(
                    f"sample {index}: {count} image placeholders {self.config.tokens.image_placeholder!r} were "
                    f"encoded as {[ids[token] for token in tokens]}, not {count} × {self.image_pad_id}"
                )
            for token in tokens:
                image_token[token] = True
        for start, end, tile in prompt.tags:  # in order: a token shared by two tags ends with the later
            for token in spans.overlapping(start, end):
                tag_tile[token] = tile
        image_positions = []
        for start, end in prompt.images:
            first = spans.overlapping(start, end)
            if not first:
                raise ValueError(f"sample {index}: no token covers the image's {self.config.tokens.image_start!r}")
            image_positions.append(first[0])
        labels = [token_id if use else IGNORE_INDEX for token_id, use in zip(ids, labeled, strict=True)]
        return _Row(ids, labels, image_token, tag_tile, image_positions)

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
        do not match its images. ``add_generation_prompt``: end with the assistant header, unless the
        last message is the assistant's.
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

        write_prompt = {
            "nvlm-d-chat": self._nvlm_d_chat_prompt,
            "tokenizer": self._tokenizer_prompt,
            "megatron": self._megatron_prompt,
        }[self.chat_format]
        xattn_tag_ids: list[list[int]] = []
        rows = []
        for index, (messages, sample_plans) in enumerate(zip(conversations_with_markers, plans, strict=True)):
            prompt = write_prompt(
                index,
                messages,
                plans=iter(sample_plans),
                xattn_tag_ids=xattn_tag_ids,
                add_generation_prompt=add_generation_prompt,
            )
            rows.append(self._row(index, prompt))
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
