"""InternVL (transformers' own ``InternVLForConditionalGeneration`` / ``InternVLModel``) on our ops.

What is replaced (options ``vision_attention`` and ``projector``, both on by default):

* ``InternVLVisionAttention.forward``: q_proj, k_proj, v_proj as the model computes them, then
  ``nk.vit_qk_norm_attention((q, k, v), q_norm.weight, k_norm.weight, ...)`` (the full-width
  q_norm / k_norm fused into the attention; the three projections' outputs read in place, no
  concatenation) or, for checkpoints without QK-norm (``use_qk_norm=False``: the norms are
  ``nn.Identity``), ``nk.vit_attention`` on [T, S, H, D] views; then projection_layer and its
  dropout as the model has them. The norm weights and eps are read from the modules at each call
  (``weight``, ``variance_epsilon`` or ``eps``; Liger-Kernel's RMSNorm patch of those modules, with
  its ``offset``, is read the same way). The attention weights are not returned (None, like SDPA).
* ``InternVLModel.get_image_features``: the vision tower as the model runs it, then its CLS drop
  (``vision_feature_select_strategy="default"``), pixel shuffle (``downsample_ratio``; transformers'
  InternVL shuffle is the v2 token order, the one ``nk.mlp_projector`` calls "v2") and
  ``multi_modal_projector`` (LayerNorm, linear_1, act, linear_2) in one ``nk.mlp_projector`` call
  reading the projector's own Parameters; ``vision_feature_layer`` picks the hidden state as the
  model does (``-1``: the last).

A call the ops cannot serve runs the model's own code for that call: an attention mask, attention
dropout in training, autocast (the model's own dtype rules apply), a norm that is not an RMSNorm
over the full width, a projector activation that is not a GELU, a list of feature layers, a
non-square token grid. Parameters stay where they are: names, checkpoints and optimizers see the same
tensors.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

import nvlm_kernels as nk
from nvlm_kernels.integrations.transformers import _patching, _vision
from nvlm_kernels.integrations.transformers._patching import PatchReport

FAMILY = "InternVL"
OPTIONS = ("vision_attention", "projector")


def _modeling():
    from transformers.models.internvl import modeling_internvl

    return modeling_internvl


def _transformers_available() -> bool:
    try:
        _modeling()
    except ImportError:
        return False
    return True


def matches(model: nn.Module) -> bool:
    if not _transformers_available():
        return False
    m = _modeling()
    return isinstance(model, (m.InternVLForConditionalGeneration, m.InternVLModel))


def classes() -> tuple[type, ...]:
    m = _modeling()
    return (m.InternVLVisionAttention, m.InternVLModel)


# --------------------------------------------------------------------------------------------------
# vision attention


def _attention_plan(attn: nn.Module) -> tuple[str, tuple | None] | str:
    """("qk_norm", (wq, wk, eps)) or ("plain", None) for this attention module now, or why our ops
    cannot compute it."""
    width = attn.num_heads * attn.head_dim
    q_norm, k_norm = attn.q_norm, attn.k_norm
    if isinstance(q_norm, nn.Identity) and isinstance(k_norm, nn.Identity):
        return "plain", None
    q = _vision.rms_norm_params(q_norm, width)
    k = _vision.rms_norm_params(k_norm, width)
    for which, params in (("q_norm", q), ("k_norm", k)):
        if isinstance(params, str):
            return f"{which}: {params}"
    if q[1] != k[1]:
        return f"q_norm and k_norm have different eps ({q[1]} and {k[1]})"
    if not (q[0].dtype == k[0].dtype == attn.q_proj.weight.dtype):
        return "the norm weights' dtype differs from the projections' (the model's own type promotion applies)"
    return "qk_norm", (q[0], k[0], q[1])


def _attention_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """InternVLVisionAttention.forward on our ops (see the module docstring); the model's own code
    for a call they cannot serve."""
    plan = _attention_plan(self)
    if (
        attention_mask is not None
        or isinstance(plan, str)
        or _vision.vision_fallback_reason(hidden_states, self, self.attention_dropout)
    ):
        original = _patching.unpatched_attribute(type(self), "forward")
        return original(self, hidden_states, attention_mask, **kwargs)
    batch, tokens, _ = hidden_states.shape
    q = self.q_proj(hidden_states)
    k = self.k_proj(hidden_states)
    v = self.v_proj(hidden_states)
    kind, norm = plan
    if kind == "qk_norm":
        wq, wk, eps = norm
        out = nk.vit_qk_norm_attention((q, k, v), wq, wk, num_heads=self.num_heads, eps=eps, softmax_scale=self.scale)
    else:
        heads = (x.view(batch, tokens, self.num_heads, self.head_dim) for x in (q, k, v))
        out = nk.vit_attention(*heads, softmax_scale=self.scale)
    output = self.projection_layer(out.reshape(batch, tokens, self.embed_dim))
    return self.projection_dropout(output), None


# --------------------------------------------------------------------------------------------------
# projector


def _projector(model: nn.Module) -> _vision.Projector | str:
    p = getattr(model, "multi_modal_projector", None)
    if p is None:
        return "the model has no multi_modal_projector"
    parts = [getattr(p, name, None) for name in ("layer_norm", "linear_1", "act", "linear_2")]
    if any(part is None for part in parts):
        return f"its projector {type(p).__name__} is not LayerNorm, linear_1, act, linear_2"
    return _vision.projector_params(*parts)


def _features_reason(self, features: torch.Tensor, drop_cls: bool) -> str | None:
    """Why the CLS drop + shuffle + projector of these features cannot be one op call, else None."""
    return _vision.grid_reason(features.shape[1] - int(drop_cls), self.config.downsample_ratio)


def _image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs):
    """InternVLModel.get_image_features with the CLS drop, pixel shuffle and multi_modal_projector in
    one ``nk.mlp_projector`` call (the config defaults are merged in by the same decorators as the
    model's own method)."""
    projector = _projector(self)
    if (
        not isinstance(vision_feature_layer, int)
        or isinstance(projector, str)
        or _vision.vision_fallback_reason(pixel_values, self)
    ):
        return _own_image_features(
            self, pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, **kwargs,
        )  # fmt: skip
    pixel_values = pixel_values.to(dtype=self.dtype)
    if vision_feature_layer != -1:
        kwargs["output_hidden_states"] = True
    vision_outputs = self.vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
    if vision_feature_layer == -1:
        features = vision_outputs.last_hidden_state
    else:
        features = vision_outputs.hidden_states[vision_feature_layer]
    drop_cls = vision_feature_select_strategy == "default"
    if _features_reason(self, features, drop_cls) or projector.reason_for(features):
        ratio = self.config.downsample_ratio
        own = _vision.own_shuffle_and_projector_input(features, drop_cls, self.pixel_shuffle, ratio)
        vision_outputs.pooler_output = self.multi_modal_projector(own)
        return vision_outputs
    vision_outputs.pooler_output = projector(
        features, pixel_shuffle=self.config.downsample_ratio, drop_cls=drop_cls, version="v2"
    )
    return vision_outputs


def _own_image_features(self, **kwargs):
    """The model's get_image_features (without our class-level patch), through its decorators (which
    take these arguments by keyword)."""
    return _patching.unpatched_attribute(type(self), "get_image_features")(self, **kwargs)


@functools.cache
def _decorated_image_features():
    """``_image_features`` under the decorators of transformers' own method (config defaults for
    vision_feature_layer / vision_feature_select_strategy; return_dict handling)."""
    from transformers.utils.generic import can_return_tuple, merge_with_config_defaults

    @merge_with_config_defaults
    @can_return_tuple
    def get_image_features(
        self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
    ):
        return _image_features(self, pixel_values, vision_feature_layer, vision_feature_select_strategy, **kwargs)

    return get_image_features


def _image_features_supported() -> str | None:
    """Why this transformers version's get_image_features is not the one we reproduce, else None."""
    own = _patching.unpatched_attribute(_modeling().InternVLModel, "get_image_features")
    params = list(inspect.signature(own).parameters)
    expected = ["self", "pixel_values", "vision_feature_layer", "vision_feature_select_strategy", "kwargs"]
    if params != expected:
        return f"this transformers' InternVLModel.get_image_features{tuple(params)} differs from the one reproduced"
    return None


# --------------------------------------------------------------------------------------------------
# apply


def _check_bool(options: dict) -> None:
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"apply_nvlm_kernels: option {name} must be a bool, got {type(value).__name__}")


def apply(model: nn.Module | None = None, **options) -> PatchReport:
    """Patch ``model`` (this instance), or with ``model=None`` InternVL's classes (every model, built
    before or after). Options: vision_attention, projector (bools, default True)."""
    _patching.reject_options(FAMILY, options, OPTIONS)
    _check_bool(options)
    vision_attention = options.get("vision_attention", True)
    projector = options.get("projector", True)
    m = _modeling()
    if model is None:
        return _apply_classes(m, vision_attention, projector)
    if not matches(model):
        raise TypeError(
            f"apply_nvlm_kernels_to_internvl: {type(model).__module__}.{type(model).__name__} is not an "
            "InternVLForConditionalGeneration or InternVLModel"
        )
    report = PatchReport(target=f"{type(model).__name__} (this instance)")
    for path, module in model.named_modules():
        if isinstance(module, m.InternVLVisionAttention):
            if not vision_attention:
                report.unchanged.append(f"{path}: forward (vision_attention=False)")
                continue
            plan = _attention_plan(module)
            if isinstance(plan, str):
                report.unchanged.append(f"{path}: forward ({plan}; the model's own attention runs)")
                continue
            what = "nk.vit_qk_norm_attention (q_norm/k_norm fused)" if plan[0] == "qk_norm" else "nk.vit_attention"
            _patching.patch_method(module, "forward", _attention_forward, report, path, what)
        elif isinstance(module, m.InternVLModel):
            _patch_image_features(module, path or type(model).__name__, projector, report)
    return report


def _patch_image_features(module: nn.Module, path: str, enabled: bool, report: PatchReport) -> None:
    if not enabled:
        report.unchanged.append(f"{path}: get_image_features (projector=False)")
        return
    reason = _image_features_supported() or (lambda p: p if isinstance(p, str) else None)(_projector(module))
    if reason:
        report.unchanged.append(f"{path}: get_image_features ({reason})")
        return
    what = "vision tower + nk.mlp_projector (CLS drop, pixel shuffle v2, multi_modal_projector)"
    _patching.patch_method(module, "get_image_features", _decorated_image_features(), report, path, what)


def _apply_classes(m, vision_attention: bool, projector: bool) -> PatchReport:
    report = PatchReport(target="InternVL classes (class level: every model, built before or after)")
    if vision_attention:
        _patching.patch_class(
            m.InternVLVisionAttention, "forward", _attention_forward, report,
            "nk.vit_qk_norm_attention / nk.vit_attention",
        )  # fmt: skip
    else:
        report.unchanged.append("InternVLVisionAttention.forward (vision_attention=False)")
    reason = _image_features_supported()
    if not projector:
        report.unchanged.append("InternVLModel.get_image_features (projector=False)")
    elif reason:
        report.unchanged.append(f"InternVLModel.get_image_features ({reason})")
    else:
        _patching.patch_class(
            m.InternVLModel, "get_image_features", _decorated_image_features(), report,
            "vision tower + nk.mlp_projector (CLS drop, pixel shuffle v2, multi_modal_projector)",
        )  # fmt: skip
    return report
