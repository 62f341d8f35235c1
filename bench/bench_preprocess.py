"""Preprocessing benchmark: decoded RGB images -> normalized 448² tiles, and JPEG decoding apart.

Providers (images/s over a batch; decoding is not in them, as in targets.md row e):
``internvl`` — the InternVL / NVLM-D pipeline (Pillow resize + crop, then ToTensor and Normalize
per tile) on one core, from PIL images: the baseline; ``cpu-1`` — our CPU path (the C++ host
kernel where the extension is built) on one thread, from the decoded uint8 arrays; ``cpu-1-pil`` —
the same from the PIL images (Pillow's pixels read in place when they lie in one memory block,
else copied by Pillow's row copy into a recycled buffer; ``PILLOW_BLOCK_SIZE=64m`` makes photos
one block); ``cpu-all`` — a thread per core; ``cpu-pillow-1`` — our Pillow-based path (the
``reference`` backend) on one thread; ``hf-fast`` — transformers' fast InternVL image processor
(torchvision; not bit-exact with the pipeline, so unchecked) where installed; ``decode`` — Pillow
decoding the batch as JPEG (quality 90; libjpeg-turbo), the time a server spends before any of the
above; ``cuda`` — our kernels from uint8 tensors already on the GPU; ``cuda-from-host`` — the same
from host arrays.
A ``1 x 4032x3024`` shape times one large image, whose rows the threads share.
Targets: issue 18 (one core: >= 4x the pipeline at 1920x1080 and 4032x3024, >= 3x at 1024x768
and 448x448; N threads >= 0.8·N x one thread) and targets.md e (the GPU path >= 20x one core).

    python bench/bench_preprocess.py
    make bench-preprocess        # in .venv-vllm, where torchvision makes the hf-fast row run
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import torch
from PIL import Image

import nvlm_kernels as nk

from common import Case, run_module, skipped

KERNEL = "preprocess"
BASELINE = "internvl"
SIZES = [(448, 448), (1024, 768), (1920, 1080), (4032, 3024)]
# issue 18: the one-core speedup over the pipeline each size must reach
ONE_CORE_GOAL = {(448, 448): 3.0, (1024, 768): 3.0, (1920, 1080): 4.0, (4032, 3024): 4.0}
SCALING_GOAL = 0.8  # N threads >= 0.8·N x one thread


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


def _ours_cpu(images: list, threads: int, backend: str = "auto"):
    def run() -> torch.Tensor:
        with torch_threads(threads), nk.use_backend(backend, ops=KERNEL):
            return nk.preprocess_images(images, num_threads=threads)[0]

    return run


def _decode(jpegs: list[bytes]):
    def run() -> list:
        out = []
        for data in jpegs:
            image = Image.open(io.BytesIO(data))
            image.load()
            out.append(image)
        return out

    return run


def _hf_fast():
    """transformers' fast InternVL image processor (GotOcr2ImageProcessorFast, torchvision-based),
    set up as InternVL's: 448² tiles, 1-6 of them plus a thumbnail; or the reason it cannot run."""
    try:
        import torchvision  # noqa: F401  (the fast processors' backend: without it, no fast row)
        import transformers

        # "...Fast" until transformers 5, the fast (torchvision) class under the plain name after
        # (5.x keeps the old name as a deprecated alias)
        major = int(transformers.__version__.split(".")[0])
        name = "GotOcr2ImageProcessor" if major >= 5 else "GotOcr2ImageProcessorFast"
        processor = getattr(transformers, name)(
            crop_to_patches=True, min_patches=1, max_patches=6, size={"height": 448, "width": 448}
        )
    except Exception as exc:  # transformers or torchvision missing
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"transformers' fast InternVL image processor unavailable ({type(exc).__name__}: {reason[:120]})"

    def make(images: list):
        def run() -> torch.Tensor:
            with torch_threads(1):
                return processor(images=images, return_tensors="pt")["pixel_values"]

        return run

    return make, None


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
    hf_fast, hf_reason = (None, "not in the quick set") if quick else _hf_fast()
    all_threads = torch.get_num_threads()
    out: list[Case] = []
    for width, height in sizes:
        images = [_image(width, height, seed=k) for k in range(batch)]
        arrays = [np.asarray(im) for im in images]
        shape = f"{batch} x {width}x{height}"
        expected = torch.cat([internvl_pipeline(im) for im in images])
        out.append(_checked("internvl", shape, batch, _internvl(images), expected))
        out.append(_checked("cpu-1", shape, batch, _ours_cpu(arrays, 1), expected))
        out.append(_checked("cpu-1-pil", shape, batch, _ours_cpu(images, 1), expected))
        out.append(_checked("cpu-all", shape, batch, _ours_cpu(arrays, all_threads), expected))
        out.append(_checked("cpu-pillow-1", shape, batch, _ours_cpu(images, 1, "reference"), expected))
        if hf_fast is None:
            out.append(skipped(KERNEL, "hf-fast", shape, "uint8->f32", hf_reason))
        else:
            out.append(Case(KERNEL, "hf-fast", shape, "uint8->f32", hf_fast(images), items=batch))
        jpegs = []
        for im in images:
            buffer = io.BytesIO()
            im.save(buffer, format="JPEG", quality=90)
            jpegs.append(buffer.getvalue())
        out.append(Case(KERNEL, "decode", shape, "jpeg->RGB", _decode(jpegs), items=batch))
        if gpu_reason:
            out.append(skipped(KERNEL, "cuda", shape, "uint8->f32", gpu_reason))
            out.append(skipped(KERNEL, "cuda-from-host", shape, "uint8->f32", gpu_reason))
            continue
        host_arrays = [np.array(im) for im in images]
        on_device = [torch.from_numpy(a).cuda() for a in host_arrays]
        out.append(_checked("cuda", shape, batch, _ours_gpu(on_device), expected))
        out.append(_checked("cuda-from-host", shape, batch, _ours_gpu(host_arrays), expected))
    if not quick:  # one large image: the threads split its rows
        image = _image(4032, 3024, seed=99)
        array, shape = np.asarray(image), "1 x 4032x3024"
        expected = internvl_pipeline(image)
        out.append(_checked("internvl", shape, 1, _internvl([image]), expected))
        out.append(_checked("cpu-1", shape, 1, _ours_cpu([array], 1), expected))
        out.append(_checked("cpu-all", shape, 1, _ours_cpu([array], all_threads), expected))
    for case in out:  # targets.md row e: a 1920x1080 image
        if "1920x1080" in case.shape:
            case.target = "e"
    return out


def _goal(shape: str) -> float | None:
    size = shape.split(" x ")[-1]
    return next((g for (w, h), g in ONE_CORE_GOAL.items() if size == f"{w}x{h}"), None)


def targets(rows: list[dict]) -> list[str]:
    """Issue 18 (one core vs the pipeline; scaling with threads) and targets.md e (GPU >= 20x)."""
    lines = []
    ok = {(r["shape"], r["provider"]): r for r in rows if r["kernel"] == KERNEL and r["status"] == "ok"}
    rate = {key: float(r["value"]) for key, r in ok.items()}
    cpus = os.cpu_count() or 1
    for shape in dict.fromkeys(r["shape"] for r in rows if r["kernel"] == KERNEL):
        base = rate.get((shape, BASELINE))
        if base is None:
            continue
        parts = []
        goal = _goal(shape)
        for provider in ("cpu-1", "cpu-1-pil"):
            if (shape, provider) in rate and goal is not None:
                ratio = rate[(shape, provider)] / base
                parts.append(f"{provider} {ratio:.2f}x -> {'MET' if ratio >= goal else 'NOT MET'} (>= {goal:g}x)")
        if (shape, "cpu-1") in rate and (shape, "cpu-all") in rate:
            n = int(ok[(shape, "cpu-all")].get("threads") or 0) or torch.get_num_threads()
            scale = rate[(shape, "cpu-all")] / rate[(shape, "cpu-1")]
            need = SCALING_GOAL * n
            parts.append(
                f"cpu-all/cpu-1 {scale:.2f}x on {n} threads -> {'MET' if scale >= need else 'NOT MET'} (>= {need:.1f}x)"
            )
        if (shape, "decode") in ok:
            parts.append(
                f"Pillow JPEG decode {float(ok[(shape, 'decode')]['p50_us']) / 1e3:.1f} ms per batch (not in the above)"
            )
        if (shape, "cuda") in rate:
            ratio = rate[(shape, "cuda")] / base
            parts.append(f"cuda {ratio:.1f}x -> {'MET' if ratio >= 20 else 'NOT MET'} (>= 20x)")
        if parts:
            lines.append(f"preprocess {shape} vs one InternVL core ({cpus} CPUs here): " + "; ".join(parts))
    return lines or ["preprocess targets: not evaluated (no baseline rows)"]


if __name__ == "__main__":
    import sys

    run_module(sys.modules[__name__])
