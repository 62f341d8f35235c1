"""NVLM-D (the released ``nvidia/NVLM-D-72B`` remote code, loaded with ``trust_remote_code``) on our ops.

Its classes are not importable ahead of time, so the model is recognized by class name and structure:
an ``NVLM_D_Model`` with ``vision_model`` (InternViT-6B: ``InternVisionModel``), ``language_model``
(Qwen2), ``mlp1`` (Sequential(LayerNorm, Linear, GELU, Linear)) and ``extract_feature``. Only this
instance is patched (``model`` is required: there are no classes to patch ahead of time).

What is replaced (options ``vision_attention`` and ``projector``, both on by default):

* each ``InternAttention.forward`` (a module of that class name with a fused ``qkv`` Linear and
  ``proj``): ``qkv`` as the model computes it, then ``nk.vit_qk_norm_attention(qkv, q_norm.weight,
  k_norm.weight, num_heads=<padded heads>, norm_features=<real features>)`` — NVLM's padded layout
  (25 real + 7 dummy heads = 32 heads of 128: qkv [.., 3·4096], q_norm / k_norm over 4096 features
  whose statistic covers the 3200 real ones, nvlm-spec §3.1) kept as it is: the dummy heads are
  computed like the model computes them (zero weights give zero outputs), ``proj`` reads the
  [.., 4096] result. The padded head count comes from the shapes (qkv's rows / 3·head_dim), the real
  width from ``num_heads · head_dim``; over how many features the norm takes its statistic is asked
  of the norm module once at patch time (``_vision.padded_norm_features``: the description's 3200,
  or all 4096 if that is what the module computes). Without QK-norm (``qk_normalization=False``):
  ``nk.vit_attention`` on [T, S, H, D] views of qkv.
* ``NVLM_D_Model.extract_feature``: the vision model as the model calls it (``select_layer``: -1
  the last hidden state, else that hidden state), then the CLS drop, pixel shuffle
  (``downsample_ratio``, ``ps_version`` "v1"/"v2") and ``mlp1`` in one ``nk.mlp_projector`` call
  reading mlp1's own Parameters. ``forward`` and ``generate`` call ``extract_feature``, so both run it.

A call the ops cannot serve runs the model's own code for that call (autocast, attention dropout in
training, a dtype or grid our op does not take). Parameters stay where they are.
"""

from __future__ import annotations

import torch
from torch import nn

import nvlm_kernels as nk
from nvlm_kernels.integrations.transformers import _patching, _vision
from nvlm_kernels.integrations.transformers._patching import PatchReport

FAMILY = "NVLM-D"
OPTIONS = ("vision_attention", "projector")

MODEL_CLASS = "NVLM_D_Model"
ATTENTION_CLASS = "InternAttention"


def matches(model: nn.Module) -> bool:
    """An ``NVLM_D_Model`` (remote code: by class name) with the parts the patch reads."""
    return (
        type(model).__name__ == MODEL_CLASS
        and all(
            isinstance(getattr(model, name, None), nn.Module) for name in ("vision_model", "language_model", "mlp1")
        )
        and callable(getattr(model, "extract_feature", None))
    )


def classes() -> tuple[type, ...]:
    """None ahead of time: NVLM-D's classes come with the checkpoint (trust_remote_code)."""
    return ()


# --------------------------------------------------------------------------------------------------
# InternAttention


def _attention_layout(attn: nn.Module) -> tuple[int, int, int] | str:
    """(padded heads, head_dim, real features) of an InternAttention, or why it is not one we serve."""
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        return "it has no qkv and proj Linear layers"
    heads = getattr(attn, "num_heads", None)
    head_dim = getattr(attn, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int) or heads < 1 or head_dim < 1:
        return "it has no num_heads / head_dim"
    if qkv.out_features % (3 * head_dim):
        return f"qkv's {qkv.out_features} outputs are not 3 x heads x head_dim {head_dim}"
    padded = qkv.out_features // (3 * head_dim)
    if padded < heads or proj.in_features != padded * head_dim:
        return f"qkv ({qkv.out_features}) and proj ({proj.in_features}) do not agree on {padded} heads of {head_dim}"
    return padded, head_dim, heads * head_dim


def _attention_plan(attn: nn.Module) -> dict | str:
    """What the patched forward of this module runs, decided once at patch time."""
    layout = _attention_layout(attn)
    if isinstance(layout, str):
        return layout
    padded, head_dim, real = layout
    plan = {"heads": padded, "head_dim": head_dim, "norm_features": None, "real_heads": real // head_dim}
    if getattr(attn, "qk_normalization", False):
        width = padded * head_dim
        for which in ("q_norm", "k_norm"):
            params = _vision.rms_norm_params(getattr(attn, which, nn.Identity()), width)
            if isinstance(params, str):
                return f"{which}: {params}"
        features = [_vision.padded_norm_features(getattr(attn, w), width, real) for w in ("q_norm", "k_norm")]
        for which, value in zip(("q_norm", "k_norm"), features, strict=True):
            if isinstance(value, str):
                return f"{which}: {value}"
        if features[0] != features[1]:
            return f"q_norm and k_norm take their statistic over {features[0]} and {features[1]} features"
        plan["norm_features"] = features[0]
    return plan


def _make_attention_forward(plan: dict):
    heads, head_dim, norm_features = plan["heads"], plan["head_dim"], plan["norm_features"]

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """InternAttention.forward on our ops (see the module docstring)."""
        dropout = float(getattr(getattr(self, "attn_drop", None), "p", 0.0) or 0.0)
        norms = None
        if norm_features is not None:
            width = heads * head_dim
            q, k = (_vision.rms_norm_params(getattr(self, w), width) for w in ("q_norm", "k_norm"))
            if not isinstance(q, str) and not isinstance(k, str) and q[1] == k[1] and q[0].dtype == k[0].dtype:
                norms = (q[0], k[0], q[1])
        if (
            args
            or kwargs
            or (norm_features is not None and (norms is None or norms[0].dtype != self.qkv.weight.dtype))
            or _vision.vision_fallback_reason(hidden_states, self, dropout)
        ):
            return type(self).forward(self, hidden_states, *args, **kwargs)
        batch, tokens, _ = hidden_states.shape
        qkv = self.qkv(hidden_states)
        scale = getattr(self, "scale", head_dim**-0.5)
        if norms is not None:
            wq, wk, eps = norms
            out = nk.vit_qk_norm_attention(
                qkv, wq, wk, num_heads=heads, eps=eps, norm_features=norm_features, softmax_scale=scale
            )
        else:
            q, k, v = qkv.view(batch, tokens, 3, heads, head_dim).unbind(2)
            out = nk.vit_attention(q, k, v, softmax_scale=scale)
        x = self.proj(out.reshape(batch, tokens, heads * head_dim))
        drop = getattr(self, "proj_drop", None)
        return drop(x) if drop is not None else x

    return forward


# --------------------------------------------------------------------------------------------------
# extract_feature


def _projector(model: nn.Module) -> _vision.Projector | str:
    mlp1 = model.mlp1
    if not isinstance(mlp1, nn.Sequential) or len(mlp1) != 4:
        return f"its mlp1 is not Sequential(LayerNorm, Linear, GELU, Linear) ({type(mlp1).__name__})"
    return _vision.projector_params(*mlp1)


def _extract_reason(model: nn.Module) -> str | None:
    """Why this model's extract_feature is not the one reproduced, else None."""
    if not isinstance(getattr(model, "select_layer", None), int):
        return "the model has no integer select_layer (not InternVL-style extract_feature)"
    if getattr(model, "ps_version", None) not in ("v1", "v2"):
        return f"ps_version {getattr(model, 'ps_version', None)!r} is not 'v1' or 'v2'"
    if not isinstance(getattr(model, "downsample_ratio", None), (int, float)):
        return "the model has no downsample_ratio"
    if not callable(getattr(model, "pixel_shuffle", None)):
        return "the model has no pixel_shuffle"
    projector = _projector(model)
    return projector if isinstance(projector, str) else None


def _extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
    """NVLM_D_Model.extract_feature with the CLS drop, pixel shuffle and mlp1 in one
    ``nk.mlp_projector`` call."""
    projector = _projector(self)
    if isinstance(projector, str) or _vision.vision_fallback_reason(pixel_values, self):
        return type(self).extract_feature(self, pixel_values)
    if self.select_layer == -1:
        outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=False, return_dict=True)
        features = outputs.last_hidden_state
    else:
        outputs = self.vision_model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        features = outputs.hidden_states[self.select_layer]
    ratio = self.downsample_ratio
    if _vision.grid_reason(features.shape[1] - 1, ratio) or projector.reason_for(features):
        return self.mlp1(_vision.own_shuffle_and_projector_input(features, True, self.pixel_shuffle, ratio))
    return projector(features, pixel_shuffle=ratio, drop_cls=True, version=self.ps_version)


# --------------------------------------------------------------------------------------------------
# apply


def apply(model: nn.Module | None = None, **options) -> PatchReport:
    """Patch this NVLM-D instance. Options: vision_attention, projector (bools, default True)."""
    _patching.reject_options(FAMILY, options, OPTIONS)
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"apply_nvlm_kernels: option {name} must be a bool, got {type(value).__name__}")
    if model is None:
        raise TypeError(
            "apply_nvlm_kernels_to_nvlm_d: pass the model: NVLM-D's classes come with its checkpoint "
            "(trust_remote_code), so there are no classes to patch ahead of time"
        )
    if not matches(model):
        raise TypeError(
            f"apply_nvlm_kernels_to_nvlm_d: {type(model).__module__}.{type(model).__name__} is not NVLM-D's "
            f"{MODEL_CLASS} (with vision_model, language_model, mlp1 and extract_feature)"
        )
    vision_attention = options.get("vision_attention", True)
    projector = options.get("projector", True)
    report = PatchReport(target=f"{type(model).__name__} (this instance)")
    for path, module in model.vision_model.named_modules(prefix="vision_model"):
        if type(module).__name__ != ATTENTION_CLASS:
            continue
        if not vision_attention:
            report.unchanged.append(f"{path}: forward (vision_attention=False)")
            continue
        if _patching.is_patched(module, "forward"):
            report.unchanged.append(f"{path}: forward already patched")
            continue
        plan = _attention_plan(module)
        if isinstance(plan, str):
            report.unchanged.append(f"{path}: forward ({plan}; the model's own attention runs)")
            continue
        if plan["norm_features"] is not None:
            what = (
                f"nk.vit_qk_norm_attention ({plan['heads']} heads of {plan['head_dim']}, "
                f"{plan['heads'] - plan['real_heads']} dummy; norm statistic over {plan['norm_features']} features)"
            )
        else:
            what = f"nk.vit_attention ({plan['heads']} heads of {plan['head_dim']})"
        _patching.patch_method(module, "forward", _make_attention_forward(plan), report, path, what)
    name = type(model).__name__
    if not projector:
        report.unchanged.append(f"{name}: extract_feature (projector=False)")
    elif reason := _extract_reason(model):
        report.unchanged.append(f"{name}: extract_feature ({reason})")
    else:
        what = "vision model + nk.mlp_projector (CLS drop, pixel shuffle, mlp1)"
        _patching.patch_method(model, "extract_feature", _extract_feature, report, name, what)
    return report
