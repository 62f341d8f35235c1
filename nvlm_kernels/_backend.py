"""Backend selection shared by every op.

Two kinds of implementation, selected by name:

* our kernels -- ``cuda`` (the compiled extension ``nvlm_kernels._C``: its CUDA kernels on CUDA
  tensors, its C++ host kernels on CPU tensors, which share the index math with the device code),
  ``triton`` (Triton kernels: on CUDA tensors with a driver, on CPU tensors only through the Triton
  interpreter), ``hopper`` (Triton kernels written for sm_90: TMA descriptors, two consumer
  warpgroups, FMA-folded scaling; CUDA tensors of a compute capability 9.x GPU, or CPU tensors
  through the interpreter) and ``reference`` (plain PyTorch: the oracle);
* peers -- the strongest implementation a user already has, behind our checks and semantics:
  ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``; torch picks cuDNN / flash /
  memory-efficient), ``flex`` (FlexAttention with a block mask) and ``unfused`` (the projector as
  one memory-bound gather + LayerNorm pass, then cuBLAS GEMMs). Each op declares the peers it has.

Choice, strongest first: the innermost ``use_backend(...)`` context, then the environment variable
``NVLM_KERNELS_BACKEND`` (read at call time), then ``auto``. An explicitly requested backend that
cannot run raises ``BackendUnavailableError`` naming the reason; only ``auto`` falls back.

``auto`` for an op with peers (``select``): the backend the dispatch table (``_dispatch``) measured
fastest for this op, device kind, dtype, shape bucket and pass; with no measurement, the op's
default peer for the device type, never an unmeasured kernel of ours. Ops without peers
(pixel_shuffle, preprocess) keep the order cuda -> triton -> reference on CUDA tensors and the
reference on CPU tensors, preceded there by the C++ host kernel for preprocess (``host_kernel``).
``python -m nvlm_kernels.info`` shows what auto picks and why.

``select`` reads only shapes, dtypes and devices (no device sync), caches its answer per shape
bucket, and under ``torch.compile`` runs once at trace time (its result is a constant of the graph).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from nvlm_kernels import _extension

KERNEL_BACKENDS = ("cuda", "triton", "hopper", "reference")
PEER_BACKENDS = ("sdpa", "flex", "unfused")
BACKENDS = KERNEL_BACKENDS + PEER_BACKENDS
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
    carries this op (checked with the dispatcher, so a stale build without it is detected).
    ``peers``: the peer backends it has; ``default_peer``: device type -> the peer ``auto`` takes
    where nothing was measured (ops without peers keep the kernel order)."""

    name: str
    has_triton: bool
    cuda_op: str | None  # e.g. "nvlm_C::pixel_shuffle_fwd"
    peers: tuple[str, ...] = ()
    default_peer: dict[str, str] = field(default_factory=dict)
    has_hopper: bool = False  # sm_90 Triton variants (module <op>/hopper.py)
    host_kernel: bool = False  # the extension's C++ host kernel is auto's first choice on CPU tensors

    @property
    def backends(self) -> tuple[str, ...]:
        """Every backend name this op implements, kernels first."""
        kernels = (("cuda",) if self.cuda_op else ()) + (("triton",) if self.has_triton else ())
        kernels += (("hopper",) if self.has_hopper else ()) + ("reference",)
        return kernels + self.peers


_REGISTRY: dict[str, OpBackends] = {}

# FlexAttention has no CPU backward (torch 2.13) and its CPU forward is slow: auto never takes it there.
_AUTO_DEVICES = {"flex": ("cuda",)}


def register_op(
    name: str,
    *,
    has_triton: bool,
    cuda_op: str | None,
    peers: tuple[str, ...] = (),
    default_peer: dict[str, str] | None = None,
    has_hopper: bool = False,
    host_kernel: bool = False,
) -> OpBackends:
    unknown = [p for p in peers if p not in PEER_BACKENDS]
    if unknown:
        raise ValueError(f"{name}: unknown peer backends {unknown}")
    default_peer = dict(default_peer or {})
    if any(p not in peers for p in default_peer.values()):
        raise ValueError(f"{name}: default peers {default_peer} must be among its peers {peers}")
    entry = OpBackends(name, has_triton, cuda_op, tuple(peers), default_peer, has_hopper, host_kernel)
    _REGISTRY[name] = entry
    _select_auto.cache_clear()
    return entry


def registered_ops() -> dict[str, OpBackends]:
    return dict(_REGISTRY)


def backends_of(op: str) -> tuple[str, ...]:
    return _REGISTRY[op].backends


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


AUTOTUNE_ENV_VAR = "NVLM_KERNELS_AUTOTUNE"


def autotune_configs(configs: list) -> list:
    """What a Triton kernel's pruner finally keeps: every allowed configuration, or only the first
    (each table's first entry is its expected best) when ``NVLM_KERNELS_AUTOTUNE=0`` — one compile per
    kernel instead of one per configuration, for quick correctness runs (gpu_check.sh's smoke step)."""
    if os.environ.get(AUTOTUNE_ENV_VAR, "1").strip() == "0":
        return configs[:1]
    return configs


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
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    if backend not in entry.backends:
        return f"{op} has no {backend!r} backend (its backends: {', '.join(entry.backends)})"
    if backend == "reference":
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if backend in PEER_BACKENDS:
        return _peer_unavailable(backend, device.type)
    if backend == "hopper":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            if interpreter:
                return "TRITON_INTERPRET=1 is set, so Triton kernels run only on CPU tensors"
            major = torch.cuda.get_device_capability()[0]
            return None if major == 9 else f"its kernels are for sm_90 (Hopper), this GPU is sm_{major}x"
        if device.type == "cpu":
            return None if interpreter else "Triton runs on CPU tensors only through its interpreter"
        return f"the hopper backend does not support device type {device.type!r}"
    if backend == "triton":
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
    # backend == "cuda"
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


def _peer_unavailable(backend: str, device_type: str) -> str | None:
    if device_type not in ("cpu", "cuda"):
        return f"the {backend} backend runs on CPU and CUDA tensors, not {device_type!r}"
    if backend == "flex":
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except Exception as exc:  # pragma: no cover - depends on the torch version
            return f"FlexAttention cannot be imported from this torch ({type(exc).__name__}: {exc})"
        if device_type == "cuda" and _triton_import_error():
            return f"FlexAttention compiles to Triton on CUDA: {_triton_import_error()}"
    return None


_warned_fallback: set[tuple] = set()


def _default_order(op: str, device_type: str) -> tuple[str, ...]:
    """What auto tries where nothing was measured: for an op with peers, its default peer for the
    device type, then its other peers, then the reference (never an unmeasured kernel of ours);
    for an op without peers, our kernels in the order cuda -> triton -> reference on CUDA tensors,
    the reference on CPU tensors (after the C++ host kernel for an op that declares one)."""
    entry = _REGISTRY[op]
    if not entry.peers:
        if device_type == "cuda":
            return ("cuda", "triton", "reference")
        return ("cuda", "reference") if entry.host_kernel and device_type == "cpu" else ("reference",)
    default = entry.default_peer.get(device_type)
    peers = [p for p in entry.peers if device_type in _AUTO_DEVICES.get(p, (device_type,))]
    if default in peers:
        peers.remove(default)
        peers.insert(0, default)
    return (*peers, "reference")


def auto_choice(op: str, device: torch.device | str) -> tuple[str, list[tuple[str, str]]]:
    """The backend ``auto`` picks for ``op`` on ``device`` where the dispatch table has no entry for
    the call, and the (backend, reason) pairs skipped."""
    device = torch.device(device)
    skipped: list[tuple[str, str]] = []
    for backend in _default_order(op, device.type):
        reason = why_unavailable(op, backend, device)
        if reason is None:
            return backend, skipped
        skipped.append((backend, reason))
    raise AssertionError("reference is always available")  # pragma: no cover


def pow2_bucket(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). Written as comparisons so that under
    torch.compile with dynamic shapes it guards on the bucket's range, not on n's exact value."""
    bucket = 1
    while n > bucket:
        bucket *= 2
    return bucket


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dispatch_table():
    """The dispatch table in effect (``_dispatch.Table``; read on first use)."""
    from nvlm_kernels import _dispatch

    return _dispatch.load({name: entry.backends for name, entry in _REGISTRY.items()})


@dataclass(frozen=True)
class Selection:
    """What ``auto`` decided for one (op, device kind, dtype, bucket, pass), and why."""

    backend: str
    reason: str  # "measured on ..." or "no measurement for ...: the default peer ..."
    skipped: tuple[tuple[str, str], ...] = ()


@functools.lru_cache(maxsize=4096)
def _select_auto(
    op: str, device_type: str, device_index: int | None, dtype: torch.dtype, bucket: str, grad: bool,
    unsupported: tuple[tuple[str, str], ...], interpreter: bool,
) -> Selection:  # fmt: skip
    from nvlm_kernels import _dispatch

    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    call_reasons = dict(unsupported)
    pass_ = "fwd+bwd" if grad else "fwd"
    kind = _dispatch.device_kind(device)
    skipped: list[tuple[str, str]] = []
    measured = dispatch_table().lookup(op, kind, dtype_name(dtype), bucket, pass_) if _REGISTRY[op].peers else None
    if measured is not None:
        reason = why_unavailable(op, measured.backend, device) or call_reasons.get(measured.backend)
        if reason is None:
            return Selection(measured.backend, measured.describe())
        skipped.append((measured.backend, f"measured fastest but unusable here: {reason}"))
    for backend in _default_order(op, device_type):
        reason = why_unavailable(op, backend, device) or call_reasons.get(backend)
        if reason is None:
            if not _REGISTRY[op].peers:
                why = "kernel order (no peers)"
            else:
                why = f"no measurement for {kind}, {dtype_name(dtype)}, {bucket or 'any shape'}, {pass_}"
                why += f": {'the default peer' if backend == _REGISTRY[op].default_peer.get(device_type) else 'next'}"
            return Selection(backend, why, tuple(skipped))
        skipped.append((backend, reason))
    raise AssertionError("reference is always available")  # pragma: no cover


_recorders: list[list[dict]] = []


@contextlib.contextmanager
def record_selections() -> Iterator[list[dict]]:
    """Collects every ``select`` call made inside (op, device kind, dtype, bucket, pass, backend):
    how the tuner learns the bucket of the shapes it measures from the ops themselves."""
    calls: list[dict] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def explain(
    op: str,
    device: torch.device | str,
    dtype: torch.dtype,
    bucket: str = "",
    *,
    grad: bool = False,
    unsupported: tuple[tuple[str, str], ...] = (),
) -> Selection:
    """What ``select`` would run for these arguments now, and why (``python -m nvlm_kernels.info``)."""
    device = torch.device(device)
    requested = requested_backend(op)
    if requested != "auto":
        reason = why_unavailable(op, requested, device) or dict(unsupported).get(requested)
        if reason is not None:
            raise BackendUnavailableError(
                f"nvlm_kernels.{op}: backend {requested!r} was requested but cannot run this call on "
                f"{device.type} tensors: {reason}"
            )
        return Selection(requested, f"requested ({ENV_VAR} or use_backend)")
    selection = _select_auto(
        op, device.type, device.index, dtype, bucket, bool(grad), tuple(unsupported), triton_interpreter_enabled()
    )
    if selection.skipped:
        key = (op, device.type, selection.backend, selection.skipped)
        if key not in _warned_fallback:
            _warned_fallback.add(key)
            log = _log.warning if device.type == "cuda" else _log.info
            log(
                "nvlm_kernels.%s: auto runs the %s backend on %s tensors (%s)",
                op, selection.backend, device.type, "; ".join(f"{b}: {r}" for b, r in selection.skipped),
            )  # fmt: skip
    return selection


@torch.compiler.assume_constant_result
def select(
    op: str,
    device: torch.device,
    dtype: torch.dtype,
    bucket: str,
    grad: bool,
    unsupported: tuple[tuple[str, str], ...] = (),
) -> str:
    """The backend that runs this call of ``op``: the explicit request (``BackendUnavailableError``
    if it cannot run it, e.g. a backend the op lacks or a dtype its kernels do not take, given in
    ``unsupported`` as (backend, reason) pairs) or auto's choice (``explain``).

    ``bucket`` is the op's shape bucket (built with ``pow2_bucket``), ``grad`` whether the call
    records an autograd graph. Under torch.compile this runs once, at trace time: the choice is a
    constant of the compiled graph (a later ``use_backend`` needs a recompile to take effect)."""
    backend = explain(op, device, dtype, bucket, grad=grad, unsupported=unsupported).backend
    if _recorders:
        from nvlm_kernels import _dispatch

        call = {
            "op": op, "device": _dispatch.device_kind(device), "dtype": dtype_name(dtype), "bucket": bucket,
            "pass": "fwd+bwd" if grad else "fwd", "backend": backend,
        }  # fmt: skip
        for calls in _recorders:
            calls.append(call)
    return backend


def op_backend(
    op: str,
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    bucket: str,
    grad: bool,
    unsupported: tuple[tuple[str, str], ...] = (),
) -> str:
    """Inside a registered op: the backend it runs. The public functions pass the one ``select``
    chose; ``"auto"`` (a direct ``torch.ops`` call) resolves through ``select`` now; any other name
    is checked like an explicit request (``BackendUnavailableError`` with the reason)."""
    if backend == "auto":
        return select(op, device, dtype, bucket, grad, unsupported)
    if backend not in _REGISTRY[op].backends:
        what = f"has no {backend!r} backend" if backend in BACKENDS else f"unknown backend {backend!r}"
        raise BackendUnavailableError(f"nvlm_kernels.{op}: {what} (its backends: {', '.join(_REGISTRY[op].backends)})")
    reason = why_unavailable(op, backend, device) or dict(unsupported).get(backend)
    if reason is not None:
        raise BackendUnavailableError(
            f"nvlm_kernels.{op}: the {backend} backend cannot run this call on {device.type} tensors: {reason}"
        )
    return backend


def reset_caches() -> None:
    """Forget cached choices and the loaded dispatch table (after changing NVLM_KERNELS_DISPATCH)."""
    from nvlm_kernels import _dispatch

    _dispatch.reload()
    _select_auto.cache_clear()
    _warned_fallback.clear()


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


@contextlib.contextmanager
def autograd_inside_op() -> Iterator[None]:
    """Grad mode with autograd's dispatch keys back on, inside a registered op's implementation.

    The dispatcher runs a custom op's implementation below autograd (its keys excluded in this
    thread, whatever the grad mode), where nothing records a graph. A peer reached through the op
    (``torch.ops`` / opcheck) has no saved state for a backward, so its op-level backward recomputes
    the peer's forward under this and takes ``torch.autograd.grad``. (The public functions run peers
    outside the op, where torch's own autograd records them: they never need this.)"""
    keys = torch._C.DispatchKey
    autograd = torch._C.DispatchKeySet(keys.AutogradFunctionality)
    for key in (keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        autograd = autograd | torch._C.DispatchKeySet(key)
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set() - autograd
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


@functools.cache
def implementation(package: str, backend: str):
    """The module ``<package>.<backend>`` (every op folder has reference.py, triton.py, cuda.py),
    imported on first use: Triton and the extension load only when a backend needs them."""
    return importlib.import_module(f"{package}.{backend}")
