"""Preprocessing: tile plan, tags, the Pillow-exact CPU path, and the compiled resize kernels.

Independent oracles, written here from the published algorithm (nvlm-spec §1–2), sharing no code
with nvlm_kernels: ``closest_grid`` (InternVL's find_closest_aspect_ratio), ``internvl_pipeline``
(dynamic_preprocess + build_transform: Pillow resize, crop, ToTensor, Normalize) and Pillow itself.
The compiled kernels are checked on CPU tensors through their C++ host kernel, which runs the
CUDA kernels' per-pixel code, and on CUDA tensors where a GPU is present.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import nvlm_kernels as nk
from nvlm_kernels.preprocess import resample
from nvlm_kernels.preprocess.plan import candidate_grids
from nvlm_kernels.testing import require_backend

OP = "preprocess"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------
# independent oracles


def closest_grid(width: int, height: int, min_num: int = 1, max_num: int = 6, size: int = 448) -> tuple[int, int]:
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    ratios = sorted(ratios, key=lambda r: r[0] * r[1])
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * size * size * ratio[0] * ratio[1]:
            best = ratio
    return best


def internvl_pipeline(image: Image.Image, *, max_num: int = 6, size: int = 448, thumbnail: bool = True) -> torch.Tensor:
    image = image.convert("RGB")
    cols, rows = closest_grid(*image.size, 1, max_num, size)
    resized = image.resize((size * cols, size * rows))
    tiles = [
        resized.crop(((k % cols) * size, (k // cols) * size, (k % cols + 1) * size, (k // cols + 1) * size))
        for k in range(cols * rows)
    ]
    if thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    mean = torch.tensor(MEAN)[:, None, None]
    std = torch.tensor(STD)[:, None, None]
    out = []
    for tile in tiles:
        tile = tile.resize((size, size))  # build_transform's Resize: a no-op on a tile
        x = torch.from_numpy(np.array(tile)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # ToTensor
        out.append(x.sub(mean).div(std))  # Normalize
    return torch.stack(out)


def random_image(width: int, height: int, seed: int, mode: str = "RGB", smooth: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    if smooth:  # gradients plus a little noise: the weights' signs matter on edges like these
        yy, xx = np.mgrid[0:height, 0:width]
        base = (xx * 255 // max(width - 1, 1) + yy * 128 // max(height - 1, 1)) % 256
        pixels = np.stack([base, 255 - base, (base * 3) % 256], -1) + rng.integers(-8, 9, (height, width, 3))
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    else:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(pixels, "RGB")


# --------------------------------------------------------------------------------------------------
# tile plan


@pytest.mark.parametrize(
    "size, grid, total",
    [
        ((700, 700), (2, 2), 5),  # exact tie with 1:1, area > 0.5·448²·4
        ((1120, 448), (3, 1), 4),  # ar exactly 2.5: tie between 2:1 and 3:1
        ((640, 480), (3, 2), 7),
        ((1920, 1080), (2, 1), 3),
        ((500, 500), (1, 1), 1),  # tie, but area below half of 2x2: the thumbnail alone
        ((448, 448), (1, 1), 1),
        ((1, 10000), (1, 6), 7),
        ((10000, 1), (6, 1), 7),
        ((896, 448), (2, 1), 3),
        ((300, 4000), (1, 6), 7),
    ],
)
def test_tile_plan_table(size, grid, total):
    plan = nk.tile_plan(*size)
    assert (plan.cols, plan.rows) == grid
    assert plan.total == total and plan.num_tiles == grid[0] * grid[1]
    assert plan.has_thumbnail == (grid != (1, 1))
    assert plan.resized_size == (448 * grid[0], 448 * grid[1])


def test_candidates_are_the_papers_fourteen():
    assert set(candidate_grids(1, 6)) == {
        (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (2, 1), (2, 2), (2, 3), (3, 1), (3, 2), (4, 1), (5, 1), (6, 1)
    }  # fmt: skip
    counts = [c * r for c, r in candidate_grids(1, 6)]
    assert counts == sorted(counts)


@pytest.mark.parametrize("min_num, max_num, size", [(1, 6, 448), (1, 12, 448), (2, 6, 448), (1, 6, 224), (3, 9, 28)])
def test_tile_plan_matches_the_reference_rule(min_num, max_num, size):
    rng = random.Random(min_num * 100 + max_num + size)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(1500)]
    # exact ties: multiples of every candidate ratio, at areas on both sides of the tie threshold
    for cols, rows in candidate_grids(min_num, max_num):
        for k in (1, 3, 7, 50, 200, 400):
            sizes.append((cols * k, rows * k))
    for width, height in sizes:
        plan = nk.tile_plan(width, height, min_tiles=min_num, max_tiles=max_num, tile_size=size)
        assert (plan.cols, plan.rows) == closest_grid(width, height, min_num, max_num, size), (width, height)
        assert min_num <= plan.num_tiles <= max_num


def test_tile_plan_boxes_are_row_major():
    plan = nk.tile_plan(640, 480)  # 3x2
    assert plan.boxes == [
        (0, 0, 448, 448), (448, 0, 896, 448), (896, 0, 1344, 448),
        (0, 448, 448, 896), (448, 448, 896, 896), (896, 448, 1344, 896),
    ]  # fmt: skip
    assert not nk.tile_plan(1920, 1080, use_thumbnail=False).has_thumbnail


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(width=0, height=10), ValueError, ["width"]),
        (dict(width=10, height=-1), ValueError, ["height"]),
        (dict(width=10, height=10, min_tiles=4, max_tiles=2), ValueError, ["max_tiles", "min_tiles"]),
        (dict(width=10, height=10, tile_size=0), ValueError, ["tile_size"]),
        (dict(width=10.5, height=10), TypeError, ["width"]),
    ],
)
def test_tile_plan_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc) as info:
        nk.tile_plan(**kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


# --------------------------------------------------------------------------------------------------
# tags and prompt


def test_tile_tags_and_prompt():
    assert nk.tile_tags(1) == ["<tile_global_thumbnail>"]
    assert nk.tile_tags(7) == [f"<tile_{k}>" for k in range(1, 7)] + ["<tile_global_thumbnail>"]
    assert nk.tile_tags(3, style="nvlm-34b") == ["<tile_1>", "<tile_2>", "<tile_global>"]
    prompt = nk.image_prompt(3)
    assert prompt.startswith("<Image><tile_1><|vision_pad|>") and prompt.endswith("<|vision_pad|></Image>")
    assert prompt.count("<|vision_pad|>") == 3 * 256
    assert nk.image_prompt(2, placeholder="<image>", tokens_per_tile=2) == (
        "<Image><tile_1><image><image><tile_global_thumbnail><image><image></Image>"
    )
    with pytest.raises(ValueError, match="total_tiles"):
        nk.tile_tags(0)
    with pytest.raises(ValueError, match="style"):
        nk.tile_tags(2, style="nvlm-9b")


# --------------------------------------------------------------------------------------------------
# the CPU path against the reference pipeline, exactly


@pytest.mark.parametrize(
    "size, smooth",
    [((640, 480), False), ((1920, 1080), True), ((500, 500), True), ((700, 700), False), ((300, 4000), True)],
)
def test_cpu_path_equals_internvl_pipeline(size, smooth):
    """Both CPU backends: auto (the C++ host kernel where the extension is built) and Pillow's."""
    image = random_image(*size, seed=size[0], smooth=smooth)
    expected = internvl_pipeline(image)
    for backend in ("auto", "reference"):
        with nk.use_backend(backend):
            pixel_values, plans = nk.preprocess_images([image])
        assert pixel_values.dtype == torch.float32 and pixel_values.shape == expected.shape
        assert torch.equal(pixel_values, expected), backend
        assert plans[0].total == expected.shape[0]


def test_batch_order_threads_and_dtypes():
    images = [random_image(w, h, seed=w + h, smooth=True) for w, h in [(90, 60), (50, 50), (40, 170), (200, 30)]]
    expected = torch.cat([internvl_pipeline(im, size=28) for im in images])
    single, plans = nk.preprocess_images(images, tile_size=28, num_threads=1)
    pooled, _ = nk.preprocess_images(images, tile_size=28, num_threads=4)
    assert torch.equal(single, expected) and torch.equal(pooled, expected)
    assert [p.total for p in plans] == [7, 5, 5, 7]  # 50x50: tie with 2x2, area above half of it
    for dtype in (torch.float16, torch.bfloat16):
        out, _ = nk.preprocess_images(images, tile_size=28, dtype=dtype)
        assert out.dtype == dtype and torch.equal(out, expected.to(dtype))
    no_thumb, plans = nk.preprocess_images(images, tile_size=28, use_thumbnail=False)
    assert no_thumb.shape[0] == sum(p.num_tiles for p in plans) == 6 + 4 + 4 + 6


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "I;16", "I", "F"])
def test_modes_convert_like_the_reference(mode):
    image = random_image(60, 40, seed=3, smooth=True)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        assert image.mode == "I;16"
    else:
        image = image.convert(mode)
    pixel_values, _ = nk.preprocess_images([image], tile_size=28)
    assert torch.equal(pixel_values, internvl_pipeline(image, size=28))


def test_input_types(tmp_path):
    image = random_image(70, 50, seed=11, smooth=True)
    rgb = np.asarray(image)
    expected = internvl_pipeline(image, size=28)
    png = io.BytesIO()
    image.save(png, format="PNG")
    path = tmp_path / "image.png"
    path.write_bytes(png.getvalue())

    class DLPackOnly:  # what CuPy or JAX hand over: only the protocol
        def __init__(self, array):
            self.array = array

        def __dlpack__(self, **kwargs):
            return self.array.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.array.__dlpack_device__()

    inputs = [
        image,
        rgb,
        torch.from_numpy(rgb.copy()),
        torch.from_numpy(rgb.copy()).permute(2, 0, 1),  # CHW
        np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1),  # RGBA: alpha dropped
        DLPackOnly(rgb.copy()),
        str(path),
        path,
        png.getvalue(),
    ]
    pixel_values, plans = nk.preprocess_images(inputs, tile_size=28)
    assert len(plans) == len(inputs)
    for k, chunk in enumerate(pixel_values.split([p.total for p in plans])):
        assert torch.equal(chunk, expected), f"input {k} ({type(inputs[k]).__name__})"
    gray = np.asarray(image.convert("L"))
    out, _ = nk.preprocess_images([gray, gray[..., None]], tile_size=28)
    assert torch.equal(out, torch.cat([internvl_pipeline(image.convert("L"), size=28)] * 2))


def test_extreme_aspect_ratios_respect_max_tiles():
    for size in [(1, 3000), (3000, 1)]:
        image = random_image(*size, seed=1, smooth=True)
        pixel_values, plans = nk.preprocess_images([image], tile_size=28, max_tiles=4)
        assert plans[0].num_tiles == 4 and pixel_values.shape == (5, 3, 28, 28)
        assert torch.equal(pixel_values, internvl_pipeline(image, max_num=4, size=28))


def _truncated_png() -> bytes:
    buffer = io.BytesIO()
    random_image(64, 64, seed=2).save(buffer, format="PNG")
    return buffer.getvalue()[:-200]


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((0, 10, 3), np.uint8), ["images[1]", "zero-size"]),
        (b"definitely not an image", ["images[1]", "cannot decode"]),
        (_truncated_png(), ["images[1]", "cannot decode"]),
        (np.zeros((10, 10, 3), np.float32), ["images[1]", "uint8"]),
        (np.zeros((10, 10, 2), np.uint8), ["images[1]", "C in (1, 3, 4)"]),
        ({"not": "an image"}, ["images[1]", "unsupported type"]),
        ("/no/such/file.png", ["images[1]", "not found"]),
    ],
)
def test_bad_images_name_their_index(bad, words):
    good = random_image(40, 30, seed=5)
    with pytest.raises(ValueError) as info:
        nk.preprocess_images([good, bad], tile_size=28)
    assert all(w in str(info.value) for w in words), str(info.value)
    # the failure leaves nothing behind: the good image alone still gives the reference
    out, _ = nk.preprocess_images([good], tile_size=28)
    assert torch.equal(out, internvl_pipeline(good, size=28))


def test_decompression_bomb_is_refused(monkeypatch):
    buffer = io.BytesIO()
    random_image(64, 64, seed=9).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match=r"images\[0\].*decompression-bomb"):
        nk.preprocess_images([buffer.getvalue()], tile_size=28)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(max_tiles=0), ValueError, "max_tiles"),
        (dict(min_tiles=3, max_tiles=2), ValueError, "max_tiles"),
        (dict(tile_size=-4), ValueError, "tile_size"),
        (dict(dtype=torch.int8), TypeError, "dtype"),
        (dict(mean=(0.5, 0.5)), ValueError, "mean"),
        (dict(std=(0.2, 0.0, 0.2)), ValueError, "std"),
    ],
)
def test_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        nk.preprocess_images([random_image(30, 30, seed=1)], **kwargs)
    with pytest.raises(TypeError, match="list of images"):
        nk.preprocess_images(random_image(30, 30, seed=1))


def test_empty_batch():
    out, plans = nk.preprocess_images([], tile_size=28)
    assert out.shape == (0, 3, 28, 28) and plans == []


# --------------------------------------------------------------------------------------------------
# Pillow's resize: the coefficient tables and the pass order (what the GPU kernels consume)

RESIZE_CASES = [
    ((640, 480), (1344, 896)),
    ((1920, 1080), (896, 448)),
    ((500, 4000), (448, 2688)),  # Pillow 13: vertical first
    ((120, 13000), (448, 448)),  # Pillow 12.2+: vertical first (taller than 100:1)
    ((37, 53), (448, 448)),
    ((1000, 10), (448, 448)),
    ((2017, 1513), (448, 448)),
    ((448, 448), (448, 448)),
    ((448, 900), (448, 448)),  # one pass only
]


@pytest.mark.parametrize("src, dst", RESIZE_CASES)
def test_host_twin_equals_pillow(src, dst):
    image = random_image(*src, seed=src[0] ^ dst[1], smooth=True)
    expected = np.asarray(image.resize(dst))
    assert np.array_equal(resample.resize_like_pillow(np.asarray(image), dst), expected)


def test_pass_order_matters_and_follows_the_version():
    """With the other order the tall case differs: the rule is needed and the test above can fail."""
    image = np.asarray(random_image(120, 13000, seed=4, smooth=True))
    pillow = np.asarray(Image.fromarray(image).resize((448, 448)))
    installed = resample.installed_pillow_version()
    other = "12.1" if resample.vertical_first((120, 13000), (448, 448), installed) else "13.0"
    assert not np.array_equal(resample.resize_like_pillow(image, (448, 448), other), pillow)
    cases = {
        "10.4": [False, False, False],
        "12.1": [False, False, False],
        "12.3": [False, True, False],
        "13.0": [True, True, False],
    }
    for version, expected in cases.items():
        got = [
            resample.vertical_first((500, 4000), (448, 2688), version),
            resample.vertical_first((120, 13000), (448, 448), version),
            resample.vertical_first((4000, 500), (2688, 448), version),
        ]
        assert got == expected, version


def test_coefficients_sum_and_window():
    for n_in, n_out in [(4032, 1344), (13, 448), (1000, 999), (7, 1)]:
        c = resample.axis_coefficients(n_in, n_out)
        sums = c.weights.astype(np.int64).sum(1)
        assert np.all(np.abs(sums - (1 << 22)) <= 2), (n_in, n_out)  # fixed-point rounding only
        assert np.all(c.start >= 0) and np.all(c.start + c.taps <= n_in) and np.all(c.taps <= c.window)


# --------------------------------------------------------------------------------------------------
# the compiled kernels (C++ host kernel on CPU tensors; CUDA kernels on a GPU)

KERNEL_IMAGES = [(640, 480), (1920, 1080), (500, 500), (300, 4000), (448, 448), (120, 13000), (37, 5), (900, 448)]


def test_kernel_equals_pillow_path(device):
    """Every job in one call: grids, thumbnails, one-pass and no-pass resizes, vertical-first."""
    require_backend(OP, "cuda", device)
    images = [random_image(w, h, seed=w * 7 + h, smooth=(w + h) % 2 == 0) for w, h in KERNEL_IMAGES]
    with nk.use_backend("reference"):
        expected, plans = nk.preprocess_images(images)
    with nk.use_backend("cuda"):
        got, got_plans = nk.preprocess_images(images, device=device)
    assert got.device.type == device and got_plans == plans
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_dtypes_and_tensor_inputs(device, dtype):
    require_backend(OP, "cuda", device)
    image = random_image(90, 61, seed=8, smooth=True)
    rgb = torch.from_numpy(np.array(image))
    inputs = [
        rgb.to(device),
        rgb.permute(2, 0, 1).contiguous().to(device),  # CHW, read through strides
        rgb[..., :1].contiguous().to(device),  # one channel: replicated like L -> RGB
        torch.cat([rgb, rgb[..., :1]], -1).to(device),  # RGBA: alpha ignored
        image,
    ]
    gray = Image.fromarray(rgb[..., 0].numpy(), "L")  # the one-channel input holds the red channel
    expected = torch.cat(
        [internvl_pipeline(image, size=28)] * 2
        + [internvl_pipeline(gray, size=28)]
        + [internvl_pipeline(image, size=28)] * 2
    ).to(dtype)
    with nk.use_backend("cuda"):
        got, _ = nk.preprocess_images(inputs, device=device, tile_size=28, dtype=dtype)
        last, _ = nk.preprocess_images(
            inputs, device=device, tile_size=28, dtype=dtype, memory_format=torch.channels_last
        )
    assert got.dtype == dtype
    assert torch.equal(got.cpu(), expected)
    assert last.is_contiguous(memory_format=torch.channels_last)  # written in that layout by the kernel
    assert torch.equal(last.cpu(), expected)


def test_kernel_follows_the_requested_pillow_version(device):
    """Pillow 13's pass order for a tall image, against the host twin (this Pillow may be another)."""
    require_backend(OP, "cuda", device)
    image = random_image(120, 1300, seed=12, smooth=True)
    results = []
    for version in ("12.1", "13.0"):
        with nk.use_backend("cuda"):
            got, plans = nk.preprocess_images([image], device=device, tile_size=56, pillow_version=version)
        resized = resample.resize_like_pillow(np.asarray(image), plans[0].resized_size, version)
        table = nk.preprocess.reference.normalization_table(MEAN, STD)
        first_tile = torch.from_numpy(resized[:56, :56]).permute(2, 0, 1).long()
        expected = torch.stack([table[c][first_tile[c]] for c in range(3)])
        assert torch.equal(got[0].cpu(), expected), version
        results.append(got[0].cpu())
    assert not torch.equal(*results)  # the two orders give different bytes here: the test can fail


def _job_call(device, **overrides):
    images = [torch.randint(0, 256, (10, 12, 3), dtype=torch.uint8, device=device)]
    c = resample.axis_coefficients(12, 28)
    coefficients = torch.from_numpy(np.concatenate([c.start, c.taps, c.weights.reshape(-1)]).astype(np.int32))
    row = [0, 28, 28, 28, 10, 1, c.window, 0, 0, 0, 0, 0, 1]
    vertical = resample.axis_coefficients(10, 28)
    offset = coefficients.numel()
    coefficients = torch.cat(
        [coefficients, torch.from_numpy(np.concatenate([vertical.start, vertical.taps, vertical.weights.reshape(-1)]))]
    )
    row[8:11] = [0, vertical.window, offset]
    args = dict(
        images=images,
        job_table=torch.tensor([row]),
        coefficients=coefficients,
        table=torch.zeros(3, 256, device=device),
        total_tiles=1,
        tile_size=28,
        dtype=torch.float32,
    )
    args.update(overrides)
    return torch.ops.nvlm_C.resize_to_tiles(**args)


def test_kernel_rejects_inconsistent_plans(device):
    """The private op validates everything a kernel would index with: a clear error, never a fault."""
    require_backend(OP, "cuda", device)
    assert _job_call(device).shape == (1, 3, 28, 28)
    bad_row = [0, 28, 28, 28, 10, 1, 9, 0, 0, 9, 0, 0, 1]
    bad_coefficients = torch.full((64,), 5, dtype=torch.int32)
    cases = [
        (dict(total_tiles=2), "total_tiles"),
        (dict(job_table=torch.tensor([[1] + bad_row[1:]])), "image index"),
        (dict(job_table=torch.tensor([bad_row]), coefficients=bad_coefficients), "coefficient"),
        (dict(job_table=torch.tensor([bad_row[:12] + [2]])), "tile_cols"),
        (dict(table=torch.zeros(3, 255, device=device)), "table"),
        (dict(images=[torch.zeros(10, 12, 2, dtype=torch.uint8, device=device)]), "images[0]"),
        (dict(dtype=torch.float64), "dtype"),
    ]
    for overrides, word in cases:
        with pytest.raises((ValueError, TypeError), match=re.escape(word)):
            _job_call(device, **overrides)


def test_kernel_on_every_size_pair_small():
    """Many small size pairs through the host kernel against Pillow (both directions, odd sizes)."""
    require_backend(OP, "cuda", "cpu")
    rng = random.Random(0)
    images = [random_image(rng.randint(1, 120), rng.randint(1, 120), seed=k, smooth=k % 2 == 0) for k in range(40)]
    with nk.use_backend("reference"):
        expected, _ = nk.preprocess_images(images, tile_size=16)
    with nk.use_backend("cuda"):
        got, _ = nk.preprocess_images(images, tile_size=16)
    assert torch.equal(got, expected)
    assert math.isfinite(got.abs().max().item())


def test_cpu_path_threads_under_inference_mode():
    """vLLM's worker calls under torch.inference_mode: the pool threads must write the inference
    tensor in the caller's mode (grad and inference modes are thread-local)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (120, 200, 3), dtype=np.uint8) for _ in range(2)]
    want, _ = nk.preprocess_images(images, tile_size=56, num_threads=1)
    with torch.inference_mode():
        got, _ = nk.preprocess_images(images, tile_size=56, num_threads=2)
    assert got.is_inference() and torch.equal(got, want)
    # a batch first seen under inference mode: its cached job table serves a later normal call
    with torch.inference_mode():
        first, _ = nk.preprocess_images(images[:1], tile_size=40)
    again, _ = nk.preprocess_images(images[:1], tile_size=40)
    assert not again.is_inference() and torch.equal(again, first)


# --------------------------------------------------------------------------------------------------
# the host kernel: every instruction set, thread count, layout and dtype against Pillow

HOST_ISAS = ["scalar", "baseline", "avx2"]

# (width, height): a row, a column, single pixels, sizes that need no resize (one or both axes),
# upscales, downscales by large factors, and tall images whose pass order depends on Pillow's version
HOST_IMAGES = [
    (1, 37), (37, 1), (1, 1), (2, 3), (28, 28), (56, 28), (28, 90), (90, 28), (33, 17), (101, 64),
    (5, 900), (900, 5), (7, 800), (300, 41), (64, 300), (13, 1400),
]  # fmt: skip


@pytest.fixture(params=HOST_ISAS)
def host_isa(request, monkeypatch):
    """NVLM_KERNELS_PREPROCESS_ISA for the host kernel; skipped where the CPU lacks the set."""
    require_backend(OP, "cuda", "cpu")
    monkeypatch.setenv("NVLM_KERNELS_PREPROCESS_ISA", request.param)
    try:
        nk.preprocess_images([np.zeros((4, 4, 3), np.uint8)], tile_size=4)
    except ValueError as exc:
        pytest.skip(f"host kernel ISA {request.param} unavailable here: {exc}")
    return request.param


def _reference(images, **kwargs) -> torch.Tensor:
    with nk.use_backend("reference"):
        return nk.preprocess_images(images, **kwargs)[0]


def test_host_kernel_equals_pillow(host_isa):
    """Each ISA's loops, on one and several threads, against Pillow: many shapes, both layouts."""
    images = [random_image(w, h, seed=w * 31 + h, smooth=(w * h) % 3 == 0) for w, h in HOST_IMAGES]
    assert resample.vertical_first((5, 900), nk.tile_plan(5, 900, tile_size=28).resized_size, "12.3")
    expected = _reference(images, tile_size=28)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # at::parallel_for may use 3 threads even on 2 cores
        outputs = []
        for threads in (1, 2, 3):
            out, _ = nk.preprocess_images(images, tile_size=28, num_threads=threads)
            assert torch.equal(out, expected), f"{host_isa}, {threads} threads"
            outputs.append(out)
        one_image = [random_image(300, 700, seed=5, smooth=True)]  # its rows split across threads
        single = [nk.preprocess_images(one_image, tile_size=28, num_threads=t)[0] for t in (1, 2, 3)]
        assert all(torch.equal(x, _reference(one_image, tile_size=28)) for x in single)
    finally:
        torch.set_num_threads(before)
    channels_last, _ = nk.preprocess_images(images, tile_size=28, memory_format=torch.channels_last)
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    assert torch.equal(channels_last, expected)


def test_host_kernel_batch_in_waves():
    """A batch whose intermediates pass the kernel's wave size (8 MB: each 1400x1000 photo needs
    5.3 MB) runs in several waves that reuse one buffer; with a same-size image between them."""
    require_backend(OP, "cuda", "cpu")
    images = [random_image(1400, 1000, seed=k, smooth=k != 1) for k in range(3)]
    images.insert(2, random_image(448, 448, seed=7))
    expected = _reference(images, num_threads=1)
    for threads in (1, 2):
        out, _ = nk.preprocess_images(images, num_threads=threads)
        assert torch.equal(out, expected), threads


def test_host_kernel_transposition_edges(host_isa):
    """The horizontal passes move pixels four rows by four pixels at a time (AVX2) and finish
    pixel by pixel: widths and output widths on both sides of each block edge, row blocks of a
    height that is not a multiple of four, and 4-byte (RGBA) pixels, which load differently."""
    rng = np.random.default_rng(11)
    images = []
    for width in range(38, 54):
        height = 9 + width % 15
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        images.append(torch.from_numpy(pixels[..., :3].copy()) if width % 2 else torch.from_numpy(pixels))
    for tile_size in (13, 16, 17):
        expected = torch.cat([_reference([Image.fromarray(x[..., :3].numpy())], tile_size=tile_size) for x in images])
        for threads in (1, 2):
            out, _ = nk.preprocess_images(images, tile_size=tile_size, num_threads=threads)
            assert torch.equal(out, expected), (host_isa, tile_size, threads)


def test_host_kernel_concurrent_calls():
    """Calls from several Python threads at once (a server's frontend): each keeps its own
    output and scratch (recycled blocks, inter-op pool tasks), and gives the serial bytes."""
    from concurrent.futures import ThreadPoolExecutor

    require_backend(OP, "cuda", "cpu")
    batches = [[random_image(260 + 40 * k, 180 + 10 * j, seed=k * 7 + j) for j in range(2)] for k in range(4)]
    expected = [_reference(batch, tile_size=56) for batch in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            futures = [pool.submit(nk.preprocess_images, batch, tile_size=56, num_threads=2) for batch in batches]
            for future, want in zip(futures, expected, strict=True):
                assert torch.equal(future.result()[0], want)


def test_host_kernel_recycles_its_output():
    """A freed output is the next call's (no fresh pages per call), and every byte of it is
    rewritten: the first output is poisoned before it is freed."""
    require_backend(OP, "cuda", "cpu")
    images = [random_image(1000, 700, seed=k) for k in range(2)]  # 14 tiles: 8.4 MB of float32
    first, _ = nk.preprocess_images(images)
    address = first.data_ptr()
    first.fill_(float("nan"))
    del first
    second, _ = nk.preprocess_images(images[::-1])
    assert second.data_ptr() == address
    assert torch.equal(second, _reference(images[::-1]))
    second.resize_(1, 3, 448, 448)  # an ordinary resizable CPU tensor
    assert torch.equal(second[0], _reference(images[1:])[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_host_kernel_dtypes_layouts_and_inputs(host_isa, dtype, memory_format):
    """Every output dtype and layout, written by the kernel itself, from every input layout."""
    image = random_image(61, 45, seed=21, smooth=True)
    rgb = torch.from_numpy(np.array(image))
    gray = Image.fromarray(rgb[..., 0].numpy(), "L")
    inputs = [
        rgb,
        rgb.permute(2, 0, 1).contiguous(),  # CHW: packed once by the kernel
        rgb[..., :1].contiguous(),  # one channel: replicated like L -> RGB
        torch.cat([rgb, rgb[..., :1]], -1),  # RGBA: 4 bytes per pixel, read in place
        torch.from_numpy(np.pad(np.array(image), ((0, 0), (0, 9), (0, 0))))[:, :61],  # padded rows
        image,
    ]
    expected = torch.cat([_reference([x], tile_size=28) for x in (image, image, gray, image, image, image)])
    out, _ = nk.preprocess_images(inputs, tile_size=28, dtype=dtype, memory_format=memory_format)
    assert out.dtype == dtype and out.is_contiguous(memory_format=memory_format)
    assert torch.equal(out, expected.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_host_kernel_same_size_tiles(host_isa, dtype, memory_format):
    """Images already of their grid's size skip resampling: their rows go straight into the tiles
    (3- and 4-byte pixels, padded rows, a PIL image's RGBX memory), beside a resized thumbnail."""
    images = [random_image(w, h, seed=w + h) for w, h in ((28, 28), (56, 28), (28, 84))]
    rgb = [torch.from_numpy(np.array(image)) for image in images]
    inputs = [
        rgb[0],
        torch.cat([rgb[1], rgb[1][..., :1]], -1),  # RGBA: 4 bytes per pixel
        torch.from_numpy(np.pad(np.array(images[2]), ((0, 0), (0, 5), (0, 0))))[:, :28],  # padded rows
        images[1],  # Pillow's RGBX memory
    ]
    expected = _reference([images[0], images[1], images[2], images[1]], tile_size=28)
    for threads in (1, 2):
        out, plans = nk.preprocess_images(
            inputs, tile_size=28, dtype=dtype, memory_format=memory_format, num_threads=threads
        )
        assert [plan.resized_size for plan in plans] == [(28, 28), (56, 28), (28, 84), (56, 28)]
        assert out.is_contiguous(memory_format=memory_format)
        assert torch.equal(out, expected.to(dtype)), (host_isa, threads)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_host_kernel_modes(host_isa, mode):
    image = random_image(50, 70, seed=3, smooth=True)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    else:
        image = image.convert(mode)
    out, _ = nk.preprocess_images([image], tile_size=28)
    assert torch.equal(out, internvl_pipeline(image, size=28))


def test_pil_pixels_are_shared_when_pillow_allows(monkeypatch):
    """One-block PIL images are read in place through Pillow's Arrow export (RGBX, no copy);
    images in several blocks are copied row by row by Pillow into a recycled buffer (RGBX); a
    Pillow that allows neither gives its RGB export copy. Same bytes every way."""
    from nvlm_kernels.preprocess import cuda as host

    require_backend(OP, "cuda", "cpu")
    image = random_image(97, 45, seed=4, smooth=True)
    view = host.pil_pixels(image)
    expected = np.asarray(image)
    if view.shape[-1] == 4:  # shared: Pillow's own memory
        assert np.array_equal(view[..., :3].numpy(), expected)
    block_size = Image.core.get_block_size()
    try:
        Image.core.set_block_size(4096)  # a 97x45 RGBX image now spans several blocks
        split = random_image(97, 45, seed=4, smooth=True)
        with pytest.raises(ValueError, match="multiple"):
            split.__arrow_c_array__()
        copied = host.pil_pixels(split)
        assert copied.shape == (45, 97, 4) and np.array_equal(copied[..., :3].numpy(), expected)
        out, _ = nk.preprocess_images([split, image], tile_size=28)
        encoded = io.BytesIO()
        image.save(encoded, format="PNG")
        for arrow in (True, False):  # Image.open holds no pixels until loaded; the copy loads them
            lazy = Image.open(io.BytesIO(encoded.getvalue()))
            if not arrow:  # a Pillow without the Arrow export (which loads the image itself)
                monkeypatch.setattr(type(lazy), "__arrow_c_array__", None, raising=False)
            from_lazy = host.pil_pixels(lazy)
            assert from_lazy.shape == (45, 97, 4) and np.array_equal(from_lazy[..., :3].numpy(), expected)
        monkeypatch.setattr(Image, "frombuffer", None)  # a Pillow whose internals differ
        assert np.array_equal(host.pil_pixels(split).numpy(), expected)
    finally:
        Image.core.set_block_size(block_size)
    assert torch.equal(out, torch.cat([internvl_pipeline(image, size=28)] * 2))
    monkeypatch.setattr(type(image), "__arrow_c_array__", None, raising=False)  # an older Pillow
    assert host.pil_pixels(image).shape[-1] == 3


def test_host_cache_setting_is_checked():
    """NVLM_KERNELS_HOST_CACHE_MB (the recycling allocator's limit) is read at the host kernel's
    first call; a bad value is an error that names it."""
    require_backend(OP, "cuda", "cpu")
    script = (
        "import numpy as np, nvlm_kernels as nk\n"
        "try:\n"
        "    nk.preprocess_images([np.zeros((900, 600, 3), np.uint8)])\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, NVLM_KERNELS_HOST_CACHE_MB="lots")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "NVLM_KERNELS_HOST_CACHE_MB must be a number of megabytes" in result.stdout


def test_host_kernel_bad_options(monkeypatch):
    require_backend(OP, "cuda", "cpu")
    image = [random_image(30, 30, seed=1)]
    monkeypatch.setenv("NVLM_KERNELS_PREPROCESS_ISA", "avx9000")
    with pytest.raises(ValueError, match="NVLM_KERNELS_PREPROCESS_ISA"):
        nk.preprocess_images(image, tile_size=28)
    monkeypatch.delenv("NVLM_KERNELS_PREPROCESS_ISA")
    with pytest.raises(ValueError, match="num_threads"):
        nk.preprocess_images(image, tile_size=28, num_threads=0)
    with pytest.raises(TypeError, match="num_threads"):
        nk.preprocess_images(image, tile_size=28, num_threads=1.5)
    with pytest.raises(ValueError, match="memory_format"):
        nk.preprocess_images(image, tile_size=28, memory_format=torch.preserve_format)
    with pytest.raises(ValueError, match="isa"):
        _job_call("cpu", isa=7)
    with pytest.raises(ValueError, match="num_threads"):
        _job_call("cpu", num_threads=-1)
