"""Checkpoints: Hugging Face NVLM-D-72B weights in, our own sharded safetensors in and out, and a
converter from transformers' native ``InternVLForConditionalGeneration`` state dict.

``from_pretrained(dir)`` (``nvlm.from_pretrained``) is the one call: it reads ``config.json`` (an
NVLM-D one through ``NVLMConfig.from_hf``, or ours), builds the model on the meta device, gives each
part its storage once in its final dtype and loads the weights with the loaders below.

Everything here works on an ``nn.Module``'s parameter names and on plain state dicts, not on the
model class, so it runs against any module that uses the names of ``nvlm.model``:

* ``vision.`` + InternViT's original names (``embeddings.class_embedding``,
  ``encoder.layers.{i}.attn.qkv.weight``, ``...ls1``, ...), real heads only;
* ``projector.`` + ``MLPProjector``'s (= HF ``mlp1``'s) names;
* ``llm.`` + HF Qwen2's names without ``model.`` (``embed_tokens.weight``, ``layers.{i}...``,
  ``norm.weight``, ``lm_head.weight``);
* ``xattn.{layer}.`` + the cross-attention block's names (NVLM-X / NVLM-H only).

NVLM-D's released ViT carries 7 all-zero dummy heads (spec §3.1: 25 real + 7 = 32 heads for
tensor parallelism 8). ``load_hf_nvlm_d`` checks them (``nvlm.vision.check_dummy_heads``: nonzero
v rows or proj columns raise, nonzero q / k rows only warn) and keeps the real part only.

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
from nvlm.vision import check_dummy_heads, strip_dummy_heads

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


# A loader's ``dtype`` that keeps each parameter's own dtype (``from_pretrained`` chooses them first).
PARAMETER_DTYPE: Any = "the parameter's dtype"


def _assign(target: torch.Tensor, tensor: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Write ``tensor`` into ``target``. A Parameter takes ``dtype`` (None: the tensor's;
    ``PARAMETER_DTYPE``: its own) and keeps its device and identity (so optimizers and tied names
    still see it); a buffer keeps its dtype."""
    with torch.no_grad():
        if isinstance(target, nn.Parameter):
            dtype = tensor.dtype if dtype is None else target.dtype if dtype is PARAMETER_DTYPE else dtype
            if target.dtype == dtype and target.shape == tensor.shape:
                target.data.copy_(tensor)
            else:
                target.data = tensor.to(device=target.device, dtype=dtype).contiguous()
        else:
            target.copy_(tensor)


def _key_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{', ...' if len(keys) > limit else ''} ({len(keys)} in all)"


def _missing(targets: Mapping[str, torch.Tensor], seen: set[str]) -> list[str]:
    """Targets no key filled; a tied parameter filled under another of its names is not missing (a
    tied checkpoint may store the embedding only)."""
    filled = {id(targets[name]) for name in seen}
    return [name for name, target in targets.items() if name not in seen and id(target) not in filled]


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
                    source = f.get_slice(key)
                    if match:
                        source = _checked_padded_heads(source, key, match.group(2), model.config, num_dummy_heads)
                    tensor = local_shard(name, source, model.config, tp)
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
    report.missing = _missing(targets, seen)
    return _finish(report, strict, f"loading {path} (Hugging Face NVLM-D)")


class _ZeroedRows:
    """A safetensors slice read through row slices (as ``nvlm.parallel.local_shard`` reads the
    ViT's qkv) with the given row ranges read as zeros."""

    def __init__(self, source, rows: list[tuple[int, int]]) -> None:
        self.source, self.rows = source, rows

    def get_shape(self) -> list[int]:
        return list(self.source.get_shape())

    def __getitem__(self, index) -> torch.Tensor:
        piece = self.source[index]
        first = index[0] if isinstance(index, tuple) else index
        start = first.start or 0
        for begin, end in self.rows:
            low, high = max(begin, start), min(end, start + piece.shape[0])
            if low < high:
                piece[low - start : high - start] = 0
        return piece


def _checked_padded_heads(source, key: str, part: str, config, num_dummy_heads: int | None):
    """A tensor-parallel rank keeps NVLM's padded ViT heads (``nvlm.parallel``): the dummy heads are
    checked as ``strip_dummy_heads`` checks them (v rows and proj columns must be zero), and nonzero
    dummy q / k rows (a warning) are read as zeros, since the padded model's QK-norm sums the
    squares of every head it holds. A real-heads-only source (no padding) is left to local_shard."""
    real = config.vision.hidden_size
    shape = tuple(source.get_shape())
    padded = shape[0] // 3 if part.startswith("qkv") else shape[-1]
    if padded == real:
        return source
    count = num_dummy_heads if num_dummy_heads is not None else config.vision.num_dummy_heads
    _, nonzero_qk = check_dummy_heads(source, key, part, real, count, config.vision.head_dim)
    return _ZeroedRows(source, nonzero_qk) if nonzero_qk else source


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
    report.missing = _missing(targets, seen)
    return _finish(report, strict, f"loading {path}")


def load_config(path: str | os.PathLike) -> Any:
    """The ``NVLMConfig`` that ``save_checkpoint`` stored in ``path/config.json``."""
    return _config_from_dict(json.loads((Path(path) / CONFIG_FILE).read_text()))


def _config_from_dict(raw: Mapping[str, Any]) -> Any:
    """An ``NVLMConfig`` from ``dataclasses.asdict`` of one (fields added since take their defaults)."""
    from nvlm.config import (
        CrossAttentionConfig,
        LLMConfig,
        NVLMConfig,
        ProjectorConfig,
        TilingConfig,
        TokenConfig,
        VisionConfig,
    )

    nested: dict[str, Callable[..., Any]] = {
        "vision": VisionConfig, "projector": ProjectorConfig, "llm": LLMConfig, "xattn": CrossAttentionConfig,
        "tiling": TilingConfig, "tokens": TokenConfig,
    }  # fmt: skip
    fields = {key: nested[key](**value) if key in nested and value is not None else value for key, value in raw.items()}
    return NVLMConfig(**fields)


# --------------------------------------------------------------------------------------------------
# one call: a directory (Hugging Face NVLM-D or ours) -> a loaded model

HF_NVLM_D = "hf-nvlm-d"
OURS = "ours"
_HF_FIRST_QKV = "vision_model.encoder.layers.0.attn.qkv.weight"
# The model's parts that each take one dtype when loading "as stored"; the cross-attention blocks
# run inside the decoder's residual stream, so they share its dtype.
_DTYPE_PARTS = {"vision": "vision", "projector": "projector", "llm": "llm", "xattn": "llm"}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
}  # fmt: skip


def checkpoint_layout(raw_config: Mapping[str, Any], path: str | os.PathLike = "") -> str:
    """``HF_NVLM_D`` or ``OURS``, told by a ``config.json``'s keys (NVLM_D_Config nests
    ``vision_config`` / ``llm_config``; ours ``vision`` / ``llm``)."""
    if "llm_config" in raw_config or "vision_config" in raw_config:
        return HF_NVLM_D
    if "llm" in raw_config and "vision" in raw_config:
        return OURS
    raise ValueError(
        f"{Path(path) / CONFIG_FILE}: neither a Hugging Face NVLM-D config (vision_config, llm_config) nor ours "
        "(vision, llm)"
    )


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{path}: no {CONFIG_FILE} (for weights without one, build the model with nvlm.build_model(preset) and "
            "load them with load_hf_nvlm_d / load_checkpoint)"
        )
    try:
        raw = json.loads(file.read_text())
    except ValueError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: not a JSON object")
    return raw


def _hf_dummy_heads(weight_map: Mapping[str, Path], config) -> int | None:
    """How many dummy heads the checkpoint's first ViT layer carries (config.json does not say it;
    the released code pads with a constant 7), from its qkv shape alone (no data read)."""
    if _HF_FIRST_QKV not in weight_map:
        return None
    with safe_open(weight_map[_HF_FIRST_QKV], framework="pt") as f:
        shape = list(f.get_slice(_HF_FIRST_QKV).get_shape())
    v = config.vision
    extra = shape[0] // 3 - v.hidden_size if len(shape) == 2 and shape[0] % 3 == 0 else -1
    if extra < 0 or extra % v.head_dim:
        raise ValueError(
            f"{_HF_FIRST_QKV}: shape {shape} is not 3 blocks of {v.hidden_size} real features + whole dummy heads of "
            f"width {v.head_dim}"
        )
    return extra // v.head_dim


def pretrained_config(path: str | os.PathLike) -> tuple[Any, str]:
    """``(NVLMConfig, layout)`` of a checkpoint directory with a ``config.json``: a Hugging Face
    NVLM-D one (``NVLMConfig.from_hf``, named after the directory, the ViT's dummy-head count taken
    from the weights' shapes) or ours (what ``save_checkpoint`` wrote)."""
    from nvlm.config import HF_EXTENSION_KEY, NVLMConfig

    path = Path(path)
    raw = _read_config_file(path)
    layout = checkpoint_layout(raw, path)
    if layout == OURS:
        try:
            return _config_from_dict(raw), layout
        except TypeError as error:  # an unknown or missing field
            raise ValueError(f"{path / CONFIG_FILE}: not an NVLMConfig ({error})") from None
    extension = raw.get(HF_EXTENSION_KEY)
    named = isinstance(extension, Mapping) and "name" in extension  # ours, written by to_hf
    config = NVLMConfig.from_hf(raw, name=None if named else path.resolve().name)
    dummy = _hf_dummy_heads(_weight_map(path), config)
    if dummy is not None and dummy != config.vision.num_dummy_heads:
        config = config.replace(vision={"num_dummy_heads": dummy})
    return config, layout


def stored_part_dtypes(path: str | os.PathLike, layout: str) -> dict[str, torch.dtype]:
    """The widest floating dtype stored per part of the model (``vision``, ``projector``, ``llm``;
    the cross-attention blocks count as ``llm``), read from the safetensors headers only. Widest:
    ``torch.promote_types`` (float32 over bfloat16; bfloat16 and float16 together give float32,
    as neither holds the other)."""
    widest: dict[str, torch.dtype] = {}
    for shard, keys in _by_shard(_weight_map(path)).items():
        with safe_open(shard, framework="pt") as f:
            for key in keys:
                name = hf_nvlm_d_key_map(key) if layout == HF_NVLM_D else key
                part = _DTYPE_PARTS.get((name or "").split(".")[0])
                dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
                if part is None or dtype is None:
                    continue  # not a parameter of ours (reported by the loader), or not floating point
                widest[part] = torch.promote_types(widest[part], dtype) if part in widest else dtype
    return widest


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str | None = None,
    tp: int | TPGroup | None = None,
):
    """The model stored in directory ``path``, loaded, in eval mode: a Hugging Face NVLM-D
    directory (``nvidia/NVLM-D-72B``: ``config.json`` + safetensors shards) or one that
    ``save_checkpoint(..., config=...)`` wrote, told by ``config.json``.

    The model is built on the meta device, then each part gets its storage once on ``device``
    (default: CPU) in its final dtype and the tensors are copied in one at a time, so the weights
    are never held twice (a 72B model fits where its weights fit). Loading is strict: a missing or
    unexpected tensor, a shape that differs, a nonzero dummy-head v row or proj column (nonzero
    dummy q / k rows only warn) raise ValueError naming the key; a bad config value raises
    ValueError naming the field (``NVLMConfig.from_hf``).

    ``dtype``: every parameter's dtype; None loads "as stored" with **one dtype per part** (the
    ViT, the projector, the decoder with its cross-attention blocks): the widest dtype its stored
    tensors have (``stored_part_dtypes``), so that no stored value is rounded and each part runs in
    a single dtype (the model casts between parts). The released NVLM-D-72B stores the ViT's
    qkv / proj / q_norm / k_norm and some LLM projections in float32, the rest in bfloat16: as
    stored it loads as a float32 ViT, a bfloat16 projector and a float32 LLM (about 315 GB).

    ``tp``: tensor-parallel size as in ``nvlm.build_model`` (None: the torch.distributed world
    size); each rank builds and reads only its shards."""
    from nvlm.model import NVLM
    from nvlm.parallel import check_tp

    path = Path(path)
    config, layout = pretrained_config(path)
    group = TPGroup.resolve(tp)
    check_tp(config, group.size)
    part_dtypes = dict.fromkeys(("vision", "projector", "llm"), dtype)
    if dtype is None:
        part_dtypes = {part: torch.get_default_dtype() for part in part_dtypes} | stored_part_dtypes(path, layout)
    model = NVLM(config, device="meta", tp=group)
    for name, part in _DTYPE_PARTS.items():
        getattr(model, name).to(dtype=part_dtypes[part])  # meta tensors: no memory
    model.to_empty(device=device if device is not None else "cpu")
    if config.llm.tie_embeddings:  # to_empty gives each name its own tensor
        model.llm.lm_head.weight = model.llm.embed_tokens.weight
    if layout == HF_NVLM_D:
        load_hf_nvlm_d(model, path, dtype=PARAMETER_DTYPE)
    else:
        load_checkpoint(model, path, dtype=PARAMETER_DTYPE)
    return model.eval()


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
