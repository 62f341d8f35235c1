"""nvlm.InternViT: against a plain fp64 transcription of InternVL's algorithm, backend agreement,
InternVL's parameter names, NVLM's dummy heads, the published parameter counts, and gradients."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels as nk
from nvlm.config import INTERNVIT_6B, INTERNVIT_300M, TINY_VISION, VisionConfig
from nvlm.vision import InternViT

# 28-pixel tiles of 14-pixel patches: 4 patches + CLS = 5 tokens; 2 heads of 64 (the kernels' head dim).
TINY_6B_STYLE = dataclasses.replace(TINY_VISION, image_size=28, num_dummy_heads=0)
TINY_300M_STYLE = dataclasses.replace(
    TINY_6B_STYLE, norm="layer", qkv_bias=True, qk_norm=False, layer_scale_init=1.0
)  # fmt: skip
STYLES = {"6b": TINY_6B_STYLE, "300m": TINY_300M_STYLE}


def randomized(config: VisionConfig, *, dtype=torch.float32, seed: int = 0) -> InternViT:
    """A model whose every parameter is random, including norm weights, biases and layer scales
    (at their init of ones / zeros / a constant, a bug in how they are applied would not show).
    Matrices get std 1/sqrt(fan_in) so activations are of order 1: with the init's std 0.02 the
    GELU inputs are so small that tanh-GELU and erf-GELU agree within the tolerance."""
    torch.manual_seed(seed)
    model = InternViT(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("ls1", "ls2") or "norm" in name and leaf == "weight":
                p.uniform_(0.5, 1.5)
            elif leaf == "bias" or leaf in ("class_embedding", "position_embedding"):
                p.uniform_(-0.3, 0.3)
            elif leaf == "weight":  # Linear [out, in] or Conv2d [out, in, kh, kw]
                p.normal_(std=p[0].numel() ** -0.5)
    return model


def pixels(config: VisionConfig, tiles: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tiles, config.num_channels, config.image_size, config.image_size, generator=generator)


def reference_internvit(params: dict[str, torch.Tensor], config: VisionConfig, pixel_values: torch.Tensor):
    """InternVL's InternVisionModel (modeling_intern_vit.py, naive attention path), in float64,
    written out step by step from its state dict."""
    p = {name: t.detach().double() for name, t in params.items()}
    x = pixel_values.double()
    tiles, eps, width = x.shape[0], config.norm_eps, config.hidden_size
    heads, head_dim = config.num_heads, width // config.num_heads

    def rms_norm(h, weight):
        return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight

    def norm(h, prefix):
        if config.norm == "rms":
            return rms_norm(h, p[prefix + ".weight"])
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        return (h - mean) / torch.sqrt(var + eps) * p[prefix + ".weight"] + p[prefix + ".bias"]

    patches = F.conv2d(
        x, p["embeddings.patch_embedding.weight"], p["embeddings.patch_embedding.bias"], stride=config.patch_size
    )
    patches = patches.permute(0, 2, 3, 1).reshape(tiles, -1, width)  # rows of patches, left to right
    h = torch.cat([p["embeddings.class_embedding"].expand(tiles, 1, width), patches], dim=1)
    h = h + p["embeddings.position_embedding"]
    tokens = h.shape[1]
    for i in range(config.num_layers):
        pre = f"encoder.layers.{i}."
        a = norm(h, pre + "norm1")
        qkv = a @ p[pre + "attn.qkv.weight"].T
        if config.qkv_bias:
            qkv = qkv + p[pre + "attn.qkv.bias"]
        q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]
        if config.qk_norm:  # one RMS over the whole C-wide vector, all heads together
            q, k = rms_norm(q, p[pre + "attn.q_norm.weight"]), rms_norm(k, p[pre + "attn.k_norm.weight"])
        q, k, v = (t.reshape(tiles, tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(tiles, tokens, width)
        h = h + p[pre + "ls1"] * (attended @ p[pre + "attn.proj.weight"].T + p[pre + "attn.proj.bias"])
        m = norm(h, pre + "norm2") @ p[pre + "mlp.fc1.weight"].T + p[pre + "mlp.fc1.bias"]
        m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))
        m = m @ p[pre + "mlp.fc2.weight"].T + p[pre + "mlp.fc2.bias"]
        h = h + p[pre + "ls2"] * m
    return h  # no final norm


@pytest.mark.parametrize("style", list(STYLES))
def test_matches_fp64_transcription_of_internvl(style):
    config = STYLES[style]
    model = randomized(config)
    x = pixels(config)
    got = model(x)
    assert got.shape == (3, 1 + config.num_patches, config.hidden_size) and got.dtype == torch.float32
    want = reference_internvit(model.state_dict(), config, x)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # float64 pixels into a float32 model: cast to the weights' dtype
    torch.testing.assert_close(model(x.double()), got)


def test_resamples_positions_for_other_image_sizes_as_internvl():
    """A 2x2 position grid read for 3x3 patches: InternVL's bicubic resampling (align_corners=False)."""
    config = TINY_6B_STYLE
    model = randomized(config)
    x = torch.randn(2, 3, 42, 42)
    grid_positions = model.embeddings.position_embedding[0, 1:].detach().reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    resampled = F.interpolate(grid_positions.double(), size=(3, 3), mode="bicubic", align_corners=False)
    params = dict(model.state_dict())
    params["embeddings.position_embedding"] = torch.cat(
        [params["embeddings.position_embedding"][:, :1].double(), resampled.flatten(2).transpose(1, 2)], dim=1
    )
    torch.testing.assert_close(model(x).double(), reference_internvit(params, config, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("style", list(STYLES))
def test_triton_and_reference_backends_agree_in_float16(style):
    for op in ("vit_attention", "vit_qk_norm_attention"):
        reason = nk.available_backends(op, "cpu")["triton"]
        if reason is not None:
            pytest.skip(f"triton backend unavailable for {op} on cpu: {reason}")
    config = STYLES[style]
    model = randomized(config, dtype=torch.float16)
    x = pixels(config, tiles=2)
    with torch.no_grad():
        with nk.use_backend("reference"):
            reference = model(x)
        with nk.use_backend("triton"):
            triton = model(x)
    assert triton.dtype == torch.float16
    exact = reference_internvit(model.state_dict(), config, x)
    scale = exact.abs().max().item()
    # Both float16 runs round at every step; the bound is a fraction of the output's scale, and
    # both must be near the fp64 transcription too (agreeing with each other is not enough).
    for out in (reference, triton):
        torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=2e-2 * scale)
    torch.testing.assert_close(triton.double(), reference.double(), rtol=2e-2, atol=1e-2 * scale)


def test_parameter_names_are_internvl_names():
    model = InternViT(dataclasses.replace(TINY_6B_STYLE, num_layers=2), device="meta")
    layer = [
        "norm1.weight", "attn.qkv.weight", "attn.q_norm.weight", "attn.k_norm.weight", "attn.proj.weight",
        "attn.proj.bias", "ls1", "norm2.weight", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "ls2",
    ]  # fmt: skip
    expected = {
        "embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
        "embeddings.position_embedding",
    } | {f"encoder.layers.{i}.{name}" for i in range(2) for name in layer}  # fmt: skip
    assert set(model.state_dict()) == expected
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["embeddings.class_embedding"] == (1, 1, 128)
    assert shapes["embeddings.patch_embedding.weight"] == (128, 3, 14, 14)
    assert shapes["embeddings.position_embedding"] == (1, 5, 128)
    assert shapes["encoder.layers.1.attn.qkv.weight"] == (384, 128)
    assert shapes["encoder.layers.1.ls2"] == (128,)

    # 300M style: LayerNorms with biases, a qkv bias, no q/k norms
    names_300m = set(InternViT(TINY_300M_STYLE, device="meta").state_dict())
    assert "encoder.layers.0.attn.qkv.bias" in names_300m and "encoder.layers.0.norm1.bias" in names_300m
    assert not any("q_norm" in n or "k_norm" in n for n in names_300m)


def pad_dummy_heads(state: dict[str, torch.Tensor], config: VisionConfig, dummy: int) -> dict[str, torch.Tensor]:
    """Lay the state dict out as NVLM's checkpoint does: each of the q, k and v blocks (and proj's
    columns, and the q/k norm weights) padded with ``dummy`` heads after the real ones."""
    real, extra = config.hidden_size, dummy * config.head_dim
    padded = dict(state)
    for name, t in state.items():
        if name.endswith("attn.qkv.weight"):
            blocks = t.reshape(3, real, -1)
            padded[name] = torch.cat([blocks, blocks.new_zeros(3, extra, t.shape[1])], dim=1).reshape(-1, t.shape[1])
        elif name.endswith("attn.proj.weight"):
            padded[name] = torch.cat([t, t.new_zeros(t.shape[0], extra)], dim=1)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            padded[name] = torch.cat([t, torch.full((extra,), 7.0)])  # any value: it scales zeros
    return padded


def test_loads_nvlm_dummy_head_padded_weights():
    config = dataclasses.replace(TINY_6B_STYLE, num_dummy_heads=2)
    source = randomized(config)
    padded = pad_dummy_heads(source.state_dict(), config, dummy=2)
    assert padded["encoder.layers.0.attn.qkv.weight"].shape == (3 * 4 * 64, 128)
    target = InternViT(config)
    target.load_state_dict(padded)  # strict
    for name, t in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], t), name

    padded["encoder.layers.1.attn.proj.weight"][0, -1] = 1.0
    with pytest.raises(ValueError, match="dummy-head columns .* are not all zero"):
        target.load_state_dict(padded)


def released_padded_internvit(padded: dict[str, torch.Tensor], config: VisionConfig, dummy: int, pixel_values):
    """The released NVLM-D InternViT (modeling_intern_vit.py's ``_naive_attn``) in float64, on the
    padded weights as they are: heads + ``dummy`` heads all attend, and the QK-norm variance is the
    sum of squares of the first C features divided by C (spec §3.1, §8.2)."""
    p = {name: t.detach().double() for name, t in padded.items()}
    x = pixel_values.double()
    tiles, eps, width = x.shape[0], config.norm_eps, config.hidden_size
    heads, head_dim = config.num_heads + dummy, config.head_dim
    padded_width = heads * head_dim

    def rms_norm(h, weight, var=None):
        var = h.pow(2).mean(-1, keepdim=True) if var is None else var
        return h / torch.sqrt(var + eps) * weight

    patches = F.conv2d(
        x, p["embeddings.patch_embedding.weight"], p["embeddings.patch_embedding.bias"], stride=config.patch_size
    )
    patches = patches.permute(0, 2, 3, 1).reshape(tiles, -1, width)
    h = torch.cat([p["embeddings.class_embedding"].expand(tiles, 1, width), patches], dim=1)
    h = h + p["embeddings.position_embedding"]
    tokens = h.shape[1]
    for i in range(config.num_layers):
        pre = f"encoder.layers.{i}."
        qkv = rms_norm(h, p[pre + "norm1.weight"]) @ p[pre + "attn.qkv.weight"].T
        q, k, v = qkv.split(padded_width, dim=-1)
        q_var = q[..., :width].pow(2).sum(-1, keepdim=True) / width
        k_var = k[..., :width].pow(2).sum(-1, keepdim=True) / width
        q, k = rms_norm(q, p[pre + "attn.q_norm.weight"], q_var), rms_norm(k, p[pre + "attn.k_norm.weight"], k_var)
        q, k, v = (t.reshape(tiles, tokens, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(tiles, tokens, padded_width)
        h = h + p[pre + "ls1"] * (attended @ p[pre + "attn.proj.weight"].T + p[pre + "attn.proj.bias"])
        m = rms_norm(h, p[pre + "norm2.weight"]) @ p[pre + "mlp.fc1.weight"].T + p[pre + "mlp.fc1.bias"]
        m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))
        h = h + p[pre + "ls2"] * (m @ p[pre + "mlp.fc2.weight"].T + p[pre + "mlp.fc2.bias"])
    return h


def test_nonzero_dummy_q_and_k_rows_warn_and_the_output_is_the_released_models():
    """The dummy-head rule (spec §8.2): the released model with random nonzero dummy q / k rows (its
    dummy v rows and proj columns zero) gives what our real-heads model gives after loading with a
    warning; a nonzero dummy v row is refused."""
    config = dataclasses.replace(TINY_6B_STYLE, num_dummy_heads=2)
    real, extra = config.hidden_size, 2 * config.head_dim
    padded = pad_dummy_heads(randomized(config).state_dict(), config, dummy=2)
    generator = torch.Generator().manual_seed(5)
    for layer in range(config.num_layers):
        qkv = padded[f"encoder.layers.{layer}.attn.qkv.weight"]
        for block in (0, 1):  # q and k
            start = block * (real + extra) + real
            qkv[start : start + extra] = torch.randn(extra, qkv.shape[1], generator=generator)
    x = pixels(config)
    want = released_padded_internvit(padded, config, 2, x)
    model = InternViT(config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_state_dict(padded)
    assert sorted(str(w.message).split(":")[0] + " " + str(w.message).split(" of the ")[1][0] for w in caught) == [
        f"encoder.layers.{layer}.attn.qkv.weight {block}" for layer in range(2) for block in "kq"
    ]
    assert all(w.category is UserWarning and "cannot change the output" in str(w.message) for w in caught)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), want, rtol=1e-4, atol=1e-4)

    v_start = 2 * (real + extra) + real
    padded["encoder.layers.1.attn.qkv.weight"][v_start + 3, 0] = 0.5
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.attn\.qkv\.weight: .* v block"):
        with warnings.catch_warnings():  # the q / k rows warn again, as above
            warnings.simplefilter("ignore")
            model.load_state_dict(padded)


def parameter_count(config: VisionConfig) -> int:
    return sum(p.numel() for p in InternViT(config, device="meta").parameters())


def test_parameter_counts_of_the_published_encoders():
    count_6b = parameter_count(INTERNVIT_6B)
    assert abs(count_6b - 5.54e9) / 5.54e9 < 0.02, count_6b
    count_300m = parameter_count(INTERNVIT_300M)
    assert 0.28e9 <= count_300m <= 0.32e9, count_300m


@pytest.mark.parametrize("style", list(STYLES))
def test_gradients_reach_every_parameter(style):
    model = randomized(STYLES[style])
    x = pixels(STYLES[style], tiles=2)
    (model(x) * torch.randn(2, 5, 128)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_initialization_is_seeded_and_meta_safe():
    torch.manual_seed(3)
    first = InternViT(TINY_6B_STYLE).state_dict()
    torch.manual_seed(3)
    second = InternViT(TINY_6B_STYLE).state_dict()
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert torch.all(first["encoder.layers.0.ls1"] == TINY_6B_STYLE.layer_scale_init)
    assert torch.all(first["encoder.layers.0.attn.q_norm.weight"] == 1)
    assert torch.all(first["encoder.layers.1.attn.proj.bias"] == 0)
    assert 0.015 < first["encoder.layers.0.mlp.fc1.weight"].std() < 0.025
    meta = InternViT(TINY_6B_STYLE, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    assert meta(torch.empty(1, 3, 28, 28, device="meta")).shape == (1, 5, 128)
