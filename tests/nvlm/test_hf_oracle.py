"""The outside oracle: transformers' own InternVL (``InternVLForConditionalGeneration``, the same
InternViT -> pixel shuffle -> mlp1 -> Qwen2 pipeline NVLM-D uses) against our InternViT,
MLPProjector and Qwen2Decoder, loaded through ``nvlm.checkpoint.from_transformers_internvl``.

A tiny random model in float32; norm weights, layer scales, biases, CLS and positions are made
non-trivial so that a swapped or dropped tensor shows. Skipped without transformers (optional).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is optional (the 'hf' extra)")

from nvlm.checkpoint import from_transformers_internvl  # noqa: E402
from nvlm.config import LLMConfig, VisionConfig  # noqa: E402
from nvlm.projector import MLPProjector  # noqa: E402

IMAGE_TOKEN_ID = 300
TILES = 2
TOKENS_PER_TILE = 4  # (56 / 14)² patches · 0.5²
VISION_VARIANTS = {
    # InternViT-6B's form: RMSNorm, full-width QK-RMSNorm, no qkv bias
    "6b-like": {"norm": "rms", "qk_norm": True, "qkv_bias": False},
    # InternViT-300M's form: LayerNorm, qkv bias, no QK norm
    "300m-like": {"norm": "layer", "qk_norm": False, "qkv_bias": True},
}
TINY_VISION = {"image_size": 56, "patch_size": 14, "hidden_size": 128, "num_heads": 2, "num_layers": 2, "mlp_size": 256}
TINY_LLM = LLMConfig(
    vocab_size=320, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256,
    rope_theta=10_000.0, max_position_embeddings=2048,
)  # fmt: skip


def ours_modules(vision_config: VisionConfig):
    try:
        from nvlm.llm import Qwen2Decoder
        from nvlm.vision import InternViT
    except ImportError as exc:
        pytest.skip(f"nvlm.vision / nvlm.llm not importable yet: {exc}")
    projector = MLPProjector(
        vision_config.hidden_size, TINY_LLM.hidden_size, TINY_LLM.hidden_size, layer_norm=True, bias=True
    )  # InternVL's mlp1: hidden = LLM width, biases
    return InternViT(vision_config), projector, Qwen2Decoder(TINY_LLM)


def hf_internvl(vision_config: VisionConfig):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    v, llm = vision_config, TINY_LLM
    config = InternVLConfig(
        vision_config={
            "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "intermediate_size": v.mlp_size, "image_size": v.image_size, "patch_size": v.patch_size,
            "norm_type": "rms_norm" if v.norm == "rms" else "layer_norm", "layer_norm_eps": v.norm_eps,
            "use_qk_norm": v.qk_norm, "attention_bias": v.qkv_bias, "layer_scale_init_value": v.layer_scale_init,
            "use_mean_pooling": True, "hidden_act": "gelu",
        },
        text_config={
            "model_type": "qwen2", "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
            "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
            "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
            "rms_norm_eps": llm.rms_eps, "max_position_embeddings": llm.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": llm.rope_theta}, "tie_word_embeddings": False,
        },
        image_token_id=IMAGE_TOKEN_ID, image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lambda_1", "lambda_2")) or ("norm" in name and name.endswith("weight")):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias") or name.endswith(("cls_token", "position_embeddings")):
                param.normal_(0.0, 0.2)
            else:
                param.normal_(0.0, 0.08)
    return model


@pytest.fixture(params=list(VISION_VARIANTS))
def pair(request):
    vision_config = VisionConfig(**TINY_VISION, **VISION_VARIANTS[request.param], num_dummy_heads=0)
    hf = hf_internvl(vision_config)
    vit, projector, llm = ours_modules(vision_config)
    converted = from_transformers_internvl(hf.state_dict(), num_heads=vision_config.num_heads)
    for prefix, module in (("vision.", vit), ("projector.", projector), ("llm.", llm)):
        part = {k[len(prefix) :]: t for k, t in converted.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    for module in (vit, projector, llm):
        module.eval()
    return hf, vit, projector, llm


def test_conversion_covers_every_tensor_once(pair):
    hf, vit, projector, llm = pair
    converted = from_transformers_internvl(hf.state_dict())
    ours = {f"{p}.{k}" for p, m in (("vision", vit), ("projector", projector), ("llm", llm)) for k in m.state_dict()}
    assert set(converted) == ours
    hf_numel = sum(t.numel() for t in hf.state_dict().values())
    assert sum(t.numel() for t in converted.values()) == hf_numel


@torch.no_grad()
def test_image_features_match_transformers(pair):
    hf, vit, projector, _ = pair
    pixel_values = torch.randn(TILES, 3, 56, 56)
    want = hf.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    got = projector(vit(pixel_values))  # CLS drop + pixel shuffle inside the projector
    assert got.shape == want.shape == (TILES, TOKENS_PER_TILE, TINY_LLM.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_logits_with_spliced_image_tokens_match_transformers(pair):
    hf, vit, projector, llm = pair
    gen = torch.Generator().manual_seed(3)
    pixel_values = torch.randn(TILES, 3, 56, 56, generator=gen)
    text = torch.randint(0, IMAGE_TOKEN_ID, (1, 5 + 3), generator=gen)
    image = torch.full((1, TILES * TOKENS_PER_TILE), IMAGE_TOKEN_ID)
    input_ids = torch.cat([text[:, :5], image, text[:, 5:]], dim=1)
    want = hf(input_ids=input_ids, pixel_values=pixel_values).logits

    embeds = llm.embed(input_ids)
    features = projector(vit(pixel_values)).reshape(-1, TINY_LLM.hidden_size)
    embeds[input_ids == IMAGE_TOKEN_ID] = features.to(embeds.dtype)
    positions = torch.arange(input_ids.shape[1])[None]
    got = llm.logits(llm(embeds, positions))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_final_vision_layernorm_is_refused():
    state = {"model.vision_tower.layernorm.weight": torch.ones(4)}
    with pytest.raises(ValueError, match="layernorm"):
        from_transformers_internvl(state)


def test_a_tied_lm_head_is_taken_from_the_embedding():
    embedding = torch.randn(10, 4)
    converted = from_transformers_internvl({"model.language_model.embed_tokens.weight": embedding})
    assert converted["llm.lm_head.weight"] is embedding
