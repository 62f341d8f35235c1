"""NVTX ranges for Nsight, one per public op, labelled ``nvlm.<module>.<op>[.fwd|.bwd]``, domain "nvlm".

Uses the ``nvtx`` package's domain API with the event attributes of each label built once, so a
range costs well under a microsecond (``nvtx.annotate`` costs several, which matters for ops whose
kernels take tens of microseconds). Without the package, ranges are no-ops (``torch.cuda.nvtx``
raises on a CPU-only torch). Ranges are skipped while ``torch.compile`` traces: a Python context
manager around a custom op would otherwise break ``fullgraph=True``.
"""

from __future__ import annotations

import torch

try:
    import nvtx as _nvtx_package
except ImportError:  # nvtx is a declared dependency; keep the ops usable without it
    _nvtx_package = None

DOMAIN = "nvlm"
_domain = _nvtx_package.get_domain(DOMAIN) if _nvtx_package is not None else None
_attributes: dict[str, object] = {}


def push(label: str) -> None:
    attributes = _attributes.get(label)
    if attributes is None:
        attributes = _attributes.setdefault(label, _domain.get_event_attributes(message=label))
    _domain.push_range(attributes)


def pop() -> None:
    _domain.pop_range()


class range:  # noqa: A001 - reads like nvtx's own ranges: ``with _nvtx.range("nvlm.kernels.x.fwd"):``
    __slots__ = ("_label", "_active")

    def __init__(self, label: str) -> None:
        self._label = label
        self._active = False

    def __enter__(self) -> None:
        self._active = _domain is not None and not torch.compiler.is_compiling()
        if self._active:
            push(self._label)

    def __exit__(self, *exc: object) -> bool:
        if self._active:
            pop()
        return False
