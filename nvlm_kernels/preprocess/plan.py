"""The dynamic-high-resolution tile plan of InternVL / NVLM (nvlm-spec §1.1–1.3).

Candidates are the grids (cols, rows) with ``min_tiles <= cols·rows <= max_tiles``, sorted by tile
count. The image takes the grid whose aspect ratio cols/rows is closest to W/H (float64, exact
comparisons); on an exact tie, a later candidate wins only when the image area W·H exceeds half
the pixel area of that later grid (0.5·tile²·cols·rows). The image is then stretched to
(tile·cols, tile·rows) and cut into tiles row-major; a thumbnail (the original image resized to
tile × tile) follows when ``use_thumbnail`` and the grid has more than one tile.
"""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """How one image becomes tiles. ``boxes`` are the crop boxes (left, top, right, bottom) of the
    regular tiles in the resized image of size ``resized_size`` (width, height), row-major."""

    width: int
    height: int
    cols: int
    rows: int
    tile_size: int
    has_thumbnail: bool

    @property
    def num_tiles(self) -> int:
        """Regular tiles (without the thumbnail)."""
        return self.cols * self.rows

    @property
    def total(self) -> int:
        """All tiles of the image, thumbnail included."""
        return self.num_tiles + int(self.has_thumbnail)

    @property
    def resized_size(self) -> tuple[int, int]:
        return (self.tile_size * self.cols, self.tile_size * self.rows)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        s = self.tile_size
        return [
            ((k % self.cols) * s, (k // self.cols) * s, (k % self.cols + 1) * s, (k // self.cols + 1) * s)
            for k in range(self.num_tiles)
        ]


@functools.cache
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_tiles <= cols·rows <= max_tiles, sorted by cols·rows (stable;
    among equal counts the order never decides a result for the ranges NVLM uses, nvlm-spec §1.2)."""
    # Built like the reference (a set in this insertion order, then a stable sort) so that even
    # equal-count candidates come in the reference's order.
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_tiling_args(min_tiles: int, max_tiles: int, tile_size: int) -> None:
    _check_positive_int(min_tiles, "min_tiles")
    _check_positive_int(max_tiles, "max_tiles")
    _check_positive_int(tile_size, "tile_size")
    if max_tiles < min_tiles:
        raise ValueError(f"max_tiles ({max_tiles}) must be >= min_tiles ({min_tiles})")


def tile_plan(
    width: int,
    height: int,
    *,
    min_tiles: int = 1,
    max_tiles: int = 6,
    tile_size: int = 448,
    use_thumbnail: bool = True,
) -> TilePlan:
    """The tile grid, crop boxes and thumbnail choice for a ``width`` × ``height`` image."""
    _check_positive_int(width, "width")
    _check_positive_int(height, "height")
    check_tiling_args(min_tiles, max_tiles, tile_size)
    return _tile_plan(width, height, min_tiles, max_tiles, tile_size, bool(use_thumbnail))


@functools.lru_cache(maxsize=1024)  # a server sees the same few photo sizes again and again
def _tile_plan(
    width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int, use_thumbnail: bool
) -> TilePlan:
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    cols, rows = best
    return TilePlan(width, height, cols, rows, tile_size, use_thumbnail and cols * rows != 1)
