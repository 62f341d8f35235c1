"""What the InternVL and NVLM-D patches share: reading the parameters our ops need out of a model's
own modules (never copying them), recognizing which norms and activations our ops compute, and the
one fused projector call.

Every reader returns the values or a string saying why the module is not one our op computes (the
patch then leaves that module alone and says so in its report, or a patched method runs the model's
own code for that call).

* ``rms_norm_params(norm, width)``: (weight, eps) of an InternRMSNorm-style module (InternVL's
  ``InternVLVisionRMSNorm``, the remote code's ``InternRMSNorm``, apex's ``FusedRMSNorm``, or one that
  Liger-Kernel patched: ``LigerRMSNorm`` or its ``forward`` bound onto the module, with its
  ``variance_epsilon`` and ``offset``).
* ``padded_norm_features(norm, width, real)``: over how many features such a norm takes its
  statistic when the width holds dummy heads (NVLM's 4096 = 3200 real + 7 zero heads).
* ``projector_params(layer_norm, linear_1, act, linear_2)``: the arguments of ``nk.mlp_projector``
  for LayerNorm -> Linear -> GELU -> Linear (InternVL's ``multi_modal_projector``, NVLM-D's ``mlp1``).
* ``vision_fallback_reason(x, module)``: why a call must run the model's own code (autocast, whose
  dtype rules our ops do not follow; attention dropout in training).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

import nvlm_kernels as nk


def _number(module: nn.Module, *names: str) -> float | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def rms_norm_params(norm: nn.Module, width: int) -> tuple[torch.Tensor, float] | str:
    """(weight [width], eps) of an RMSNorm module over ``width`` features, read from the module (the
    Parameter itself; with Liger's ``offset`` the weight plus it, a [width] temporary that autograd
    differentiates into the Parameter), or why it is not one our fused QK-norm computes."""
    name = type(norm).__name__
    if "RMSNorm" not in name and "RMSNorm" not in norm._get_name():
        return f"its norm is a {name}, not an RMSNorm"
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return f"its {name} has no weight"
    if tuple(weight.shape) != (width,):
        return f"its {name} weight has shape {tuple(weight.shape)}, not ({width},)"
    eps = _number(norm, "variance_epsilon", "eps")
    if eps is None or not (eps > 0 and math.isfinite(eps)):
        return f"its {name} has no positive variance_epsilon / eps"
    offset = _number(norm, "offset") or 0.0  # Liger's RMSNorm: x_n · (offset + weight)
    return (weight + offset if offset else weight), eps


def padded_norm_features(norm: nn.Module, width: int, real: int) -> int | str:
    """Over how many leading features ``norm`` (an RMSNorm over ``width`` features of which the first
    ``real`` belong to real heads, the rest to dummy heads) takes its mean square, or why that is
    neither ``real`` nor ``width``.

    An attribute that says so wins (vLLM's ``variance_size_override`` / ``var_hidden_size``). Else the
    module is asked (one forward on a two-row probe whose dummy features are large, so that the two
    candidates differ by far more than rounding): NVLM's description says the statistic covers the
    ``real`` features (nvlm-spec §3.1); a module that normalizes over all ``width`` features is served
    too, and one that matches neither is refused. A module that cannot run here (meta tensors, a
    kernel this device lacks, e.g. Liger's RMSNorm on a CPU) is taken at the description's word."""
    if width == real:
        return width
    for attr in ("variance_size_override", "var_hidden_size", "norm_features"):
        value = getattr(norm, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= width:
            return value
    params = rms_norm_params(norm, width)
    if isinstance(params, str):
        return params
    weight, eps = params
    if weight.is_meta:
        return real
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(2, width, generator=gen)
    probe[:, real:] *= 4.0
    probe = probe.to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            out = norm(probe).float()
    except Exception:  # noqa: BLE001 - a module that cannot run here is taken at its description
        return real
    tolerance = 1e-4 if weight.dtype in (torch.float32, torch.float64) else 2e-2
    x = probe.float()
    w = weight.detach().float()
    for features in (real, width):
        expected = w * x * torch.rsqrt(x[:, :features].pow(2).mean(-1, keepdim=True) + eps)
        if torch.allclose(out, expected, rtol=tolerance, atol=tolerance * float(w.abs().max().clamp_min(1.0))):
            return features
    return f"its {type(norm).__name__} is not an RMSNorm over the first {real} or all {width} features"


_GELU_EXACT = ("GELUActivation",)
_GELU_TANH = ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation")


def activation_name(act: nn.Module) -> str | None:
    """ "gelu" (exact erf) or "gelu_tanh" for the GELU modules our projector computes, else None."""
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    name = type(act).__name__
    if name in _GELU_EXACT:
        return "gelu"
    if name in _GELU_TANH:
        return "gelu_tanh"
    return None


@dataclasses.dataclass(frozen=True)
class Projector:
    """The modules of LayerNorm -> Linear -> activation -> Linear, and the activation's name."""

    layer_norm: nn.Module
    linear_1: nn.Linear
    linear_2: nn.Linear
    activation: str

    def __call__(self, features: torch.Tensor, *, pixel_shuffle: float, drop_cls: bool, version: str) -> torch.Tensor:
        """``nk.mlp_projector`` on the ViT output [T, L, C] (CLS drop and shuffle fused), reading
        the modules' Parameters at this call (so a module swapped or re-loaded since is honoured)."""
        ln = self.layer_norm
        eps = _number(ln, "eps", "variance_epsilon")
        return nk.mlp_projector(
            features, ln.weight, getattr(ln, "bias", None), self.linear_1.weight, self.linear_2.weight,
            self.linear_1.bias, self.linear_2.bias, eps=eps, activation=self.activation,
            pixel_shuffle=pixel_shuffle, drop_cls=drop_cls, version=version,
        )  # fmt: skip

    def reason_for(self, features: torch.Tensor) -> str | None:
        """Why this call cannot go to our op (its tensors' dtypes or devices differ), else None."""
        ln_bias = getattr(self.layer_norm, "bias", None)
        tensors = [self.layer_norm.weight, self.linear_1.weight, self.linear_2.weight]
        tensors += [t for t in (ln_bias, self.linear_1.bias, self.linear_2.bias) if t is not None]
        if any(t.dtype != features.dtype or t.device != features.device for t in tensors):
            return "the projector's parameters and the vision features differ in dtype or device"
        return None


def projector_params(
    layer_norm: nn.Module, linear_1: nn.Module, act: nn.Module, linear_2: nn.Module
) -> Projector | str:
    """The projector our op computes, or why these modules are not one."""
    if not isinstance(layer_norm, nn.LayerNorm) and "LayerNorm" not in type(layer_norm).__name__:
        return f"its first module is a {type(layer_norm).__name__}, not a LayerNorm"
    weight = getattr(layer_norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return "its LayerNorm has no elementwise affine weight"
    if _number(layer_norm, "eps", "variance_epsilon") is None:
        return "its LayerNorm has no eps"
    for i, linear in ((1, linear_1), (2, linear_2)):
        if not isinstance(linear, nn.Linear):
            return f"its linear {i} is a {type(linear).__name__}, not an nn.Linear"
    if linear_1.in_features != weight.shape[0] or linear_2.in_features != linear_1.out_features:
        return "its LayerNorm and linears do not chain"
    activation = activation_name(act)
    if activation is None:
        return f"its activation {type(act).__name__} is not a GELU (exact or tanh) our projector computes"
    return Projector(layer_norm, linear_1, linear_2, activation)


def grid_reason(tokens: int, ratio: float) -> str | None:
    """Why ``tokens`` ViT tokens (CLS dropped) cannot be pixel-shuffled by ``ratio`` in our op."""
    downscale = round(1 / ratio) if ratio else 0
    if downscale < 1 or abs(downscale * ratio - 1) > 1e-9:
        return f"downsample ratio {ratio} is not 1/an integer"
    side = math.isqrt(max(tokens, 0))
    if tokens < 1 or side * side != tokens or side % downscale:
        return f"{tokens} tokens are not a square grid divisible by {downscale}"
    return None


def own_shuffle_and_projector_input(features: torch.Tensor, drop_cls: bool, pixel_shuffle, ratio: float):
    """The model's own steps between the ViT output and its projector (for a call our op cannot
    take after the tower ran): CLS drop, [N, side, side, C] grid, the model's ``pixel_shuffle``,
    rows of tokens."""
    if drop_cls:
        features = features[:, 1:, :]
    side = int(features.shape[1] ** 0.5)
    features = pixel_shuffle(features.reshape(features.shape[0], side, side, -1), scale_factor=ratio)
    return features.reshape(features.shape[0], -1, features.shape[-1])


def vision_fallback_reason(x: torch.Tensor, module: nn.Module, dropout: float = 0.0) -> str | None:
    """Why this call of a patched vision method runs the model's own code, else None."""
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is on (our ops take their inputs' dtype as it is)"
    if module.training and dropout > 0:
        return "attention dropout in training"
    return None
