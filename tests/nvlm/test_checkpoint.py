"""nvlm.checkpoint: a Hugging Face NVLM-D checkpoint (built here in its published layout, dummy heads
and all) lands in our parameters; bad checkpoints fail loudly; our own format round-trips exactly.

The target model is a stand-in module with exactly our parameter names, built from the config (so
these tests need nothing but the config), and, when it imports, ``nvlm.model.build_model``'s model.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from nvlm.checkpoint import (
    INDEX_FILE,
    hf_nvlm_d_key_map,
    load_checkpoint,
    load_config,
    load_hf_nvlm_d,
    save_checkpoint,
)
from nvlm.config import NVLMConfig
from nvlm.projector import MLPProjector


def our_parameter_shapes(cfg: NVLMConfig) -> dict[str, tuple[int, ...]]:
    """Our names and shapes for a config (the fixed naming of nvlm.model)."""
    v, llm = cfg.vision, cfg.llm
    c, m = v.hidden_size, v.mlp_size
    shapes: dict[str, tuple[int, ...]] = {
        "vision.embeddings.class_embedding": (1, 1, c),
        "vision.embeddings.patch_embedding.weight": (c, v.num_channels, v.patch_size, v.patch_size),
        "vision.embeddings.patch_embedding.bias": (c,),
        "vision.embeddings.position_embedding": (1, v.seq_len, c),
    }
    for i in range(v.num_layers):
        layer = f"vision.encoder.layers.{i}."
        norms = ("weight", "bias") if v.norm == "layer" else ("weight",)
        for norm in ("norm1", "norm2"):
            shapes.update({f"{layer}{norm}.{p}": (c,) for p in norms})
        shapes[layer + "attn.qkv.weight"] = (3 * c, c)
        if v.qkv_bias:
            shapes[layer + "attn.qkv.bias"] = (3 * c,)
        if v.qk_norm:
            shapes[layer + "attn.q_norm.weight"] = shapes[layer + "attn.k_norm.weight"] = (c,)
        shapes.update({layer + "attn.proj.weight": (c, c), layer + "attn.proj.bias": (c,)})
        shapes.update({layer + "mlp.fc1.weight": (m, c), layer + "mlp.fc1.bias": (m,)})
        shapes.update({layer + "mlp.fc2.weight": (c, m), layer + "mlp.fc2.bias": (c,)})
        shapes.update({layer + "ls1": (c,), layer + "ls2": (c,)})
    p = cfg.projector
    projector = MLPProjector(c, llm.hidden_size, p.hidden, layer_norm=p.layer_norm, bias=p.bias, device="meta")
    shapes.update({"projector." + name: tuple(t.shape) for name, t in projector.state_dict().items()})
    h, d, kv = llm.hidden_size, llm.head_dim, llm.num_kv_heads * llm.head_dim

    def swiglu(prefix: str) -> dict[str, tuple[int, ...]]:
        f = llm.intermediate_size
        return {
            prefix + "gate_proj.weight": (f, h),
            prefix + "up_proj.weight": (f, h),
            prefix + "down_proj.weight": (h, f),
        }

    shapes["llm.embed_tokens.weight"] = (llm.vocab_size, h)
    for i in range(llm.num_layers):
        attn = f"llm.layers.{i}.self_attn."
        q = llm.num_heads * d
        shapes.update(
            {attn + "q_proj.weight": (q, h), attn + "k_proj.weight": (kv, h), attn + "v_proj.weight": (kv, h)}
        )
        if llm.qkv_bias:
            shapes.update({attn + "q_proj.bias": (q,), attn + "k_proj.bias": (kv,), attn + "v_proj.bias": (kv,)})
        shapes[attn + "o_proj.weight"] = (h, q)
        shapes.update(swiglu(f"llm.layers.{i}.mlp."))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"llm.layers.{i}.{norm}.weight"] = (h,)
    shapes.update({"llm.norm.weight": (h,), "llm.lm_head.weight": (llm.vocab_size, h)})
    if cfg.xattn is not None:
        for i in cfg.xattn.layer_indices(llm.num_layers):
            x = f"xattn.{i}."
            shapes.update({x + "attn_norm.weight": (h,), x + "q_proj.weight": (h, h), x + "o_proj.weight": (h, h)})
            shapes.update({x + "k_proj.weight": (kv, h), x + "v_proj.weight": (kv, h), x + "attn_gate": (1,)})
            shapes.update({x + "ffn_norm.weight": (h,), x + "ffn_gate": (1,), **swiglu(x + "mlp.")})
    return shapes


def stand_in_model(cfg: NVLMConfig) -> nn.Module:
    """An nn.Module tree holding zero parameters under exactly our names (no forward)."""
    root = nn.Module()
    for name, shape in our_parameter_shapes(cfg).items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))
    return root


def real_model(cfg: NVLMConfig) -> nn.Module:
    try:
        from nvlm.model import build_model
    except ImportError as exc:  # nvlm.model is optional for these tests
        pytest.skip(f"nvlm.model does not import: {exc}")
    return build_model(cfg)


@pytest.fixture(params=["stand-in", "nvlm.model"])
def make_model(request):
    return stand_in_model if request.param == "stand-in" else real_model


def random_weights(cfg: NVLMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Our-named weights with values bf16 represents exactly (so a bf16 load can be compared exactly)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen).to(torch.bfloat16)
        for name, shape in our_parameter_shapes(cfg).items()
        if not name.startswith("xattn.")
    }


TINY_D = NVLMConfig.from_preset("tiny-d")


def test_the_stand_in_has_the_models_names_and_shapes():
    model = real_model(TINY_D)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == our_parameter_shapes(TINY_D)


@pytest.mark.parametrize("shards", [2, 1], ids=["index+2-shards", "single-file"])
def test_hf_nvlm_d_weights_land_on_the_real_heads_in_bf16(hf_layout, tmp_path, make_model, shards):
    assert TINY_D.vision.num_dummy_heads > 0
    ours = random_weights(TINY_D)
    hf = hf_layout.to_hf(ours, TINY_D)
    qkv = hf["vision_model.encoder.layers.0.attn.qkv.weight"]
    assert qkv.shape[0] == 3 * (TINY_D.vision.num_heads + TINY_D.vision.num_dummy_heads) * TINY_D.vision.head_dim
    model = make_model(TINY_D)
    report = load_hf_nvlm_d(model, hf_layout.write(tmp_path / "hf", hf, shards=shards))
    assert (report.missing, report.unexpected, report.loaded) == ([], [], len(hf))
    params = dict(model.named_parameters())
    for name, want in ours.items():
        assert params[name].dtype == torch.bfloat16, name
        assert torch.equal(params[name], want), name
    # The k block starts at row (heads + dummy) · D in the checkpoint, at row C in ours.
    c = TINY_D.vision.hidden_size
    padded = qkv.shape[0] // 3
    assert torch.equal(params["vision.encoder.layers.0.attn.qkv.weight"][c], qkv[padded])


def test_load_keeps_float32_when_asked(hf_layout, tmp_path):
    hf = hf_layout.to_hf(random_weights(TINY_D), TINY_D)
    model = stand_in_model(TINY_D)
    load_hf_nvlm_d(model, hf_layout.write(tmp_path, hf), dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("key", "where", "message"),
    [
        ("vision_model.encoder.layers.1.attn.qkv.weight", "k-row", "rows of the k block"),
        ("vision_model.encoder.layers.0.attn.qkv.weight", "v-row", "rows of the v block"),
        ("vision_model.encoder.layers.1.attn.proj.weight", "column", "columns"),
    ],
)
def test_a_nonzero_dummy_head_is_refused_by_name(hf_layout, tmp_path, key, where, message):
    hf = hf_layout.to_hf(random_weights(TINY_D), TINY_D)
    c = TINY_D.vision.hidden_size
    tensor = hf[key].clone()
    padded = tensor.shape[-1] if where == "column" else tensor.shape[0] // 3
    if where == "column":
        tensor[3, padded - 1] = 1e-3
    else:
        block = {"k-row": 1, "v-row": 2}[where]
        tensor[block * padded + c, 5] = -2.0  # first dummy row of that block
    hf[key] = tensor
    with pytest.raises(ValueError, match=re.escape(key) + ".*" + message):
        load_hf_nvlm_d(stand_in_model(TINY_D), hf_layout.write(tmp_path, hf))


def test_a_dummy_head_count_that_does_not_fit_the_shapes_is_refused(hf_layout, tmp_path):
    path = hf_layout.write(tmp_path, hf_layout.to_hf(random_weights(TINY_D), TINY_D))
    with pytest.raises(ValueError, match=r"qkv\.weight.*3 dummy heads"):
        load_hf_nvlm_d(stand_in_model(TINY_D), path, num_dummy_heads=3)
    assert load_hf_nvlm_d(stand_in_model(TINY_D), path, num_dummy_heads=2).loaded


def test_a_wrong_shape_names_the_key_and_both_shapes(hf_layout, tmp_path):
    hf = hf_layout.to_hf(random_weights(TINY_D), TINY_D)
    hf["mlp1.1.weight"] = hf["mlp1.1.weight"].t()
    with pytest.raises(ValueError, match=re.escape("mlp1.1.weight") + r".*\[512, 256\].*\[256, 512\]"):
        load_hf_nvlm_d(stand_in_model(TINY_D), hf_layout.write(tmp_path, hf))


def test_missing_and_unexpected_keys_are_reported_or_raised(hf_layout, tmp_path):
    hf = hf_layout.to_hf(random_weights(TINY_D), TINY_D)
    del hf["language_model.model.norm.weight"]
    hf["language_model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    hf["img_context_token.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    hf["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # recomputed: ignored
    path = hf_layout.write(tmp_path, hf)
    model = stand_in_model(TINY_D)
    report = load_hf_nvlm_d(model, path, strict=False)
    assert report.missing == ["llm.norm.weight"]
    assert sorted(report.unexpected) == ["img_context_token.weight", "language_model.model.layers.9.mlp.up_proj.weight"]
    assert report.loaded == len(hf) - 3
    assert torch.count_nonzero(model.llm.embed_tokens.weight)  # the rest did load
    with pytest.raises(ValueError, match=r"llm\.norm\.weight.*img_context_token\.weight"):
        load_hf_nvlm_d(stand_in_model(TINY_D), path)


def test_hf_key_map():
    assert hf_nvlm_d_key_map("vision_model.encoder.layers.3.ls1") == "vision.encoder.layers.3.ls1"
    assert hf_nvlm_d_key_map("mlp1.3.weight") == "projector.3.weight"
    assert hf_nvlm_d_key_map("language_model.model.norm.weight") == "llm.norm.weight"
    assert hf_nvlm_d_key_map("language_model.lm_head.weight") == "llm.lm_head.weight"
    assert hf_nvlm_d_key_map("language_model.lm_head.bias") is None
    assert hf_nvlm_d_key_map("vision.encoder.layers.3.ls1") is None


@pytest.mark.parametrize("preset", ["tiny-h", "tiny-x", "tiny-d"])
def test_own_checkpoint_round_trip_is_exact(tmp_path, make_model, preset):
    cfg = NVLMConfig.from_preset(preset)
    model = make_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.copy_(torch.randn_like(param))
            if i % 3 == 0:  # mixed dtypes survive too
                param.data = param.data.to(torch.bfloat16)
    want = {name: t.clone() for name, t in model.state_dict().items()}
    files = save_checkpoint(model, tmp_path, config=cfg, shard_size_bytes=64 * 1024)
    assert len(files) > 1
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(want)
    assert any(k.startswith("xattn.") for k in want) == (cfg.variant != "D")
    assert load_config(tmp_path) == cfg

    fresh = make_model(cfg)
    report = load_checkpoint(fresh, tmp_path)
    assert (report.missing, report.unexpected, report.loaded) == ([], [], len(want))
    got = fresh.state_dict()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_own_checkpoint_of_another_variant_is_refused(tmp_path):
    save_checkpoint(stand_in_model(TINY_D), tmp_path)
    tiny_h = stand_in_model(NVLMConfig.from_preset("tiny-h"))
    report = load_checkpoint(tiny_h, tmp_path, strict=False)
    assert report.missing and all(name.startswith("xattn.") for name in report.missing)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: xattn\."):
        load_checkpoint(tiny_h, tmp_path)
    wider = stand_in_model(NVLMConfig.from_preset("tiny-d").replace(llm={"vocab_size": 400}))
    with pytest.raises(ValueError, match=r"llm\.embed_tokens\.weight.*\[320, 128\].*\[400, 128\]"):
        load_checkpoint(wider, tmp_path)
