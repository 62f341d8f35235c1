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
from PIL import Image
from torch import nn

from nvlm.checkpoint import (
    INDEX_FILE,
    from_pretrained,
    hf_nvlm_d_key_map,
    load_checkpoint,
    load_config,
    load_hf_nvlm_d,
    save_checkpoint,
    stored_part_dtypes,
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


def tiny_inputs(config: NVLMConfig):
    """One prompt with a 120x60 image (3 tiles at the tiny presets' sizes), built by the processor."""
    from nvlm.processor import NVLMProcessor
    from nvlm.tokenizer import ByteTokenizer

    pixels = torch.randint(0, 256, (60, 120, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    processor = NVLMProcessor(ByteTokenizer(), config)
    return processor([{"role": "user", "content": "<image>\nWhat is this?"}], [Image.fromarray(pixels.numpy())])


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


def with_nonzero_dummy(hf: dict[str, torch.Tensor], key: str, where: str) -> dict[str, torch.Tensor]:
    """``hf`` with one nonzero value in a dummy head of ``key``: the first dummy row of the q, k or v
    block ("q-row", "k-row", "v-row") of a qkv weight, or the last dummy column of a proj weight."""
    c = TINY_D.vision.hidden_size
    tensor = hf[key].clone()
    if where == "column":
        tensor[3, tensor.shape[-1] - 1] = 1e-3
    else:
        padded = tensor.shape[0] // 3
        tensor[{"q-row": 0, "k-row": 1, "v-row": 2}[where] * padded + c, 5] = -2.0
    return {**hf, key: tensor}


@pytest.mark.parametrize(
    ("key", "where", "message"),
    [
        ("vision_model.encoder.layers.0.attn.qkv.weight", "v-row", "rows of the v block"),
        ("vision_model.encoder.layers.1.attn.proj.weight", "column", "columns"),
    ],
)
def test_a_nonzero_dummy_v_row_or_proj_column_is_refused_by_name(hf_layout, tmp_path, key, where, message):
    hf = with_nonzero_dummy(hf_layout.to_hf(random_weights(TINY_D), TINY_D), key, where)
    with pytest.raises(ValueError, match=re.escape(key) + ".*" + message):
        load_hf_nvlm_d(stand_in_model(TINY_D), hf_layout.write(tmp_path, hf))


@pytest.mark.parametrize("where", ["q-row", "k-row"])
def test_a_nonzero_dummy_q_or_k_row_only_warns_and_changes_nothing(hf_layout, tmp_path, where):
    """Dummy q / k rows only shape the dummy heads' attention over zero v rows, and the QK-norm
    statistic covers the real features only (spec §8.2): the model equals the hand-built one."""
    ours = random_weights(TINY_D)
    key = "vision_model.encoder.layers.1.attn.qkv.weight"
    hf = with_nonzero_dummy(hf_layout.to_hf(ours, TINY_D), key, where)
    model = real_model(TINY_D).eval()
    with pytest.warns(UserWarning, match=re.escape(key) + f".*rows of the {where[0]} block.*cannot change the output"):
        load_hf_nvlm_d(model, hf_layout.write(tmp_path, hf), dtype=torch.float32)
    by_hand = real_model(TINY_D).eval()
    by_hand.load_state_dict({name: t.float() for name, t in ours.items()})
    inputs = tiny_inputs(TINY_D)
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, by_hand(inputs).logits)


def test_tensor_parallel_ranks_read_nonzero_dummy_q_rows_as_zeros(hf_layout, tmp_path):
    """A TP rank keeps the padded heads, and its QK-norm sums the squares of every head it holds:
    the dummy q / k rows must arrive as zeros (with the warning); v rows are still refused."""
    from nvlm.checkpoint import _load_hf_nvlm_d  # one rank's loading, without a process group
    from nvlm.model import NVLM
    from nvlm.parallel import TPGroup

    ours = random_weights(TINY_D)
    clean = hf_layout.write(tmp_path / "clean", hf_layout.to_hf(ours, TINY_D))
    key = "vision_model.encoder.layers.0.attn.qkv.weight"
    noisy = hf_layout.write(tmp_path / "noisy", with_nonzero_dummy(hf_layout.to_hf(ours, TINY_D), key, "q-row"))
    bad = hf_layout.write(tmp_path / "bad", with_nonzero_dummy(hf_layout.to_hf(ours, TINY_D), key, "v-row"))
    for rank in range(2):
        group = TPGroup(2, rank)
        want, got = NVLM(TINY_D, tp=group), NVLM(TINY_D, tp=group)
        _load_hf_nvlm_d(want, clean, dtype=None, strict=True, num_dummy_heads=None, tp=group)
        with pytest.warns(UserWarning, match="rows of the q block"):
            _load_hf_nvlm_d(got, noisy, dtype=None, strict=True, num_dummy_heads=None, tp=group)
        for (name, a), b in zip(want.state_dict().items(), got.state_dict().values(), strict=True):
            assert torch.equal(a, b), (rank, name)
        with pytest.raises(ValueError, match=re.escape(key) + ".*rows of the v block"):
            _load_hf_nvlm_d(NVLM(TINY_D, tp=group), bad, dtype=None, strict=True, num_dummy_heads=None, tp=group)


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


# --------------------------------------------------------------------------------------------------
# nvlm.from_pretrained


def released_tiny_directory(hf_layout, path, ours, **config_changes):
    """A tiny NVLM-D directory as nvidia/NVLM-D-72B ships: config.json in the released schema (written
    in conftest, not by to_hf), index + 2 shards with the released key names, the padded ViT and the
    released mix of float32 and bfloat16."""
    directory = hf_layout.write(path, hf_layout.released_dtypes(hf_layout.to_hf(ours, TINY_D)))
    (directory / "config.json").write_text(json.dumps(hf_layout.tiny_d_config(**config_changes)))
    return directory


# what the released schema at tiny-d's sizes says: tiny-d with NVLM-D-72B's dynamic RoPE scaling
TINY_D_RELEASED = TINY_D.replace(llm={"rope_scaling": "dynamic", "rope_scaling_factor": 3.0})


def hand_built(config: NVLMConfig, ours: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> nn.Module:
    """The model built and loaded by hand: build_model, each part cast, load_state_dict (real heads)."""
    from nvlm.model import build_model

    model = build_model(config).eval()
    for part, dtype in dtypes.items():
        getattr(model, part).to(dtype)
    model.load_state_dict(ours)
    return model


def test_from_pretrained_loads_the_released_layout_as_the_hand_built_model(hf_layout, tmp_path, monkeypatch):
    from nvlm.model import NVLM

    ours = random_weights(TINY_D)
    directory = released_tiny_directory(hf_layout, tmp_path / "NVLM-D-tiny", ours)
    built_on, init = [], NVLM.__init__

    def recording_init(self, *args, **kwargs):
        built_on.append(kwargs.get("device"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(NVLM, "__init__", recording_init)
    model = from_pretrained(directory, dtype=torch.float32)
    assert built_on == ["meta"]  # never built with storage: each weight is written once
    assert model.config == TINY_D_RELEASED.replace(name="NVLM-D-tiny")  # 2 dummy heads, read from the shapes
    assert not model.training and {p.dtype for p in model.parameters()} == {torch.float32}
    by_hand = hand_built(TINY_D_RELEASED, ours, dict.fromkeys(("vision", "projector", "llm"), torch.float32))
    inputs = tiny_inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, by_hand(inputs).logits)
    # the default: bfloat16 throughout
    assert {p.dtype for p in from_pretrained(directory).parameters()} == {torch.bfloat16}


def test_from_pretrained_as_stored_takes_each_parts_widest_dtype_and_runs(hf_layout, tmp_path):
    ours = random_weights(TINY_D)
    directory = released_tiny_directory(hf_layout, tmp_path / "hf", ours)
    # the ViT and the LLM store some float32 tensors, the projector none
    widest = {"vision": torch.float32, "projector": torch.bfloat16, "llm": torch.float32}
    assert stored_part_dtypes(directory, "hf-nvlm-d") == widest
    model = from_pretrained(directory, dtype=None)
    for part, dtype in widest.items():
        assert {p.dtype for p in getattr(model, part).parameters()} == {dtype}, part
    inputs = tiny_inputs(model.config)
    with torch.no_grad():
        logits = model(inputs).logits
        assert torch.isfinite(logits).all()
        assert torch.equal(logits, hand_built(TINY_D_RELEASED, ours, widest)(inputs).logits)


def test_from_pretrained_loads_our_own_checkpoints_too(tmp_path):
    from nvlm.model import build_model

    torch.manual_seed(0)
    saved = build_model("tiny-h")
    with torch.no_grad():
        for i, param in enumerate(saved.parameters()):
            if i % 3 == 0:  # stored mixed: as stored, each part takes its widest dtype
                param.data = param.data.to(torch.bfloat16)
    save_checkpoint(saved, tmp_path, config=saved.config)
    model = from_pretrained(tmp_path, dtype=torch.float32)
    assert model.config == saved.config
    for (name, want), got in zip(saved.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(got, want.float()), name
    as_stored = from_pretrained(tmp_path, dtype=None)
    assert {p.dtype for p in as_stored.parameters()} == {torch.float32}  # every part holds some float32


def test_from_pretrained_refuses_bad_directories_and_config_values(hf_layout, tmp_path):
    ours = random_weights(TINY_D)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(tmp_path / "absent")
    no_config = hf_layout.write(tmp_path / "no-config", hf_layout.to_hf(ours, TINY_D))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(no_config)
    (no_config / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="neither a Hugging Face NVLM-D config"):
        from_pretrained(no_config)
    for changes, message in (
        ({"select_layer": -2}, "select_layer = -2"),
        ({"llm_config": {"architectures": ["LlamaForCausalLM"]}}, r"llm_config\.architectures"),
        ({"ps_version": "v9"}, "ps_version = 'v9'"),
        ({"llm_config": {"num_hidden_layers": 5}}, r"missing from the checkpoint: llm\.layers\.4\."),
    ):
        directory = released_tiny_directory(hf_layout, tmp_path / str(len(message)), ours, **changes)
        with pytest.raises(ValueError, match=message):
            from_pretrained(directory, dtype=torch.float32)


def test_from_pretrained_keeps_tied_embeddings_tied(hf_layout, tmp_path):
    from nvlm.model import build_model

    tied = TINY_D.replace(llm={"tie_embeddings": True})
    torch.manual_seed(0)
    saved = build_model(tied)
    save_checkpoint(saved, tmp_path / "ours", config=tied)
    ours = {name: t.detach().clone() for name, t in saved.state_dict().items()}
    hf = hf_layout.to_hf(ours, tied)
    del hf["language_model.lm_head.weight"]  # a tied Hugging Face checkpoint stores the embedding only
    directory = hf_layout.write(tmp_path / "hf", hf)
    (directory / "config.json").write_text(json.dumps(tied.to_hf()))
    for path in (tmp_path / "ours", directory):
        model = from_pretrained(path, dtype=torch.float32)
        assert model.llm.lm_head.weight is model.llm.embed_tokens.weight, path
        assert torch.equal(model.llm.lm_head.weight, ours["llm.embed_tokens.weight"]), path


def test_from_pretrained_builds_and_reads_only_a_ranks_shards(hf_layout, tmp_path, monkeypatch):
    """Each tensor-parallel rank of from_pretrained holds exactly its shards of the hand-sharded
    state dict (``shard_state_dict``; the padded ViT heads of NVLM's layout). One process plays each
    rank: the ranks' agreement (a collective) is replaced by running the load."""
    from nvlm.parallel import TPGroup, shard_state_dict

    monkeypatch.setattr("nvlm.checkpoint.agree_on_success", lambda action, tp, what: action())
    ours = random_weights(TINY_D)
    directory = released_tiny_directory(hf_layout, tmp_path / "hf", ours)
    full = {name: t.float() for name, t in ours.items()}
    for rank in range(2):
        model = from_pretrained(directory, dtype=torch.float32, tp=TPGroup(2, rank))
        want = shard_state_dict(full, model.config, 2, rank)
        got = model.state_dict()
        assert set(got) == set(want)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (rank, name)
