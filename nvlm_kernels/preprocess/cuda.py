"""The compiled preprocessing path: ``torch.ops.nvlm_C.resize_to_tiles`` (csrc/preprocess).

The host plans the work — per image a job for its tile grid and one for its thumbnail, each with
its passes in the installed Pillow's order and the passes' coefficient tables (``resample.py``) —
and the extension runs every job of the batch in two launches (first passes; second passes with
normalization and the scatter into tiles). On CPU tensors the C++ host kernel runs the same
arithmetic with SIMD loops and threads (the CPU path of ``preprocess_images``). Pixels are shared,
not copied, wherever their owner allows: tensors and numpy arrays as they are, PIL images through
Pillow's Arrow export when they lie in one memory block; for the GPU, host pixels are copied once
from pinned memory.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings

import numpy as np
import torch

from nvlm_kernels import _extension
from nvlm_kernels.preprocess.images import Image, to_rgb_array
from nvlm_kernels.preprocess.plan import TilePlan
from nvlm_kernels.preprocess.resample import axis_coefficients, installed_pillow_version, vertical_first

AXIS_NONE, AXIS_VERTICAL, AXIS_HORIZONTAL = -1, 0, 1
ISA_ENV_VAR = "NVLM_KERNELS_PREPROCESS_ISA"
HOST_ISAS = {"auto": -1, "scalar": 0, "baseline": 1, "avx2": 2}  # csrc/preprocess/resize_host.cpp
JOB_FIELDS = 13  # csrc/preprocess/resize.h kJobFields


class _CoefficientBuffer:
    """Concatenated coefficient blocks [start[n], taps[n], weights[n·window]] (int32), one per
    distinct (input size, output size)."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0
        self.offsets: dict[tuple[int, int], tuple[int, int]] = {}

    def block(self, in_size: int, out_size: int) -> tuple[int, int]:
        """(offset, window) of the block for in_size -> out_size."""
        key = (in_size, out_size)
        if key not in self.offsets:
            c = axis_coefficients(in_size, out_size)
            flat = np.concatenate([c.start, c.taps, c.weights.reshape(-1)]).astype(np.int32)
            self.offsets[key] = (self.size, c.window)
            self.parts.append(flat)
            self.size += flat.size
        return self.offsets[key]

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(self.parts) if self.parts else np.zeros(1, np.int32))


def job_rows(
    image_index: int,
    in_size: tuple[int, int],
    out_size: tuple[int, int],
    tile_base: int,
    tile_size: int,
    coefficients: _CoefficientBuffer,
    pillow_version: str | None,
) -> list[int]:
    """One row of the job table (csrc/preprocess/resize.h) for resizing in_size -> out_size (w, h)."""
    (w_in, h_in), (w_out, h_out) = in_size, out_size
    passes = []
    horizontal = (AXIS_HORIZONTAL, w_in, w_out)
    vertical = (AXIS_VERTICAL, h_in, h_out)
    order = [vertical, horizontal] if vertical_first(in_size, out_size, pillow_version) else [horizontal, vertical]
    for axis, n_in, n_out in order:
        if n_in != n_out:  # Pillow skips a pass that keeps the size
            passes.append((axis, *coefficients.block(n_in, n_out)[::-1]))  # (axis, window, offset)
    while len(passes) < 2:
        passes.insert(0, (AXIS_NONE, 0, 0))
    (first_axis, first_window, first_offset), (second_axis, second_window, second_offset) = passes
    mid_w = w_out if first_axis == AXIS_HORIZONTAL else w_in
    mid_h = h_out if first_axis == AXIS_VERTICAL else h_in
    if first_axis == AXIS_NONE:
        mid_w = mid_h = 0
    row = [image_index, w_out, h_out, mid_w, mid_h, first_axis, first_window, first_offset]
    row += [second_axis, second_window, second_offset, tile_base, w_out // tile_size]
    assert len(row) == JOB_FIELDS
    return row


@functools.lru_cache(maxsize=256)  # a server sees the same few batches of photo sizes again and again
def job_plan(plans: tuple[TilePlan, ...], pillow_version: str | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(job table, coefficients, total tiles) of a batch: per image a job for its tile grid and one
    for its thumbnail. Cached: the kernels only read the two tensors, and callers must not write
    to them; never inference tensors, whatever mode the first caller was in."""
    with torch.inference_mode(False):
        return _job_plan(plans, pillow_version)


def _job_plan(plans: tuple[TilePlan, ...], pillow_version: str | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    coefficients = _CoefficientBuffer()
    rows: list[list[int]] = []
    tile = 0
    for index, plan in enumerate(plans):
        size = (plan.width, plan.height)
        rows.append(job_rows(index, size, plan.resized_size, tile, plan.tile_size, coefficients, pillow_version))
        tile += plan.num_tiles
        if plan.has_thumbnail:
            thumb = (plan.tile_size, plan.tile_size)
            rows.append(job_rows(index, size, thumb, tile, plan.tile_size, coefficients, pillow_version))
            tile += 1
    job_table = torch.from_numpy(np.array(rows, dtype=np.int64))  # torch.tensor of lists is slower
    return job_table, coefficients.tensor(), tile


class _ArrowArray(ctypes.Structure):
    """The Arrow C data interface's ArrowArray (a stable ABI)."""


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _pil_arrow_view(image) -> torch.Tensor | None:
    """Pillow's own pixel memory as a uint8 [H, W, 4] RGBX view (no copy), through its Arrow export
    (Pillow >= 11.2), when the image lies in one memory block; else None."""
    try:
        _, array_capsule = image.__arrow_c_array__()
        array = _ArrowArray.from_address(_capsule_pointer(array_capsule, b"arrow_array"))
        width, height = image.size
        if array.n_children != 1 or array.offset != 0:
            return None
        child = array.children[0].contents
        if child.n_buffers != 2 or child.offset != 0 or child.length != width * height * 4 or not child.buffers[1]:
            return None
        memory = (ctypes.c_uint8 * child.length).from_address(child.buffers[1])
    except Exception:  # older Pillow, several blocks, another layout: take the copy
        return None
    memory._keep_alive = array_capsule  # the capsule releases Pillow's memory when collected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only to us: the kernels never write their inputs
        return torch.frombuffer(memory, dtype=torch.uint8).view(height, width, 4)


def _pil_row_copy(image) -> torch.Tensor | None:
    """uint8 [H, W, 4] RGBX copy of a PIL RGB image that Pillow keeps in several memory blocks
    (photos over its 16 MB block size): Pillow's own row copy (the core image's paste) into a
    buffer from the extension's recycling allocator, which a PIL image made by ``frombuffer``
    shares. 7 ms for a 4032x3024 photo here, against 36 ms for ``np.asarray`` (Pillow's
    ``tobytes``, which also packs RGBX to RGB). None where this Pillow refuses any step."""
    width, height = image.size
    try:
        image.load()  # an Image.open result holds no pixels until loaded
        buffer = torch.ops.nvlm_C.host_buffer(width * height * 4)
        target = Image.frombuffer("RGBX", (width, height), buffer.numpy(), "raw", "RGBX", 0, 1)
        target.im.paste(image.im, (0, 0, width, height))
    except Exception:  # another Pillow's internals, or no extension: the export copy instead
        return None
    return buffer.view(height, width, 4)


def pil_pixels(image) -> torch.Tensor:
    """uint8 [H, W, 3 or 4] of a PIL RGB image: Pillow's RGBX memory itself where it can be
    shared, else one copy."""
    if image.mode == "RGB":
        view = _pil_arrow_view(image)
        if view is None:
            view = _pil_row_copy(image)
        if view is not None:
            return view
    array = to_rgb_array(image)  # np.asarray: Pillow's tobytes, read-only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only to us: the kernels never write their inputs
        return torch.from_numpy(array)


def _as_device_tensor(image, device: torch.device) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        return image if image.device == device else image.to(device, non_blocking=True)
    pixels = pil_pixels(image)
    if device.type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
    return pixels


def host_isa() -> int:
    """The host kernel's instruction set: ``NVLM_KERNELS_PREPROCESS_ISA`` = auto (the best this CPU
    has), scalar (the CUDA kernels' per-pixel functions), baseline (the loops built for the wheel's
    baseline, SSE2 on x86-64) or avx2; for tests and benchmarks."""
    name = os.environ.get(ISA_ENV_VAR, "auto").strip().lower() or "auto"
    if name not in HOST_ISAS:
        raise ValueError(f"{ISA_ENV_VAR} must be one of {tuple(HOST_ISAS)}, got {name!r}")
    return HOST_ISAS[name]


def preprocess(
    images: list,
    plans: list[TilePlan],
    table: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    pillow_version: str | None,
    channels_last: bool = False,
    num_threads: int = 0,
) -> torch.Tensor:
    _extension.require()
    isa = host_isa() if device.type == "cpu" else -1
    tensors = [_as_device_tensor(image, device) for image in images]
    # the version resolved before the cache: the key then names the pass order it holds
    job_table, coefficients, total_tiles = job_plan(tuple(plans), pillow_version or installed_pillow_version())
    return torch.ops.nvlm_C.resize_to_tiles(
        tensors,
        job_table,
        coefficients,
        table.to(device),
        total_tiles,
        plans[0].tile_size,
        dtype,
        channels_last=channels_last,
        num_threads=num_threads,
        isa=isa,
    )
