"""Tiny random NVLM-D and InternVL-chat checkpoints in the released layouts, for the plugin's tests
and ``bench/bench_vllm.py`` (no hub access: everything is written here).

    path = write_checkpoint(tmp_dir, "nvlm-d")     # or "internvl"; scale= for bigger widths
    llm = vllm.LLM(path, trust_remote_code=True, ...)

A checkpoint folder holds what the released ones hold, at tiny sizes:

* ``config.json`` with ``auto_map`` to remote code of ours that follows the released schema
  (``configuration_nvlm_d.py`` / ``configuration_internvl_chat.py`` + ``configuration_intern_vit.py``:
  ``vision_config``, ``llm_config`` (Qwen2), ``select_layer``, ``downsample_ratio``, ``ps_version``,
  ``dynamic_image_size``, ``use_thumbnail``, ``min/max_dynamic_patch``, ``force_image_size``, ``template``)
  and ``modeling_*.py`` naming the released classes (vLLM uses its own implementation of the
  architecture; the modeling file is there because the released layout has one, and loading it
  through transformers says so);
* ``model.safetensors`` with the released parameter names: ``vision_model.*`` (InternViT: NVLM-D's
  6B form with RMSNorm, full-width QK-norm, no qkv bias and its 7 zero dummy heads appended to the
  q, k and v blocks and proj's input; InternVL's 300M form with LayerNorm, qkv bias, no QK-norm),
  ``mlp1.{0,1,3}.*`` (NVLM-D without biases), ``language_model.model.*`` / ``language_model.lm_head``;
* a byte-level BPE tokenizer (``tokenizer.json``: the 256 byte symbols, a few merges, the special
  tokens each family needs: ``<|vision_pad|>`` for NVLM-D, ``<img>`` / ``</img>`` / ``<IMG_CONTEXT>``
  for InternVL, ChatML's ``<|im_start|>`` / ``<|im_end|>`` / ``<|endoftext|>``).

The tiles are 56 pixels (4 x 4 patches of 14 + CLS; 4 image tokens per tile after the shuffle); the
ViT has 2 heads of 32 (the CPU attention of vLLM needs a head dim of 32 or more in the LLM; the
ViT uses the same), the LLM 2 query heads and 1 kv head of 32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["FAMILIES", "sample_images", "write_checkpoint"]

FAMILIES = ("nvlm-d", "internvl")
NVLM_DUMMY_HEADS = 7  # vLLM's NVLM_D_Model hard-codes them; the released checkpoint carries them

_SPECIAL = {
    "nvlm-d": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"],
    "internvl": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"],
}
_MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he"), ("i", "m"), ("a", "g"), ("Ġ", "a"), ("e", "r")]


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(printable, codes, strict=True))]


def write_tokenizer(path: str | os.PathLike, family: str) -> int:
    """tokenizer.json + tokenizer_config.json; returns the vocabulary size (special tokens included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(_SPECIAL[family])
    path = Path(path)
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tokenizer.get_vocab_size()


# --------------------------------------------------------------------------------------------------
# remote code (the released schema, written for these checkpoints)

_CONFIGURATION_INTERN_VIT = '''"""InternViT configuration, the released schema (a tiny test checkpoint)."""

from transformers import PretrainedConfig


class InternVisionConfig(PretrainedConfig):
    model_type = "intern_vit_6b"

    def __init__(self, num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                 num_attention_heads=25, intermediate_size=12800, qk_normalization=True, num_hidden_layers=48,
                 use_flash_attn=False, hidden_act="gelu", norm_type="rms_norm", layer_norm_eps=1e-6,
                 dropout=0.0, drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02,
                 initializer_factor=0.1, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.qkv_bias = qkv_bias
        self.qk_normalization = qk_normalization
        self.use_flash_attn = use_flash_attn
'''

_CONFIGURATION_CHAT = '''"""{title} configuration (the released schema's fields; tiny checkpoints of nvlm-kernels)."""

import copy

from transformers import PretrainedConfig, Qwen2Config

from .configuration_intern_vit import InternVisionConfig


class {cls}(PretrainedConfig):
    model_type = "{model_type}"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0, use_llm_lora=0,
                 select_layer=-1, force_image_size=None, downsample_ratio=0.5, template=None,
                 dynamic_image_size=False, use_thumbnail=False, ps_version="v1", min_dynamic_patch=1,
                 max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        if isinstance(vision_config, InternVisionConfig):
            vision_config = vision_config.to_dict()
        if isinstance(llm_config, PretrainedConfig):
            llm_config = llm_config.to_dict()
        self.vision_config = InternVisionConfig(**(vision_config or {{}}))
        self.llm_config = Qwen2Config(**(llm_config or {{}}))
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch

    def to_dict(self):
        output = copy.deepcopy(self.__dict__)
        output["vision_config"] = self.vision_config.to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        output["model_type"] = self.__class__.model_type
        return output
'''

_MODELING = '''"""{title}: the released remote code's model class name, for the layout (tiny checkpoints of
nvlm-kernels). vLLM serves this architecture with its own implementation ({vllm_file}); this
file is not an implementation and refuses to build a model."""

from transformers import PreTrainedModel

from .{config_module} import {config_cls}


class {cls}(PreTrainedModel):
    config_class = {config_cls}
    base_model_prefix = ""

    def __init__(self, config, *args, **kwargs):
        raise NotImplementedError(
            "{cls} of this tiny checkpoint exists for the released layout only: serve it with vLLM"
        )
'''

_FAMILY = {
    "nvlm-d": {
        "title": "NVLM-D",
        "arch": "NVLM_D",
        "model_type": "NVLM_D",
        "config_module": "configuration_nvlm_d",
        "config_cls": "NVLM_D_Config",
        "modeling_module": "modeling_nvlm_d",
        "model_cls": "NVLM_D_Model",
        "vllm_file": "vllm/model_executor/models/nvlm_d.py",
    },
    "internvl": {
        "title": "InternVL-chat",
        "arch": "InternVLChatModel",
        "model_type": "internvl_chat",
        "config_module": "configuration_internvl_chat",
        "config_cls": "InternVLChatConfig",
        "modeling_module": "modeling_internvl_chat",
        "model_cls": "InternVLChatModel",
        "vllm_file": "vllm/model_executor/models/internvl.py",
    },
}


def _write_remote_code(path: Path, family: str) -> None:
    f = _FAMILY[family]
    (path / "configuration_intern_vit.py").write_text(_CONFIGURATION_INTERN_VIT)
    (path / f"{f['config_module']}.py").write_text(
        _CONFIGURATION_CHAT.format(title=f["title"], cls=f["config_cls"], model_type=f["model_type"])
    )
    (path / f"{f['modeling_module']}.py").write_text(
        _MODELING.format(
            title=f["title"],
            cls=f["model_cls"],
            config_module=f["config_module"],
            config_cls=f["config_cls"],
            vllm_file=f["vllm_file"],
        )
    )


# --------------------------------------------------------------------------------------------------
# configs and weights


def _configs(
    family: str, vocab: int, scale: int, image_size: int, layers: int, vision_overrides: dict, llm_overrides: dict
) -> tuple[dict, dict, dict]:
    nvlm = family == "nvlm-d"
    head_dim = 32
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "num_channels": 3,
        "patch_size": 14,
        "image_size": image_size,
        "hidden_size": 2 * head_dim * scale,
        "num_attention_heads": 2 * scale,
        "intermediate_size": 4 * head_dim * scale,
        "num_hidden_layers": layers,
        "qkv_bias": not nvlm,
        "qk_normalization": nvlm,
        "norm_type": "rms_norm" if nvlm else "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "initializer_factor": 0.1 if nvlm else 1.0,
        "use_flash_attn": False,
        "dropout": 0.0,
        "drop_path_rate": 0.0,
        "attention_dropout": 0.0,
    }
    llm = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": 2 * head_dim * scale,
        "intermediate_size": 4 * head_dim * scale,
        "num_hidden_layers": layers,
        "num_attention_heads": 2 * scale,
        "num_key_value_heads": scale,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": "float32",
    }
    vision.update(vision_overrides)
    llm.update(llm_overrides)
    llm["vocab_size"] = max(llm["vocab_size"], vocab)
    f = _FAMILY[family]
    top = {
        "architectures": [f["arch"]],
        "model_type": f["model_type"],
        "auto_map": {
            "AutoConfig": f"{f['config_module']}.{f['config_cls']}",
            "AutoModel": f"{f['modeling_module']}.{f['model_cls']}",
            "AutoModelForCausalLM": f"{f['modeling_module']}.{f['model_cls']}",
        },
        "vision_config": vision,
        "llm_config": llm,
        "select_layer": -1,
        "force_image_size": image_size,
        "downsample_ratio": 0.5,
        "template": "chatml" if nvlm else "internvl2_5",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "ps_version": "v2",
        "min_dynamic_patch": 1,
        "max_dynamic_patch": 6,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "float32",
    }
    return top, vision, llm


def _weights(family: str, vision: dict, llm: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with the released names. Scales keep activations O(1) and the logits'
    top-two gaps wide, so that greedy decoding is decided by the inputs, not by rounding."""
    nvlm = family == "nvlm-d"
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    w: dict[str, torch.Tensor] = {}
    c, heads = vision["hidden_size"], vision["num_attention_heads"]
    d = c // heads
    dummy = NVLM_DUMMY_HEADS if nvlm else 0
    padded = (heads + dummy) * d
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    v = "vision_model."
    w[v + "embeddings.class_embedding"] = randn(1, 1, c)
    w[v + "embeddings.patch_embedding.weight"] = randn(c, 3, 14, 14, std=(3 * 14 * 14) ** -0.5)
    w[v + "embeddings.patch_embedding.bias"] = randn(c, std=0.1)
    w[v + "embeddings.position_embedding"] = randn(1, tokens, c, std=0.5)
    for i in range(vision["num_hidden_layers"]):
        p = f"{v}encoder.layers.{i}."
        qkv = torch.zeros(3, padded, c)
        qkv[:, :c] = randn(3, c, c, std=c**-0.5 * 2)  # the dummy heads' rows stay zero (spec §3.1)
        w[p + "attn.qkv.weight"] = qkv.reshape(3 * padded, c)
        if vision["qkv_bias"]:
            w[p + "attn.qkv.bias"] = randn(3 * padded, std=0.1)
        if vision["qk_normalization"]:
            for name in ("q_norm", "k_norm"):
                weight = torch.zeros(padded)
                weight[:c] = 1.0 + randn(c, std=0.2)
                w[p + f"attn.{name}.weight"] = weight
        proj = torch.zeros(c, padded)
        proj[:, :c] = randn(c, c, std=c**-0.5)
        w[p + "attn.proj.weight"] = proj
        w[p + "attn.proj.bias"] = randn(c, std=0.1)
        inner = vision["intermediate_size"]
        w[p + "mlp.fc1.weight"] = randn(inner, c, std=c**-0.5)
        w[p + "mlp.fc1.bias"] = randn(inner, std=0.1)
        w[p + "mlp.fc2.weight"] = randn(c, inner, std=inner**-0.5)
        w[p + "mlp.fc2.bias"] = randn(c, std=0.1)
        for name in ("norm1", "norm2"):
            w[p + f"{name}.weight"] = 1.0 + randn(c, std=0.1)
            if vision["norm_type"] == "layer_norm":
                w[p + f"{name}.bias"] = randn(c, std=0.1)
        w[p + "ls1"] = torch.full((c,), vision["initializer_factor"]) + randn(c, std=0.05)
        w[p + "ls2"] = torch.full((c,), vision["initializer_factor"]) + randn(c, std=0.05)
    k = 4 * c
    hidden = llm["hidden_size"]
    inner = llm["intermediate_size"] if nvlm else hidden
    w["mlp1.0.weight"] = 1.0 + randn(k, std=0.1)
    w["mlp1.0.bias"] = randn(k, std=0.1)
    w["mlp1.1.weight"] = randn(inner, k, std=k**-0.5)
    w["mlp1.3.weight"] = randn(hidden, inner, std=inner**-0.5 * 3)
    if not nvlm:
        w["mlp1.1.bias"] = randn(inner, std=0.1)
        w["mlp1.3.bias"] = randn(hidden, std=0.1)
    m = "language_model.model."
    q_heads, kv_heads, hd = llm["num_attention_heads"], llm["num_key_value_heads"], llm["head_dim"]
    w[m + "embed_tokens.weight"] = randn(llm["vocab_size"], hidden)
    for i in range(llm["num_hidden_layers"]):
        p = f"{m}layers.{i}."
        for name, out in (("q_proj", q_heads * hd), ("k_proj", kv_heads * hd), ("v_proj", kv_heads * hd)):
            w[p + f"self_attn.{name}.weight"] = randn(out, hidden, std=hidden**-0.5)
            w[p + f"self_attn.{name}.bias"] = randn(out, std=0.1)
        w[p + "self_attn.o_proj.weight"] = randn(hidden, q_heads * hd, std=(q_heads * hd) ** -0.5)
        ffn = llm["intermediate_size"]
        w[p + "mlp.gate_proj.weight"] = randn(ffn, hidden, std=hidden**-0.5)
        w[p + "mlp.up_proj.weight"] = randn(ffn, hidden, std=hidden**-0.5)
        w[p + "mlp.down_proj.weight"] = randn(hidden, ffn, std=ffn**-0.5)
        w[p + "input_layernorm.weight"] = 1.0 + randn(hidden, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1.0 + randn(hidden, std=0.1)
    w[m + "norm.weight"] = 1.0 + randn(hidden, std=0.1)
    w["language_model.lm_head.weight"] = randn(llm["vocab_size"], hidden, std=hidden**-0.5 * 4)
    return {name: t.contiguous() for name, t in w.items()}


def write_checkpoint(
    path: str | os.PathLike,
    family: str,
    *,
    seed: int = 0,
    scale: int = 1,
    image_size: int = 56,
    layers: int = 2,
    vision: dict | None = None,
    llm: dict | None = None,
    weights: bool = True,
) -> str:
    """Write a tiny random ``family`` ("nvlm-d" or "internvl") checkpoint into ``path`` (created);
    returns the path as a string. ``scale`` multiplies the heads (and so the widths) of the ViT
    and the LLM; ``image_size`` is the tile size (a multiple of 28: 14-pixel patches, then the 2x2
    shuffle). ``vision`` / ``llm``: entries that replace those of ``vision_config`` / ``llm_config``
    (real widths for a benchmark). ``weights=False`` writes no weights (for vLLM's
    ``load_format="dummy"``, which makes random ones itself)."""
    from safetensors.torch import save_file

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28, got {image_size}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path, family)
    vocab = (vocab + 63) // 64 * 64  # the embedding rows, padded as released checkpoints pad them
    top, vision, llm = _configs(family, vocab, scale, image_size, layers, vision or {}, llm or {})
    (path / "config.json").write_text(json.dumps(top, indent=2))
    _write_remote_code(path, family)
    if weights:
        save_file(_weights(family, vision, llm, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def sample_images(sizes=((112, 56), (70, 98), (56, 56)), seed: int = 0) -> list:
    """Deterministic RGB PIL images of the given (width, height): smooth gradients with noise, so
    every resize and crop changes the pixels (and each image's tiles differ)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for width, height in sizes:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1)
        noise = rng.uniform(-0.25, 0.25, size=(height, width, 3))
        pixels = np.clip((base * rng.uniform(0.3, 1.0, size=3) + noise) * 255.0, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


# --------------------------------------------------------------------------------------------------
# running vLLM on a tiny checkpoint (the tests' and the benchmark's driver)

PROMPTS = {
    1: "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n",
    2: "<|im_start|>user\n<image>\n<image>\nCompare the two images.<|im_end|>\n<|im_start|>assistant\n",
}
# (width, height) of each request's images: 7 tiles (3x2 + thumbnail); 3 (2x1 + thumbnail) and 1;
# the first request's prompt with another 7-tile image (the image must change the answer)
REQUEST_IMAGES = (((168, 112),), ((112, 56), (56, 56)), ((70, 98),))

ENGINE_DEFAULTS = {
    "trust_remote_code": True,
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 512,
    "max_num_batched_tokens": 512,
    "max_num_seqs": 4,
    "limit_mm_per_prompt": {"image": 2},
    "seed": 0,
    "kv_cache_memory_bytes": 64 * 1024**2,
}
OPS = ("vit_attention", "vit_qk_norm_attention", "mlp_projector", "preprocess")

_calls = None  # the worker's OpCalls observer (worker_start_counting)


def worker_start_counting(worker=None) -> int:
    """In a vLLM worker (``LLM.collective_rpc``): count our ops' ranges from now on, reset the
    plugin's counters; returns the worker's pid."""
    from nvlm_kernels.integrations import vllm as plugin
    from nvlm_kernels.testing import OpCalls

    global _calls
    if _calls is not None:
        _calls.__exit__(None, None, None)
    _calls = OpCalls().__enter__()
    plugin.reset_stats()
    return os.getpid()


def worker_counts(worker=None) -> dict:
    """In a vLLM worker: its pid, the model's class, the plugin's counters and the ops' range counts
    since ``worker_start_counting``."""
    from nvlm_kernels.integrations import vllm as plugin

    model = None
    runner = getattr(worker, "model_runner", None)
    if runner is not None:
        model = getattr(runner, "model", None) or (runner.get_model() if hasattr(runner, "get_model") else None)
    return {
        "pid": os.getpid(),
        "model_class": type(model).__name__ if model is not None else None,
        "stats": plugin.stats(),
        "ops": {op: _calls.count(op) if _calls is not None else 0 for op in OPS},
    }


def requests(request_images=REQUEST_IMAGES, seed: int = 0) -> list[dict]:
    """vLLM prompts (the ChatML text with one ``<image>`` per image, and the images)."""
    out = []
    for i, sizes in enumerate(request_images):
        images = sample_images(sizes, seed=seed + i)
        out.append(
            {"prompt": PROMPTS[len(images)], "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
        )
    return out


def engine_run(path: str, *, max_tokens: int = 12, request_images=REQUEST_IMAGES, **engine) -> dict:
    """``vllm.LLM`` on ``path`` (``ENGINE_DEFAULTS`` updated by ``engine``), greedy generation of
    ``requests()``; returns the tokens, this process's pid and what each worker counted."""
    from vllm import LLM, SamplingParams

    llm = LLM(path, **{**ENGINE_DEFAULTS, **engine})
    try:
        llm.collective_rpc(worker_start_counting)
        outputs = llm.generate(
            requests(request_images), SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False
        )
        workers = llm.collective_rpc(worker_counts)
    finally:
        del llm
        import gc

        gc.collect()
    return {
        "pid": os.getpid(),
        "tokens": [list(o.outputs[0].token_ids) for o in outputs],
        "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
        "workers": workers,
    }


# --------------------------------------------------------------------------------------------------
# tensor parallelism: one InternViT attention module at TP 2 against vLLM's own forward


def tp_attention_worker(rank: int, port: int, queue) -> None:
    """One rank of the tensor-parallel attention check (tests/integrations/test_vllm_engine.py): puts
    (rank, results) on ``queue``; a spawned process (vLLM's TP 2 over gloo on 127.0.0.1:``port``)."""
    try:
        queue.put((rank, _tp_compare(rank, port)))
    except BaseException as exc:  # report, do not hang the parent
        import traceback

        queue.put((rank, {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}))


def _tp_compare(rank: int, port: int) -> dict:
    from transformers import PretrainedConfig
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.models import intern_vit

    torch.set_num_threads(1)
    results = {}
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(
            world_size=2, rank=rank, distributed_init_method=f"tcp://127.0.0.1:{port}", local_rank=rank, backend="gloo"
        )
        initialize_model_parallel(tensor_model_parallel_size=2)
        from nvlm_kernels.integrations.vllm import _models

        gathers, reduces = [], []
        vllm_gather, our_reduce = intern_vit.tensor_model_parallel_all_gather, _models.tensor_model_parallel_all_reduce
        intern_vit.tensor_model_parallel_all_gather = lambda *a, **k: gathers.append(1) or vllm_gather(*a, **k)
        _models.tensor_model_parallel_all_reduce = lambda *a, **k: reduces.append(1) or our_reduce(*a, **k)
        # NVLM's padded layout (9 real + 7 dummy heads: rank 0 real heads only, rank 1 one real and the
        # 7 dummy ones, so the statistic's features end inside rank 1's share), then InternVL-300M's form
        cases = {
            "qk_norm_padded": dict(heads=9, dummy=7, qk_normalization=True, qkv_bias=False),
            "no_qk_norm": dict(heads=4, dummy=0, qk_normalization=False, qkv_bias=True),
        }
        for name, case in cases.items():
            head_dim = 16
            config = PretrainedConfig(
                hidden_size=case["heads"] * head_dim,
                num_attention_heads=case["heads"],
                qkv_bias=case["qkv_bias"],
                qk_normalization=case["qk_normalization"],
                layer_norm_eps=1e-6,
            )
            attn = intern_vit.InternParallelAttention(config, num_dummy_heads=case["dummy"], prefix=name)
            generator = torch.Generator().manual_seed(1)
            for param in attn.parameters():  # the same random values on both ranks, dummy heads included
                param.data.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            for module in attn.modules():
                if hasattr(module, "quant_method"):
                    module.quant_method.process_weights_after_loading(module)
            x = torch.randn(3, 17, config.hidden_size, generator=torch.Generator().manual_seed(2))
            gathers.clear()
            reduces.clear()
            expected = attn(x)
            vllm_gathers = len(gathers)
            assert _models._attention_problem(attn) is None
            attn.__class__ = _models.InternAttentionOnNvlmKernels
            gathers.clear()
            from nvlm_kernels.testing import OpCalls

            with OpCalls() as calls:
                out = attn(x)
            results[name] = {
                "tp_size": attn.tp_size,
                "max_error": (out - expected).abs().max().item(),
                "scale": expected.abs().max().item(),
                "vllm_all_gathers": vllm_gathers,
                "our_all_gathers": len(gathers),
                "our_all_reduces": len(reduces),
                "vit_attention_calls": calls.count("vit_attention"),
            }
    return results


def main(argv=None) -> None:
    """``python -m nvlm_kernels.integrations.vllm.testing RUNS_JSON OUT_JSON``: each run is
    {"family", "dir", "env": {...}, "engine": {...}}; the runs go one after the other in this
    process (the env entries set for that run only), the reports to OUT_JSON."""
    import importlib
    import sys

    # this module by its name, not as __main__: the worker functions must be pickled by reference
    # (as __main__'s they would travel by value, each call with its own copy of the globals)
    this = importlib.import_module("nvlm_kernels.integrations.vllm.testing")
    args = sys.argv[1:] if argv is None else argv
    runs = json.loads(Path(args[0]).read_text())
    reports = []
    for run in runs:
        saved = dict(os.environ)
        os.environ.update(run.get("env", {}))
        try:
            path = this.write_checkpoint(run["dir"], run["family"])
            reports.append(this.engine_run(path, **run.get("engine", {})))
        finally:
            os.environ.clear()
            os.environ.update(saved)
    Path(args[1]).write_text(json.dumps(reports))


if __name__ == "__main__":
    main()
