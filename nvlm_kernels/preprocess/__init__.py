"""Dynamic high-resolution preprocessing of NVLM / InternVL: tile plan, tiles, tile tags.

    plan = tile_plan(1920, 1080)                      # 2x1 grid + thumbnail: plan.total == 3
    pixel_values, plans = preprocess_images([img_a, "b.jpg", cupy_array], device="cuda")
    prompt = image_prompt(plans[0].total)             # <Image><tile_1>...<tile_global_thumbnail>...</Image>

``preprocess_images`` returns ``pixel_values`` [T, 3, S, S] (tiles of each image row-major, its
thumbnail last, images in order) and one ``TilePlan`` per image. Two backends:

* ``cuda`` — the compiled extension: on the GPU, Pillow's integer bicubic arithmetic on uint8
  pixels already there, straight into normalized tiles of every image in two launches; on the CPU
  the C++ host kernel (csrc/preprocess/resize_host.cpp: SIMD loops chosen by the CPU's features,
  rows and images split across threads), bit for bit the same bytes as Pillow.
* ``reference`` — Pillow's own resize, then crop and normalize; equal to InternVL's
  ``dynamic_preprocess`` + ``build_transform`` bit for bit; a thread pool across images.

``auto`` picks ``cuda`` on either device when the extension has the kernels for it (else the
Pillow path, followed by a copy for a GPU; ``python -m nvlm_kernels.info`` says why);
``use_backend`` chooses explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nvlm_kernels import _backend, _nvtx
from nvlm_kernels.preprocess import reference
from nvlm_kernels.preprocess.images import ImageError, image_size, load_image
from nvlm_kernels.preprocess.plan import TilePlan, _tile_plan, candidate_grids, check_tiling_args, tile_plan
from nvlm_kernels.preprocess.tags import image_prompt, tile_tags

OP = "preprocess"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_backend.register_op(OP, has_triton=False, cuda_op="nvlm_C::resize_to_tiles", host_kernel=True)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageError",
    "TilePlan",
    "candidate_grids",
    "image_prompt",
    "preprocess_images",
    "tile_plan",
    "tile_tags",
]


def _check_stats(values: Sequence[float], name: str) -> tuple[float, float, float]:
    try:
        stats = tuple(float(v) for v in values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of 3 floats, got {values!r}") from None
    if len(stats) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(stats)}")
    if name == "std" and any(v == 0.0 for v in stats):
        raise ValueError(f"std must not contain 0, got {stats}")
    return stats


def preprocess_images(
    images: Sequence,
    *,
    device: str | torch.device = "cpu",
    min_tiles: int = 1,
    max_tiles: int = 6,
    tile_size: int = 448,
    use_thumbnail: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
    num_threads: int | None = None,
    pillow_version: str | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, list[TilePlan]]:
    """Tiles of every image, normalized: ``(pixel_values [T, 3, S, S], plans)``.

    Args:
        images: PIL images (any mode), uint8 numpy/torch arrays [H, W], [H, W, C] or [C, H, W]
            (C in 1, 3, 4; torch tensors may be on the GPU), DLPack arrays (CuPy stays on the
            GPU), file paths or encoded bytes.
        device: where ``pixel_values`` is made.
        min_tiles, max_tiles, tile_size, use_thumbnail: the tiling rule (``tile_plan``).
        mean, std: per-channel normalization (ImageNet's by default, as NVLM).
        dtype: float32, float16 or bfloat16 (computed in float32, rounded once).
        num_threads: CPU path threads (default: torch's thread count, ``torch.get_num_threads()``;
            the host kernel splits a single image's rows across them too). The host kernel's
            helpers are torch's inter-op threads, so it uses at most
            ``1 + torch.get_num_interop_threads()``.
        pillow_version: which Pillow's pass order the compiled kernels copy (default: the
            installed Pillow's; pillow-resample.md §3).
        memory_format: ``torch.contiguous_format`` or ``torch.channels_last`` (the compiled
            kernels write either layout directly).

    Raises:
        ImageError (a ValueError) naming ``images[i]`` for an image that cannot be used; the
        whole batch is checked before any pixel is written.
    """
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a list of images, got {type(images).__name__}")
    check_tiling_args(min_tiles, max_tiles, tile_size)
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype}")
    mean, std = _check_stats(mean, "mean"), _check_stats(std, "std")
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}")
    if num_threads is not None and (isinstance(num_threads, bool) or not isinstance(num_threads, int)):
        raise TypeError(f"num_threads must be an int or None, got {type(num_threads).__name__}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())

    with _nvtx.range(f"nvlm.kernels.{OP}.load"):
        loaded = [load_image(image, i) for i, image in enumerate(images)]
    # tile_plan's rule without its argument checks per image (done once above; image sizes are
    # positive ints, load_image checked them)
    use_thumbnail = bool(use_thumbnail)
    plans = [_tile_plan(*image_size(image), min_tiles, max_tiles, tile_size, use_thumbnail) for image in loaded]
    total = sum(plan.total for plan in plans)
    if total == 0:
        empty = torch.empty((0, 3, tile_size, tile_size), dtype=dtype, device=device)
        return empty.contiguous(memory_format=memory_format), plans
    backend = _backend.resolve(OP, device)
    with _nvtx.range(f"nvlm.kernels.{OP}.fwd"):
        if backend == "cuda":
            from nvlm_kernels.preprocess import cuda as impl

            table = reference.normalization_table(mean, std)
            channels_last = memory_format == torch.channels_last
            out = impl.preprocess(loaded, plans, table, device, dtype, pillow_version, channels_last, num_threads or 0)
        else:
            out = torch.empty((total, 3, tile_size, tile_size), dtype=torch.float32)
            threads = reference.default_threads() if num_threads is None else num_threads
            reference.preprocess(loaded, plans, mean, std, out, threads)
            out = out.to(device=device, dtype=dtype, memory_format=memory_format)
    return out, plans
