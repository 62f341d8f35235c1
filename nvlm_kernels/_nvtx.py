"""NVTX ranges for Nsight, one per public op, labelled ``nvlm.<module>.<op>[.fwd|.bwd]``.

Uses the ``nvtx`` package (a no-op without a GPU; ``torch.cuda.nvtx`` raises on a CPU-only torch).
Ranges are skipped while ``torch.compile`` traces: a Python context manager around a custom op
would otherwise break ``fullgraph=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

try:
    import nvtx as _nvtx
except ImportError:  # nvtx is a declared dependency; keep the ops usable without it
    _nvtx = None

_DOMAIN = "nvlm"


@contextlib.contextmanager
def range(label: str) -> Iterator[None]:  # noqa: A001 - mirrors nvtx.annotate
    if _nvtx is None or torch.compiler.is_compiling():
        yield
        return
    with _nvtx.annotate(label, domain=_DOMAIN):
        yield
