"""Preprocessing benchmark: RGB images already decoded in memory -> normalized 448² tiles.

Providers (images/s over a batch; decoding is not timed, as in targets.md row e):
``internvl`` — the InternVL / NVLM-D pipeline (Pillow resize + crop, then ToTensor and Normalize
per tile) on one core; ``cpu-1`` — our CPU path on one core; ``cpu-all`` — our CPU path with a
thread per core; ``cuda`` — our kernels from uint8 tensors already on the GPU; ``cuda-from-host``
— the same from numpy arrays in host memory, the copy included.
Targets (targets.md e): the GPU path >= 20x one Pillow core; the CPU path never slower than the
InternVL pipeline.

    python bench/bench_preprocess.py
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image

import nvlm_kernels as nk

from common import Case, run_module, skipped

KERNEL = "preprocess"
BASELINE = "internvl"
SIZES = [(448, 448), (1024, 768), (1920, 1080), (4032, 3024)]


@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def internvl_pipeline(image: Image.Image, size: int = 448) -> torch.Tensor:
    """dynamic_preprocess + build_transform of InternVL / NVLM-D's README, with torch for the
    tensor steps (torchvision's ToTensor and Normalize do these same operations)."""
    plan = nk.tile_plan(*image.size)  # the closest-ratio rule itself is not what is timed
    resized = image.resize(plan.resized_size)
    tiles = [resized.crop(box) for box in plan.boxes]
    if plan.has_thumbnail:
        tiles.append(image.resize((size, size)))
    mean = torch.tensor(nk.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(nk.IMAGENET_STD)[:, None, None]
    out = []
    for tile in tiles:
        x = torch.from_numpy(np.array(tile)).permute(2, 0, 1).contiguous().float().div(255)
        out.append(x.sub(mean).div(std))
    return torch.stack(out)


def _image(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like image (smooth gradients and noise): content does not change the work, but
    keeps the comparison honest."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx * 255 // max(width - 1, 1) + yy * 97 // max(height - 1, 1)) % 256
    pixels = np.stack([base, (base * 5) % 256, 255 - base], -1) + rng.integers(-20, 21, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _checked(provider: str, shape: str, batch: int, fn, expected: torch.Tensor) -> Case:
    def check() -> None:
        if not torch.equal(fn().float().cpu(), expected):
            raise AssertionError(f"{provider}: result differs from the InternVL pipeline")

    return Case(KERNEL, provider, shape, "uint8->f32", fn, items=batch, check=check)


def _ours_cpu(images: list, threads: int):
    def run() -> torch.Tensor:
        with torch_threads(threads):
            return nk.preprocess_images(images, num_threads=threads)[0]

    return run


def _internvl(images: list):
    def run() -> torch.Tensor:
        with torch_threads(1):
            return torch.cat([internvl_pipeline(im) for im in images])

    return run


def _ours_gpu(inputs: list):
    def run() -> torch.Tensor:
        with nk.use_backend("cuda"):
            return nk.preprocess_images(inputs, device="cuda")[0]

    return run


def cases(device: str, quick: bool = False) -> list[Case]:
    sizes = SIZES[1:3] if quick else SIZES
    batch = 8 if device == "cuda" else 4
    gpu_reason = nk.available_backends("preprocess", "cuda")["cuda"] if device == "cuda" else "needs a CUDA device"
    out: list[Case] = []
    for width, height in sizes:
        images = [_image(width, height, seed=k) for k in range(batch)]
        shape = f"{batch} x {width}x{height}"
        expected = torch.cat([internvl_pipeline(im) for im in images])
        out.append(_checked("internvl", shape, batch, _internvl(images), expected))
        out.append(_checked("cpu-1", shape, batch, _ours_cpu(images, 1), expected))
        out.append(_checked("cpu-all", shape, batch, _ours_cpu(images, torch.get_num_threads()), expected))
        if gpu_reason:
            out.append(skipped(KERNEL, "cuda", shape, "uint8->f32", gpu_reason))
            out.append(skipped(KERNEL, "cuda-from-host", shape, "uint8->f32", gpu_reason))
            continue
        host_arrays = [np.array(im) for im in images]
        on_device = [torch.from_numpy(a).cuda() for a in host_arrays]
        out.append(_checked("cuda", shape, batch, _ours_gpu(on_device), expected))
        out.append(_checked("cuda-from-host", shape, batch, _ours_gpu(host_arrays), expected))
    for case in out:  # targets.md row e: a 1920x1080 image
        if "1920x1080" in case.shape:
            case.target = "e"
    return out


def targets(rows: list[dict]) -> list[str]:
    """GPU >= 20x one Pillow core (from uint8 on the device); CPU path (one core) >= the pipeline."""
    lines = []
    ok = {(r["shape"], r["provider"]): float(r["value"]) for r in rows if r["kernel"] == KERNEL and r["status"] == "ok"}
    for shape in dict.fromkeys(r["shape"] for r in rows if r["kernel"] == KERNEL):
        base = ok.get((shape, BASELINE))
        if base is None:
            continue
        parts = []
        if (shape, "cpu-1") in ok:
            ratio = ok[(shape, "cpu-1")] / base
            parts.append(f"cpu-1 {ratio:.2f}x -> {'MET' if ratio >= 1 else 'NOT MET'} (>= 1x)")
        if (shape, "cuda") in ok:
            ratio = ok[(shape, "cuda")] / base
            parts.append(f"cuda {ratio:.1f}x -> {'MET' if ratio >= 20 else 'NOT MET'} (>= 20x)")
        if parts:
            lines.append(f"preprocess {shape} vs one InternVL core: " + "; ".join(parts))
    return lines or ["preprocess targets: not evaluated (no baseline rows)"]


if __name__ == "__main__":
    import sys

    run_module(sys.modules[__name__])
