"""vLLM's NVLM-D and InternVL-chat models on our ops: subclasses of vLLM's own classes.

Imported by vLLM's model registry (lazily, through the names ``register()`` gives it), never by
``import nvlm_kernels``. Everything that is not named here is vLLM's: weight loading and parameter
names, the language model, tensor / pipeline parallelism, the scheduler, the prompt replacement.

Shapes (T tiles of all images in the encoder batch, S = 1 + P tokens per tile, C the ViT width,
H heads on this rank (real + dummy, divided by the TP size), D the head dim):

* attention: ``qkv`` [T, S, 3·H·D] from vLLM's ``QKVParallelLinear`` (q, k, v blocks of this rank's
  heads) -> ``nk.vit_qk_norm_attention`` (TP 1) or RMSNorm of q and k over the all-reduced sum of
  squares + ``nk.vit_attention`` (TP > 1), or ``nk.vit_attention`` without QK-norm -> [T, S, H, D]
  -> vLLM's ``proj`` (``RowParallelLinear``: its own all-reduce).
* projector: the ViT output [T, S, C] -> ``nk.mlp_projector`` (CLS drop, shuffle, LayerNorm, Linear,
  GELU, Linear) -> [T, P·s², hidden].
* preprocessing (worker mode): per image a flat uint8 [H·W·3] and a layout row (height, width,
  min tiles, max tiles, thumbnail, tile size) -> ``nk.preprocess_images`` on the model's device ->
  ``pixel_values_flat`` [T, 3, tile, tile] in the model's dtype -> vLLM's own ``embed_multimodal``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import nvlm_kernels as nk
from nvlm_kernels.integrations import vllm as plugin
from nvlm_kernels.preprocess.images import load_image

_missing = plugin.check_vllm_internals()
if _missing:  # the same clear error as register()'s, for a registry that imports this module itself
    import vllm as _vllm

    raise plugin._incompatible(str(_vllm.__version__), _missing)

from transformers import BatchFeature  # noqa: E402
from vllm.distributed import tensor_model_parallel_all_reduce  # noqa: E402
from vllm.model_executor.models.intern_vit import InternParallelAttention  # noqa: E402
from vllm.model_executor.models.internvl import (  # noqa: E402
    InternVLChatModel,
    InternVLDummyInputsBuilder,
    InternVLMultiModalProcessor,
    InternVLProcessingInfo,
)
from vllm.model_executor.models.nvlm_d import (  # noqa: E402
    NVLM_D_Model,
    NVLMDummyInputsBuilder,
    NVLMMultiModalProcessor,
    NVLMProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalFieldConfig  # noqa: E402
from vllm.transformers_utils.processors.internvl import InternVLImageProcessor  # noqa: E402

__all__ = ["InternVLChatOnNvlmKernels", "NVLMDOnNvlmKernels"]

PIXELS = "nvlm_pixels_uint8"  # flat uint8 pixels of each image (H·W·3, row-major RGB)
LAYOUT = "nvlm_image_layout"  # int64 [6] per image: height, width, min tiles, max tiles, thumbnail, tile size
_LAYOUT_COLUMNS = 6


def _count(key: str, n: int = 1) -> None:
    """The plugin's counters, outside torch.compile's tracing (vLLM can compile the encoder layers)."""
    if not torch.compiler.is_compiling():
        plugin._count(key, n)


# --------------------------------------------------------------------------------------------------
# preprocessing: the frontend side (vLLM's processor, run in the API / LLM process)


def _uint8_hwc(image, index: int) -> torch.Tensor:
    """One image as a contiguous CPU uint8 [H, W, 3] RGB tensor (no float work). vLLM's parser hands
    PIL images over already converted to RGB; arrays and tensors go through our image loader's
    rules (grayscale expanded, alpha dropped), as ``preprocess_images`` would read them."""
    loaded = load_image(image, index)
    if isinstance(loaded, torch.Tensor):
        tensor = loaded.cpu()
        if tensor.shape[-1] == 1:
            tensor = tensor.expand(*tensor.shape[:2], 3)
        elif tensor.shape[-1] == 4:
            tensor = tensor[..., :3]
        return tensor.contiguous()
    return torch.from_numpy(np.array(loaded, dtype=np.uint8, copy=True))  # PIL RGB -> [H, W, 3]


class NvlmImageProcessor(InternVLImageProcessor):
    """vLLM's ``InternVLImageProcessor`` with the same tiling arguments; the tile plan is ours
    (``nk.tile_plan``, InternVL's rule). ``worker`` mode returns the uint8 pixels and the layout,
    ``frontend`` mode our CPU path's ``pixel_values_flat`` (equal to vLLM's bit for bit)."""

    def __init__(self, *args, preprocess: str = "worker", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.preprocess = preprocess

    @classmethod
    def like(cls, base: InternVLImageProcessor, preprocess: str) -> NvlmImageProcessor:
        return cls(
            image_size=base.image_size,
            min_dynamic_patch=base.min_dynamic_patch,
            max_dynamic_patch=base.max_dynamic_patch,
            dynamic_image_size=base.dynamic_image_size,
            use_thumbnail=base.use_thumbnail,
            preprocess=preprocess,
        )

    def __call__(
        self,
        images,
        *,
        min_dynamic_patch: int | None = None,
        max_dynamic_patch: int | None = None,
        dynamic_image_size: bool | None = None,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        images = images if isinstance(images, list) else [images]
        min_tiles, max_tiles = self.resolve_min_max_num(
            min_dynamic_patch=min_dynamic_patch,
            max_dynamic_patch=max_dynamic_patch,
            dynamic_image_size=dynamic_image_size,
            use_thumbnail=False,  # the thumbnail is the plan's (as vLLM's image_to_pixel_values_internvl)
        )
        tiling = {
            "min_tiles": min_tiles,
            "max_tiles": max_tiles,
            "tile_size": self.image_size,
            "use_thumbnail": bool(self.use_thumbnail),
        }
        if self.preprocess == "frontend":
            pixel_values, plans = nk.preprocess_images(images, device="cpu", **tiling)
            data = {"pixel_values_flat": pixel_values}
        else:
            pixels = [_uint8_hwc(image, i) for i, image in enumerate(images)]
            plans = [nk.tile_plan(p.shape[1], p.shape[0], **tiling) for p in pixels]
            layout = [[p.shape[0], p.shape[1], min_tiles, max_tiles, int(self.use_thumbnail), self.image_size]
                      for p in pixels]  # fmt: skip
            data = {
                PIXELS: torch.cat([p.reshape(-1) for p in pixels]) if pixels else torch.empty(0, dtype=torch.uint8),
                LAYOUT: torch.tensor(layout, dtype=torch.int64).reshape(-1, _LAYOUT_COLUMNS),
            }
        data["image_num_patches"] = torch.tensor([plan.total for plan in plans], dtype=torch.int64)
        return BatchFeature(data, tensor_type=return_tensors)


class _ProcessingInfo:
    """Mixin for vLLM's ``*ProcessingInfo``: its image processor, as ours."""

    def get_image_processor(self, **kwargs):
        return NvlmImageProcessor.like(super().get_image_processor(**kwargs), plugin.preprocess_mode())


class _MultiModalProcessor:
    """Mixin for vLLM's ``*MultiModalProcessor``: the fields of worker mode (flat pixels, sliced per
    image by their byte counts; the layout rows stay on the CPU)."""

    def _get_image_fields_config(self, hf_inputs: BatchFeature):
        fields = dict(super()._get_image_fields_config(hf_inputs))
        if PIXELS in hf_inputs:
            layout = hf_inputs[LAYOUT]
            fields[PIXELS] = MultiModalFieldConfig.flat_from_sizes("image", layout[:, 0] * layout[:, 1] * 3)
            fields[LAYOUT] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields


class NVLMProcessingInfoOnNvlmKernels(_ProcessingInfo, NVLMProcessingInfo):
    pass


class InternVLProcessingInfoOnNvlmKernels(_ProcessingInfo, InternVLProcessingInfo):
    pass


class NVLMMultiModalProcessorOnNvlmKernels(_MultiModalProcessor, NVLMMultiModalProcessor):
    pass


class InternVLMultiModalProcessorOnNvlmKernels(_MultiModalProcessor, InternVLMultiModalProcessor):
    pass


# --------------------------------------------------------------------------------------------------
# InternViT attention


def _attention_problem(attn: nn.Module) -> str | None:
    """Why a built ``InternParallelAttention`` cannot run our forward, or None."""
    if type(attn) is not InternParallelAttention:
        return f"{type(attn).__name__} is not vLLM's InternParallelAttention"
    missing = [name for name in plugin.ATTENTION_ATTRIBUTES if not hasattr(attn, name)]
    if missing:
        return f"it has no {', '.join(missing)}"
    if attn.qk_normalization:
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        for norm in (q_norm, k_norm):
            if not all(hasattr(norm, a) for a in ("weight", "variance_epsilon", "variance_size_override")):
                return "its q_norm / k_norm are not vLLM RMSNorms"
            if not getattr(norm, "has_weight", True):
                return "its q_norm / k_norm have no weight"
        if q_norm.variance_epsilon != k_norm.variance_epsilon:
            return "q_norm and k_norm have different eps (one fused op takes one)"
        if _norm_features(q_norm) != _norm_features(k_norm):
            return "q_norm and k_norm average over different features"
    return None


def _norm_features(norm: nn.Module) -> int:
    """Over how many (leading) features vLLM's RMSNorm takes its mean square."""
    return norm.variance_size_override or norm.weight.shape[0]


class InternAttentionOnNvlmKernels(InternParallelAttention):
    """vLLM's ``InternParallelAttention`` (same parameters, same ``qkv`` and ``proj``) with the
    attention core on our ops. Built modules are switched to this class in place (``_use_our_attention``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles, tokens, _ = x.shape
        qkv, _ = self.qkv(x)
        heads, head_dim = self.num_heads_per_partition, self.head_dim
        if not self.qk_normalization:
            q, k, v = qkv.view(tiles, tokens, 3, heads, head_dim).unbind(2)  # strided views, no copies
            out = nk.vit_attention(q, k, v, softmax_scale=self.scale)
            _count("vit_attention")
        elif self.tp_size == 1:
            out = nk.vit_qk_norm_attention(
                qkv,
                self.q_norm.weight,
                self.k_norm.weight,
                num_heads=heads,
                eps=self.q_norm.variance_epsilon,
                norm_features=_norm_features(self.q_norm),
                softmax_scale=self.scale,
            )
            _count("vit_qk_norm_attention")
        else:
            q, k, v = qkv.view(tiles, tokens, 3, heads, head_dim).unbind(2)
            q, k = self._qk_norm_all_reduce(q, k)
            out = nk.vit_attention(q, k, v, softmax_scale=self.scale)
            _count("vit_attention")
        out, _ = self.proj(out.reshape(tiles, tokens, heads * head_dim))
        return out

    def _qk_norm_all_reduce(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-width QK-RMSNorm when this rank holds heads [first, first + H) of the padded
        layout: each token's float32 sum of squares over this rank's share of the statistic's
        features (the first ``norm_features`` of the padded width; dummy heads are outside it),
        summed over the ranks by one all-reduce of [2, T, S], then vLLM's RMSNorm arithmetic
        (float32 normalize, weight in its dtype) with this rank's slice of the replicated weights.
        vLLM's own forward all-gathers q and k ([T, S, H·D·tp] each) and splits them again."""
        width = q.shape[-2] * q.shape[-1]
        start = self.tp_rank * width
        features = _norm_features(self.q_norm)
        local = max(0, min(features - start, width))
        q32, k32 = q.float().flatten(-2), k.float().flatten(-2)
        squares = torch.stack([q32[..., :local].pow(2).sum(-1), k32[..., :local].pow(2).sum(-1)])
        squares = tensor_model_parallel_all_reduce(squares)
        rstd = torch.rsqrt(squares / features + self.q_norm.variance_epsilon).unsqueeze(-1)
        out = []
        for x32, r, norm in ((q32, rstd[0], self.q_norm), (k32, rstd[1], self.k_norm)):
            weight = norm.weight[start : start + width]
            out.append(((x32 * r).to(weight.dtype) * weight).to(q.dtype).view(q.shape))
        return out[0], out[1]


def _use_our_attention(vision_model: nn.Module) -> None:
    for name, module in vision_model.named_modules():
        if isinstance(module, InternParallelAttention):
            problem = _attention_problem(module)
            if problem is None:
                module.__class__ = InternAttentionOnNvlmKernels
            else:
                plugin._log.warning("nvlm_kernels vLLM plugin: %s keeps vLLM's attention: %s", name, problem)


# --------------------------------------------------------------------------------------------------
# the projector


def _projector_problem(mlp1: nn.Module) -> str | None:
    """Why ``mlp1`` is not LayerNorm -> Linear -> GELU -> Linear as our op computes it, or None
    (exact types: a LoRA- or quantization-wrapped Linear keeps vLLM's code)."""
    layers = list(mlp1) if isinstance(mlp1, nn.Sequential) else []
    types = (nn.LayerNorm, nn.Linear, nn.GELU, nn.Linear)
    if len(layers) != 4 or any(type(layer) is not t for layer, t in zip(layers, types, strict=True)):
        return "mlp1 is not Sequential(LayerNorm, Linear, GELU, Linear)"
    norm, gelu = layers[0], layers[2]
    if norm.weight is None or norm.bias is None or len(norm.normalized_shape) != 1:
        return "mlp1's LayerNorm has no affine weight and bias over one dimension"
    if gelu.approximate not in ("none", "tanh"):
        return f"mlp1's GELU approximation {gelu.approximate!r} is not one our op computes"
    return None


class _OnNvlmKernels:
    """Mixin for vLLM's ``InternVLChatModel`` and ``NVLM_D_Model``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        if plugin.preprocess_mode() == "worker" and getattr(
            vllm_config.compilation_config, "cudagraph_mm_encoder", False
        ):
            raise plugin.VllmPluginError(
                "nvlm_kernels' vLLM plugin preprocesses images in the worker from uint8 pixels, which "
                "compilation_config.cudagraph_mm_encoder cannot capture (its graphs take vLLM's float "
                f"pixel_values_flat): set {plugin.ENV_PREPROCESS}=frontend (our CPU path in the frontend) "
                "or turn cudagraph_mm_encoder off"
            )
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._nk_projector_problem = _projector_problem(self.mlp1)
        if self._nk_projector_problem:
            plugin._log.warning(
                "nvlm_kernels vLLM plugin: the projector keeps vLLM's code: %s", self._nk_projector_problem
            )

    def _init_vision_model(self, *args, **kwargs):
        vision_model = super()._init_vision_model(*args, **kwargs)
        _use_our_attention(vision_model)
        return vision_model

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self._nk_projector_problem:
            return super().extract_feature(pixel_values)
        vit_embeds = self.vision_model(pixel_values=pixel_values)  # [T, 1 + P, C]
        norm, fc1, gelu, fc2 = self.mlp1
        out = nk.mlp_projector(
            vit_embeds,
            norm.weight,
            norm.bias,
            fc1.weight,
            fc2.weight,
            fc1.bias,
            fc2.bias,
            eps=norm.eps,
            activation="gelu" if gelu.approximate == "none" else "gelu_tanh",
            pixel_shuffle=self.downsample_ratio,
            drop_cls=True,
            version="v1" if self.ps_version == "v1" else "v2",
        )
        _count("mlp_projector")
        return out

    def embed_multimodal(self, **kwargs):
        if PIXELS in kwargs:
            kwargs = self._pixel_values_from_uint8(kwargs)
        return super().embed_multimodal(**kwargs)

    def _pixel_values_from_uint8(self, kwargs: dict) -> dict:
        """``kwargs`` with the uint8 pixels and layouts replaced (in place in the order, which vLLM
        reads as the order of the modalities) by ``pixel_values_flat`` made on the model's device."""
        pixels = kwargs[PIXELS]
        if isinstance(pixels, (list, tuple)):
            pixels = torch.cat([p.reshape(-1) for p in pixels])
        layout = kwargs[LAYOUT]
        layout = torch.stack(list(layout)) if isinstance(layout, (list, tuple)) else layout
        rows = layout.reshape(-1, _LAYOUT_COLUMNS).tolist()
        sizes = [h * w * 3 for h, w, *_ in rows]
        if sum(sizes) != pixels.numel():
            raise ValueError(f"nvlm_kernels vLLM plugin: {pixels.numel()} pixel bytes for images of {sizes} bytes")
        images = [part.view(h, w, 3) for part, (h, w, *_) in zip(pixels.split(sizes), rows, strict=True)]
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        tiles, totals, start = [], [], 0
        while start < len(rows):  # one call per run of images with the same tiling (normally one)
            end = start + 1
            while end < len(rows) and rows[end][2:] == rows[start][2:]:
                end += 1
            min_tiles, max_tiles, thumbnail, tile_size = rows[start][2:]
            values, plans = nk.preprocess_images(
                images[start:end],
                device=pixels.device,
                dtype=dtype,
                min_tiles=min_tiles,
                max_tiles=max_tiles,
                tile_size=tile_size,
                use_thumbnail=bool(thumbnail),
            )
            tiles.append(values)
            totals += [plan.total for plan in plans]
            start = end
        _count("preprocess_images", len(rows))
        expected = kwargs.get("image_num_patches")
        if expected is not None:
            expected = [int(n) for n in (expected.tolist() if isinstance(expected, torch.Tensor) else expected)]
            if expected != totals:
                raise ValueError(
                    f"nvlm_kernels vLLM plugin: the worker's tile plans {totals} differ from the frontend's {expected}"
                )
        pixel_values = tiles[0] if len(tiles) == 1 else torch.cat(tiles)
        out = {}
        for key, value in kwargs.items():
            if key == PIXELS:
                out["pixel_values_flat"] = pixel_values
            elif key != LAYOUT:
                out[key] = value
        return out


@MULTIMODAL_REGISTRY.register_processor(
    NVLMMultiModalProcessorOnNvlmKernels,
    info=NVLMProcessingInfoOnNvlmKernels,
    dummy_inputs=NVLMDummyInputsBuilder,
)
class NVLMDOnNvlmKernels(_OnNvlmKernels, NVLM_D_Model):
    """vLLM's ``NVLM_D_Model`` on our ops (the ``NVLM_D`` architecture while the plugin is on)."""


@MULTIMODAL_REGISTRY.register_processor(
    InternVLMultiModalProcessorOnNvlmKernels,
    info=InternVLProcessingInfoOnNvlmKernels,
    dummy_inputs=InternVLDummyInputsBuilder,
)
class InternVLChatOnNvlmKernels(_OnNvlmKernels, InternVLChatModel):
    """vLLM's ``InternVLChatModel`` on our ops (the ``InternVLChatModel`` architecture while the plugin is on)."""
