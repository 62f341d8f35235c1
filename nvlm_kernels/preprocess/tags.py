"""Tile tags and the image segment of an NVLM prompt (nvlm-spec §2.2).

For an image of T tiles the tags are ``<tile_1> … <tile_{T-1}>`` and then the thumbnail tag
(``<tile_global_thumbnail>`` for NVLM-D-72B / Qwen, ``<tile_global>`` for the Yi-34B format); a
single-tile image gets only the thumbnail tag. The prompt segment is
``<Image>`` + per tile (tag + 256 × ``<|vision_pad|>``) + ``</Image>``.
"""

from __future__ import annotations

THUMBNAIL_TAGS = {"nvlm-72b": "<tile_global_thumbnail>", "nvlm-34b": "<tile_global>"}
IMAGE_START, IMAGE_END = "<Image>", "</Image>"
VISION_PAD = "<|vision_pad|>"
TOKENS_PER_TILE = 256


def tile_tags(total_tiles: int, style: str = "nvlm-72b") -> list[str]:
    """The text tag before each tile, thumbnail last (``total_tiles`` counts the thumbnail)."""
    if isinstance(total_tiles, bool) or not isinstance(total_tiles, int) or total_tiles < 1:
        raise ValueError(f"total_tiles must be a positive int, got {total_tiles!r}")
    if style not in THUMBNAIL_TAGS:
        raise ValueError(f"style must be one of {sorted(THUMBNAIL_TAGS)}, got {style!r}")
    return [f"<tile_{k}>" for k in range(1, total_tiles)] + [THUMBNAIL_TAGS[style]]


def image_prompt(
    total_tiles: int,
    *,
    style: str = "nvlm-72b",
    placeholder: str = VISION_PAD,
    tokens_per_tile: int = TOKENS_PER_TILE,
) -> str:
    """``<Image>`` + per tile (tag + ``tokens_per_tile`` × ``placeholder``) + ``</Image>``."""
    if isinstance(tokens_per_tile, bool) or not isinstance(tokens_per_tile, int) or tokens_per_tile < 0:
        raise ValueError(f"tokens_per_tile must be a non-negative int, got {tokens_per_tile!r}")
    body = "".join(tag + placeholder * tokens_per_tile for tag in tile_tags(total_tiles, style))
    return IMAGE_START + body + IMAGE_END
