"""Pillow's bicubic resize, exactly: the coefficients every resize path shares, and a host twin.

``shared/docs/pillow-resample.md`` has the algorithm (Pillow ``libImaging/Resample.c``). Per axis
(input size n, output size m): window centre ``(i + 0.5)·n/m``, support ``2·max(n/m, 1)``, cubic
kernel a = −0.5 evaluated at ``(tap − centre + 0.5)/max(n/m, 1)``, weights normalized by their sum
(summed in tap order, float64), then fixed point with 22 fractional bits, rounded half away from
zero. Each pass accumulates ``2^21 + Σ pixel·weight`` in int32 and stores ``acc >> 22`` clipped to
uint8; the second pass reads that uint8 intermediate. A pass whose size does not change is
skipped; which pass runs first depends on the Pillow version (``vertical_first``).

``axis_coefficients`` is what the GPU kernel consumes (computed here, on the host, once per image
and axis); ``resize_like_pillow`` is the same integer arithmetic in numpy, so the tests prove the
tables and the pass order against Pillow on any machine.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

PRECISION_BITS = 22
BICUBIC_SUPPORT = 2.0
_A = -0.5


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's ``bicubic_filter``, with its operation order (float64, no fused multiply-add)."""
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@dataclasses.dataclass(frozen=True)
class AxisCoefficients:
    """Resampling of one axis from ``in_size`` to ``out_size`` samples: output i reads inputs
    ``start[i] .. start[i] + taps[i] - 1`` with int32 weights ``weights[i, :taps[i]]`` (zeros after)."""

    in_size: int
    out_size: int
    start: np.ndarray  # int32 [out_size]
    taps: np.ndarray  # int32 [out_size]
    weights: np.ndarray  # int32 [out_size, window]

    @property
    def window(self) -> int:
        return self.weights.shape[1]


@functools.lru_cache(maxsize=256)
def axis_coefficients(in_size: int, out_size: int) -> AxisCoefficients:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the whole axis (no box)."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    window = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    inverse = 1.0 / filterscale  # Pillow multiplies by the reciprocal
    start = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    end = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64)
    taps = end - start
    tap = np.arange(window, dtype=np.int64)
    valid = tap[None, :] < taps[:, None]
    raw = np.where(valid, _bicubic(((start[:, None] + tap[None, :]) - center[:, None] + 0.5) * inverse), 0.0)
    total = np.zeros(out_size, dtype=np.float64)
    for t in range(window):  # in tap order, as Pillow sums (numpy's sum would pair them up)
        total += raw[:, t]
    normalized = np.where(total[:, None] != 0.0, raw / np.where(total == 0.0, 1.0, total)[:, None], raw)
    scaled = normalized * float(1 << PRECISION_BITS)
    fixed = np.trunc(np.where(normalized < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    fixed[~valid] = 0
    for array in (start, taps, fixed):
        array.setflags(write=False)
    return AxisCoefficients(in_size, out_size, start.astype(np.int32), taps.astype(np.int32), fixed)


@functools.lru_cache(maxsize=64)  # parsed for every job of a batch otherwise (and by the reference path)
def _version_tuple(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def installed_pillow_version() -> str | None:
    try:
        import PIL
    except ImportError:
        return None
    return PIL.__version__


# The rule of the newest Pillow this module knows, used when Pillow is not installed beside it.
LATEST_KNOWN_PILLOW = "13.0"


def vertical_first(in_size: tuple[int, int], out_size: tuple[int, int], pillow_version: str | None = None) -> bool:
    """Whether Pillow ``pillow_version`` (default: the installed one) resizes (w, h) ``in_size`` to
    ``out_size`` with the vertical pass first (pillow-resample.md §3)."""
    (w_in, h_in), (w_out, h_out) = in_size, out_size
    version = _version_tuple(pillow_version or installed_pillow_version() or LATEST_KNOWN_PILLOW)
    if version >= (13, 0):
        return h_in - h_out > 0 and h_in - h_out > 2 * (w_in - w_out)
    if version >= (12, 2):
        return h_in > 100 * w_in and h_out < h_in
    return False


def resample_axis(image: np.ndarray, coefficients: AxisCoefficients, axis: int) -> np.ndarray:
    """One pass of Pillow's integer resampling of a uint8 image along ``axis``; returns uint8."""
    if image.shape[axis] != coefficients.in_size:
        raise ValueError(f"axis {axis} has {image.shape[axis]} samples, coefficients expect {coefficients.in_size}")
    out_shape = list(image.shape)
    out_shape[axis] = coefficients.out_size
    shape = [1] * image.ndim
    shape[axis] = coefficients.out_size
    acc = np.full(out_shape, 1 << (PRECISION_BITS - 1), dtype=np.int64)
    last = coefficients.in_size - 1
    for t in range(coefficients.window):  # padded taps have weight 0; clamp their index
        index = np.minimum(coefficients.start + t, last)
        acc += np.take(image, index, axis=axis).astype(np.int64) * coefficients.weights[:, t].reshape(shape)
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_like_pillow(image: np.ndarray, size: tuple[int, int], pillow_version: str | None = None) -> np.ndarray:
    """``Image.resize(size)`` (bicubic, no box) of a uint8 [H, W] or [H, W, C] array, in numpy."""
    h_in, w_in = image.shape[:2]
    w_out, h_out = size
    passes = [(1, w_in, w_out), (0, h_in, h_out)]  # (axis, in, out): horizontal, then vertical
    if vertical_first((w_in, h_in), (w_out, h_out), pillow_version):
        passes.reverse()
    out = image
    for axis, n_in, n_out in passes:
        if n_in != n_out:
            out = resample_axis(out, axis_coefficients(n_in, n_out), axis)
    return out if out is not image else image.copy()
