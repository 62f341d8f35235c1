"""The Pillow path (the ``reference`` backend): Pillow's own resize, then crop and normalize, equal
to the reference bit for bit. The CPU path where the compiled extension is missing (it runs the C++
host kernel otherwise: csrc/preprocess/resize_host.cpp), and the tests' second oracle.

Per image: ``resize((tile·cols, tile·rows))`` with Pillow's default filter (bicubic for RGB), the
regular tiles cut row-major, and the thumbnail as ``resize((tile, tile))`` of the original. The
float conversion runs ToTensor's and Normalize's float32 operations in their order (÷255, −mean,
÷std) over all tiles at once, so every value equals the reference's. Pillow releases the GIL
while it resizes, so a thread pool spreads the grids and thumbnails of a batch over the cores.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os

import numpy as np
import torch

from nvlm_kernels.preprocess.images import to_rgb_array
from nvlm_kernels.preprocess.plan import TilePlan

try:
    from PIL import Image
except ImportError:
    Image = None


@functools.lru_cache(maxsize=16)
def normalization_table(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """float32 [3, 256]: the value ToTensor + Normalize give each byte of each channel (the table
    the compiled kernels look values up in; the CPU path computes the same operations in place).
    Cached per (mean, std): callers must not write to it; never an inference tensor, whatever
    mode the first caller was in."""
    with torch.inference_mode(False):
        return _table(mean, std)


def _table(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
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


def _write_tiles(
    resized, cols: int, rows: int, size: int, mean: torch.Tensor, std: torch.Tensor, out: torch.Tensor
) -> None:
    """Cut the resized image (PIL, cols·size × rows·size) into tiles and normalize them into
    out [cols·rows, 3, size, size] float32, with ToTensor's and Normalize's operations in order."""
    pixels = torch.from_numpy(np.array(resized))  # [H, W, 3] uint8, a writable copy
    tiles = pixels.view(rows, size, cols, size, 3).permute(0, 2, 4, 1, 3)  # [rows, cols, 3, S, S]
    view = out.view(rows, cols, 3, size, size)
    view.copy_(tiles)  # exact uint8 -> float32
    view.div_(255).sub_(mean).div_(std)


def _resize(image, size: tuple[int, int]):
    return image.resize(size) if image.size != size else image


def preprocess(
    images: list, plans: list[TilePlan], mean: tuple, std: tuple, out: torch.Tensor, num_threads: int
) -> None:
    """Fill out [T, 3, S, S] (float32). Every image gives two tasks, its grid and its thumbnail,
    so with several threads even a single image uses two cores."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    tasks = []
    start = 0
    for image, plan in zip(images, plans, strict=True):
        pil = _as_pil(image)
        s = plan.tile_size
        grid_out = out[start : start + plan.num_tiles]
        tasks.append((pil, plan.resized_size, plan.cols, plan.rows, s, grid_out))
        if plan.has_thumbnail:
            tasks.append((pil, (s, s), 1, 1, s, out[start + plan.num_tiles : start + plan.total]))
        start += plan.total

    inference = torch.is_inference_mode_enabled()

    def run(task) -> None:
        pil, size, cols, rows, s, dest = task
        # grad and inference modes are thread-local: a pool thread takes the caller's, or it could
        # not write into an inference tensor made by a caller under torch.inference_mode (vLLM's worker)
        with torch.inference_mode(inference):
            _write_tiles(_resize(pil, size), cols, rows, s, mean_t, std_t, dest)

    if num_threads <= 1 or len(tasks) <= 1:
        for task in tasks:
            run(task)
        return
    # Largest first, so a big grid does not start last and leave the other threads idle.
    tasks.sort(key=lambda t: -t[1][0] * t[1][1])
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(num_threads, len(tasks))) as pool:
        list(pool.map(run, tasks))


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
