"""Backend selection shared by every op.

Each op has up to three implementations of its forward/backward kernels:

* ``cuda``      - the compiled extension ``nvlm_kernels._C`` (private ``torch.ops.nvlm_C`` ops).
                  On CUDA tensors its CUDA kernels run; on CPU tensors its C++ host kernels run,
                  which share the index math with the device code (that is how the host tests
                  check the CUDA index arithmetic without a GPU).
* ``triton``    - Triton kernels. On CUDA tensors with a GPU driver; on CPU tensors only through
                  the Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels are defined).
* ``reference`` - plain PyTorch, readable; the oracle and the CPU implementation.

Choice, strongest first: the innermost ``use_backend(...)`` context, then the environment variable
``NVLM_KERNELS_BACKEND`` (read at call time), then ``auto``. An explicitly requested backend that
cannot run raises ``BackendUnavailableError`` naming the reason; only ``auto`` falls back
(CUDA tensors: cuda -> triton -> reference; CPU tensors: reference), and it says so once through
``logging`` and always in ``python -m nvlm_kernels.info``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from nvlm_kernels import _extension

BACKENDS = ("cuda", "triton", "reference")
ENV_VAR = "NVLM_KERNELS_BACKEND"

_log = logging.getLogger("nvlm_kernels")

# (backend name or None, frozenset of op names or None for all ops)
_override: contextvars.ContextVar[tuple[str | None, frozenset[str] | None]] = contextvars.ContextVar(
    "nvlm_kernels_backend", default=(None, None)
)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op on these tensors."""


@dataclass(frozen=True)
class OpBackends:
    """Which backends an op implements. ``cuda_op`` is the nvlm_C op that proves the extension
    carries this op (checked with the dispatcher, so a stale build without it is detected)."""

    name: str
    has_triton: bool
    cuda_op: str | None  # e.g. "nvlm_C::pixel_shuffle_fwd"


_REGISTRY: dict[str, OpBackends] = {}


def register_op(name: str, *, has_triton: bool, cuda_op: str | None) -> OpBackends:
    entry = OpBackends(name, has_triton, cuda_op)
    _REGISTRY[name] = entry
    return entry


def registered_ops() -> dict[str, OpBackends]:
    return dict(_REGISTRY)


def _normalize(name: str, what: str) -> str:
    value = name.strip().lower()
    if value not in (*BACKENDS, "auto"):
        raise ValueError(f"{what} must be one of {(*BACKENDS, 'auto')}, got {name!r}")
    return value


@contextlib.contextmanager
def use_backend(name: str, ops: str | list[str] | tuple[str, ...] | None = None) -> Iterator[None]:
    """Run the enclosed ops on backend ``name`` ("cuda", "triton", "reference" or "auto").

    ``ops`` limits the override to some ops (e.g. ``ops="pixel_shuffle"``); others keep their
    outer choice. Thread- and task-local (a ``contextvars`` variable).
    """
    backend = _normalize(name, "use_backend(name)")
    if isinstance(ops, str):
        ops = (ops,)
    if ops is not None:
        unknown = [o for o in ops if o not in _REGISTRY]
        if unknown:
            raise ValueError(f"use_backend(ops=...) names unknown ops {unknown}; known: {sorted(_REGISTRY)}")
    token = _override.set((backend, frozenset(ops) if ops is not None else None))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend(op: str) -> str:
    """The backend asked for by context or environment for ``op`` ("auto" when none)."""
    backend, ops = _override.get()
    if backend is not None and (ops is None or op in ops):
        return backend
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _normalize(env, f"environment variable {ENV_VAR}")
    return "auto"


def remember_backend(ctx, op: str) -> None:
    """In an op's ``setup_context``: note the backend the forward was asked to run on, so that
    ``backward_backend`` runs the backward on it too, wherever ``backward()`` is called (a
    ``use_backend`` block around the forward alone is the common way to use it)."""
    ctx.nvlm_backend = requested_backend(op)


@contextlib.contextmanager
def backward_backend(ctx, op: str) -> Iterator[None]:
    """In an op's backward: the backend request in effect when its forward ran (see
    ``remember_backend``). Under torch.compile the compiled backward runs outside this, on the
    request in effect when it runs."""
    with use_backend(getattr(ctx, "nvlm_backend", "auto"), ops=op):
        yield


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


def why_unavailable(op: str, backend: str, device: torch.device | str) -> str | None:
    """None when ``backend`` can run ``op`` on tensors of ``device``, else the reason.

    Everything it looks at is fixed for the life of the process (the extension, the driver, the
    Triton import) except ``TRITON_INTERPRET``, which is part of the cache key: the answer is
    computed once, as ops are called on a hot path."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _why_unavailable(op, backend, device_type, triton_interpreter_enabled())


@functools.cache
def _why_unavailable(op: str, backend: str, device_type: str, interpreter: bool) -> str | None:
    device = torch.device(device_type)
    entry = _REGISTRY[op]
    if backend == "reference":
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if backend == "triton":
        if not entry.has_triton:
            return f"{op} has no Triton kernel"
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            if interpreter:
                return "TRITON_INTERPRET=1 is set, so Triton kernels run only on CPU tensors"
            return None
        if device.type == "cpu":
            if interpreter:
                return None
            return "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before import"
        return f"Triton backend does not support device type {device.type!r}"
    if backend == "cuda":
        if entry.cuda_op is None:
            return f"{op} has no compiled kernel"
        err = _extension.load_error()
        if err:
            return err
        key = {"cuda": "CUDA", "cpu": "CPU"}.get(device.type)
        if key is None:
            return f"the extension has no kernels for device type {device.type!r}"
        if not _extension.has_kernel(entry.cuda_op, key):
            if key == "CUDA":
                return "the extension was built without CUDA kernels (CPU torch or no nvcc at build time)"
            return f"the extension has no {key} kernel for {entry.cuda_op} (stale build? rebuild it)"
        return None
    raise ValueError(f"unknown backend {backend!r}")


_warned_fallback: set[tuple[str, str]] = set()


def auto_choice(op: str, device: torch.device | str) -> tuple[str, list[tuple[str, str]]]:
    """The backend ``auto`` picks for ``op`` on ``device``, and the (backend, reason) pairs skipped."""
    device = torch.device(device)
    order = ("cuda", "triton", "reference") if device.type == "cuda" else ("reference",)
    skipped: list[tuple[str, str]] = []
    for backend in order:
        reason = why_unavailable(op, backend, device)
        if reason is None:
            return backend, skipped
        skipped.append((backend, reason))
    raise AssertionError("reference is always available")  # pragma: no cover


def resolve(op: str, device: torch.device | str) -> str:
    """The backend that will run ``op`` on tensors of ``device`` now (raises if explicit and unusable)."""
    requested = requested_backend(op)
    if requested != "auto":
        reason = why_unavailable(op, requested, device)
        if reason is not None:
            raise BackendUnavailableError(
                f"nvlm_kernels.{op}: backend {requested!r} was requested but cannot run on "
                f"{torch.device(device).type} tensors: {reason}"
            )
        return requested
    backend, skipped = auto_choice(op, device)
    if skipped and torch.device(device).type == "cuda":
        key = (op, backend)
        if key not in _warned_fallback:
            _warned_fallback.add(key)
            _log.warning(
                "nvlm_kernels.%s: using the %s backend on CUDA tensors (%s)",
                op,
                backend,
                "; ".join(f"{b}: {r}" for b, r in skipped),
            )
    return backend


def eager_fast_path(*tensors: torch.Tensor) -> bool:
    """True when a public function may run its backend directly instead of through its registered
    torch.library op, because nobody could tell the difference: no torch.compile tracing, no
    autograd graph to record, plain tensors (no fake/meta subclass, no functorch transform) and no
    dispatch or function mode watching. The registered op costs tens of microseconds of Python
    per call, as much as a pixel-shuffle kernel on an H100; everything else takes the op path."""
    return eager_autograd_path(*tensors) and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def eager_autograd_path(*tensors: torch.Tensor) -> bool:
    """Like ``eager_fast_path`` but with an autograd graph allowed: the public function may record
    its own ``torch.autograd.Function`` around the same backend forward and backward instead of the
    registered op's autograd (torch.library's dispatch of a forward + backward costs about half a
    millisecond of Python, more than a small projector on a CPU)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch._C._is_torch_function_mode_enabled() or _get_current_dispatch_mode() is not None:
        return False
    return all(type(t) is torch.Tensor and not t.is_meta for t in tensors)


def resolve_supported(op: str, device: torch.device | str, unsupported: dict[str, str | None]) -> str:
    """``resolve``, then: when the chosen backend cannot take these inputs (``unsupported`` maps a
    backend to the reason, e.g. a dtype its kernels lack), an explicit request raises
    ``BackendUnavailableError`` with the reason and ``auto`` runs the reference instead."""
    backend = resolve(op, device)
    reason = unsupported.get(backend)
    if reason is None:
        return backend
    if requested_backend(op) != "auto":
        raise BackendUnavailableError(f"nvlm_kernels.{op}: the {backend} backend cannot run this call: {reason}")
    key = (op, f"{backend}->reference: {reason}")
    if key not in _warned_fallback:
        _warned_fallback.add(key)
        _log.info("nvlm_kernels.%s: running the reference (%s backend: %s)", op, backend, reason)
    return "reference"


@functools.cache
def implementation(package: str, backend: str):
    """The module ``<package>.<backend>`` (every op folder has reference.py, triton.py, cuda.py),
    imported on first use: Triton and the extension load only when a backend needs them."""
    return importlib.import_module(f"{package}.{backend}")
