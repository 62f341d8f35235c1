"""nvlm.MLPProjector: Hugging Face parameter names, presets, and the same output as the HF module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nvlm_kernels as nk
from nvlm import PRESETS, MLPProjector


def hf_mlp1(vit_hidden: int, hidden: int, out: int, *, bias: bool) -> nn.Sequential:
    """mlp1 as InternVL / NVLM-D build it (modeling_*_chat.py)."""
    features = vit_hidden * 4
    return nn.Sequential(
        nn.LayerNorm(features), nn.Linear(features, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, out, bias=bias)
    )


def hf_extract(mlp1: nn.Sequential, vit_out: torch.Tensor) -> torch.Tensor:
    """InternVL's extract_feature after the ViT: drop CLS, pixel_shuffle(0.5) v2, mlp1."""
    x = vit_out[:, 1:]
    side = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], side, side, -1)
    n, w, h, c = x.size()
    x = x.view(n, w, h // 2, c * 2).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, h // 2, w // 2, c * 4).permute(0, 2, 1, 3).contiguous()
    return mlp1(x.reshape(n, -1, c * 4))


@pytest.mark.parametrize("bias", [False, True], ids=["nvlm-d", "internvl"])
def test_loads_hf_names_and_matches_the_hf_module(bias):
    torch.manual_seed(0)
    hf = hf_mlp1(24, 40, 16, bias=bias)
    with torch.no_grad():
        hf[0].weight.uniform_(0.5, 1.5)
        hf[0].bias.uniform_(-0.2, 0.2)
    ours = MLPProjector(24, 16, 40, bias=bias)
    ours.load_state_dict(hf.state_dict())  # strict: exactly the same names
    vit_out = torch.randn(3, 1 + 16, 24) + 0.3
    with nk.use_backend("reference"):
        got = ours(vit_out)
        shuffled = ours(hf_extract(nn.Identity(), vit_out))  # tokens already shuffled
    want = hf_extract(hf, vit_out)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(shuffled, want)
    assert torch.equal(ours(vit_out[:, 1:]), got)  # no CLS token: recognized by the length


def test_presets_have_the_published_shapes():
    shapes = {name: [tuple(p.shape) for p in MLPProjector.from_config(name, device="meta").parameters()]
              for name in PRESETS}  # fmt: skip
    assert shapes["nvlm-d-72b"] == [(12800,), (12800,), (29568, 12800), (8192, 29568)]
    assert shapes["nvlm-h-34b"] == [(12800,), (12800,), (20480, 12800), (7168, 20480)]
    assert shapes["nvlm-x-72b"] == [(8192, 12800)]
    with pytest.raises(ValueError, match="preset"):
        MLPProjector.from_config("nvlm-q")


def test_from_hf_configs():
    nvlm_d = {"architectures": ["NVLM_D"], "vision_config": {"hidden_size": 3200},
              "llm_config": {"hidden_size": 8192, "intermediate_size": 29568}, "downsample_ratio": 0.5}  # fmt: skip
    internvl = {"architectures": ["InternVLChatModel"], "vision_config": {"hidden_size": 1024},
                "llm_config": {"hidden_size": 2048, "intermediate_size": 8192}}  # fmt: skip
    d = MLPProjector.from_config(nvlm_d, device="meta")
    i = MLPProjector.from_config(internvl, device="meta")
    assert [k for k, _ in d.named_parameters()] == ["0.weight", "0.bias", "1.weight", "3.weight"]
    assert tuple(d[1].weight.shape) == (29568, 12800)
    assert [k for k, _ in i.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert tuple(i[3].weight.shape) == (2048, 2048)
    with pytest.raises(ValueError, match="vision_config"):
        MLPProjector.from_config({"llm_config": {}})


def test_one_layer_form_and_gradients():
    torch.manual_seed(1)
    proj = MLPProjector(8, 6, None, layer_norm=False, dtype=torch.float64)
    vit_out = torch.randn(2, 17, 8, dtype=torch.float64, requires_grad=True)
    with nk.use_backend("reference"):
        y = proj(vit_out)
    assert y.shape == (2, 4, 6)
    torch.autograd.gradcheck(lambda x: proj(x), (vit_out,))
