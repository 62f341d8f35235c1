"""NVTX ranges for Nsight, one per public op, labelled ``nvlm.<module>.<op>[.fwd|.bwd]``, domain "nvlm".

Ranges are off by default and then cost one module-level bool check. They are on when

* ranges are enabled: ``NVLM_NVTX=1`` in the environment (read once, at import), ``enable()``, or
  the CLI's ``--nvtx``. Then a range pushes an NVTX range (when the ``nvtx`` package is installed)
  and, while the torch profiler records, a ``record_function`` range with the same label, so a
  torch.profiler Chrome trace shows the names Nsight shows;
* an observer listens (``add_observer``): ``nvlm.profiling.StageTimer`` times model stages from
  the range events without turning NVTX on.

NVTX uses the ``nvtx`` package's domain API with the event attributes of each label built once, so a
range costs well under a microsecond (``nvtx.annotate`` costs several, which matters for ops whose
kernels take tens of microseconds). Without the package, only the NVTX part is a no-op
(``torch.cuda.nvtx`` raises on a CPU-only torch). Ranges are skipped while ``torch.compile`` traces:
a Python context manager around a custom op would otherwise break ``fullgraph=True``.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

try:
    import nvtx as _nvtx_package
except ImportError:  # nvtx is a declared dependency; keep the ops usable without it
    _nvtx_package = None

DOMAIN = "nvlm"
ENV_VAR = "NVLM_NVTX"
_domain = _nvtx_package.get_domain(DOMAIN) if _nvtx_package is not None else None
_attributes: dict[str, object] = {}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class RangeObserver(Protocol):
    """Receives the label of every range entered and left while it is registered."""

    def range_enter(self, label: str) -> None: ...

    def range_exit(self, label: str) -> None: ...


def parse_env_flag(value: str | None) -> bool:
    """``NVLM_NVTX``'s value -> on/off. Unset or empty is off; an unknown value is off with a warning
    rather than an error, as it is read at import, where raising would make every op unusable."""
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text not in _FALSE:
        import warnings

        warnings.warn(f"{ENV_VAR}={value!r} is neither of {_TRUE} nor {_FALSE}: NVTX ranges stay off", stacklevel=2)
    return False


_enabled = parse_env_flag(os.environ.get(ENV_VAR))
_observers: list[RangeObserver] = []
# What range.__enter__ checks, the one test on the hot path when everything is off: enabled or observed.
_ranges_on = _enabled


def _update_ranges_on() -> None:
    global _ranges_on
    _ranges_on = _enabled or bool(_observers)


def enable(on: bool = True) -> None:
    """Turn NVTX / torch.profiler ranges on (or off with ``on=False``) for the whole process."""
    global _enabled
    _enabled = bool(on)
    _update_ranges_on()


def disable() -> None:
    enable(False)


def is_enabled() -> bool:
    return _enabled


def add_observer(observer: RangeObserver) -> None:
    _observers.append(observer)
    _update_ranges_on()


def remove_observer(observer: RangeObserver) -> None:
    _observers.remove(observer)
    _update_ranges_on()


def push(label: str) -> None:
    attributes = _attributes.get(label)
    if attributes is None:
        attributes = _attributes.setdefault(label, _domain.get_event_attributes(message=label))
    _domain.push_range(attributes)


def pop() -> None:
    _domain.pop_range()


class range:  # noqa: A001 - reads like nvtx's own ranges: ``with _nvtx.range("nvlm.kernels.x.fwd"):``
    __slots__ = ("_label", "_active", "_pushed", "_profiler_range")

    def __init__(self, label: str) -> None:
        self._label = label
        self._active = False

    def __enter__(self) -> None:
        # Off: one global read. The compile check comes second so it costs nothing when off.
        self._active = _ranges_on and not torch.compiler.is_compiling()
        if not self._active:
            return
        self._pushed = _enabled and _domain is not None
        if self._pushed:
            push(self._label)
        self._profiler_range = None
        if _enabled and torch._C._autograd._profiler_enabled():
            self._profiler_range = torch.autograd.profiler.record_function(self._label)
            self._profiler_range.__enter__()
        for observer in _observers:
            observer.range_enter(self._label)

    def __exit__(self, *exc: object) -> bool:
        if not self._active:
            return False
        # Observers leave first, as they entered last: their times exclude the NVTX and profiler calls.
        for observer in reversed(_observers):
            observer.range_exit(self._label)
        if self._profiler_range is not None:
            self._profiler_range.__exit__(None, None, None)
        if self._pushed:
            pop()
        return False
