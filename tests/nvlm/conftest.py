"""Helpers shared by the nvlm tests, as fixtures (the suite imports test files by path, so they
cannot import each other)."""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from nvlm.checkpoint import INDEX_FILE
from nvlm.config import NVLMConfig


def to_hf_nvlm_d(ours: dict[str, torch.Tensor], cfg: NVLMConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face NVLM-D checkpoint holding ``ours`` (spec §3.1): ViT attention padded with
    zero dummy heads after the real ones in each of the q, k, v blocks and in proj's columns; the
    qk-norm weights padded with *nonzero* values (they only ever scale the dummy heads' zeros)."""
    v = cfg.vision
    heads, dummy, d, c = v.num_heads, v.num_dummy_heads, v.head_dim, v.hidden_size
    gen = torch.Generator().manual_seed(1)
    hf = {}
    for name, tensor in ours.items():
        if name.endswith("attn.qkv.weight"):
            per_head = tensor.reshape(3, heads, d, c)
            tensor = torch.cat([per_head, per_head.new_zeros(3, dummy, d, c)], dim=1).reshape(-1, c)
        elif name.endswith("attn.proj.weight"):
            per_head = tensor.reshape(c, heads, d)
            tensor = torch.cat([per_head, per_head.new_zeros(c, dummy, d)], dim=1).reshape(c, -1)
        elif name.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
            tensor = torch.cat([tensor, torch.rand(dummy * d, generator=gen).add(0.5).to(tensor.dtype)])
        if name.startswith("vision."):
            hf["vision_model." + name[len("vision.") :]] = tensor
        elif name.startswith("projector."):
            hf["mlp1." + name[len("projector.") :]] = tensor
        elif name == "llm.lm_head.weight":
            hf["language_model.lm_head.weight"] = tensor
        else:
            hf["language_model.model." + name[len("llm.") :]] = tensor
    return hf


def write_hf(directory, hf: dict[str, torch.Tensor], *, shards: int = 2):
    """Write ``hf`` as NVLM-D-72B ships: model-0000i-of-0000n.safetensors + the index (one shard:
    a bare model.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        save_file({k: t.contiguous() for k, t in hf.items()}, directory / "model.safetensors")
        return directory
    keys = list(hf)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: hf[k].contiguous() for k in part}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in hf.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return directory


# nvidia/NVLM-D-72B's config.json (spec §8.2), as released: the fields that describe the model, and
# some of the generation / bookkeeping keys the file also carries (they must be ignored). Note the
# LLM's model_type "llama": the released code decides by architectures[0].
RELEASED_CONFIG = {
    "architectures": ["NVLM_D"],
    "auto_map": {
        "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
        "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
        "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
    },
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "llm_config": {
        "_name_or_path": "Qwen/Qwen2-72B-Instruct",
        "architectures": ["Qwen2ForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": 8192,
        "initializer_range": 0.02,
        "intermediate_size": 29568,
        "max_position_embeddings": 32768,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"factor": 3.0, "type": "dynamic"},
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "top_k": 1,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.39.3",
        "use_bfloat16": True,
        "use_cache": True,
        "vocab_size": 152064,
    },
    "max_dynamic_patch": 6,
    "min_dynamic_patch": 1,
    "model_type": "NVLM_D",
    "ps_version": "v2",
    "select_layer": -1,
    "template": "chatml",
    "torch_dtype": "bfloat16",
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "use_thumbnail": True,
    "vision_config": {
        "architectures": ["InternVisionModel"],
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 3200,
        "image_size": 448,
        "initializer_factor": 0.1,
        "initializer_range": 1e-10,
        "intermediate_size": 12800,
        "layer_norm_eps": 1e-06,
        "model_type": "intern_vit_6b",
        "norm_type": "rms_norm",
        "num_attention_heads": 25,
        "num_channels": 3,
        "num_hidden_layers": 45,
        "patch_size": 14,
        "qk_normalization": True,
        "qkv_bias": False,
        "torch_dtype": "bfloat16",
        "use_flash_attn": True,
    },
}

# The released schema at the tiny-d preset's sizes (the rest as released, rope scaling included).
TINY_D_SIZES = {
    "force_image_size": 56,
    "max_dynamic_patch": 4,
    "vision_config": {
        "image_size": 56, "hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
        "intermediate_size": 256,
    },
    "llm_config": {
        "vocab_size": 320, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": 4, "intermediate_size": 256, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    },
}  # fmt: skip


def _changed(config: dict, changes: dict) -> dict:
    """A copy of ``config`` with top-level keys replaced; ``vision_config`` / ``llm_config`` dicts
    update the nested ones; a value of ``...`` deletes the key."""
    config = copy.deepcopy(config)
    for key, value in changes.items():
        if key in ("vision_config", "llm_config") and isinstance(value, dict):
            for inner, inner_value in value.items():
                if inner_value is ...:
                    config[key].pop(inner, None)
                else:
                    config[key][inner] = inner_value
        elif value is ...:
            config.pop(key, None)
        else:
            config[key] = value
    return config


# Which tensors the released shards store in float32 (spec §8.2); all others are bfloat16.
_RELEASED_FLOAT32 = re.compile(
    r"^(vision_model\.encoder\.layers\.\d+\.attn\.(qkv\.weight|proj\.weight|[qk]_norm\.weight)"
    r"|language_model\.model\.layers\.\d+\.self_attn\.(k_proj|v_proj|o_proj)\.weight)$"
)


def as_released_dtypes(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``hf`` with the released mix of dtypes: float32 where NVLM-D-72B stores float32, bfloat16 elsewhere."""
    return {key: t.to(torch.float32 if _RELEASED_FLOAT32.match(key) else torch.bfloat16) for key, t in hf.items()}


@pytest.fixture(scope="session")
def hf_layout() -> SimpleNamespace:
    """``to_hf(ours, config)``: our NVLM-D state dict in Hugging Face NVLM-D-72B's layout, written
    out here independently of ``nvlm.checkpoint``; ``write(directory, hf, shards=2)``: as it ships;
    ``released_dtypes(hf)``: its mix of float32 and bfloat16; ``config(**changes)``: its
    config.json (``RELEASED_CONFIG``; see ``_changed`` for ``changes``), ``tiny_d_config(**changes)``:
    the same at tiny-d's sizes."""

    return SimpleNamespace(
        to_hf=to_hf_nvlm_d, write=write_hf, released_dtypes=as_released_dtypes,
        config=lambda **changes: _changed(RELEASED_CONFIG, changes),
        tiny_d_config=lambda **changes: _changed(_changed(RELEASED_CONFIG, TINY_D_SIZES), changes),
    )  # fmt: skip
