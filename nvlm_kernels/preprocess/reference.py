"""The CPU path: Pillow's own resize, then crop and normalize, equal to the reference bit for bit.

Per image: ``resize((tile·cols, tile·rows))`` with Pillow's default filter (bicubic for RGB), the
regular tiles cut row-major, and the thumbnail as ``resize((tile, tile))`` of the original. The
float conversion is a 256-entry table per channel holding ``(byte / 255 − mean) / std`` computed
with the same float32 operations as ToTensor + Normalize, so every value equals the reference's.
Pillow releases the GIL while it resizes, so a thread pool spreads a batch over the cores.
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import torch

from nvlm_kernels.preprocess.images import to_rgb_array
from nvlm_kernels.preprocess.plan import TilePlan

try:
    from PIL import Image
except ImportError:
    Image = None


def normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """float32 [3, 256]: the value ToTensor + Normalize give each byte of each channel."""
    levels = torch.arange(256, dtype=torch.float32).div(255)  # ToTensor: float32 then / 255
    mean_t = torch.as_tensor(mean, dtype=torch.float32)[:, None]
    std_t = torch.as_tensor(std, dtype=torch.float32)[:, None]
    return levels[None, :].sub(mean_t).div(std_t)  # Normalize: subtract, then divide


def _as_pil(image):
    if Image is not None and isinstance(image, Image.Image):
        return image
    if Image is None:
        raise RuntimeError("the CPU preprocessing path needs Pillow")
    return Image.fromarray(to_rgb_array(image), mode="RGB")


def _write_tiles(rgb: np.ndarray, table: torch.Tensor, out: torch.Tensor, plan: TilePlan) -> None:
    """Normalize the resized image [H, W, 3] and scatter its tiles into out [num_tiles, 3, S, S]."""
    s = plan.tile_size
    pixels = torch.from_numpy(np.array(rgb)).long()  # a writable copy (Pillow's buffer is read-only)
    # [rows, S, cols, S, 3] -> [rows, cols, 3, S, S]
    tiles = pixels.view(plan.rows, s, plan.cols, s, 3).permute(0, 2, 4, 1, 3)
    for channel in range(3):
        out[:, channel] = table[channel][tiles[:, :, channel]].reshape(plan.num_tiles, s, s)


def preprocess_one(image, plan: TilePlan, table: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out`` [plan.total, 3, S, S] (float32) with the image's tiles and thumbnail."""
    pil = _as_pil(image)
    resized = pil.resize(plan.resized_size) if pil.size != plan.resized_size else pil
    _write_tiles(np.asarray(resized), table, out[: plan.num_tiles], plan)
    if plan.has_thumbnail:
        s = plan.tile_size
        thumb = pil.resize((s, s)) if pil.size != (s, s) else pil
        single = TilePlan(s, s, 1, 1, s, False)
        _write_tiles(np.asarray(thumb), table, out[plan.num_tiles :], single)


def preprocess(images: list, plans: list[TilePlan], table: torch.Tensor, out: torch.Tensor, num_threads: int) -> None:
    offsets = np.cumsum([0] + [p.total for p in plans]).tolist()
    jobs = [
        (image, plan, out[offsets[i] : offsets[i + 1]])
        for i, (image, plan) in enumerate(zip(images, plans, strict=True))
    ]
    if num_threads <= 1 or len(jobs) <= 1:
        for image, plan, dest in jobs:
            preprocess_one(image, plan, table, dest)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(num_threads, len(jobs))) as pool:
        list(pool.map(lambda job: preprocess_one(job[0], job[1], table, job[2]), jobs))


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
