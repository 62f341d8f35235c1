"""nvlm-kernels: CUDA and Triton kernels for NVIDIA's NVLM-1.0 models, as drop-in torch ops.

Public API::

    import nvlm_kernels as nk
    y = nk.pixel_shuffle(vit_out[:, 1:], scale_factor=0.5)      # [T, 1024, 3200] -> [T, 256, 12800]
    with nk.use_backend("triton"):                               # or NVLM_KERNELS_BACKEND=triton
        ...

``python -m nvlm_kernels.info`` prints versions, devices and which backend each op can use.
"""

from __future__ import annotations

from nvlm_kernels._backend import BACKENDS, BackendUnavailableError, use_backend
from nvlm_kernels._version import __version__
from nvlm_kernels.cross_attention import cross_attention_ranges, gated_cross_attention, ranges_from_mask
from nvlm_kernels.mlp_projector import mlp_projector
from nvlm_kernels.pixel_shuffle import pixel_shuffle
from nvlm_kernels.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    TilePlan,
    image_prompt,
    preprocess_images,
    tile_plan,
    tile_tags,
)
from nvlm_kernels.vit_attention import vit_attention, vit_qk_norm_attention

__all__ = [
    "BACKENDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackendUnavailableError",
    "ImageError",
    "TilePlan",
    "__version__",
    "available_backends",
    "cross_attention_ranges",
    "gated_cross_attention",
    "image_prompt",
    "mlp_projector",
    "pixel_shuffle",
    "preprocess_images",
    "ranges_from_mask",
    "tile_plan",
    "tile_tags",
    "use_backend",
    "vit_attention",
    "vit_qk_norm_attention",
]


def available_backends(op: str, device: str = "cuda") -> dict[str, str | None]:
    """For ``op`` on tensors of ``device``: backend name -> None if it can run, else the reason."""
    from nvlm_kernels import _backend

    if op not in _backend.registered_ops():
        raise ValueError(f"unknown op {op!r}; known: {sorted(_backend.registered_ops())}")
    return {b: _backend.why_unavailable(op, b, device) for b in _backend.BACKENDS}
