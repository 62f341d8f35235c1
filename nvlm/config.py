"""One config for the three NVLM-1.0 architectures: ``NVLMConfig`` and its presets.

``NVLMConfig.from_preset("nvlm-d-72b")`` etc. Values and their sources: ../shared/docs/nvlm-spec.md
(InternViT-6B §3.1, InternViT-300M §3.2, projector §5, cross-attention §6.3, NVLM-H §7, LLM
backbones §8.1). Where NVLM-X / NVLM-H internals are unpublished (spec §6.2) the choice is a field
here, defaulting to the Flamingo / Llama-3-V design the spec recommends (§6.3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

VARIANTS = ("D", "X", "H")


@dataclass(frozen=True)
class VisionConfig:
    """InternViT. ``num_dummy_heads``: zero heads NVLM's checkpoint pads the 25 real ones with (7:
    25 + 7 = 32 divides by the tensor-parallel size 8); the model itself runs the real heads."""

    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 3200
    num_heads: int = 25
    num_layers: int = 45
    mlp_size: int = 12800
    norm: str = "rms"  # "rms" (6B) or "layer" (300M)
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = True  # full-width RMSNorm on q and k (all heads together)
    layer_scale_init: float = 0.1
    num_dummy_heads: int = 7

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        """Tokens per tile including CLS (1025 for InternViT-6B-448px)."""
        return self.num_patches + 1


@dataclass(frozen=True)
class ProjectorConfig:
    """mlp1: [LayerNorm] -> Linear -> GELU -> Linear (``hidden=None``: one Linear, NVLM-X)."""

    hidden: int | None = 29568
    layer_norm: bool = True
    bias: bool = False
    eps: float = 1e-5  # Hugging Face's value; NVLM trained with 1e-6
    activation: str = "gelu"
    downsample_ratio: float = 0.5
    ps_version: str = "v2"


@dataclass(frozen=True)
class LLMConfig:
    """A Qwen2-style decoder (RMSNorm, RoPE, GQA, QKV bias, SwiGLU)."""

    vocab_size: int = 152064
    hidden_size: int = 8192
    num_layers: int = 80
    num_heads: int = 64
    num_kv_heads: int = 8
    intermediate_size: int = 29568
    rms_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    qkv_bias: bool = True
    max_position_embeddings: int = 32768
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class CrossAttentionConfig:
    """Gated cross-attention blocks (spec §6.3): pre-norm, q from text, k/v from image embeddings,
    tanh-gated attention and (``gated_ffn``) tanh-gated FFN, gates initialized to 0. A block sits
    *before* LLM layer i for every i with i % every == offset (10 blocks at 72B: every 8 of 80)."""

    every: int = 8
    offset: int = 0
    num_heads: int | None = None  # None: the LLM's
    num_kv_heads: int | None = None  # None: the LLM's
    gated_ffn: bool = True
    attend_all_previous: bool = False  # text sees every image so far, not only the most recent one
    gate_init: float = 0.0

    def layer_indices(self, num_llm_layers: int) -> tuple[int, ...]:
        return tuple(i for i in range(num_llm_layers) if i % self.every == self.offset)


@dataclass(frozen=True)
class TilingConfig:
    """Dynamic high resolution (spec §1-2): up to ``max_tiles`` regular tiles + a thumbnail."""

    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True
    tag_style: str = "nvlm-72b"  # thumbnail tag <tile_global_thumbnail> ("nvlm-34b": <tile_global>)


@dataclass(frozen=True)
class TokenConfig:
    """Special strings of the prompt (spec §2.2, §8.2)."""

    image_placeholder: str = "<|vision_pad|>"  # repeated per image token (NVLM-D, NVLM-H thumbnail)
    image_start: str = "<Image>"
    image_end: str = "</Image>"
    image_marker: str = "<image>"  # where a user message puts an image
    im_start: str = "<|im_start|>"
    im_end: str = "<|im_end|>"
    pad: str = "<|endoftext|>"


@dataclass(frozen=True)
class NVLMConfig:
    name: str = "custom"
    variant: str = "D"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    xattn: CrossAttentionConfig | None = None  # None for NVLM-D
    tiling: TilingConfig = field(default_factory=TilingConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)
    max_seq_len: int = 8192  # decoder positions (prompt + generated)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "D" and self.xattn is not None:
            raise ValueError("NVLM-D has no cross-attention layers: xattn must be None")
        if self.variant in ("X", "H") and self.xattn is None:
            raise ValueError(f"NVLM-{self.variant} needs an xattn config")
        if self.vision.hidden_size % self.vision.num_heads:
            raise ValueError("vision.hidden_size must be divisible by vision.num_heads")
        if self.llm.hidden_size % self.llm.num_heads or self.llm.num_heads % self.llm.num_kv_heads:
            raise ValueError("llm heads must divide hidden_size, and kv heads must divide heads")
        side = self.vision.grid
        factor = round(1 / self.projector.downsample_ratio)
        if side % factor:
            raise ValueError(f"the ViT grid side {side} must be divisible by 1/downsample_ratio = {factor}")
        if self.max_seq_len > self.llm.max_position_embeddings:
            raise ValueError("max_seq_len must not exceed llm.max_position_embeddings")

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens per tile after the pixel shuffle (256 in NVLM)."""
        return round(self.vision.num_patches * self.projector.downsample_ratio**2)

    @property
    def projector_in(self) -> int:
        return round(self.vision.hidden_size / self.projector.downsample_ratio**2)

    @property
    def max_tiles_per_image(self) -> int:
        return self.tiling.max_tiles + (1 if self.tiling.use_thumbnail and self.tiling.max_tiles > 1 else 0)

    def replace(self, **changes: Any) -> NVLMConfig:
        """A copy with fields changed; nested configs take dicts of their fields too
        (``cfg.replace(llm={"num_layers": 2})``)."""
        for key, value in list(changes.items()):
            current = getattr(self, key)
            if isinstance(value, dict) and dataclasses.is_dataclass(current):
                changes[key] = dataclasses.replace(current, **value)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str) -> NVLMConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]


# --------------------------------------------------------------------------------------------------
# presets

INTERNVIT_6B = VisionConfig()
INTERNVIT_300M = VisionConfig(
    hidden_size=1024, num_heads=16, num_layers=24, mlp_size=4096, norm="layer", qkv_bias=True,
    qk_norm=False, layer_scale_init=1.0, num_dummy_heads=0,
)  # fmt: skip
QWEN2_72B = LLMConfig()
YI_34B = LLMConfig(
    vocab_size=64000, hidden_size=7168, num_layers=60, num_heads=56, num_kv_heads=8, intermediate_size=20480,
    rope_theta=5_000_000.0, qkv_bias=False, max_position_embeddings=4096,
)  # fmt: skip


def _nvlm(name: str, variant: str, llm: LLMConfig, vision: VisionConfig = INTERNVIT_6B, **kw: Any) -> NVLMConfig:
    two_layer = ProjectorConfig(hidden=llm.intermediate_size)
    projector = ProjectorConfig(hidden=None, layer_norm=False) if variant == "X" else two_layer
    every = llm.num_layers // 10  # 10 cross-attention blocks (paper §3.2): every 8 of 80, every 6 of 60
    xattn = CrossAttentionConfig(every=every) if variant != "D" else None
    tag_style = "nvlm-34b" if llm is YI_34B else "nvlm-72b"
    return NVLMConfig(
        name=name, variant=variant, vision=vision, projector=projector, llm=llm, xattn=xattn,
        tiling=TilingConfig(tag_style=tag_style), max_seq_len=min(8192, llm.max_position_embeddings), **kw,
    )  # fmt: skip


# Tiny presets: the same structure at widths that run in seconds on a CPU and that the Triton
# kernels take (head dim 64). 56-pixel tiles of 14-pixel patches: 16 patches -> 4 tokens per tile.
TINY_VISION = VisionConfig(
    image_size=56, hidden_size=128, num_heads=2, num_layers=2, mlp_size=256, num_dummy_heads=2,
)  # fmt: skip
TINY_LLM = LLMConfig(
    vocab_size=320, hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=4, intermediate_size=256,
    rope_theta=10_000.0, max_position_embeddings=2048,
)  # fmt: skip


def _tiny(name: str, variant: str) -> NVLMConfig:
    projector = ProjectorConfig(hidden=None, layer_norm=False) if variant == "X" else ProjectorConfig(hidden=256)
    xattn = CrossAttentionConfig(every=2) if variant != "D" else None
    return NVLMConfig(
        name=name, variant=variant, vision=TINY_VISION, projector=projector, llm=TINY_LLM, xattn=xattn,
        tiling=TilingConfig(max_tiles=4), max_seq_len=2048,
    )  # fmt: skip


PRESETS: dict[str, NVLMConfig] = {
    "nvlm-d-72b": _nvlm("nvlm-d-72b", "D", QWEN2_72B),
    "nvlm-x-72b": _nvlm("nvlm-x-72b", "X", QWEN2_72B),
    "nvlm-h-72b": _nvlm("nvlm-h-72b", "H", QWEN2_72B),
    "nvlm-d-34b": _nvlm("nvlm-d-34b", "D", YI_34B),
    "nvlm-x-34b": _nvlm("nvlm-x-34b", "X", YI_34B),
    "nvlm-h-34b": _nvlm("nvlm-h-34b", "H", YI_34B),
    # InternViT-300M with Qwen2-72B (not an NVLM-1.0 release; InternVL's smaller encoder)
    "nvlm-d-72b-vit300m": _nvlm("nvlm-d-72b-vit300m", "D", QWEN2_72B, vision=INTERNVIT_300M),
    "tiny-d": _tiny("tiny-d", "D"),
    "tiny-x": _tiny("tiny-x", "X"),
    "tiny-h": _tiny("tiny-h", "H"),
}
