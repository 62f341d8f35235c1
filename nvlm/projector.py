"""``MLPProjector``: the vision-to-language projector ("mlp1") as a module over ``nk.mlp_projector``.

It *is* an ``nn.Sequential`` of the layers InternVL / NVLM build (LayerNorm, Linear, GELU, Linear),
so its parameter names are theirs (``0.weight``, ``1.weight``, ``3.weight``, ...) and a Hugging
Face checkpoint's ``mlp1.*`` tensors load with ``load_state_dict`` as they are; only ``forward``
differs: one fused op, with the CLS drop and the pixel shuffle done inside the kernels' loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import nvlm_kernels as nk
from nvlm.parallel import TPGroup, copy_to_tp, reduce_from_tp

# preset -> (vision width, LayerNorm?, hidden ("llm" = the LLM width), out, biases?)
PRESETS: dict[str, dict[str, Any]] = {
    "nvlm-d-72b": {"vit_hidden": 3200, "layer_norm": True, "hidden": 29568, "out": 8192, "bias": False},
    "nvlm-h-72b": {"vit_hidden": 3200, "layer_norm": True, "hidden": 29568, "out": 8192, "bias": False},
    "nvlm-d-34b": {"vit_hidden": 3200, "layer_norm": True, "hidden": 20480, "out": 7168, "bias": False},
    "nvlm-h-34b": {"vit_hidden": 3200, "layer_norm": True, "hidden": 20480, "out": 7168, "bias": False},
    # NVLM-X: "a single Linear" (paper §4.5); whether a LayerNorm precedes it is unpublished.
    "nvlm-x-72b": {"vit_hidden": 3200, "layer_norm": False, "hidden": None, "out": 8192, "bias": False},
    "nvlm-x-34b": {"vit_hidden": 3200, "layer_norm": False, "hidden": None, "out": 7168, "bias": False},
}


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


class MLPProjector(nn.Sequential):
    """[LayerNorm(K)] -> Linear(K, hidden) -> GELU -> Linear(hidden, out), K = vit_hidden / s²;
    ``hidden=None`` is the one-layer form (Linear(K, out)).

    ``forward(x)`` takes the ViT's last hidden state [tiles, 1 + side², vit_hidden] (CLS first,
    ``drop_cls=True``) or [tiles, side², vit_hidden], or tokens already shuffled [tiles, L, K]
    (recognized by their width), and returns [tiles, side² · s², out].
    """

    def __init__(
        self,
        vit_hidden: int,
        out: int,
        hidden: int | None = None,
        *,
        layer_norm: bool = True,
        bias: bool = False,
        downsample_ratio: float = 0.5,
        ps_version: str = "v2",
        eps: float = 1e-5,
        activation: str = "gelu",
        drop_cls: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        features = round(vit_hidden / downsample_ratio**2)
        kw = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = [nn.LayerNorm(features, eps=eps, **kw)] if layer_norm else []
        # Tensor parallelism (nvlm.parallel): the first Linear column-, the second row-parallel. The
        # one-Linear form stays replicated (small; no collective needed).
        parallel = tp is not None and tp.parallel and hidden is not None
        if hidden is None:
            layers.append(nn.Linear(features, out, bias=bias, **kw))
        else:
            hidden = hidden // tp.size if parallel else hidden
            gelu = nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
            layers += [nn.Linear(features, hidden, bias=bias, **kw), gelu, nn.Linear(hidden, out, bias=bias, **kw)]
        super().__init__(*layers)
        self.vit_hidden, self.features = vit_hidden, features
        self.downsample_ratio, self.ps_version = downsample_ratio, ps_version
        self.eps, self.activation, self.drop_cls = eps, activation, drop_cls
        self.layer_norm = layer_norm
        self.tp = tp if parallel else None

    @classmethod
    def from_config(cls, config: str | Any, **overrides: Any) -> MLPProjector:
        """A preset name (``PRESETS``: "nvlm-d-72b", "nvlm-h-34b", "nvlm-x-72b", ...), or a Hugging
        Face NVLM-D / InternVL chat config (an object or dict with ``vision_config.hidden_size``,
        ``llm_config.hidden_size``, ``downsample_ratio``, ``ps_version``): NVLM-D's projector when
        ``llm_config.intermediate_size`` is used (``architectures`` names NVLM), else InternVL's
        (hidden = LLM width, biases). Keyword overrides win."""
        if isinstance(config, str):
            if config not in PRESETS:
                raise ValueError(f"unknown projector preset {config!r}; known: {sorted(PRESETS)}")
            return cls(**{**PRESETS[config], **overrides})
        vision, llm = _get(config, "vision_config"), _get(config, "llm_config")
        if vision is None or llm is None:
            raise ValueError("config must have vision_config and llm_config (an NVLM-D / InternVL chat config)")
        architectures = " ".join(_get(config, "architectures", None) or [])
        nvlm = "NVLM" in architectures or _get(config, "model_type", "") == "NVLM_D"
        llm_hidden = _get(llm, "hidden_size")
        kwargs = {
            "vit_hidden": _get(vision, "hidden_size"),
            "out": llm_hidden,
            "hidden": _get(llm, "intermediate_size") if nvlm else llm_hidden,
            "bias": not nvlm,
            "downsample_ratio": _get(config, "downsample_ratio", 0.5),
            "ps_version": _get(config, "ps_version", "v2"),
        }
        return cls(**{**kwargs, **overrides})

    def _parameters_for_op(self):
        layers = list(self)
        norm = layers.pop(0) if self.layer_norm else None
        first = layers[0]
        second = layers[2] if len(layers) == 3 else None
        return (
            norm.weight if norm is not None else None,
            norm.bias if norm is not None else None,
            first.weight,
            second.weight if second is not None else None,
            first.bias,
            second.bias if second is not None else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ln_w, ln_b, w1, w2, b1, b2 = self._parameters_for_op()
        if self.tp is not None:
            # The LayerNorm runs inside the fused op, after the split into column shards: each rank's
            # gradient of x and of the LayerNorm parameters covers only its columns, so all of them
            # are summed over the ranks in the backward pass (identity forward).
            x = copy_to_tp(x, self.tp)
            ln_w, ln_b = (copy_to_tp(t, self.tp) if t is not None else None for t in (ln_w, ln_b))
        if x.dim() == 3 and x.shape[-1] == self.features and self.features != self.vit_hidden:
            shuffle, drop_cls = None, False  # tokens already shuffled
        else:
            shuffle, drop_cls = self.downsample_ratio, self.drop_cls and x.dim() == 3 and _has_cls(x.shape[1])
        if self.tp is None:
            return nk.mlp_projector(
                x, ln_w, ln_b, w1, w2, b1, b2, eps=self.eps, activation=self.activation,
                pixel_shuffle=shuffle, drop_cls=drop_cls, version=self.ps_version,
            )  # fmt: skip
        partial = nk.mlp_projector(
            x, ln_w, ln_b, w1, w2, b1, None, eps=self.eps, activation=self.activation,
            pixel_shuffle=shuffle, drop_cls=drop_cls, version=self.ps_version,
        )  # fmt: skip
        out = reduce_from_tp(partial, self.tp)
        return out + b2 if b2 is not None else out  # the second bias once, after the sum over ranks


def _has_cls(length: int) -> bool:
    """A ViT sequence of 1 + side² tokens carries a CLS token (side² alone does not)."""
    side = int((length - 1) ** 0.5 + 0.5)
    return length > 1 and side * side == length - 1
