"""Hugging Face ``transformers`` models on our ops, in one call (Liger-Kernel style).

    from nvlm_kernels.integrations.transformers import apply_nvlm_kernels
    report = apply_nvlm_kernels(model)        # InternVL, Mllama or NVLM-D (remote code): this instance
    print(report)                             # what was replaced, what was left alone and why
    revert_nvlm_kernels(model)                # exactly as before

    apply_nvlm_kernels_to_internvl()          # class level, before from_pretrained: every model built after

Per family:

* ``apply_nvlm_kernels_to_internvl(model=None, *, vision_attention=True, projector=True)``
  (transformers' ``InternVLForConditionalGeneration`` / ``InternVLModel``);
* ``apply_nvlm_kernels_to_mllama(model=None, *, cross_attention=True, vision_attention=True,
  strict_image_masking=False)`` (``MllamaForConditionalGeneration`` / ``MllamaModel``);
* ``apply_nvlm_kernels_to_nvlm_d(model, *, vision_attention=True, projector=True)`` (the released
  ``nvidia/NVLM-D-72B`` remote code, recognized by class name and structure);
* ``register_nvlm_attention()``: the zero-patch route, ``attn_implementation="nvlm"``.

With ``model=None`` the patch goes on the family's own classes (models built afterwards, and those
already built, use it); with a model only that instance changes. Parameters, their names and
checkpoints never change. ``torch.nn`` and other models' classes are never patched. ``transformers``
stays optional: it is imported when a function here is called, never by ``import nvlm_kernels``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

from torch import nn

from nvlm_kernels.integrations.transformers._patching import PatchReport, revert_classes, revert_model

__all__ = [
    "PatchReport",
    "apply_nvlm_kernels",
    "apply_nvlm_kernels_to_internvl",
    "apply_nvlm_kernels_to_mllama",
    "apply_nvlm_kernels_to_nvlm_d",
    "nvlm_kernels_patched",
    "register_nvlm_attention",
    "revert_nvlm_kernels",
]

# family modules, each with FAMILY (a name), OPTIONS, matches(model) -> bool, classes() -> the
# classes its class-level patch touches, and apply(model | None, **options) -> PatchReport
_FAMILIES = ("_internvl", "_mllama", "_nvlm_d")


def _family(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def _family_of(model) -> object:
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_nvlm_kernels: expected a torch.nn.Module model, got {type(model).__name__}")
    for name in _FAMILIES:
        family = _family(name)
        if family.matches(model):
            return family
    supported = ", ".join(_family(name).FAMILY for name in _FAMILIES)
    raise TypeError(
        f"apply_nvlm_kernels: {type(model).__module__}.{type(model).__name__} is not a model nvlm_kernels can patch "
        f"(supported: {supported})"
    )


def apply_nvlm_kernels(model: nn.Module, **options) -> PatchReport:
    """Patch ``model`` (this instance) with our ops, whichever supported family it is; ``options``
    are the family's (an option that does not apply to it is a TypeError). Returns the report."""
    return _family_of(model).apply(model, **options)


def apply_nvlm_kernels_to_internvl(
    model: nn.Module | None = None, *, vision_attention: bool = True, projector: bool = True
) -> PatchReport:
    return _family("_internvl").apply(model, vision_attention=vision_attention, projector=projector)


def apply_nvlm_kernels_to_mllama(
    model: nn.Module | None = None,
    *,
    cross_attention: bool = True,
    vision_attention: bool = True,
    strict_image_masking: bool = False,
) -> PatchReport:
    return _family("_mllama").apply(
        model, cross_attention=cross_attention, vision_attention=vision_attention,
        strict_image_masking=strict_image_masking,
    )  # fmt: skip


def apply_nvlm_kernels_to_nvlm_d(
    model: nn.Module, *, vision_attention: bool = True, projector: bool = True
) -> PatchReport:
    return _family("_nvlm_d").apply(model, vision_attention=vision_attention, projector=projector)


def revert_nvlm_kernels(model: nn.Module | None = None) -> list[str]:
    """Undo the patches: on ``model`` (its instance-level patches), or with ``model=None`` every
    class-level patch. Returns what was restored."""
    if model is None:
        return revert_classes()
    return revert_model(model)


@contextlib.contextmanager
def nvlm_kernels_patched(model: nn.Module, **options) -> Iterator[PatchReport]:
    """``with nvlm_kernels_patched(model) as report:`` the model runs on our ops inside, as before after."""
    report = apply_nvlm_kernels(model, **options)
    try:
        yield report
    finally:
        revert_nvlm_kernels(model)


def register_nvlm_attention() -> str:
    """Register the ``"nvlm"`` attention function with transformers' ``AttentionInterface`` (and
    its mask function with ``AttentionMaskInterface``); returns the name for ``attn_implementation``."""
    return _family("_attention").register()
