"""nvlm.config: NVLM-D-72B's released config.json (written in conftest from the spec, §8.2) reads as
the nvlm-d-72b preset; to_hf writes the released values back; from_hf(to_hf(c)) == c; every value
the released model cannot have, or we do not run, is refused naming its field; the presets' eps."""

from __future__ import annotations

import json
import re

import pytest

from nvlm.config import PRESETS, NVLMConfig

NVLM_D_72B = NVLMConfig.from_preset("nvlm-d-72b")
TINY_D = NVLMConfig.from_preset("tiny-d")


def test_the_released_config_reads_as_the_nvlm_d_72b_preset(hf_layout):
    config = NVLMConfig.from_hf(hf_layout.config(), name="NVLM-D-72B")
    # the facts of spec §3.1 / §8.1-8.2, checked one by one (not only through the preset)
    v, llm, p, t = config.vision, config.llm, config.projector, config.tiling
    assert (v.num_layers, v.hidden_size, v.num_heads, v.mlp_size, v.image_size, v.patch_size) == (
        45, 3200, 25, 12800, 448, 14
    )  # fmt: skip
    assert (v.norm, v.norm_eps, v.qk_norm, v.qkv_bias, v.num_dummy_heads) == ("rms", 1e-6, True, False, 7)
    assert (llm.num_layers, llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.intermediate_size) == (
        80, 8192, 64, 8, 29568
    )  # fmt: skip
    assert (llm.vocab_size, llm.rms_eps, llm.rope_theta, llm.qkv_bias, llm.tie_embeddings) == (
        152064, 1e-6, 1e6, True, False
    )  # fmt: skip
    assert (llm.rope_scaling, llm.rope_scaling_factor, llm.max_position_embeddings) == ("dynamic", 3.0, 32768)
    assert (p.hidden, p.layer_norm, p.bias, p.eps, p.ps_version, p.downsample_ratio) == (
        29568, True, False, 1e-5, "v2", 0.5
    )  # fmt: skip
    assert (t.min_tiles, t.max_tiles, t.use_thumbnail, t.tag_style) == (1, 6, True, "nvlm-72b")
    assert (config.name, config.variant, config.xattn, config.max_seq_len) == ("NVLM-D-72B", "D", None, 32768)
    # and the preset is that model (its own context limit aside)
    assert config == NVLM_D_72B.replace(name="NVLM-D-72B", max_seq_len=32768)


def test_to_hf_writes_the_released_values(hf_layout):
    released, written = hf_layout.config(), NVLM_D_72B.to_hf()
    for key in ("architectures", "auto_map", "model_type", "downsample_ratio", "dynamic_image_size",
                "force_image_size", "max_dynamic_patch", "min_dynamic_patch", "ps_version", "select_layer",
                "template", "use_backbone_lora", "use_llm_lora", "use_thumbnail"):  # fmt: skip
        assert written[key] == released[key], key
    for key, value in released["vision_config"].items():
        assert written["vision_config"].get(key, value) == value, f"vision_config.{key}"
    assert set(written["vision_config"]) >= {"num_hidden_layers", "norm_type", "qk_normalization", "layer_norm_eps"}
    for key in ("architectures", "hidden_act", "hidden_size", "intermediate_size", "max_position_embeddings",
                "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "rope_scaling",
                "rope_theta", "tie_word_embeddings", "vocab_size"):  # fmt: skip
        assert written["llm_config"][key] == released["llm_config"][key], f"llm_config.{key}"
    # our own fields sit under one key the released code ignores
    assert written["nvlm_kernels"] == {"name": "nvlm-d-72b", "max_seq_len": 8192, "num_dummy_heads": 7}


@pytest.mark.parametrize(
    "config",
    [
        NVLM_D_72B,
        TINY_D,
        TINY_D.replace(
            name="variations", projector={"ps_version": "v1"}, llm={"tie_embeddings": True, "rope_theta": 12345.5},
            tiling={"max_tiles": 1, "use_thumbnail": False}, vision={"num_dummy_heads": 0, "norm_eps": 1e-5},
        ),
    ],
    ids=["nvlm-d-72b", "tiny-d", "variations"],
)  # fmt: skip
def test_to_hf_and_back_is_the_same_config(config):
    assert NVLMConfig.from_hf(json.loads(json.dumps(config.to_hf()))) == config


def test_transformers_own_qwen2_config_dict_reads_the_same(hf_layout):
    """transformers 5 rewrites rope_scaling / rope_theta into rope_parameters when it saves a config."""
    transformers = pytest.importorskip("transformers", reason="transformers' Qwen2Config writes the newer form")
    released = hf_layout.config()
    llm_dict = transformers.Qwen2Config(**released["llm_config"]).to_dict()
    want = NVLMConfig.from_hf(released)
    assert NVLMConfig.from_hf({**released, "llm_config": llm_dict}) == want


def test_dynamic_image_size_off_is_one_tile(hf_layout):
    config = NVLMConfig.from_hf(hf_layout.config(dynamic_image_size=False))
    assert (config.tiling.min_tiles, config.tiling.max_tiles, config.max_tiles_per_image) == (1, 1, 1)


def test_class_defaults_fill_what_the_file_leaves_out(hf_layout):
    # NVLM_D_Config's defaults: ps_version "v1", use_thumbnail false, select_layer -1, no LoRA
    keys = ("ps_version", "use_thumbnail", "select_layer", "use_llm_lora", "use_backbone_lora", "force_image_size")
    config = NVLMConfig.from_hf(hf_layout.config(**dict.fromkeys(keys, ...)))
    assert (config.projector.ps_version, config.tiling.use_thumbnail) == ("v1", False)


BAD_VALUES = [
    ({"model_type": "internvl_chat"}, "model_type = 'internvl_chat'"),
    ({"select_layer": -2}, "select_layer = -2: only the last ViT layer"),
    ({"ps_version": "v3"}, "ps_version = 'v3': unknown pixel shuffle version"),
    ({"template": "Hermes-2"}, "template = 'Hermes-2'"),
    ({"template": ...}, "template is missing"),
    ({"use_llm_lora": 8}, "use_llm_lora = 8: LoRA"),
    ({"downsample_ratio": 0.3}, "downsample_ratio = 0.3"),
    ({"force_image_size": 224}, "force_image_size = 224: differs from vision_config.image_size 448"),
    ({"min_dynamic_patch": 7}, "min_dynamic_patch = 7: exceeds max_dynamic_patch 6"),
    ({"max_dynamic_patch": 0}, "max_dynamic_patch = 0: must be an integer >= 1"),
    ({"llm_config": {"architectures": ["LlamaForCausalLM"]}}, r"llm_config\.architectures = \['LlamaForCausalLM'\]"),
    ({"llm_config": {"hidden_act": "gelu"}}, r"llm_config\.hidden_act = 'gelu'"),
    ({"llm_config": {"use_sliding_window": True}}, r"llm_config\.use_sliding_window = True"),
    ({"llm_config": {"rope_scaling": {"type": "yarn", "factor": 4.0}}}, r"llm_config\.rope_scaling = .*'yarn'"),
    ({"llm_config": {"rope_scaling": {"type": "dynamic", "factor": 0.5}}}, r"llm_config\.rope_scaling = .*factor"),
    ({"llm_config": {"num_key_value_heads": 7}}, r"llm_config\.num_key_value_heads = 7: does not divide"),
    ({"llm_config": {"num_key_value_heads": ...}}, r"llm_config\.num_key_value_heads is missing"),
    ({"llm_config": {"vocab_size": "152064"}}, r"llm_config\.vocab_size = '152064': must be an integer"),
    ({"llm_config": {"head_dim": 64}}, r"llm_config\.head_dim = 64"),
    ({"llm_config": {"rms_norm_eps": -1.0}}, r"llm_config\.rms_norm_eps = -1\.0: must be a positive number"),
    ({"vision_config": {"norm_type": "layer_norm"}}, r"vision_config\.norm_type = 'layer_norm'"),
    ({"vision_config": {"hidden_act": "quick_gelu"}}, r"vision_config\.hidden_act = 'quick_gelu'"),
    ({"vision_config": {"num_attention_heads": 24}}, r"vision_config\.hidden_size = 3200: .* num_attention_heads 24"),
    ({"vision_config": {"num_hidden_layers": ...}}, r"vision_config\.num_hidden_layers is missing"),
    ({"vision_config": {"qk_normalization": "yes"}}, r"vision_config\.qk_normalization = 'yes'"),
    ({"vision_config": {"image_size": 450}, "force_image_size": 450}, r"vision_config\.image_size = 450: .*patch"),
    ({"vision_config": "InternViT"}, r"vision_config must be a dict"),
    ({"nvlm_kernels": {"max_seq_len": 10**6}}, r"max_seq_len 1000000 exceeds .* 32768 · rope_scaling_factor"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_VALUES, ids=[m.split(" ")[0] for _, m in BAD_VALUES])
def test_every_bad_value_is_refused_naming_its_field(hf_layout, changes, message):
    with pytest.raises(ValueError, match=message):
        NVLMConfig.from_hf(hf_layout.config(**changes))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (PRESETS["nvlm-x-72b"], "variant = 'X'"),
        (PRESETS["nvlm-d-34b"], "llm.qkv_bias = False"),  # Yi-34B is not Qwen2
        (PRESETS["nvlm-d-72b-vit300m"], "vision.norm = 'layer'"),
        (NVLM_D_72B.replace(projector={"eps": 1e-6}), "projector.eps = 1e-06"),
        (NVLM_D_72B.replace(tiling={"tag_style": "nvlm-34b"}), "tiling.tag_style"),
    ],
    ids=["nvlm-x", "yi-34b", "vit300m", "projector-eps", "tag-style"],
)
def test_to_hf_refuses_what_the_format_cannot_express(config, field):
    with pytest.raises(ValueError, match=re.escape(f"to_hf: {field}")):
        config.to_hf()


def test_yi_34b_presets_use_yis_rms_eps_and_the_72b_ones_qwens():
    for name, config in PRESETS.items():
        want = 1e-5 if name.endswith("-34b") else 1e-6
        assert config.llm.rms_eps == want, name
    assert all(PRESETS[f"nvlm-{v}-34b"].llm.max_position_embeddings == 4096 for v in "dxh")


def test_dynamic_rope_scaling_raises_the_position_limit():
    assert NVLM_D_72B.llm.position_limit == 3 * 32768
    assert NVLM_D_72B.replace(max_seq_len=98304).max_seq_len == 98304
    with pytest.raises(ValueError, match="max_seq_len 98305 exceeds"):
        NVLM_D_72B.replace(max_seq_len=98305)
    with pytest.raises(ValueError, match="max_seq_len 2049 exceeds llm.max_position_embeddings 2048$"):
        TINY_D.replace(max_seq_len=2049)
    with pytest.raises(ValueError, match="llm.rope_scaling must be one of"):
        TINY_D.replace(llm={"rope_scaling": "linear"})
