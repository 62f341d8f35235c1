"""``ByteTokenizer``: a dependency-free byte-level tokenizer for the tiny presets and the tests.

Random-weight runs of the tiny models need a tokenizer but no download, so this one maps text to
UTF-8 bytes (ids 0..255) and gives each special token one id after them (256, 257, ...). It offers
the subset of the Hugging Face tokenizer interface that ``nvlm.NVLMProcessor`` uses, so the
processor code is the same for it and for a real Qwen2 tokenizer.

Only the special tokens are matched as units; everything else, tile tags such as ``<tile_1>`` and
the ``<Image>`` wrappers included, is plain text and becomes bytes, as those strings are ordinary
text (several tokens) in Qwen's tokenizer too (nvlm-spec §2.2).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
VISION_PAD_TOKEN = "<|vision_pad|>"
DEFAULT_SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN, VISION_PAD_TOKEN)
NUM_BYTE_IDS = 256


class ByteTokenizer:
    """UTF-8 bytes plus one id per special token (``<|endoftext|>`` = pad, ``<|im_start|>``,
    ``<|im_end|>`` = eos, ``<|vision_pad|>``, then ``extra_special_tokens`` in order, then
    ``bos_token`` if it is not among them: the 34B (Yi) prompt format starts with a BOS).

    With the default specials ``vocab_size`` is 260, inside the tiny presets' LLM vocabulary (320).
    """

    def __init__(self, extra_special_tokens: Iterable[str] = (), *, bos_token: str | None = None) -> None:
        specials = list(DEFAULT_SPECIAL_TOKENS)
        for token in extra_special_tokens:
            if not isinstance(token, str) or not token:
                raise ValueError(f"special tokens must be non-empty strings, got {token!r}")
            if token in specials:
                raise ValueError(f"special token {token!r} given twice")
            specials.append(token)
        if bos_token is not None:
            if not isinstance(bos_token, str) or not bos_token:
                raise ValueError(f"bos_token must be a non-empty string, got {bos_token!r}")
            if bos_token not in specials:
                specials.append(bos_token)
        self.all_special_tokens: list[str] = specials
        self._special_to_id = {token: NUM_BYTE_IDS + i for i, token in enumerate(specials)}
        self._id_to_special = {i: token for token, i in self._special_to_id.items()}
        # Longest first, so that a special that contains another one wins.
        alternatives = sorted(specials, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(token) for token in alternatives) + ")")
        self.pad_token = PAD_TOKEN
        self.eos_token = IM_END_TOKEN
        self.bos_token = bos_token
        self.unk_token = None

    # ---------------------------------------------------------------------------------------------
    # Hugging Face tokenizer interface (the subset the processor uses)

    @property
    def vocab_size(self) -> int:
        return NUM_BYTE_IDS + len(self.all_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return [self._special_to_id[token] for token in self.all_special_tokens]

    @property
    def pad_token_id(self) -> int:
        return self._special_to_id[self.pad_token]

    @property
    def eos_token_id(self) -> int:
        return self._special_to_id[self.eos_token]

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._special_to_id[self.bos_token]

    @property
    def unk_token_id(self) -> None:
        return None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special-token strings become their ids, the rest its UTF-8 bytes. ``add_special_tokens``
        is accepted for interface compatibility; this tokenizer adds no BOS/EOS either way."""
        return self._encode_with_offsets(text)[0]

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids and, per id, the [start, end) character span of ``text`` it encodes (every byte of
        a multi-byte character gets that character's span, as Hugging Face's byte-level BPE does)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        position = 0
        # re.split with a capturing group alternates plain text (even indices) and specials (odd).
        for index, piece in enumerate(self._special_pattern.split(text)):
            if index % 2:
                ids.append(self._special_to_id[piece])
                offsets.append((position, position + len(piece)))
            elif piece.isascii():  # one byte per character
                ids.extend(piece.encode("ascii"))
                offsets.extend((offset, offset + 1) for offset in range(position, position + len(piece)))
            else:
                for offset, character in enumerate(piece, start=position):
                    encoded = character.encode("utf-8")
                    ids.extend(encoded)
                    offsets.extend([(offset, offset + 1)] * len(encoded))
            position += len(piece)
        return ids, offsets

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Bytes are joined and decoded as UTF-8 (invalid sequences become U+FFFD, as a partial
        multi-byte character can occur mid-generation)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        pieces: list[str] = []
        pending = bytearray()
        for token_id in ids:
            token_id = int(token_id)
            if 0 <= token_id < NUM_BYTE_IDS:
                pending.append(token_id)
                continue
            if token_id not in self._id_to_special:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
            pieces.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            if not skip_special_tokens:
                pieces.append(self._id_to_special[token_id])
        pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def convert_tokens_to_ids(self, token: str) -> int:
        """The id of a special token, or of a one-byte token (a single ASCII character)."""
        if token in self._special_to_id:
            return self._special_to_id[token]
        encoded = token.encode("utf-8") if isinstance(token, str) else b""
        if len(encoded) == 1:
            return encoded[0]
        raise KeyError(f"{token!r} is not a token of ByteTokenizer (only specials and single bytes are)")

    def __call__(
        self, text: str | Sequence[str], add_special_tokens: bool = False, return_offsets_mapping: bool = False
    ) -> dict[str, list]:
        """``{"input_ids": ...}`` (and ``"offset_mapping"``: per id its character span) for a string
        or, element-wise, a list of them."""
        texts = [text] if isinstance(text, str) else list(text)
        encodings = [self._encode_with_offsets(item) for item in texts]
        result: dict[str, list] = {"input_ids": [ids for ids, _ in encodings]}
        if return_offsets_mapping:
            result["offset_mapping"] = [offsets for _, offsets in encodings]
        if isinstance(text, str):
            result = {key: value[0] for key, value in result.items()}
        return result

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, specials={self.all_special_tokens})"
