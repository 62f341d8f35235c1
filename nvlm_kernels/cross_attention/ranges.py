"""Per-query key ranges for gated cross-attention, from a token layout or from a mask.

Every cross-attention layout of NVLM-X / NVLM-H, Llama-3.2-Vision (Mllama) and Flamingo lets each
text row see one contiguous range of the image key/value sequence, or nothing. The key/value
sequence holds each batch row's images one after another, each as its tiles one after another
(``tokens_per_tile`` keys each; NVLM-H puts ``tag_tokens_per_tile`` tag-embedding keys before each
tile's image keys). A text row sees, by policy:

* ``"nvlm-x"``: nothing before the first image; after image m (from its position on), all tiles of
  image m (``attend_all_previous``: of images 0..m); a row that is part of the tag of tile g sees
  only tile g (the one rule the paper states).
* ``"nvlm-h"``: the same over the interleaved [tag_k, tile_k] key/value sequence; a tag row sees
  its tag and tile.
* ``"mllama"``: Hugging Face's processor rule: image m is visible from its image token to the next
  image token, and images whose tokens are adjacent form a group that stays visible together.
* ``"flamingo"``: the most recent image only (``attend_all_previous``: every image so far).

``ranges_from_tile_mask(tile_mask, tokens_per_tile)`` takes a tile-level mask instead (Hugging
Face's Mllama processor gives one: text rows × images × max_tiles): it drops the tiles no row sees
(padding tiles) from the key sequence, so that each row's tiles become one contiguous range, and
says which tiles to gather; the token-level mask is never built.

Everything is computed with tensor operations on the inputs' device, without a Python loop over
tokens. The ranges it returns are well formed by construction (0 <= start <= end) and are marked
as such: ``gated_cross_attention`` skips its host check of their values (a device sync) for them,
as long as they are not modified in place (``is_trusted``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

POLICIES = ("nvlm-x", "nvlm-h", "mllama", "flamingo")


# Range tensors known to be well formed -> their version counter when that was established (None for
# inference tensors, which have no version counter). Weak: an entry goes with its tensor.
_TRUSTED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def mark_trusted(*tensors: torch.Tensor) -> None:
    """Note that these range tensors are well formed now (an in-place change withdraws it)."""
    if torch.compiler.is_compiling():  # a trace has no tensors to remember; eager calls check again
        return
    for t in tensors:
        _TRUSTED[t] = _version(t)


def is_trusted(t: torch.Tensor) -> bool:
    """True for a tensor passed to ``mark_trusted`` and not modified in place since (inference tensors
    have no version counter: they stay trusted)."""
    return t in _TRUSTED and _TRUSTED[t] == _version(t)


def _as_long(t, name: str, dims: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    return t.long()


def cross_attention_ranges(
    image_positions: torch.Tensor,
    tiles_per_image: torch.Tensor,
    num_text_tokens: int,
    *,
    policy: str = "nvlm-x",
    tag_tiles: torch.Tensor | None = None,
    tokens_per_tile: int = 256,
    tag_tokens_per_tile: int = 0,
    attend_all_previous: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_start, kv_end), int32 [B, num_text_tokens], for ``gated_cross_attention``.

    Args:
        image_positions: [B, M] text index where each image occurs (its placeholder token), in
            increasing order, -1 for absent images (after the present ones).
        tiles_per_image: [B, M] tiles of each image in the key/value sequence (thumbnail
            included for NVLM-X); ignored for absent images.
        num_text_tokens: Sq, the text length.
        policy: "nvlm-x", "nvlm-h", "mllama" or "flamingo" (module docstring).
        tag_tiles: [B, Sq], for nvlm-x / nvlm-h: the tile (0-based over the row's tiles, in image
            order) whose tag a text token belongs to, -1 for other tokens.
        tokens_per_tile: image keys per tile (256 in NVLM).
        tag_tokens_per_tile: nvlm-h only: tag-embedding keys before each tile.
        attend_all_previous: nvlm-x / nvlm-h / flamingo: text sees every image so far, not only
            the most recent one.
        validate: check the values of image_positions, tiles_per_image and tag_tiles (ValueError
            naming the rule broken): one device->host transfer. False skips it, for a caller that
            has checked them already (the model's input check), so that building the ranges makes
            no host sync; the ranges are well formed (0 <= start <= end) either way, and every
            gated_cross_attention backend clamps them into [0, Skv].
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    positions = _as_long(image_positions, "image_positions", 2)
    tiles = _as_long(tiles_per_image, "tiles_per_image", 2)
    if tiles.shape != positions.shape:
        raise ValueError(f"tiles_per_image {tuple(tiles.shape)} must match image_positions {tuple(positions.shape)}")
    if tiles.device != positions.device:
        raise ValueError(f"tiles_per_image is on {tiles.device}, image_positions on {positions.device}")
    if isinstance(num_text_tokens, bool) or not isinstance(num_text_tokens, int) or num_text_tokens < 0:
        raise ValueError(f"num_text_tokens must be a non-negative int, got {num_text_tokens!r}")
    for name, value in (("tokens_per_tile", tokens_per_tile), ("tag_tokens_per_tile", tag_tokens_per_tile)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if tag_tokens_per_tile and policy != "nvlm-h":
        raise ValueError("tag_tokens_per_tile is for policy 'nvlm-h' (tags interleaved with tiles in the keys)")
    if tag_tiles is not None and policy not in ("nvlm-x", "nvlm-h"):
        raise ValueError(f"tag_tiles is for the nvlm-x and nvlm-h policies, not {policy!r}")

    batch, _ = positions.shape
    device = positions.device
    present = positions >= 0
    big = torch.iinfo(torch.long).max
    sorted_positions = torch.where(present, positions, big)
    problems = [  # (any bad value, what the rule is), checked together in one transfer at the end
        (
            ((tiles < 0) & present).any() | (present & (positions >= num_text_tokens)).any(),
            "image_positions must lie in [0, num_text_tokens) and tiles_per_image must be >= 0",
        ),
        (
            (sorted_positions[:, 1:] < sorted_positions[:, :-1]).any(),
            "image_positions must increase along each row, with -1 (absent) at the end",
        ),
    ]

    per_tile = tokens_per_tile + tag_tokens_per_tile
    tiles = torch.where(present, tiles, 0).clamp(min=0)  # well-formed ranges even when not validated
    kv_len = tiles * per_tile
    kv_end_of_image = kv_len.cumsum(1)
    kv_start_of_image = kv_end_of_image - kv_len

    text = torch.arange(num_text_tokens, device=device).expand(batch, num_text_tokens).contiguous()
    # index of the most recent image at or before each text row (-1: before the first image)
    latest = torch.searchsorted(sorted_positions.contiguous(), text, right=True) - 1
    seen = latest >= 0
    latest_c = latest.clamp(min=0)
    end = kv_end_of_image.gather(1, latest_c)
    if policy == "mllama":
        # a group starts at every image whose token does not directly follow the previous image's
        starts_group = torch.ones_like(present)
        if positions.shape[1] > 1:
            starts_group[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        index = torch.arange(positions.shape[1], device=device).expand_as(positions)
        group_first = torch.where(starts_group, index, 0).cummax(1).values
        start = kv_start_of_image.gather(1, group_first.gather(1, latest_c))
    elif attend_all_previous:
        start = torch.zeros_like(end)
    else:
        start = kv_start_of_image.gather(1, latest_c)

    if tag_tiles is not None:
        tags = _as_long(tag_tiles, "tag_tiles", 2)
        if tags.shape != (batch, num_text_tokens):
            raise ValueError(f"tag_tiles must have shape [B, Sq] = {(batch, num_text_tokens)}, got {tuple(tags.shape)}")
        if tags.device != device:
            raise ValueError(f"tag_tiles is on {tags.device}, image_positions on {device}")
        is_tag = tags >= 0
        total_tiles = tiles.sum(1, keepdim=True)
        problems.append(((is_tag & (tags >= total_tiles)).any(), "tag_tiles names a tile beyond the row's tiles"))
        start = torch.where(is_tag, tags * per_tile, start)
        end = torch.where(is_tag, (tags + 1) * per_tile, end)
        seen = seen | is_tag
    if validate:
        flags = torch.stack([flag for flag, _ in problems]).tolist()  # one transfer for every check
        for flag, (_, message) in zip(flags, problems, strict=True):
            if flag:
                raise ValueError(message)
    start = torch.where(seen, start, 0).to(torch.int32)
    end = torch.where(seen, end, 0).to(torch.int32)
    mark_trusted(start, end)
    return start, end


def ranges_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_start, kv_end), int32 [B, Sq], of a boolean mask [B, Sq, Skv] whose every row is one
    contiguous run of True (or all False: the empty range). Raises ValueError naming the first row
    that is not."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 3:
        raise ValueError(
            f"mask must be a bool tensor [B, Sq, Skv], got {getattr(mask, 'dtype', type(mask).__name__)} "
            f"{tuple(getattr(mask, 'shape', ()))}"
        )
    skv = mask.shape[-1]
    if skv == 0:
        zeros = torch.zeros(mask.shape[:2], dtype=torch.int32, device=mask.device)
        ends = zeros.clone()
        mark_trusted(zeros, ends)
        return zeros, ends
    any_key = mask.any(-1)
    first = mask.int().argmax(-1)
    last = skv - 1 - mask.flip(-1).int().argmax(-1)
    count = mask.sum(-1)
    broken = any_key & (count != last - first + 1)
    if bool(broken.any()):
        b, i = (int(x) for x in broken.nonzero()[0])
        raise ValueError(f"mask row [{b}, {i}] is not one contiguous range of keys")
    start = torch.where(any_key, first, 0).to(torch.int32)
    end = torch.where(any_key, last + 1, 0).to(torch.int32)
    mark_trusted(start, end)
    return start, end


class TileRanges(NamedTuple):
    """``ranges_from_tile_mask``'s answer. ``tile_index`` [B, num_tiles] (int64) names, per batch row,
    the tiles of the given key sequence that make the compacted one, in order (gather the keys with
    it); None when the compacted keys are simply the first ``num_tiles`` tiles of every row (take a
    slice, or nothing when that is all of them). ``row_has_tiles`` [B, R]: the row sees some tile."""

    kv_start: torch.Tensor
    kv_end: torch.Tensor
    tile_index: torch.Tensor | None
    num_tiles: int
    row_has_tiles: torch.Tensor


TILE_ROWS_WITHOUT_TILES = ("empty", "all")


def ranges_from_tile_mask(
    tile_mask: torch.Tensor,
    tokens_per_tile: int,
    *,
    rows_without_tiles: str = "empty",
    rows: slice | None = None,
) -> TileRanges:
    """Ranges over a compacted key sequence, from a tile-level mask, without the token-level mask.

    ``tile_mask`` (bool [B, S, J]) says which of J tiles each text row sees; tile j holds keys
    [j·tokens_per_tile, (j+1)·tokens_per_tile) of a padded key sequence (Mllama: images × max_tiles
    slots, padding tiles included, so the tiles of a group of images are not adjacent there). Per
    batch row the keys are compacted: the tiles some row sees, in their order, then the others; the
    key sequence keeps ``num_tiles`` tiles: as many as the batch row that sees the most, or all J
    when ``rows_without_tiles="all"`` and some row sees none. A row sees one contiguous range of the
    compacted keys; a row that sees no tile gets the empty range (``"empty"``: exact zeros), or every
    key (``"all"``: what Hugging Face's Mllama masking computes for text before the first image).

    ``rows`` (a slice of S, default all) picks the rows to return ranges for; the compaction is
    decided by every row, so a decoding step given the whole mask gets the layout of its prefill.
    Raises ValueError for a row whose tiles are not one contiguous run of the compacted sequence.
    One device->host transfer; the ranges are marked well formed (no check in the op).
    """
    if not isinstance(tile_mask, torch.Tensor) or tile_mask.dtype != torch.bool or tile_mask.dim() != 3:
        raise ValueError(
            f"tile_mask must be a bool tensor [B, S, J], got {getattr(tile_mask, 'dtype', type(tile_mask).__name__)} "
            f"{tuple(getattr(tile_mask, 'shape', ()))}"
        )
    if isinstance(tokens_per_tile, bool) or not isinstance(tokens_per_tile, int) or tokens_per_tile < 1:
        raise ValueError(f"tokens_per_tile must be a positive int, got {tokens_per_tile!r}")
    if rows_without_tiles not in TILE_ROWS_WITHOUT_TILES:
        raise ValueError(f"rows_without_tiles must be one of {TILE_ROWS_WITHOUT_TILES}, got {rows_without_tiles!r}")
    batch, length, tiles = tile_mask.shape
    rows = slice(None) if rows is None else rows
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise ValueError(f"rows must be a slice with step 1, got {rows!r}")
    device = tile_mask.device

    seen = tile_mask.any(1)  # [B, J]: tiles some row sees
    has = tile_mask.any(2)  # [B, S]
    order = torch.sort((~seen).to(torch.uint8), dim=1, stable=True).indices  # seen tiles first, in order
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(tiles, device=device).expand(batch, tiles))
    rank = rank[:, None, :].expand(batch, length, tiles)
    if tiles:
        lo = torch.where(tile_mask, rank, tiles).amin(2)  # first and one past the last seen position
        hi = torch.where(tile_mask, rank, -1).amax(2) + 1
    else:
        lo = hi = torch.zeros_like(has, dtype=torch.long)
    broken = has & (hi - lo != tile_mask.sum(2))
    prefix = (seen[:, 1:] <= seen[:, :-1]).all()  # every row's seen tiles come first already
    most_seen = seen.sum(1).amax() if batch else torch.zeros((), dtype=torch.long, device=device)
    flags = torch.stack([broken.any().long(), prefix.long(), (~has).any().long(), most_seen.long()])
    any_broken, is_prefix, any_without, most = flags.tolist()  # the one transfer
    if any_broken:
        b, s = (int(x) for x in broken.nonzero()[0])
        raise ValueError(f"tile_mask row [{b}, {s}]: its tiles are not one contiguous run once unseen tiles are gone")
    keep_all = rows_without_tiles == "all" and bool(any_without)
    num_tiles = tiles if keep_all else most

    lo, hi, has_rows = lo[:, rows], hi[:, rows], has[:, rows]
    start = torch.where(has_rows, lo * tokens_per_tile, 0)
    end = torch.where(has_rows, hi * tokens_per_tile, num_tiles * tokens_per_tile if keep_all else 0)
    start, end = start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()
    mark_trusted(start, end)
    tile_index = None if is_prefix else order[:, :num_tiles].contiguous()
    return TileRanges(start, end, tile_index, num_tiles, has_rows.contiguous())
