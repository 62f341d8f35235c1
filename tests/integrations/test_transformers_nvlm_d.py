"""NVLM-D's released remote code (``nvidia/NVLM-D-72B``, trust_remote_code) on our ops.

The remote code cannot be imported here (it comes with the checkpoint), and it is not copied into
the project: the model below is a stand-in written for these tests from its description
(shared/docs/nvlm-spec.md §3-§5 and the published class and attribute names): the same class names
(``NVLM_D_Model``, ``InternVisionModel``, ``InternAttention``, ``InternRMSNorm``), attribute names
(``vision_model``, ``language_model``, ``mlp1``, ``extract_feature``, ``select_layer``,
``downsample_ratio``, ``ps_version``, ``pixel_shuffle``; ``qkv``, ``q_norm``, ``k_norm``, ``proj``,
``attn_drop``, ``proj_drop``, ``num_heads``, ``head_dim``, ``num_dummy_heads``, ``scale``,
``qk_normalization``) and forward semantics: InternViT with NVLM's dummy heads (the real heads
padded with dummy ones; qkv holds q, k, v blocks of all the padded heads; q_norm / k_norm are
InternRMSNorms over the padded width whose mean square covers the real features; proj reads the
padded width), CLS drop, InternVL's pixel shuffle (v2 and v1), mlp1 = LayerNorm, Linear, GELU,
Linear without biases, Qwen2 as the language model (transformers' own). Tiny sizes: 2 real heads of
64 + 1 dummy head, 2 layers, 56-pixel tiles (16 patches + CLS -> 4 image tokens per tile).

How the norm spells "the mean square over the real features" is not published in what we could
read, so the stand-in keeps it private (``_statistic_features``) and the patch has to find it out;
a variant normalizes over the whole padded width, the other plausible reading, which the patch must
follow too. The dummy heads' weights are random here (the checkpoint's are zero): the patch must
compute exactly what the model computes, whatever they hold.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: the stand-in uses its Qwen2 and output classes"
)

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

import nvlm_kernels as nk  # noqa: E402
from nvlm_kernels.integrations.transformers import (  # noqa: E402
    apply_nvlm_kernels,
    apply_nvlm_kernels_to_nvlm_d,
    nvlm_kernels_patched,
    revert_nvlm_kernels,
)
from nvlm_kernels.testing import OpCalls, assert_close_flash, require_backend  # noqa: E402

IMG_CONTEXT = 95
LAYERS = 2
TILES = 6
HIDDEN, HEADS, DUMMY = 128, 2, 1


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """These tiny models are all small GEMMs: on a loaded 2-core machine two intra-op threads ran
    this file three times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# the stand-in (see the module docstring)


class InternRMSNorm(nn.Module):
    """RMSNorm: mean square in float32 (over the first ``_statistic_features`` features), the
    normalized value in the input dtype, times the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, statistic_features: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self._statistic_features = statistic_features or hidden_size

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        mean_square = x[..., : self._statistic_features].pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(mean_square + self.variance_epsilon)).to(dtype)


class InternAttention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embed_dim = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.head_dim = self.embed_dim // self.num_heads
        self.num_dummy_heads = cfg["num_dummy_heads"]
        self.dummy_dim = (self.num_heads + self.num_dummy_heads) * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.dummy_dim, bias=cfg["qkv_bias"])
        self.attn_drop = nn.Dropout(cfg["attention_dropout"])
        self.proj_drop = nn.Dropout(0.0)
        self.qk_normalization = cfg["qk_normalization"]
        if self.qk_normalization:
            over = cfg["norm_over"]
            statistic = self.embed_dim if over == "real" else self.dummy_dim if over == "padded" else over
            eps = cfg["layer_norm_eps"]
            self.q_norm = InternRMSNorm(self.dummy_dim, eps=eps, statistic_features=statistic)
            self.k_norm = InternRMSNorm(self.dummy_dim, eps=eps, statistic_features=statistic)
        self.proj = nn.Linear(self.dummy_dim, self.embed_dim)

    def _naive_attn(self, x):
        batch, tokens, _ = x.shape
        heads = self.num_heads + self.num_dummy_heads
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_normalization:  # the norm sees all heads of a token at once
            q = self.q_norm(q.transpose(1, 2).flatten(-2)).view(batch, tokens, heads, -1).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).flatten(-2)).view(batch, tokens, heads, -1).transpose(1, 2)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj_drop(self.proj(x))

    def forward(self, hidden_states):
        return self._naive_attn(hidden_states)


class InternMLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.act = nn.GELU()
        self.fc1 = nn.Linear(cfg["hidden_size"], cfg["intermediate_size"])
        self.fc2 = nn.Linear(cfg["intermediate_size"], cfg["hidden_size"])

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.attn = InternAttention(cfg)
        self.mlp = InternMLP(cfg)
        self.norm1 = InternRMSNorm(cfg["hidden_size"], cfg["layer_norm_eps"])
        self.norm2 = InternRMSNorm(cfg["hidden_size"], cfg["layer_norm_eps"])
        self.ls1 = nn.Parameter(0.1 * torch.ones(cfg["hidden_size"]))
        self.ls2 = nn.Parameter(0.1 * torch.ones(cfg["hidden_size"]))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layers = nn.ModuleList([InternVisionEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])

    def forward(self, x, output_hidden_states=False):
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return x, tuple(states) if output_hidden_states else None


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden, patch = cfg["hidden_size"], cfg["patch_size"]
        self.class_embedding = nn.Parameter(torch.randn(1, 1, hidden))
        self.patch_embedding = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)
        positions = (cfg["image_size"] // patch) ** 2 + 1
        self.position_embedding = nn.Parameter(torch.randn(1, positions, hidden))

    def forward(self, pixel_values):
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)


class InternVisionModel(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)

    def forward(self, pixel_values=None, output_hidden_states=None, return_dict=None):
        last, states = self.encoder(self.embeddings(pixel_values), output_hidden_states=bool(output_hidden_states))
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last[:, 0], hidden_states=states)


class NVLM_D_Model(nn.Module):  # noqa: N801 - the remote code's class name
    def __init__(self, vision: dict, text: Qwen2Config, select_layer=-1, ps_version="v2", downsample_ratio=0.5):
        super().__init__()
        self.select_layer = select_layer
        self.ps_version = ps_version
        self.downsample_ratio = downsample_ratio
        self.img_context_token_id = IMG_CONTEXT
        self.vision_model = InternVisionModel(vision)
        self.language_model = Qwen2ForCausalLM(text)
        shuffled = vision["hidden_size"] * int(1 / downsample_ratio) ** 2
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(shuffled),
            nn.Linear(shuffled, text.intermediate_size, bias=False),
            nn.GELU(),
            nn.Linear(text.intermediate_size, text.hidden_size, bias=False),
        )

    def pixel_shuffle(self, x, scale_factor=0.5):
        """InternVL's shuffle (nvlm-spec §4.1): merge column pairs into channels, swap the spatial
        axes, merge row pairs; v2 swaps the axes back."""
        n, rows, cols, c = x.shape
        x = x.reshape(n, rows, int(cols * scale_factor), int(c / scale_factor)).transpose(1, 2).contiguous()
        x = x.reshape(n, int(cols * scale_factor), int(rows * scale_factor), int(c / scale_factor**2))
        return x if self.ps_version == "v1" else x.transpose(1, 2).contiguous()

    def extract_feature(self, pixel_values):
        if self.select_layer == -1:
            out = self.vision_model(pixel_values=pixel_values, output_hidden_states=False, return_dict=True)
            vit_embeds = out.last_hidden_state
        else:
            out = self.vision_model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
            vit_embeds = out.hidden_states[self.select_layer]
        vit_embeds = vit_embeds[:, 1:, :]  # CLS dropped
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = self.pixel_shuffle(vit_embeds.reshape(vit_embeds.shape[0], side, side, -1), self.downsample_ratio)
        return self.mlp1(vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1]))

    def _embeds(self, pixel_values, input_ids, image_flags=None):
        embeds = self.language_model.get_input_embeddings()(input_ids)
        vit_embeds = self.extract_feature(pixel_values)
        if image_flags is not None:
            vit_embeds = vit_embeds[image_flags.squeeze(-1) == 1]
        selected = input_ids == self.img_context_token_id
        embeds = embeds.clone()
        embeds[selected] = embeds[selected] * 0.0 + vit_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(self, pixel_values, input_ids, attention_mask=None, image_flags=None, labels=None):
        embeds = self._embeds(pixel_values, input_ids, image_flags)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, attention_mask=None, **kwargs):
        embeds = self._embeds(pixel_values, input_ids)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)


def _vision_config(**overrides) -> dict:
    cfg = dict(
        hidden_size=HIDDEN, num_attention_heads=HEADS, num_dummy_heads=DUMMY, intermediate_size=128,
        num_hidden_layers=LAYERS, image_size=56, patch_size=14, qkv_bias=False, qk_normalization=True,
        layer_norm_eps=1e-6, attention_dropout=0.0, norm_over="real",
    )  # fmt: skip
    return {**cfg, **overrides}


def _text_config() -> Qwen2Config:
    return Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=96, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip


def _model(seed: int = 0, **kwargs) -> NVLM_D_Model:
    vision = _vision_config(**kwargs.pop("vision", {}))
    torch.manual_seed(seed)
    model = NVLM_D_Model(vision, _text_config(), **kwargs).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():  # constants at init (norms, biases, layer scales) get noise
            if p.dim() == 1 or p.std() == 0:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two samples: one image of 2 tiles and right padding; two images of 1 and 3 tiles."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (2, 36), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, 2:10] = IMG_CONTEXT
    ids[0, 30:] = 0
    mask[0, 30:] = 0
    ids[1, 1:5] = IMG_CONTEXT
    ids[1, 9:21] = IMG_CONTEXT
    labels = ids.masked_fill((ids == IMG_CONTEXT) | (mask == 0), -100)
    pixels = torch.randn(TILES, 3, 56, 56, generator=gen)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}


def _run(model, batch, dtype):
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in batch.items()}
    out = model(**{**inputs, "pixel_values": inputs["pixel_values"].to(dtype)})
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _check_flash(dtype, backend, *, seed=0, vision=None, device="cpu", **kwargs):
    lo = _model(seed, vision=vision or {}, **kwargs).to(device, dtype)
    hi = copy.deepcopy(lo).double()
    patched = copy.deepcopy(lo)
    report = apply_nvlm_kernels(patched)
    assert len(report.replaced) == LAYERS + 1, str(report)
    batch = _batch(seed)
    ctx = nk.use_backend(backend) if backend != "auto" else torch.enable_grad()
    with ctx, OpCalls() as calls:
        out = _run(patched, batch, dtype)
    ref_lo, ref_hi = _run(lo, batch, dtype), _run(hi, batch, torch.float64)
    qk_norm = (vision or {}).get("qk_normalization", True)
    assert calls.count("vit_qk_norm_attention" if qk_norm else "vit_attention") == LAYERS, calls.labels
    assert calls.count("mlp_projector") == 1, calls.labels
    assert_close_flash(out[0], ref_lo[0], ref_hi[0], name="logits")
    assert_close_flash(out[1], ref_lo[1], ref_hi[1], name="loss")
    assert out[2].keys() == ref_lo[2].keys() == ref_hi[2].keys()
    if kwargs.get("select_layer", -1) == -1:  # every parameter takes part (an earlier layer leaves the last out)
        assert len(out[2]) == len(list(lo.parameters()))
    for name, grad in out[2].items():
        assert_close_flash(grad, ref_lo[2][name], ref_hi[2][name], name=f"d {name}")
    return report


@pytest.mark.parametrize("norm_over", ["real", "padded"])
def test_reference_backend_float32(norm_over):
    report = _check_flash(torch.float32, "reference", vision={"norm_over": norm_over})
    statistic = HIDDEN if norm_over == "real" else (HEADS + DUMMY) * (HIDDEN // HEADS)
    assert f"{HEADS + DUMMY} heads of 64, {DUMMY} dummy; norm statistic over {statistic} features" in str(report)


def test_reference_backend_without_qk_norm_v1_shuffle_and_an_earlier_layer():
    _check_flash(
        torch.float32, "reference", seed=2, vision={"qk_normalization": False}, ps_version="v1", select_layer=-2
    )


def test_auto_runs_the_peers_float32():
    _check_flash(torch.float32, "auto", seed=3)


def test_triton_interpreter_float16():
    require_backend("vit_qk_norm_attention", "triton", "cpu")
    _check_flash(torch.float16, "triton", seed=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the compiled Triton kernels need one")
def test_cuda_triton_bfloat16():
    _check_flash(torch.bfloat16, "triton", seed=6, device="cuda")


def test_twenty_adamw_steps_match():
    """Patched (auto) and unpatched training: every step's loss and the final parameters within
    Liger-Kernel's fp32 multimodal convergence tolerances (linkedin/Liger-Kernel
    test/convergence/fp32/test_mini_models_multimodal.py: loss atol 1e-8 / rtol 1e-5, params atol
    5e-3 / rtol 1e-5), at lr 1e-2 so that the parameters move well past param_atol (at Liger's lr
    1e-4, 20 AdamW steps move none by more than 2e-3, and the parameter check could not fail)."""
    reference = _model(11).train()
    patched = copy.deepcopy(reference)
    apply_nvlm_kernels(patched)
    losses = {}
    for name, model in (("reference", reference), ("patched", patched)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[name] = []
        for step in range(20):
            optimizer.zero_grad()
            loss = model(**_batch(100 + step % 4)).loss
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["patched"]), torch.tensor(losses["reference"]), atol=1e-8, rtol=1e-5)
    assert losses["reference"][-1] < 0.8 * losses["reference"][0], losses["reference"]
    start = dict(_model(11).named_parameters())
    assert max((p - start[n]).abs().max().item() for n, p in reference.named_parameters()) > 0.05
    for (name, p), (_, q) in zip(patched.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=5e-3, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_generate_gives_the_same_tokens():
    model = _model(13)
    patched = copy.deepcopy(model)
    apply_nvlm_kernels_to_nvlm_d(patched)
    batch = {k: v for k, v in _batch(13).items() if k != "labels"}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(**batch, **kwargs)
    with OpCalls() as calls:
        got = patched.generate(**batch, **kwargs)
    assert calls.count("mlp_projector") == 1 and calls.count("vit_qk_norm_attention") == LAYERS
    assert got.shape == expected.shape and got.shape[1] >= 6
    assert torch.equal(got, expected)


def test_revert_restores_the_model_exactly_and_patching_twice_is_idempotent():
    model = _model(17)
    batch = _batch(17)
    state = {name: set(m.__dict__) for name, m in model.named_modules()}
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        before = model(**batch).logits
        with nvlm_kernels_patched(model) as report:
            assert len(report.replaced) == LAYERS + 1
            again = apply_nvlm_kernels(model)
            assert again.replaced == [] and len(again.unchanged) == LAYERS + 1, str(again)
            assert dict(model.named_parameters()) == parameters
            with OpCalls() as calls:
                model(**batch)
            assert calls.count("vit_qk_norm_attention") == LAYERS and calls.count("mlp_projector") == 1
        with OpCalls() as calls:
            after = model(**batch).logits
    assert calls.labels == [] and torch.equal(before, after)
    assert {name: set(m.__dict__) for name, m in model.named_modules()} == state
    assert revert_nvlm_kernels(model) == []


def test_options_and_what_is_left_alone():
    model = _model(19)
    report = apply_nvlm_kernels(model, projector=False)
    assert len(report.replaced) == LAYERS and "extract_feature (projector=False)" in str(report)
    revert_nvlm_kernels(model)
    report = apply_nvlm_kernels_to_nvlm_d(model, vision_attention=False)
    assert len(report.replaced) == 1 and str(report).count("vision_attention=False") == LAYERS
    revert_nvlm_kernels(model)
    del model.select_layer  # an extract_feature that is not InternVL's: left to the model
    report = apply_nvlm_kernels(model)
    assert len(report.replaced) == LAYERS and "select_layer" in str(report)
    revert_nvlm_kernels(model)


def test_a_norm_our_op_does_not_compute_is_left_alone():
    """A q_norm / k_norm whose statistic covers neither the real nor all features: the attention is
    left to the model (the report says why), the projector is still ours, the output the model's."""
    model = _model(31, vision={"norm_over": 100})
    patched = copy.deepcopy(model)
    report = apply_nvlm_kernels(patched)
    assert len(report.replaced) == 1 and "extract_feature" in report.replaced[0]
    assert str(report).count("not an RMSNorm over the first 128 or all 192 features") == LAYERS, str(report)
    batch = _batch(31)
    with torch.no_grad(), OpCalls() as calls:
        got = patched(**batch).logits
        expected = model(**batch).logits
    assert calls.count("vit_qk_norm_attention") == 0 and calls.count("mlp_projector") == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_calls_the_ops_cannot_serve_run_the_model_code():
    """Autocast and attention dropout in training run the model's own code."""
    model = _model(23, vision={"attention_dropout": 0.5})
    patched = copy.deepcopy(model)
    apply_nvlm_kernels(patched)
    batch = _batch(23)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), OpCalls() as calls:
        got = patched(**batch).logits
        expected = model(**batch).logits
    assert calls.labels == [] and torch.equal(got, expected)
    patched.train()
    with torch.no_grad(), OpCalls() as calls:
        patched(**batch)
    assert calls.count("vit_qk_norm_attention") == 0 and calls.count("mlp_projector") == 1


def test_unsupported_models_and_options_are_errors():
    with pytest.raises(TypeError, match="pass the model"):
        apply_nvlm_kernels_to_nvlm_d(None)
    with pytest.raises(TypeError, match="InternVisionModel"):
        apply_nvlm_kernels_to_nvlm_d(InternVisionModel(_vision_config()))

    class NotNVLM(nn.Module):  # the right parts under another name
        def __init__(self):
            super().__init__()
            self.vision_model, self.language_model, self.mlp1 = nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 1)

        def extract_feature(self, x):
            return x

    with pytest.raises(TypeError, match="NotNVLM"):
        apply_nvlm_kernels(NotNVLM())
    model = _model(29)
    with pytest.raises(TypeError, match="strict_image_masking"):
        apply_nvlm_kernels(model, strict_image_masking=True)
    with pytest.raises(TypeError, match="bool"):
        apply_nvlm_kernels_to_nvlm_d(model, projector=1)
    assert not any("_nvlm_kernels_patched" in m.__dict__ for m in model.modules())
