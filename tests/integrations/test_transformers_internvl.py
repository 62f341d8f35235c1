"""Hugging Face InternVL (transformers' own classes) on our ops: patched vs the unpatched model itself.

Tiny random configs of the real classes (vision hidden 128 = 2 heads of 64, 2 layers, 56-pixel tiles
of 14-pixel patches: 16 tokens + CLS, 4 image tokens per tile after the shuffle; a Qwen2 text model
of hidden 64). Every parameter is perturbed (norm weights, biases, CLS and position embeddings are
constants at init) so that nothing compares equal by accident. One batch: two samples, three images
of 2, 1 and 3 tiles (6 tiles), the first sample padded.

FlashAttention's rule (``assert_close_flash``): out = the patched model in the test dtype, ref_lo =
the unpatched model in the test dtype, ref_hi = the unpatched model in float64; for the logits, the
loss and every parameter's gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: these tests build its InternVL"
)

from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLModel  # noqa: E402
from transformers.models.internvl import modeling_internvl  # noqa: E402

import nvlm_kernels as nk  # noqa: E402
from nvlm_kernels.integrations.transformers import (  # noqa: E402
    apply_nvlm_kernels,
    apply_nvlm_kernels_to_internvl,
    nvlm_kernels_patched,
    revert_nvlm_kernels,
)
from nvlm_kernels.testing import OpCalls, assert_close_flash, require_backend  # noqa: E402

IMAGE_TOKEN = 95
LAYERS = 2
TILES = 6


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tiny models are all small GEMMs: on a loaded 2-core machine two intra-op threads ran
    this file three times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(qk_norm: bool = True, **overrides) -> InternVLConfig:
    vision = dict(
        hidden_size=128, num_attention_heads=2, intermediate_size=128, num_hidden_layers=LAYERS,
        image_size=[56, 56], patch_size=[14, 14], use_qk_norm=qk_norm, norm_type="layer_norm",
        use_mean_pooling=True, layer_scale_init_value=0.1,
    )  # fmt: skip
    text = dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=96, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    args = dict(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=4)
    return InternVLConfig(**{**args, **overrides})


def _model(config: InternVLConfig, seed: int = 0, cls=InternVLForConditionalGeneration):
    torch.manual_seed(seed)
    model = cls(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # constants at init (norms, biases, CLS, positions) get noise
            if p.numel() == 1 or p.std() == 0 or p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two samples: one image of 2 tiles (8 image tokens) and right padding; two images of 1 and 3
    tiles (4 + 12 image tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (2, 36), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, 2:10] = IMAGE_TOKEN
    ids[0, 30:] = 0
    mask[0, 30:] = 0
    ids[1, 1:5] = IMAGE_TOKEN
    ids[1, 9:21] = IMAGE_TOKEN
    labels = ids.masked_fill((ids == IMAGE_TOKEN) | (mask == 0), -100)
    pixels = torch.randn(TILES, 3, 56, 56, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def _run(model, batch, dtype):
    """(logits, loss, {name: grad}) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _check_flash(config, dtype, backend, *, seed=0, device="cpu"):
    """Patched (``backend``) vs unpatched (dtype, float64): logits, loss, every gradient; and
    the ops that ran."""
    lo = _model(config, seed).to(device, dtype)
    hi = copy.deepcopy(lo).double()
    patched = copy.deepcopy(lo)
    report = apply_nvlm_kernels(patched)
    assert len(report.replaced) == LAYERS + 1, str(report)
    batch = _batch(seed)
    ctx = nk.use_backend(backend) if backend != "auto" else torch.enable_grad()
    with ctx, OpCalls() as calls:
        out = _run(patched, batch, dtype)
    ref_lo, ref_hi = _run(lo, batch, dtype), _run(hi, batch, torch.float64)
    attention = "vit_qk_norm_attention" if config.vision_config.use_qk_norm else "vit_attention"
    assert calls.count(attention) == LAYERS and calls.count("mlp_projector") == 1, calls.labels
    assert_close_flash(out[0], ref_lo[0], ref_hi[0], name="logits")
    assert_close_flash(out[1], ref_lo[1], ref_hi[1], name="loss")
    assert out[2].keys() == ref_lo[2].keys() == ref_hi[2].keys()
    assert len(out[2]) == len(list(lo.parameters()))  # every parameter gets a gradient
    for name, grad in out[2].items():
        assert_close_flash(grad, ref_lo[2][name], ref_hi[2][name], name=f"d {name}")


@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "no_qk_norm"])
def test_reference_backend_float32(qk_norm):
    _check_flash(_config(qk_norm), torch.float32, "reference")


def test_auto_runs_the_peers_float32():
    _check_flash(_config(), torch.float32, "auto", seed=3)


def test_triton_interpreter_float16():
    require_backend("vit_qk_norm_attention", "triton", "cpu")
    _check_flash(_config(), torch.float16, "triton", seed=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the compiled Triton kernels need one")
def test_cuda_triton_bfloat16():
    _check_flash(_config(), torch.bfloat16, "triton", seed=6, device="cuda")


def test_compiled_image_features_fullgraph():
    """torch.compile(fullgraph=True) traces the patched get_image_features (our ops included) and
    gives the eager result."""
    model = _model(_config(), seed=9)
    apply_nvlm_kernels(model)
    pixels = _batch(9)["pixel_values"]
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x: model.model.get_image_features(pixel_values=x).pooler_output, fullgraph=True, backend="aot_eager"
    )
    with torch.no_grad():
        eager = model.model.get_image_features(pixel_values=pixels).pooler_output
        torch.testing.assert_close(compiled(pixels), eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(vision_feature_layer=-2, projector_hidden_act="gelu_pytorch_tanh"),
        dict(vision_feature_layer=0, projector_hidden_act="gelu_new"),
    ],
    ids=["layer-2-gelu_tanh", "layer0-gelu_new"],
)
def test_feature_layer_and_projector_activation(overrides):
    config = _config(**overrides)
    model = _model(config, seed=7)
    patched = copy.deepcopy(model)
    apply_nvlm_kernels_to_internvl(patched)
    batch = _batch(7)
    with torch.no_grad():
        expected = model(**batch).logits
        with nk.use_backend("reference"), OpCalls() as calls:
            got = patched(**batch).logits
    assert calls.count("mlp_projector") == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_twenty_adamw_steps_match():
    """The same training run, patched (auto) and unpatched: the loss of every step and the final
    parameters within Liger-Kernel's fp32 multimodal convergence tolerances (linkedin/Liger-Kernel
    test/convergence/fp32/test_mini_models_multimodal.py: loss atol 1e-8 / rtol 1e-5, params atol
    5e-3 / rtol 1e-5). Liger trains at lr 1e-4, where AdamW moves a parameter by at most 20 x 1e-4 in
    20 steps: inside param_atol whatever the gradients. At lr 1e-2 the parameters move by up to 0.2,
    so the parameter check can fail."""
    config = _config()
    reference = _model(config, seed=11).train()
    patched = copy.deepcopy(reference)
    apply_nvlm_kernels(patched)
    losses = {}
    for name, model in (("reference", reference), ("patched", patched)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for step in range(20):
            batch = _batch(100 + step % 4)
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["patched"]), torch.tensor(losses["reference"]), atol=1e-8, rtol=1e-5)
    assert losses["reference"][-1] < 0.8 * losses["reference"][0], losses["reference"]  # it trained
    start = dict(_model(config, seed=11).named_parameters())
    moved = max((p - start[n]).abs().max().item() for n, p in reference.named_parameters())
    assert moved > 0.05, moved
    for (name, p), (_, q) in zip(patched.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=5e-3, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_generate_gives_the_same_tokens():
    model = _model(_config(), seed=13)
    patched = copy.deepcopy(model)
    apply_nvlm_kernels(patched)
    batch = {k: v for k, v in _batch(13).items() if k != "labels"}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(**batch, **kwargs)
    with OpCalls() as calls:
        got = patched.generate(**batch, **kwargs)
    assert calls.count("mlp_projector") == 1 and calls.count("vit_qk_norm_attention") == LAYERS  # prefill only
    assert got.shape == expected.shape and got.shape[1] > batch["input_ids"].shape[1]
    assert torch.equal(got, expected)


def _instance_state(model) -> dict[str, set[str]]:
    return {name: set(module.__dict__) for name, module in model.named_modules()}


def test_revert_restores_the_model_exactly():
    model = _model(_config(), seed=17)
    batch = _batch(17)
    before_state = _instance_state(model)
    parameters = dict(model.named_parameters())
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(**batch).logits
        with nvlm_kernels_patched(model) as report:
            assert len(report.replaced) == LAYERS + 1
            assert dict(model.named_parameters()) == parameters  # the same Parameter objects
            assert list(model.state_dict()) == keys
            with OpCalls() as calls:
                model(**batch)
            assert calls.count("mlp_projector") == 1
        with OpCalls() as calls:
            after = model(**batch).logits
    assert calls.labels == []
    assert torch.equal(before, after)
    assert _instance_state(model) == before_state  # no attribute of ours left on any module


def test_patching_twice_is_idempotent():
    model = _model(_config(), seed=19)
    first = apply_nvlm_kernels(model)
    second = apply_nvlm_kernels_to_internvl(model)
    assert len(first.replaced) == LAYERS + 1
    assert second.replaced == [] and len(second.unchanged) == LAYERS + 1
    assert all("already patched" in line for line in second.unchanged), str(second)
    with torch.no_grad(), OpCalls() as calls:
        model(**_batch(19))
    assert calls.count("vit_qk_norm_attention") == LAYERS and calls.count("mlp_projector") == 1
    assert len(revert_nvlm_kernels(model)) == LAYERS + 1


def test_options_select_what_is_replaced():
    model = _model(_config(), seed=23)
    batch = _batch(23)
    report = apply_nvlm_kernels_to_internvl(model, projector=False)
    assert len(report.replaced) == LAYERS and any("projector=False" in line for line in report.unchanged)
    with torch.no_grad(), OpCalls() as calls:
        model(**batch)
    assert calls.count("vit_qk_norm_attention") == LAYERS and calls.count("mlp_projector") == 0
    revert_nvlm_kernels(model)
    report = apply_nvlm_kernels(model, vision_attention=False)
    assert len(report.replaced) == 1
    with torch.no_grad(), OpCalls() as calls:
        model(**batch)
    assert calls.count("vit_qk_norm_attention") == 0 and calls.count("mlp_projector") == 1
    revert_nvlm_kernels(model)


def test_class_level_patch_before_the_model_is_built():
    instance = _model(_config(), seed=29)
    apply_nvlm_kernels(instance)
    original_attention = modeling_internvl.InternVLVisionAttention.forward
    original_features = modeling_internvl.InternVLModel.get_image_features
    try:
        report = apply_nvlm_kernels_to_internvl()
        assert len(report.replaced) == 2, str(report)
        assert apply_nvlm_kernels_to_internvl().replaced == []  # idempotent at class level too
        model = _model(_config(), seed=29)  # built after the patch
        assert not any("_nvlm_kernels_patched" in m.__dict__ for m in model.modules())
        batch = _batch(29)
        with torch.no_grad(), OpCalls() as calls:
            got = model(**batch).logits
            expected = instance(**batch).logits
        assert calls.count("vit_qk_norm_attention") == 2 * LAYERS and calls.count("mlp_projector") == 2
        assert torch.equal(got, expected)
        # an InternVLModel (no LM head) is served by the same class-level patch
        base = _model(_config(), seed=29, cls=InternVLModel)
        with torch.no_grad(), OpCalls() as calls:
            base.get_image_features(pixel_values=batch["pixel_values"])
        assert calls.count("mlp_projector") == 1
    finally:
        restored = revert_nvlm_kernels()
    assert len(restored) == 2
    assert modeling_internvl.InternVLVisionAttention.forward is original_attention
    assert modeling_internvl.InternVLModel.get_image_features is original_features
    with torch.no_grad(), OpCalls() as calls:
        model(**batch)
    assert calls.labels == []


def test_calls_the_ops_cannot_serve_run_the_model_code():
    """Autocast and an attention mask run the model's own code (no op range opens); the output is
    the unpatched model's."""
    model = _model(_config(), seed=31)
    patched = copy.deepcopy(model)
    apply_nvlm_kernels(patched)
    batch = _batch(31)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OpCalls() as calls:
        got = patched(**batch).logits
        expected = model(**batch).logits
    assert calls.labels == []
    assert torch.equal(got, expected)
    attention = patched.model.vision_tower.encoder.layer[0].attention
    x = torch.randn(2, 17, 128)
    mask = torch.zeros(2, 1, 17, 17)
    with torch.no_grad(), OpCalls() as calls:
        out, _ = attention(x, attention_mask=mask)
    assert calls.labels == []
    torch.testing.assert_close(out, model.model.vision_tower.encoder.layer[0].attention(x, attention_mask=mask)[0])


def test_unsupported_models_and_options_are_errors():
    with pytest.raises(TypeError, match="Linear"):
        apply_nvlm_kernels(torch.nn.Linear(2, 2))
    text = transformers.Qwen2ForCausalLM(_config().text_config)
    with pytest.raises(TypeError, match="Qwen2ForCausalLM"):
        apply_nvlm_kernels(text)
    with pytest.raises(TypeError, match="Qwen2ForCausalLM"):
        apply_nvlm_kernels_to_internvl(text)
    model = _model(_config(), seed=37)
    with pytest.raises(TypeError, match="strict_image_masking"):
        apply_nvlm_kernels(model, strict_image_masking=True)
    with pytest.raises(TypeError, match="cross_attention"):
        apply_nvlm_kernels(model, cross_attention=False)
    with pytest.raises(TypeError, match="bool"):
        apply_nvlm_kernels_to_internvl(model, projector="yes")
    assert not any("_nvlm_kernels_patched" in m.__dict__ for m in model.modules())


def test_with_liger_kernel_patch(monkeypatch):
    """Liger-Kernel's InternVL patch and ours on the same model.

    Liger's kernels need a GPU (its RMSNorm and LayerNorm fail on CPU tensors, even through the
    Triton interpreter), so its patch is applied where its own kernels are bypassed: the vision
    q_norm / k_norm (Liger binds LigerRMSNorm.forward onto them; our fused attention reads their
    weight and variance_epsilon instead of calling them), with layer_norm=False (it would patch the
    vision LayerNorms) and the text model left out (its Qwen2 patch would replace norms, RoPE and
    SwiGLU with GPU kernels). Liger's class-level edits of transformers' InternVL module are undone.
    Both orders are checked: the forward still matches the unpatched model."""
    liger = pytest.importorskip("liger_kernel.transformers.monkey_patch", reason="liger-kernel is not installed")
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    rms_norm_class = modeling_internvl.InternVLVisionRMSNorm
    monkeypatch.setattr(modeling_internvl, "InternVLVisionRMSNorm", rms_norm_class)
    monkeypatch.setattr(
        modeling_internvl.InternVLForConditionalGeneration,
        "forward",
        modeling_internvl.InternVLForConditionalGeneration.forward,
    )
    monkeypatch.delitem(liger.MODEL_TYPE_TO_APPLY_LIGER_FN, "qwen2", raising=False)
    model = _model(_config(), seed=41)
    batch = _batch(41)
    with torch.no_grad():
        expected = model(**batch).logits
    for ours_first in (True, False):
        both = copy.deepcopy(model)
        if ours_first:
            apply_nvlm_kernels(both)
        liger.apply_liger_kernel_to_internvl(
            model=both, rms_norm=True, layer_norm=False, fused_linear_cross_entropy=False, cross_entropy=False
        )
        # Liger replaced the module's class for models built later (process-wide): put it back, or its
        # next call would not recognize the norms of a model built before
        modeling_internvl.InternVLVisionRMSNorm = rms_norm_class
        if not ours_first:
            assert len(apply_nvlm_kernels(both).replaced) == LAYERS + 1
        q_norm = both.model.vision_tower.encoder.layer[0].attention.q_norm
        assert q_norm.forward.__func__ is LigerRMSNorm.forward  # Liger's patch is on
        with torch.no_grad(), nk.use_backend("reference"), OpCalls() as calls:
            got = both(**batch).logits
        assert calls.count("vit_qk_norm_attention") == LAYERS
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
