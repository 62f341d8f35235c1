"""Turning whatever the caller has into an RGB image, as the reference pipeline would.

The reference (InternVL / NVLM-D) opens files with Pillow and calls ``.convert("RGB")`` before
tiling, so: grayscale is replicated, palette images are expanded, alpha is dropped (not blended),
16-bit and CMYK images go through Pillow's own conversion. Arrays and tensors are uint8 pixels:
[H, W] (grayscale), [H, W, C] or [C, H, W] with C in {1, 3, 4} (the last dim is taken as channels
when it is 1, 3 or 4). Tensors and DLPack arrays (CuPy, JAX, ...) stay on their device.

``load_image`` returns either a ``PIL.Image.Image`` in mode RGB or a uint8 tensor [H, W, C] (a
view, C in {1, 3, 4}; channel 0 is replicated for C = 1 and channel 3 is ignored for C = 4).
Every problem raises ``ValueError`` naming ``images[index]``.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import torch

try:
    from PIL import Image
except ImportError:  # Pillow is a declared dependency; tensors still work without it
    Image = None


class ImageError(ValueError):
    """A bad image in a batch: the message starts with ``images[i]``."""


def _fail(index: int, reason: str) -> ImageError:
    return ImageError(f"images[{index}]: {reason}")


def _check_size(index: int, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise _fail(index, f"zero-size image ({width}x{height})")


def _open_pil(source, index: int, what: str):
    if Image is None:
        raise _fail(index, f"{what} needs Pillow, which is not installed")
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; the reference
            # pipeline would have stopped at the error, and a warning is no place for a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            image.load()
    except FileNotFoundError as exc:
        raise _fail(index, f"file not found: {exc.filename}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(index, f"image is over Pillow's decompression-bomb limit ({exc})") from exc
    except Exception as exc:  # UnidentifiedImageError, truncated data, ...
        raise _fail(index, f"cannot decode {what} ({type(exc).__name__}: {exc})") from exc
    return image


def _to_rgb(image, index: int):
    _check_size(index, *image.size)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except Exception as exc:
        raise _fail(index, f"cannot convert mode {image.mode!r} to RGB ({exc})") from exc


def _tensor_hwc(tensor: torch.Tensor, index: int) -> torch.Tensor:
    if tensor.dtype != torch.uint8:
        raise _fail(index, f"pixel arrays must be uint8, got {tensor.dtype}")
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(-1)
    elif tensor.dim() == 3:
        if tensor.shape[-1] not in (1, 3, 4):
            if tensor.shape[0] not in (1, 3, 4):
                raise _fail(index, f"expected [H, W, C] or [C, H, W] with C in (1, 3, 4), got {tuple(tensor.shape)}")
            tensor = tensor.permute(1, 2, 0)
    else:
        raise _fail(index, f"expected a 2-D or 3-D pixel array, got shape {tuple(tensor.shape)}")
    _check_size(index, tensor.shape[1], tensor.shape[0])
    return tensor


def load_image(image, index: int = 0):
    """A PIL RGB image or a uint8 tensor [H, W, C] view (see the module docstring)."""
    if isinstance(image, torch.Tensor):  # tensors and arrays first: a server's usual input
        return _tensor_hwc(image, index)
    if isinstance(image, np.ndarray):
        # shared, never copied (a decoded 12-megapixel photo is 36 MB): torch only warns about
        # read-only memory (np.asarray of a PIL image), which nothing here writes to; negative
        # strides are the one layout torch cannot view
        array = np.ascontiguousarray(image) if min(image.strides, default=0) < 0 else image
        if array.flags.writeable:  # no warning to silence (catching one costs more than the rest)
            return _tensor_hwc(torch.from_numpy(array), index)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            return _tensor_hwc(torch.from_numpy(array), index)
    if Image is not None and isinstance(image, Image.Image):
        return _to_rgb(image, index)
    if isinstance(image, (str, os.PathLike)):
        return _to_rgb(_open_pil(os.fspath(image), index, f"file {os.fspath(image)!r}"), index)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _to_rgb(_open_pil(io.BytesIO(bytes(image)), index, "bytes"), index)
    if hasattr(image, "__dlpack__"):
        try:
            tensor = torch.from_dlpack(image)
        except Exception as exc:
            raise _fail(index, f"cannot import the array through DLPack ({exc})") from exc
        return _tensor_hwc(tensor, index)
    raise _fail(
        index,
        f"unsupported type {type(image).__name__} (PIL image, numpy/torch uint8 array, DLPack array, path or bytes)",
    )


def image_size(image) -> tuple[int, int]:
    """(width, height) of a ``load_image`` result."""
    if isinstance(image, torch.Tensor):
        return image.shape[1], image.shape[0]
    return image.size


def to_rgb_array(image) -> np.ndarray:
    """uint8 [H, W, 3] on the host (what Pillow's RGB conversion gives for arrays)."""
    if isinstance(image, torch.Tensor):
        return to_rgb_tensor(image).cpu().numpy()
    return np.asarray(image)


def to_rgb_tensor(image: torch.Tensor) -> torch.Tensor:
    """[H, W, C] uint8 -> [H, W, 3]: grayscale replicated, alpha dropped (Pillow's L/RGBA -> RGB)."""
    channels = image.shape[-1]
    if channels == 1:
        return image.expand(*image.shape[:2], 3)
    return image[..., :3]
