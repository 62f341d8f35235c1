"""The NVLM-D / NVLM-X / NVLM-H models, assembled from the public ops.

    model = nvlm.build_model("tiny-d")                 # random weights
    inputs = NVLMProcessor(ByteTokenizer(), model.config)(conversation, images)
    out = model(inputs)                                # out.logits [B, S, V]; out.loss with labels

One class, ``NVLM``, for the three variants (``config.variant``):

* **D** — the tiles' image embeddings replace the ``<|vision_pad|>`` placeholders after each tile
  tag in the decoder sequence (spec §2.2); no cross-attention.
* **X** — the decoder sequence is text (with the tile tags); gated cross-attention blocks before
  every ``xattn.every``-th layer attend to all tiles of the image, thumbnail included, a tag's
  tokens to their own tile only (``cross_attention_ranges(policy="nvlm-x")``, spec §6).
* **H** — the thumbnail's embeddings go into the decoder like NVLM-D's; the regular tiles, each
  preceded by its tag's token embeddings, are the cross-attention keys/values (``"nvlm-h"``, §7).

Data flow: pixel values -> InternViT (``vit_qk_norm_attention``) -> projector (``mlp_projector``
with the CLS drop and pixel shuffle fused) -> decoder inputs and/or cross-attention keys/values ->
Qwen2 decoder (SDPA self-attention) with the blocks inserted through its ``before_layer`` hook.

Generation (``model.generate``, ``nvlm.generate``) runs ``hidden_states`` once over the prompts as
the prefill, filling a ``KVCache`` and a ``CrossAttentionCache``, then ``decode_step`` per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import nvlm_kernels as nk
from nvlm.config import NVLMConfig
from nvlm.llm import KVCache, Qwen2Decoder
from nvlm.parallel import TPGroup, check_tp
from nvlm.projector import MLPProjector
from nvlm.vision import InternViT
from nvlm.xattn import GatedCrossAttentionBlock
from nvlm_kernels import _nvtx

IGNORE_INDEX = -100
COMPONENTS = ("vision", "projector", "llm", "xattn")


@dataclass
class NVLMOutput:
    logits: torch.Tensor  # [B, S, V]
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != -100


@dataclass(frozen=True)
class InputFacts:
    """What ``check_inputs`` brought to the host in its one transfer, for the rest of the forward."""

    tiles_per_image: list[list[int]] | None  # [B][M] tiles of each image (thumbnail included)
    all_real: bool  # no padding token in the batch


@dataclass
class CrossAttentionInputs:
    """What every cross-attention block of one forward reads: the image-side sequence (projected to
    keys/values by each block, once) and each text row's key range."""

    image_embeds: torch.Tensor  # [B, N_kv, hidden]
    kv_start: torch.Tensor  # int32 [B, S]
    kv_end: torch.Tensor  # int32 [B, S]


@dataclass
class CrossAttentionCache:
    """The cross-attention state of one generation request, filled by the prefill and read by every
    decoding step: each block's image keys/values (``project_kv`` once per request, not once per
    token) and the key range of every generated token. One range serves all of them: generated text
    is never a tile tag and comes after every image of the prompt, so it sees the prompt's last image
    (all of its images with ``attend_all_previous``), or nothing in a row without images."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # block index -> (k, v)
    kv_start: torch.Tensor | None = None  # int32 [B, 1]
    kv_end: torch.Tensor | None = None  # int32 [B, 1]


class NVLM(nn.Module):
    """``tp``: this process's tensor-parallel rank (``nvlm.parallel.TPGroup``); None or size 1 is the
    single-process model. At TP > 1 every module holds only this rank's shards."""

    def __init__(self, config: NVLMConfig, *, device=None, dtype=None, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp if tp is not None else TPGroup()
        check_tp(config, self.tp.size)
        kw = {"device": device, "dtype": dtype, "tp": self.tp}
        p = config.projector
        self.vision = InternViT(config.vision, **kw)
        self.projector = MLPProjector(
            config.vision.hidden_size, config.llm.hidden_size, p.hidden, layer_norm=p.layer_norm, bias=p.bias,
            downsample_ratio=p.downsample_ratio, ps_version=p.ps_version, eps=p.eps, activation=p.activation, **kw,
        )  # fmt: skip
        self.llm = Qwen2Decoder(config.llm, **kw)
        self.xattn = nn.ModuleDict()
        if config.xattn is not None:
            for i in config.xattn.layer_indices(config.llm.num_layers):
                self.xattn[str(i)] = GatedCrossAttentionBlock(
                    config.llm, config.xattn, kv_dim=config.llm.hidden_size, index=i, **kw
                )

    # ----------------------------------------------------------------------------------------------
    # images

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [T, 3, S, S] -> image embeddings [T, tokens_per_tile, hidden] (ViT, CLS drop, pixel
        shuffle, projector)."""
        with _nvtx.range("nvlm.vision"):
            features = self.vision(pixel_values)
        with _nvtx.range("nvlm.projector"):
            # The parts may hold different dtypes (nvlm.from_pretrained(dtype=None)): the projector's op
            # takes its input in its own (a no-op when they agree).
            return self.projector(features.to(self.projector[0].weight.dtype))

    # ----------------------------------------------------------------------------------------------
    # checks: every one runs before any kernel

    def check_inputs(self, inputs, *, past_length: int = 0) -> InputFacts:
        """Checks ``inputs`` against the config and returns the host-side facts the forward needs
        (tiles per image, whether any token is padding). Every value that lives on the device comes
        to the host in ONE transfer (one device sync per forward, none per check); ``decode_step``
        makes none."""
        cfg = self.config
        ids = inputs.input_ids
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(ids.shape)}")
        if past_length + ids.shape[1] > cfg.max_seq_len:
            raise ValueError(
                f"input_ids: sequence length {past_length + ids.shape[1]} exceeds the model's maximum "
                f"{cfg.max_seq_len} (config.max_seq_len)"
            )
        tiles = inputs.tiles_per_image
        mask = inputs.attention_mask
        device = ids.device
        scalars = [
            ids.min() if ids.numel() else ids.new_zeros(()),
            ids.max() if ids.numel() else ids.new_zeros(()),
            inputs.image_token_mask.sum(),
            mask.to(torch.bool).all() if mask is not None else ids.new_ones((), dtype=torch.bool),
        ]
        if cfg.variant != "D" and tiles is not None:  # what cross_attention_ranges would check, in this transfer
            scalars += self._layout_problems(inputs, ids.shape[1])
        parts = [torch.stack([x.to(device=device, dtype=torch.long) for x in scalars])]
        if tiles is not None:
            parts.append(tiles.reshape(-1).to(device=device, dtype=torch.long))
        host = torch.cat(parts).tolist()  # the one device -> host transfer
        ids_min, ids_max, slots, all_real = host[:4]
        layout = host[4 : len(scalars)]
        tile_rows = None
        if tiles is not None:
            width = tiles.shape[1] if tiles.dim() == 2 else 0
            flat = host[len(scalars) :]
            tile_rows = [flat[i : i + width] for i in range(0, len(flat), width)] if width else []
        if ids.numel() and (ids_min < 0 or ids_max >= cfg.llm.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {cfg.llm.vocab_size}) (the vocabulary)")
        counts = [n for row in tile_rows or [] for n in row]
        total = sum(counts)
        pixels = inputs.pixel_values
        if total and max(counts) > cfg.max_tiles_per_image:
            raise ValueError(
                f"tiles_per_image: an image has {max(counts)} tiles, more than the config allows "
                f"({cfg.tiling.max_tiles} + thumbnail = {cfg.max_tiles_per_image})"
            )
        if (pixels.shape[0] if pixels is not None else 0) != total:
            got = "None" if pixels is None else f"{pixels.shape[0]} tiles"
            raise ValueError(f"pixel_values has {got}, but tiles_per_image sums to {total}")
        if pixels is not None:
            size = cfg.vision.image_size
            if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (cfg.vision.num_channels, size, size):
                raise ValueError(
                    f"pixel_values must be [T, {cfg.vision.num_channels}, {size}, {size}], got {tuple(pixels.shape)}"
                )
        if any(n < 0 for n in counts):
            raise ValueError("tiles_per_image must be >= 0")
        for bad, message in zip(layout, self._LAYOUT_RULES, strict=False):
            if bad:
                raise ValueError(message)
        present = sum(1 for n in counts if n > 0)
        expected = {"D": total, "H": present if total else 0, "X": 0}[cfg.variant] * cfg.tokens_per_tile
        if slots != expected:
            raise ValueError(
                f"image_token_mask marks {slots} image-token positions, but NVLM-{cfg.variant} needs {expected} "
                f"for these images"
            )
        return InputFacts(tile_rows, bool(all_real))

    _LAYOUT_RULES = (
        "image_positions must lie in [0, sequence length) and increase along each row, -1 (absent) at the end",
        "tag_tiles names a tile beyond the row's cross-attention tiles",
    )

    def _layout_problems(self, inputs, num_text_tokens: int) -> list[torch.Tensor]:
        """Device flags (one per ``_LAYOUT_RULES`` entry) for the rules ``cross_attention_ranges``
        checks, so that check_inputs brings them over in its one transfer and the ranges are built
        with ``validate=False`` (no host sync of their own)."""
        positions = inputs.image_positions.long()
        present = positions >= 0
        ordered = torch.where(present, positions, torch.iinfo(torch.long).max)
        bad_positions = (present & (positions >= num_text_tokens)).any()
        if positions.shape[1] > 1:
            bad_positions = bad_positions | (ordered[:, 1:] < ordered[:, :-1]).any()
        flags = [bad_positions]
        if self.config.variant == "X" and inputs.tag_tiles is not None:
            tags = inputs.tag_tiles.long()
            key_tiles = self._key_tiles(inputs.tiles_per_image.long()).clamp(min=0).sum(1, keepdim=True)
            flags.append(((tags >= 0) & (tags >= key_tiles)).any())
        return flags

    def _facts(self, inputs, facts: InputFacts | None) -> InputFacts:
        return facts if facts is not None else self.check_inputs(inputs)

    # ----------------------------------------------------------------------------------------------
    # decoder inputs and cross-attention inputs

    @staticmethod
    def _tile_index(facts: InputFacts, device: torch.device, *, thumbnails: bool) -> torch.Tensor:
        """Indices in the flat tile list of each present image's last tile (its thumbnail), or of
        every other tile, from the host's tile counts (boolean indexing would sync on a GPU)."""
        index, position = [], 0
        for n in (n for row in facts.tiles_per_image or [] for n in row):
            if n > 0:
                index += [position + n - 1] if thumbnails else list(range(position, position + n - 1))
                position += n
        return torch.tensor(index, dtype=torch.long, device=device)

    def embed_inputs(
        self, inputs, image_features: torch.Tensor | None, facts: InputFacts | None = None
    ) -> torch.Tensor:
        embeds = self.llm.embed(inputs.input_ids)
        if image_features is None or self.config.variant == "X":
            return embeds
        if self.config.variant == "H":
            thumbnails = self._tile_index(self._facts(inputs, facts), image_features.device, thumbnails=True)
            image_features = image_features[thumbnails]
        # in order: the D tiles (tile_1 .. thumbnail) of each image, or the H thumbnails
        flat = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(inputs.image_token_mask.unsqueeze(-1), flat)

    def cross_attention_inputs(
        self, inputs, image_features: torch.Tensor | None, facts: InputFacts | None = None
    ) -> CrossAttentionInputs | None:
        """The key/value-side sequence of each batch row and the text rows' ranges, or None when the
        batch has no image keys (then every block would add exactly zero, so they are skipped)."""
        cfg = self.config
        if cfg.variant == "D" or image_features is None:
            return None
        rows = self._facts(inputs, facts).tiles_per_image or []
        per_tile = cfg.tokens_per_tile
        tag_len = 0
        if cfg.variant == "X":
            per_row_tiles = [sum(row) for row in rows]
            pieces = image_features  # [T, P, hidden]: every tile, thumbnail included
        else:  # H: the regular tiles, each after its tag's embeddings
            per_row_tiles = [sum(n - 1 for n in row if n > 1) for row in rows]
            if not sum(per_row_tiles):
                return None
            regular = self._tile_index(self._facts(inputs, facts), image_features.device, thumbnails=False)
            tag_ids = inputs.xattn_tag_ids
            tag_len = int(inputs.tag_tokens_per_tile)
            tag_embeds = self.llm.embed(tag_ids).to(image_features.dtype)  # [N_regular, tag_len, hidden]
            pieces = torch.cat([tag_embeds, image_features[regular]], dim=1)
        keys_per_tile = per_tile + tag_len
        batch, width = len(rows), max(per_row_tiles, default=0) * keys_per_tile
        image_embeds = pieces.new_zeros((batch, width, pieces.shape[-1]))
        flat = pieces.reshape(-1, keys_per_tile, pieces.shape[-1])
        start = 0
        for b, n in enumerate(per_row_tiles):  # one slice per batch row, not per token
            image_embeds[b, : n * keys_per_tile] = flat[start : start + n].reshape(-1, pieces.shape[-1])
            start += n
        kv_start, kv_end = self._cross_attention_ranges(inputs, inputs.input_ids.shape[1], inputs.tag_tiles)
        return CrossAttentionInputs(image_embeds, kv_start, kv_end)

    def _key_tiles(self, tiles_per_image: torch.Tensor) -> torch.Tensor:
        """[B, M] tiles of each image among the cross-attention keys: X all of them, thumbnail
        included; H the regular tiles (a one-tile image is its own thumbnail: no keys)."""
        if self.config.variant == "X":
            return tiles_per_image
        return torch.where(tiles_per_image > 1, tiles_per_image - 1, torch.zeros_like(tiles_per_image))

    def _cross_attention_ranges(
        self, inputs, num_text_tokens: int, tag_tiles: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return nk.cross_attention_ranges(
            inputs.image_positions, self._key_tiles(inputs.tiles_per_image.to(torch.long)), num_text_tokens,
            policy="nvlm-x" if cfg.variant == "X" else "nvlm-h",
            tag_tiles=tag_tiles if cfg.variant == "X" else None,
            tokens_per_tile=cfg.tokens_per_tile,
            tag_tokens_per_tile=int(inputs.tag_tokens_per_tile) if cfg.variant == "H" else 0,
            attend_all_previous=cfg.xattn.attend_all_previous,
            validate=False,  # check_inputs checked the layout in its one transfer
        )  # fmt: skip

    def next_token_ranges(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 [B, 1]: the key range of every token that generation appends: the layout rule applied
        to one more column after the prompt, a text column (no tag). Not the prompt's last column,
        which would be a tag's range in a prompt that ends inside an image segment."""
        kv_start, kv_end = self._cross_attention_ranges(inputs, inputs.input_ids.shape[1] + 1, None)
        return kv_start[:, -1:], kv_end[:, -1:]

    def _before_layer(self, cross: CrossAttentionInputs | None, cross_cache: CrossAttentionCache | None = None):
        """The decoder's ``before_layer`` hook running the cross-attention blocks, or None when there is
        nothing to attend to. Three uses:

        * a forward over a whole sequence (``cross`` only): each block projects ``cross.image_embeds``;
        * a prefill (``cross`` and an empty ``cross_cache``): the same, and each block's keys/values
          are kept in the cache;
        * a decoding step (``cross_cache`` only): the kept keys/values and the cache's one-token range.
        """
        if not len(self.xattn):
            return None
        if cross is not None:
            kv_start, kv_end = cross.kv_start, cross.kv_end
        elif cross_cache is not None and cross_cache.kv:
            kv_start, kv_end = cross_cache.kv_start, cross_cache.kv_end
        else:
            return None  # no image keys in the batch: every block would add exactly zero
        blocks = self.xattn

        def run(index: int, hidden: torch.Tensor) -> torch.Tensor:
            block = blocks[str(index)] if str(index) in blocks else None
            if block is None:
                return hidden
            kv = cross_cache.kv.get(index) if cross_cache is not None else None
            if kv is None:
                kv = block.project_kv(cross.image_embeds.to(hidden.dtype))
                if cross_cache is not None:
                    cross_cache.kv[index] = kv
            return block(hidden, kv, kv_start, kv_end)

        return run

    # ----------------------------------------------------------------------------------------------

    def hidden_states(
        self,
        inputs,
        *,
        cache: KVCache | None = None,
        cross_cache: CrossAttentionCache | None = None,
        facts: InputFacts | None = None,
    ) -> torch.Tensor:
        """The decoder's final hidden states [B, S, H] for ``inputs`` (what ``forward`` turns into
        logits). With ``cache`` the new keys/values are appended to it; with ``cross_cache`` (a fresh
        one: this is a prefill) the cross-attention keys/values and the generated tokens' range are
        stored in it for ``decode_step``. ``facts``: what ``check_inputs`` returned for these inputs
        (checked already: not again)."""
        past = cache.length if cache is not None else 0
        if facts is None:
            facts = self.check_inputs(inputs, past_length=past)
        features = self.encode_images(inputs.pixel_values) if inputs.pixel_values is not None else None
        embeds = self.embed_inputs(inputs, features, facts)
        cross = self.cross_attention_inputs(inputs, features, facts)
        if cross_cache is not None and cross is not None:
            cross_cache.kv_start, cross_cache.kv_end = self.next_token_ranges(inputs)
        mask = inputs.attention_mask.to(torch.bool)
        positions = (torch.cumsum(mask.long(), 1) - 1).clamp(min=0) + past
        full_mask = None  # no padding: SDPA's own causal path, no mask tensor
        if not facts.all_real:
            full_mask = torch.cat([mask.new_ones((mask.shape[0], past)), mask], 1) if past else mask
        return self.llm(
            embeds,
            positions,
            attention_mask=full_mask,
            cache=cache,
            before_layer=self._before_layer(cross, cross_cache),
        )

    def forward(
        self,
        inputs,
        *,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cross_cache: CrossAttentionCache | None = None,
    ) -> NVLMOutput:
        """``inputs``: an ``nvlm.processor.NVLMInputs`` (or anything with its fields). Labels default
        to ``inputs.labels``. ``cache`` / ``cross_cache``: see ``hidden_states``."""
        logits = self.llm.logits(self.hidden_states(inputs, cache=cache, cross_cache=cross_cache))
        labels = labels if labels is not None else getattr(inputs, "labels", None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        return NVLMOutput(logits, loss)

    def decode_step(
        self,
        token_ids: torch.Tensor,
        cache: KVCache,
        cross_cache: CrossAttentionCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One text token per row after what ``cache`` holds -> logits [B, 1, V].

        Args:
            token_ids: [B, 1] the tokens to feed (text: no image embeddings, no tags).
            cache: the decoder's keys/values so far; the new ones are appended.
            cross_cache: from the prefill (X, H): the blocks' keys/values and the new token's range.
            attention_mask: bool [B, cache.length + 1], True at real tokens, the new one included;
                None when no row has padding. Each row's new position is its count of real tokens
                minus one, which makes left padding invisible to the rotary positions.
        """
        batch = token_ids.shape[0]
        if attention_mask is None:
            positions = torch.full((batch, 1), cache.length, dtype=torch.long, device=token_ids.device)
        else:
            positions = attention_mask.to(torch.long).sum(1, keepdim=True) - 1
        hidden = self.llm(
            self.llm.embed(token_ids),
            positions,
            attention_mask=attention_mask,
            cache=cache,
            before_layer=self._before_layer(None, cross_cache),
        )
        return self.llm.logits(hidden)

    def generate(self, inputs, **options):
        """Generate text after each prompt of ``inputs``: ``nvlm.generate.generate(self, inputs, ...)``
        (greedy or sampled, with KV and cross-attention caches); returns a ``GenerationOutput``."""
        from nvlm.generate import generate  # here: nvlm.generate imports this module

        return generate(self, inputs, **options)


# --------------------------------------------------------------------------------------------------
# entry points


def _config(name_or_config: str | NVLMConfig) -> NVLMConfig:
    if isinstance(name_or_config, NVLMConfig):
        return name_or_config
    if isinstance(name_or_config, str):
        return NVLMConfig.from_preset(name_or_config)
    raise TypeError(f"expected a preset name or an NVLMConfig, got {type(name_or_config).__name__}")


def build_model(
    name_or_config: str | NVLMConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tp: int | TPGroup | None = None,
) -> NVLM:
    """An ``NVLM`` with random weights (load a checkpoint with ``nvlm.checkpoint``). On the meta
    device (no memory) it prints the parameter count of each component.

    ``tp``: tensor-parallel size (None: the ``torch.distributed`` world size when initialized, else
    1). At TP > 1 only this rank's shards are built (``nvlm.parallel``); a size that does not divide
    the heads / kv heads / FFN / vocabulary, or differs from the world size, is a ValueError."""
    config = _config(name_or_config)
    group = TPGroup.resolve(tp)
    check_tp(config, group.size)
    model = NVLM(config, device=device, dtype=dtype, tp=group)
    if device is not None and torch.device(device).type == "meta":
        counts = count_parameters(model)
        print(f"{config.name} (NVLM-{config.variant}): " + ", ".join(f"{k} {_human(v)}" for k, v in counts.items()))
    return model


def count_parameters(model: NVLM) -> dict[str, int]:
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in COMPONENTS}
    counts["total"] = sum(counts.values())
    return counts


def parameter_counts(name_or_config: str | NVLMConfig, tp: int = 1) -> dict[str, int]:
    """Parameters per component (``vision``, ``projector``, ``llm``, ``xattn``, ``total``), counted
    on a model built on the meta device (no memory, no time). With ``tp`` > 1: those of one rank
    (rank 0; every rank holds the same shapes), NVLM's dummy ViT heads included."""
    group = TPGroup(tp, 0) if tp > 1 else None
    if group is not None:
        check_tp(_config(name_or_config), tp)
    return count_parameters(NVLM(_config(name_or_config), device="meta", tp=group))


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
