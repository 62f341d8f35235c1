"""One config for the three NVLM-1.0 architectures: ``NVLMConfig`` and its presets.

``NVLMConfig.from_preset("nvlm-d-72b")`` etc. Values and their sources: ../shared/docs/nvlm-spec.md
(InternViT-6B §3.1, InternViT-300M §3.2, projector §5, cross-attention §6.3, NVLM-H §7, LLM
backbones §8.1). Where NVLM-X / NVLM-H internals are unpublished (spec §6.2) the choice is a field
here, defaulting to the Flamingo / Llama-3-V design the spec recommends (§6.3).

``NVLMConfig.from_hf(config_dict)`` reads the ``config.json`` of a Hugging Face NVLM-D directory
(``NVLM_D_Config``, spec §8.2) and ``to_hf()`` writes one; ``nvlm.from_pretrained`` uses them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

VARIANTS = ("D", "X", "H")
ROPE_SCALINGS = (None, "dynamic")


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
    """A Qwen2-style decoder (RMSNorm, RoPE, GQA, QKV bias, SwiGLU).

    ``rope_scaling``: None, or ``"dynamic"``: Hugging Face's dynamic NTK scaling (``rope_scaling =
    {"type": "dynamic", "factor": rope_scaling_factor}``, as NVLM-D-72B's released ``llm_config``
    sets). Up to ``max_position_embeddings`` positions it changes nothing; beyond, the RoPE base of
    a forward grows with its longest position (``nvlm.llm.rotary_cos_sin``), and the model accepts
    up to ``max_position_embeddings · rope_scaling_factor`` positions (``position_limit``)."""

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
    rope_scaling: str | None = None  # None or "dynamic"
    rope_scaling_factor: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_limit(self) -> int:
        """The most decoder positions the config allows (``NVLMConfig.max_seq_len`` at most this)."""
        if self.rope_scaling == "dynamic":
            return int(self.max_position_embeddings * self.rope_scaling_factor)
        return self.max_position_embeddings


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
        if self.llm.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"llm.rope_scaling must be one of {ROPE_SCALINGS}, got {self.llm.rope_scaling!r}")
        if self.llm.rope_scaling is not None and not self.llm.rope_scaling_factor >= 1.0:
            raise ValueError(f"llm.rope_scaling_factor must be >= 1, got {self.llm.rope_scaling_factor!r}")
        if self.max_seq_len > self.llm.position_limit:
            scaled = f" · rope_scaling_factor = {self.llm.position_limit}" if self.llm.rope_scaling else ""
            raise ValueError(
                f"max_seq_len {self.max_seq_len} exceeds llm.max_position_embeddings "
                f"{self.llm.max_position_embeddings}{scaled}"
            )

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

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | Any, *, name: str | None = None) -> NVLMConfig:
        """The config of a Hugging Face NVLM-D directory's ``config.json`` (a dict, or a transformers
        config with ``to_dict()``). See ``nvlm.config.from_hf_nvlm_d`` for what is read and refused."""
        return from_hf_nvlm_d(config, name=name)

    def to_hf(self) -> dict[str, Any]:
        """This config as an NVLM-D ``config.json`` dict (``from_hf(to_hf())`` gives it back). See
        ``nvlm.config.to_hf_nvlm_d`` for what the format cannot express (a ValueError)."""
        return to_hf_nvlm_d(self)


# --------------------------------------------------------------------------------------------------
# presets

INTERNVIT_6B = VisionConfig()
INTERNVIT_300M = VisionConfig(
    hidden_size=1024, num_heads=16, num_layers=24, mlp_size=4096, norm="layer", qkv_bias=True,
    qk_norm=False, layer_scale_init=1.0, num_dummy_heads=0,
)  # fmt: skip
QWEN2_72B = LLMConfig()
# NVLM-D-72B's released llm_config adds dynamic RoPE scaling (spec §8.2); nothing changes up to 32768 positions.
QWEN2_72B_NVLM_D = dataclasses.replace(QWEN2_72B, rope_scaling="dynamic", rope_scaling_factor=3.0)
# Nous-Hermes-2-Yi-34B: RMSNorm eps 1e-5 is Yi's own config (Megatron's Yi runs pass none; its default is 1e-5).
YI_34B = LLMConfig(
    vocab_size=64000, hidden_size=7168, num_layers=60, num_heads=56, num_kv_heads=8, intermediate_size=20480,
    rms_eps=1e-5, rope_theta=5_000_000.0, qkv_bias=False, max_position_embeddings=4096,
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
    "nvlm-d-72b": _nvlm("nvlm-d-72b", "D", QWEN2_72B_NVLM_D),
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


# --------------------------------------------------------------------------------------------------
# Hugging Face NVLM-D config.json (NVLM_D_Config: configuration_nvlm_d.py of nvidia/NVLM-D-72B)

HF_MODEL_TYPE = "NVLM_D"
HF_TEMPLATE = "chatml"  # conversation.py's template: the ChatML prompts of nvlm.processor
HF_LLM_ARCHITECTURE = "Qwen2ForCausalLM"  # the only LLM modeling_nvlm_d.py builds
# modeling_intern_vit.py pads the real heads with this many zero heads; config.json does not say it
# (nvlm.from_pretrained takes the count from the checkpoint's shapes instead).
HF_NUM_DUMMY_HEADS = 7
# mlp1's nn.LayerNorm is built with torch's default eps; config.json cannot say another.
HF_PROJECTOR_EPS = 1e-5
# Our fields that config.json has no place for, kept under this key by to_hf so that
# from_hf(to_hf(c)) == c. The released code ignores unknown keys (PretrainedConfig keeps them).
HF_EXTENSION_KEY = "nvlm_kernels"
HF_DEFAULT_NAME = "nvlm-d-hf"
_HF_AUTO_MAP = {
    "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
    "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
    "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
}
_MISSING = object()


class _HFSection:
    """One dict of config.json (top level, ``vision_config`` or ``llm_config``): typed reads whose
    errors name the field as config.json spells it."""

    def __init__(self, values: Any, prefix: str) -> None:
        if not isinstance(values, Mapping):
            raise ValueError(f"NVLM-D config.json: {prefix.rstrip('.') or 'the config'} must be a dict, got {values!r}")
        self.values, self.prefix = values, prefix

    def error(self, key: str, why: str) -> ValueError:
        value = self.values.get(key, "<missing>")
        return ValueError(f"NVLM-D config.json: {self.prefix}{key} = {value!r}: {why}")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.values or self.values[key] is None and default is not _MISSING:
            if default is _MISSING:
                raise ValueError(f"NVLM-D config.json: {self.prefix}{key} is missing")
            return default
        return self.values[key]

    def positive_int(self, key: str, default: Any = _MISSING, *, minimum: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}")
        return value

    def positive_float(self, key: str, default: Any = _MISSING) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self.error(key, "must be a positive number")
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def one_of(self, key: str, allowed: tuple[Any, ...], why: str, default: Any = _MISSING) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            raise self.error(key, f"{why} (supported: {', '.join(map(repr, allowed))})")
        return value


def _as_dict(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    raise TypeError(f"expected a config.json dict or a transformers config, got {type(config).__name__}")


def _rope_scaling_from_hf(llm: _HFSection) -> tuple[str | None, float]:
    """(type, factor) from ``rope_scaling`` (transformers 4.x: ``{"type": ..., "factor": ...}``) or
    ``rope_parameters`` (transformers 5 writes ``{"rope_type": ..., "factor": ..., "rope_theta": ...}``)."""
    key = "rope_scaling" if llm.values.get("rope_scaling") is not None else "rope_parameters"
    scaling = llm.values.get(key)
    if scaling is None:
        return None, 1.0
    if not isinstance(scaling, Mapping):
        raise llm.error(key, "must be a dict")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None, 1.0
    if kind != "dynamic":
        raise llm.error(key, f"RoPE scaling {kind!r} is not implemented (supported: 'default', 'dynamic')")
    factor = scaling.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 1:
        raise llm.error(key, "dynamic scaling needs a factor >= 1")
    return "dynamic", float(factor)


def from_hf_nvlm_d(config: Mapping[str, Any] | Any, *, name: str | None = None) -> NVLMConfig:
    """An ``NVLMConfig`` (variant D) from an NVLM-D ``config.json`` (spec §8.2).

    Read: ``vision_config`` (InternViT: ``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``,
    ``intermediate_size``, ``image_size``, ``patch_size``, ``num_channels``, ``norm_type``,
    ``layer_norm_eps``, ``qkv_bias``, ``qk_normalization``, ``initializer_factor``, ``hidden_act``),
    ``llm_config`` (Qwen2: ``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``, ``rms_norm_eps``,
    ``rope_theta``, ``rope_scaling``, ``max_position_embeddings``, ``tie_word_embeddings``,
    ``hidden_act``), and ``downsample_ratio``, ``ps_version``, ``select_layer``,
    ``force_image_size``, ``template``, ``dynamic_image_size``, ``min/max_dynamic_patch``,
    ``use_thumbnail``. Keys the released code also defaults take ``NVLM_D_Config``'s defaults
    (``ps_version`` "v1", ``use_thumbnail`` false, ...); architecture sizes must be present.

    The projector is what ``modeling_nvlm_d.py`` builds: LayerNorm (eps 1e-5) -> Linear(·,
    llm intermediate_size) -> GELU -> Linear(·, llm hidden_size), no biases. The ViT has
    ``HF_NUM_DUMMY_HEADS`` zero heads (the released code's constant). ``max_seq_len`` is
    ``max_position_embeddings`` (the trained context; with dynamic RoPE scaling it may be raised to
    ``llm.position_limit``). ``dynamic_image_size`` false means one tile per image.

    ValueError naming the field for what the released model cannot be or we do not run: a
    ``model_type`` other than NVLM_D, an LLM other than Qwen2ForCausalLM, ``select_layer`` other
    than -1, a ``ps_version`` other than v1/v2, ``template`` other than chatml, a
    ``force_image_size`` other than the ViT's, a ``norm_type`` other than rms_norm (the released
    InternViT builds RMSNorm only), activations other than gelu / silu, a sliding window, RoPE
    scaling other than dynamic, LoRA, and non-positive sizes. Dropout and drop-path rates are
    training-time regularizers our modules do not have; they are ignored."""
    top = _HFSection(_as_dict(config), "")
    top.one_of("model_type", (HF_MODEL_TYPE,), "not an NVLM-D config")
    vision = _HFSection(top.get("vision_config"), "vision_config.")
    llm = _HFSection(top.get("llm_config"), "llm_config.")
    extension = _HFSection(top.get(HF_EXTENSION_KEY, {}), HF_EXTENSION_KEY + ".")

    top.one_of("select_layer", (-1,), "only the last ViT layer's output is supported", default=-1)
    ps_version = top.one_of("ps_version", ("v1", "v2"), "unknown pixel shuffle version", default="v1")
    top.one_of("template", (HF_TEMPLATE,), "only the ChatML conversation template is supported")
    for lora in ("use_backbone_lora", "use_llm_lora"):
        top.one_of(lora, (0, False), "LoRA-wrapped weights are not supported", default=0)
    ratio = top.positive_float("downsample_ratio", 0.5)
    if abs(1 / ratio - round(1 / ratio)) > 1e-9:
        raise top.error("downsample_ratio", "must be 1 / an integer (the pixel shuffle merges whole patches)")

    image_size = vision.positive_int("image_size")
    force_image_size = top.get("force_image_size", None)
    if force_image_size is not None and force_image_size != image_size:
        raise top.error(
            "force_image_size",
            f"differs from vision_config.image_size {image_size} (the released InternViT's positions are for that)",
        )
    vision.one_of("norm_type", ("rms_norm",), "the released InternViT builds RMSNorm only", default="rms_norm")
    vision.one_of("hidden_act", ("gelu",), "the ViT's MLP is exact GELU", default="gelu")
    heads, hidden = vision.positive_int("num_attention_heads"), vision.positive_int("hidden_size")
    if hidden % heads:
        raise vision.error("hidden_size", f"is not divisible by num_attention_heads {heads}")
    vision_config = VisionConfig(
        image_size=image_size,
        patch_size=vision.positive_int("patch_size"),
        num_channels=vision.positive_int("num_channels", 3),
        hidden_size=hidden,
        num_heads=heads,
        num_layers=vision.positive_int("num_hidden_layers"),
        mlp_size=vision.positive_int("intermediate_size"),
        norm="rms",
        norm_eps=vision.positive_float("layer_norm_eps"),
        qkv_bias=vision.flag("qkv_bias"),
        qk_norm=vision.flag("qk_normalization"),
        layer_scale_init=vision.positive_float("initializer_factor", 0.1),
        num_dummy_heads=extension.positive_int("num_dummy_heads", HF_NUM_DUMMY_HEADS, minimum=0),
    )
    if image_size % vision_config.patch_size:
        raise vision.error("image_size", f"is not a multiple of patch_size {vision_config.patch_size}")

    architectures = llm.get("architectures")
    if not isinstance(architectures, list | tuple) or not architectures or architectures[0] != HF_LLM_ARCHITECTURE:
        # modeling_nvlm_d.py decides by architectures[0] (the released file's model_type says "llama")
        raise llm.error("architectures", f"the released NVLM-D builds {HF_LLM_ARCHITECTURE} only")
    llm.one_of("hidden_act", ("silu",), "the decoder's MLP is SwiGLU (silu)", default="silu")
    llm.one_of("use_sliding_window", (False,), "sliding-window attention is not implemented", default=False)
    llm_heads, llm_hidden = llm.positive_int("num_attention_heads"), llm.positive_int("hidden_size")
    kv_heads = llm.positive_int("num_key_value_heads")
    if llm_hidden % llm_heads:
        raise llm.error("hidden_size", f"is not divisible by num_attention_heads {llm_heads}")
    if llm_heads % kv_heads:
        raise llm.error("num_key_value_heads", f"does not divide num_attention_heads {llm_heads}")
    if llm.get("head_dim", None) not in (None, llm_hidden // llm_heads):
        raise llm.error("head_dim", f"differs from hidden_size / num_attention_heads = {llm_hidden // llm_heads}")
    rope_parameters = llm.values.get("rope_parameters")
    theta_section = llm
    if llm.values.get("rope_theta") is None and isinstance(rope_parameters, Mapping):
        theta_section = _HFSection(rope_parameters, "llm_config.rope_parameters.")
    rope_scaling, factor = _rope_scaling_from_hf(llm)
    max_positions = llm.positive_int("max_position_embeddings")
    llm_config = LLMConfig(
        vocab_size=llm.positive_int("vocab_size"),
        hidden_size=llm_hidden,
        num_layers=llm.positive_int("num_hidden_layers"),
        num_heads=llm_heads,
        num_kv_heads=kv_heads,
        intermediate_size=llm.positive_int("intermediate_size"),
        rms_eps=llm.positive_float("rms_norm_eps"),
        rope_theta=theta_section.positive_float("rope_theta"),
        qkv_bias=True,  # Qwen2's q/k/v projections always have biases (its attention_bias key is ignored)
        max_position_embeddings=max_positions,
        tie_embeddings=llm.flag("tie_word_embeddings", False),
        rope_scaling=rope_scaling,
        rope_scaling_factor=factor,
    )

    dynamic = top.flag("dynamic_image_size", False)
    min_tiles = top.positive_int("min_dynamic_patch", 1)
    max_tiles = top.positive_int("max_dynamic_patch", 6)
    if min_tiles > max_tiles:
        raise top.error("min_dynamic_patch", f"exceeds max_dynamic_patch {max_tiles}")
    tiling = TilingConfig(
        min_tiles=min_tiles if dynamic else 1,
        max_tiles=max_tiles if dynamic else 1,
        use_thumbnail=top.flag("use_thumbnail", False),
        tag_style="nvlm-72b",  # the released chat() tags the thumbnail <tile_global_thumbnail>
    )
    projector = ProjectorConfig(
        hidden=llm_config.intermediate_size, layer_norm=True, bias=False, eps=HF_PROJECTOR_EPS, activation="gelu",
        downsample_ratio=ratio, ps_version=ps_version,
    )  # fmt: skip
    return NVLMConfig(
        name=name if name is not None else extension.get("name", HF_DEFAULT_NAME),
        variant="D",
        vision=vision_config,
        projector=projector,
        llm=llm_config,
        xattn=None,
        tiling=tiling,
        max_seq_len=extension.positive_int("max_seq_len", max_positions),
    )


def to_hf_nvlm_d(config: NVLMConfig) -> dict[str, Any]:
    """``config`` as an NVLM-D ``config.json`` dict: the released schema (spec §8.2) plus
    ``"nvlm_kernels": {"name", "max_seq_len", "num_dummy_heads"}`` (fields config.json has no place
    for; the released code ignores the key). ValueError naming the field for what the format cannot
    express: NVLM-X / NVLM-H, a ViT with LayerNorm, a projector other than LayerNorm(eps 1e-5) ->
    Linear(·, llm.intermediate_size) -> GELU -> Linear without biases, an LLM without q/k/v biases
    (not Qwen2), other prompt tokens or tag style."""

    def refuse(field_name: str, value: Any, why: str) -> ValueError:
        return ValueError(f"to_hf: {field_name} = {value!r}: {why}")

    v, p, llm, t = config.vision, config.projector, config.llm, config.tiling
    if config.variant != "D":
        raise refuse("variant", config.variant, "only NVLM-D has a Hugging Face format")
    if v.norm != "rms":
        raise refuse("vision.norm", v.norm, "the released InternViT builds RMSNorm only")
    for field_name, value, want in (
        ("projector.layer_norm", p.layer_norm, True),
        ("projector.bias", p.bias, False),
        ("projector.hidden", p.hidden, llm.intermediate_size),
        ("projector.eps", p.eps, HF_PROJECTOR_EPS),
        ("projector.activation", p.activation, "gelu"),
        ("llm.qkv_bias", llm.qkv_bias, True),
        ("tiling.tag_style", t.tag_style, "nvlm-72b"),
        ("tokens", config.tokens, TokenConfig()),
    ):
        if value != want:
            raise refuse(field_name, value, f"the Hugging Face NVLM-D model has {want!r} here")
    rope_scaling = None
    if llm.rope_scaling == "dynamic":
        rope_scaling = {"factor": llm.rope_scaling_factor, "type": "dynamic"}
    return {
        "architectures": ["NVLM_D"],
        "auto_map": dict(_HF_AUTO_MAP),
        "model_type": HF_MODEL_TYPE,
        "downsample_ratio": p.downsample_ratio,
        "dynamic_image_size": True,
        "force_image_size": v.image_size,
        "min_dynamic_patch": t.min_tiles,
        "max_dynamic_patch": t.max_tiles,
        "use_thumbnail": t.use_thumbnail,
        "ps_version": p.ps_version,
        "select_layer": -1,
        "template": HF_TEMPLATE,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": v.hidden_size,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": v.num_channels,
            "num_attention_heads": v.num_heads,
            "num_hidden_layers": v.num_layers,
            "intermediate_size": v.mlp_size,
            "hidden_act": "gelu",
            "norm_type": "rms_norm",
            "layer_norm_eps": v.norm_eps,
            "qk_normalization": v.qk_norm,
            "qkv_bias": v.qkv_bias,
            "initializer_factor": v.layer_scale_init,
            "attention_dropout": 0.0,
            "dropout": 0.0,
            "drop_path_rate": 0.0,
            "use_flash_attn": True,
            "torch_dtype": "bfloat16",
        },
        "llm_config": {
            "architectures": [HF_LLM_ARCHITECTURE],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "vocab_size": llm.vocab_size,
            "hidden_size": llm.hidden_size,
            "intermediate_size": llm.intermediate_size,
            "num_hidden_layers": llm.num_layers,
            "num_attention_heads": llm.num_heads,
            "num_key_value_heads": llm.num_kv_heads,
            "rms_norm_eps": llm.rms_eps,
            "rope_theta": llm.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": llm.max_position_embeddings,
            "tie_word_embeddings": llm.tie_embeddings,
            "use_sliding_window": False,
            "torch_dtype": "bfloat16",
        },
        HF_EXTENSION_KEY: {
            "name": config.name,
            "max_seq_len": config.max_seq_len,
            "num_dummy_heads": v.num_dummy_heads,
        },  # fmt: skip
    }
