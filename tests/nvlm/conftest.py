"""Helpers shared by the nvlm tests, as fixtures (the suite imports test files by path, so they
cannot import each other)."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="session")
def hf_layout() -> SimpleNamespace:
    """``to_hf(ours, config)``: our NVLM-D state dict in Hugging Face NVLM-D-72B's layout, written
    out here independently of ``nvlm.checkpoint``; ``write(directory, hf, shards=2)``: as it ships."""
    return SimpleNamespace(to_hf=to_hf_nvlm_d, write=write_hf)
