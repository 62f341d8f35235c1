"""Checkpoints: Hugging Face NVLM-D-72B weights in, our own sharded safetensors in and out, and a
converter from transformers' native ``InternVLForConditionalGeneration`` state dict.

Everything here works on an ``nn.Module``'s parameter names and on plain state dicts, not on the
model class, so it runs against any module that uses the names of ``nvlm.model``:

* ``vision.`` + InternViT's original names (``embeddings.class_embedding``,
  ``encoder.layers.{i}.attn.qkv.weight``, ``...ls1``, ...), real heads only;
* ``projector.`` + ``MLPProjector``'s (= HF ``mlp1``'s) names;
* ``llm.`` + HF Qwen2's names without ``model.`` (``embed_tokens.weight``, ``layers.{i}...``,
  ``norm.weight``, ``lm_head.weight``);
* ``xattn.{layer}.`` + the cross-attention block's names (NVLM-X / NVLM-H only).

NVLM-D's released ViT carries 7 all-zero dummy heads (spec §3.1: 25 real + 7 = 32 heads for
tensor parallelism 8). ``load_hf_nvlm_d`` checks that they are zero and keeps the real part only.

Tensors are read one at a time with ``safetensors.safe_open`` (sliced with ``get_slice`` where only
part of a tensor is needed), so loading never holds the whole checkpoint in memory.

Tensor-parallel models (``model.tp.size > 1``, ``nvlm.parallel``) load sharded: each rank reads only
its slices (``get_slice``), the ViT in NVLM's padded head layout (the dummy heads a rank holds are
checked to be zero, or zero-filled from a real-heads-only checkpoint). Then the ranks agree: if any
rank failed, every rank raises (no rank is left waiting in a later collective).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nvlm.parallel import TPGroup, agree_on_success, local_shard
from nvlm.vision import strip_dummy_heads

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# Keys some checkpoints carry that are recomputed, never loaded (old transformers saved RoPE tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadReport:
    """``missing``: model parameters the checkpoint did not fill; ``unexpected``: checkpoint keys
    the model has no parameter for (in the checkpoint's own names); ``loaded``: tensors copied."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: int = 0


# --------------------------------------------------------------------------------------------------
# reading sharded safetensors


def _weight_map(path: str | os.PathLike) -> dict[str, Path]:
    """key -> shard file, from ``model.safetensors.index.json`` or a single ``model.safetensors``
    (``path`` may also name a .safetensors file directly)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text())
        return {key: path / shard for key, shard in index["weight_map"].items()}
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    weight_map: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), file))
    return weight_map


def _by_shard(weight_map: Mapping[str, Path]) -> dict[Path, list[str]]:
    shards: dict[Path, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    return shards


def _targets(model: nn.Module, *, buffers: bool) -> dict[str, torch.Tensor]:
    """name -> the model's Parameter (and persistent buffer): the objects loading writes into.
    Tied parameters appear under each of their names."""
    targets: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    if buffers:
        persistent = model.state_dict(keep_vars=True)
        targets.update({name: t for name, t in persistent.items() if name not in targets})
    return targets


def _assign(target: torch.Tensor, tensor: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Write ``tensor`` into ``target``. A Parameter takes ``dtype`` (None: the tensor's) and keeps
    its device and identity (so optimizers and tied names still see it); a buffer keeps its dtype."""
    with torch.no_grad():
        if isinstance(target, nn.Parameter):
            dtype = tensor.dtype if dtype is None else dtype
            if target.dtype == dtype and target.shape == tensor.shape:
                target.data.copy_(tensor)
            else:
                target.data = tensor.to(device=target.device, dtype=dtype).contiguous()
        else:
            target.copy_(tensor)


def _key_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{', ...' if len(keys) > limit else ''} ({len(keys)} in all)"


def _finish(report: LoadReport, strict: bool, what: str) -> LoadReport:
    if strict and (report.missing or report.unexpected):
        problems = []
        if report.missing:
            problems.append(f"missing from the checkpoint: {_key_list(report.missing)}")
        if report.unexpected:
            problems.append(f"not in the model: {_key_list(report.unexpected)}")
        raise ValueError(f"{what}: " + "; ".join(problems))
    return report


def _tensor_parallel(model: nn.Module) -> TPGroup | None:
    """The model's TP group when it is sharded over more than one rank (else None)."""
    tp = getattr(model, "tp", None)
    return tp if isinstance(tp, TPGroup) and tp.parallel else None


def _check_shape(key: str, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        label = key if key == name else f"{key} (-> {name})"
        raise ValueError(f"{label}: checkpoint shape {list(got)} does not match the model's {list(want)}")


# --------------------------------------------------------------------------------------------------
# Hugging Face NVLM-D


def hf_nvlm_d_key_map(key: str) -> str | None:
    """Our parameter name for a key of the Hugging Face NVLM-D checkpoint (None: not ours)."""
    if key.startswith("vision_model."):
        return "vision." + key[len("vision_model.") :]
    if key.startswith("mlp1."):
        return "projector." + key[len("mlp1.") :]
    if key.startswith("language_model.model."):
        return "llm." + key[len("language_model.model.") :]
    if key == "language_model.lm_head.weight":
        return "llm.lm_head.weight"
    return None


_VIT_ATTN = re.compile(
    r"^vision\.encoder\.layers\.(\d+)\.attn\.(qkv\.weight|qkv\.bias|proj\.weight|[qk]_norm\.weight)$"
)


def _vision_config_value(model: nn.Module, name: str) -> int | None:
    """``model.config.vision.<name>`` when the model carries an ``NVLMConfig`` (else None)."""
    vision = getattr(getattr(model, "config", None), "vision", None)
    return getattr(vision, name, None)


def load_hf_nvlm_d(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    strict: bool = True,
    num_dummy_heads: int | None = None,
) -> LoadReport:
    """Load a Hugging Face NVLM-D checkpoint directory (``nvidia/NVLM-D-72B`` layout: sharded with
    ``model.safetensors.index.json``, or one ``model.safetensors``) into ``model``'s parameters, in
    ``dtype`` (None: as stored). The ViT's dummy heads are checked to be zero and dropped;
    ``num_dummy_heads`` (default: ``model.config.vision.num_dummy_heads`` if the model has an
    ``NVLMConfig``, else whatever the padded width says) is checked against the shapes.

    Raises ValueError for a nonzero dummy head, a shape that differs from the model's, and, with
    ``strict``, for missing or unexpected keys; returns a ``LoadReport``. A tensor-parallel model
    reads its own slices only; a failure on any rank raises on every rank."""
    tp = _tensor_parallel(model)
    if tp is not None:
        return agree_on_success(
            lambda: _load_hf_nvlm_d(model, path, dtype=dtype, strict=strict, num_dummy_heads=num_dummy_heads, tp=tp),
            tp, f"loading {path}",
        )  # fmt: skip
    return _load_hf_nvlm_d(model, path, dtype=dtype, strict=strict, num_dummy_heads=num_dummy_heads, tp=None)


def _load_hf_nvlm_d(model, path, *, dtype, strict, num_dummy_heads, tp: TPGroup | None) -> LoadReport:
    targets = _targets(model, buffers=False)
    head_dim = _vision_config_value(model, "head_dim")
    if num_dummy_heads is None:
        num_dummy_heads = _vision_config_value(model, "num_dummy_heads")
    weight_map = _weight_map(path)
    report = LoadReport()
    seen: set[str] = set()
    for shard, keys in _by_shard(weight_map).items():
        with safe_open(shard, framework="pt") as f:
            for key in keys:
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
                name = hf_nvlm_d_key_map(key)
                target = targets.get(name) if name is not None else None
                if target is None:
                    report.unexpected.append(key)
                    continue
                match = _VIT_ATTN.match(name)
                if tp is not None:  # this rank's slice; the padded ViT heads stay (nvlm.parallel)
                    tensor = local_shard(name, f.get_slice(key), model.config, tp)
                elif match:
                    part = match.group(2)
                    real_width = (
                        target.shape[-1]
                        if part == "proj.weight"
                        else target.shape[0] // (3 if part.startswith("qkv") else 1)
                    )
                    tensor = strip_dummy_heads(f.get_slice(key), key, part, real_width, num_dummy_heads, head_dim)
                else:
                    tensor = f.get_tensor(key)
                _check_shape(key, name, tuple(tensor.shape), tuple(target.shape))
                _assign(target, tensor, dtype)
                seen.add(name)
                report.loaded += 1
                del tensor
    report.missing = [name for name in targets if name not in seen]
    return _finish(report, strict, f"loading {path} (Hugging Face NVLM-D)")


# --------------------------------------------------------------------------------------------------
# our own layout


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    config: Any = None,
    shard_size_bytes: int = 4 * 1024**3,
) -> list[Path]:
    """Write ``model.state_dict()`` under our names to directory ``path`` as safetensors shards
    (``model-0000i-of-0000n.safetensors``, each at most ``shard_size_bytes`` unless one tensor is
    larger) with a Hugging-Face-style ``model.safetensors.index.json``, and ``config.json``
    (``dataclasses.asdict(config)``) when a config is given. Returns the shard paths."""
    if _tensor_parallel(model) is not None:
        raise ValueError("save_checkpoint writes a single-process model; a tensor-parallel model holds only shards")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > shard_size_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for file, names in zip(files, shards, strict=True):
        tensors: dict[str, torch.Tensor] = {}
        pointers: set[int] = set()
        for name in names:
            tensor = state[name].detach().to("cpu").contiguous()
            # safetensors refuses tensors sharing memory (tied weights): store a copy under each name
            if tensor.data_ptr() in pointers:
                tensor = tensor.clone()
            pointers.add(tensor.data_ptr())
            tensors[name] = tensor
            weight_map[name] = file
        save_file(tensors, path / file, metadata={"format": "pt"})
        del tensors
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if config is not None:
        (path / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    return [path / file for file in files]


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, strict: bool = True, dtype: torch.dtype | None = None
) -> LoadReport:
    """Load what ``save_checkpoint`` wrote into ``model`` (parameters and persistent buffers).
    Parameters take ``dtype`` (None: the stored dtype, so a round trip is exact). A tensor-parallel
    model reads its own slices only; a failure on any rank raises on every rank."""
    tp = _tensor_parallel(model)
    if tp is not None:
        return agree_on_success(lambda: _load_checkpoint(model, path, strict, dtype, tp), tp, f"loading {path}")
    return _load_checkpoint(model, path, strict, dtype, None)


def _load_checkpoint(model, path, strict: bool, dtype, tp: TPGroup | None) -> LoadReport:
    targets = _targets(model, buffers=True)
    report = LoadReport()
    seen: set[str] = set()
    for shard, keys in _by_shard(_weight_map(path)).items():
        with safe_open(shard, framework="pt") as f:
            for key in keys:
                target = targets.get(key)
                if target is None:
                    report.unexpected.append(key)
                    continue
                if tp is not None:
                    tensor = local_shard(key, f.get_slice(key), model.config, tp)
                    _check_shape(key, key, tuple(tensor.shape), tuple(target.shape))
                else:
                    _check_shape(key, key, tuple(f.get_slice(key).get_shape()), tuple(target.shape))
                    tensor = f.get_tensor(key)
                _assign(target, tensor, dtype)
                seen.add(key)
                report.loaded += 1
    report.missing = [name for name in targets if name not in seen]
    return _finish(report, strict, f"loading {path}")


def load_config(path: str | os.PathLike) -> Any:
    """The ``NVLMConfig`` that ``save_checkpoint`` stored in ``path/config.json``."""
    from nvlm.config import (
        CrossAttentionConfig,
        LLMConfig,
        NVLMConfig,
        ProjectorConfig,
        TilingConfig,
        TokenConfig,
        VisionConfig,
    )

    raw = json.loads((Path(path) / CONFIG_FILE).read_text())
    nested: dict[str, Callable[..., Any]] = {
        "vision": VisionConfig, "projector": ProjectorConfig, "llm": LLMConfig, "xattn": CrossAttentionConfig,
        "tiling": TilingConfig, "tokens": TokenConfig,
    }  # fmt: skip
    fields = {key: nested[key](**value) if key in nested and value is not None else value for key, value in raw.items()}
    return NVLMConfig(**fields)


# --------------------------------------------------------------------------------------------------
# transformers' native InternVL (InternVLForConditionalGeneration)

_TF_VISION = "model.vision_tower."
_TF_VISION_RENAMES = {
    "embeddings.cls_token": "embeddings.class_embedding",
    "embeddings.position_embeddings": "embeddings.position_embedding",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
}
_TF_LAYER_RENAMES = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "lambda_1": "ls1",
    "lambda_2": "ls2",
    "attention.projection_layer": "attn.proj",
    "attention.q_norm": "attn.q_norm",
    "attention.k_norm": "attn.k_norm",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TF_PROJECTOR = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}
_TF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def _iter_tf_vision_layer(index: str, rest: str) -> Iterator[str]:
    for theirs, ours in _TF_LAYER_RENAMES.items():
        if rest == theirs or rest.startswith(theirs + "."):
            yield f"vision.encoder.layers.{index}.{ours}{rest[len(theirs) :]}"


def from_transformers_internvl(hf_state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None) -> dict:
    """Our names for the state dict of ``transformers.InternVLForConditionalGeneration``.

    Its vision attention has separate ``q_proj`` / ``k_proj`` / ``v_proj`` (each [heads·D, C],
    head-major): concatenated in q, k, v order they are InternViT's fused ``qkv`` ([3C, C], the
    order its forward reshapes to (3, heads, D)). ``lambda_1/2`` are the layer scales ``ls1/2``,
    ``layernorm_before/after`` are ``norm1/2``, ``cls_token`` / ``position_embeddings`` /
    ``patch_embeddings.projection`` (a Conv2d with bias) the embeddings, ``multi_modal_projector``'s
    ``layer_norm`` / ``linear_1`` / ``linear_2`` are ``mlp1``'s ``0`` / ``1`` / ``3``, and
    ``model.language_model.*`` / ``lm_head.weight`` the decoder (``lm_head`` from the embedding
    when the dict leaves a tied one out). ``num_heads`` (the ViT's) only checks the widths.

    Not convertible (ValueError): a final vision ``layernorm`` (``use_mean_pooling=False``; our ViT,
    like InternViT, ends with the last layer) and unknown keys. The MIM ``mask_token`` is dropped
    (used only with ``bool_masked_pos``). What transformers' config must say for the models to
    agree is not in a state dict: ``vision_feature_layer=-1``, ``vision_feature_select_strategy=
    "default"`` (CLS dropped), ``projector_hidden_act="gelu"``."""
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in hf_state_dict.items():
        if key.startswith(_TF_VISION):
            rest = key[len(_TF_VISION) :]
            if rest in _TF_VISION_RENAMES:
                out["vision." + _TF_VISION_RENAMES[rest]] = tensor
                continue
            if rest == "embeddings.mask_token":
                continue
            if rest.startswith("layernorm."):
                raise ValueError(
                    f"{key}: a final vision LayerNorm (use_mean_pooling=False) has no counterpart in InternViT"
                )
            layer = _TF_LAYER.match(rest)
            if layer:
                index, inner = layer.groups()
                qkv = re.fullmatch(r"attention\.([qkv])_proj\.(weight|bias)", inner)
                if qkv:
                    qkv_parts.setdefault((index, qkv.group(2)), {})[qkv.group(1)] = tensor
                    continue
                names = list(_iter_tf_vision_layer(index, inner))
                if names:
                    out[names[0]] = tensor
                    continue
            unknown.append(key)
        elif key.startswith("model.multi_modal_projector."):
            module, _, param = key[len("model.multi_modal_projector.") :].partition(".")
            if module not in _TF_PROJECTOR:
                unknown.append(key)
                continue
            out[f"projector.{_TF_PROJECTOR[module]}.{param}"] = tensor
        elif key.startswith("model.language_model."):
            if not key.endswith(_IGNORED_SUFFIXES):
                out["llm." + key[len("model.language_model.") :]] = tensor
        elif key == "lm_head.weight":
            out["llm.lm_head.weight"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys of no InternVLForConditionalGeneration part we know: {_key_list(unknown)}")
    for (index, kind), parts in sorted(qkv_parts.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"vision layer {index}: {kind} of q/k/v incomplete (have {sorted(parts)})")
        width = parts["q"].shape[0]
        if num_heads is not None and width % num_heads:
            raise ValueError(f"vision layer {index}: q width {width} is not divisible by num_heads={num_heads}")
        out[f"vision.encoder.layers.{index}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if "llm.lm_head.weight" not in out and "llm.embed_tokens.weight" in out:
        out["llm.lm_head.weight"] = out["llm.embed_tokens.weight"]  # tied, and the dict kept one name
    return out
