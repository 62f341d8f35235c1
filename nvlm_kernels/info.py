"""``python -m nvlm_kernels.info``: versions, devices, and which backend each op can use (and why not).

For every op it prints, per device type (cpu, and cuda), whether each backend can run, the reason
when it cannot, and the backend that ``auto`` would pick now (a fallback is visible here).
"""

from __future__ import annotations

import platform
import sys

import torch

from nvlm_kernels import __version__, _backend, _extension


def _triton_version() -> str:
    try:
        import triton
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"not importable ({type(exc).__name__})"
    return triton.__version__


def report() -> str:
    lines = [
        f"nvlm-kernels {__version__}",
        f"python {platform.python_version()} ({sys.executable})",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"triton {_triton_version()}  TRITON_INTERPRET={'1' if _backend.triton_interpreter_enabled() else '0'}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)")
    else:
        lines.append("cuda: no device available")
    err = _extension.load_error()
    if err:
        lines.append(f"extension: {err}")
    else:
        lines.append(f"extension: loaded, {'with' if _extension.built_with_cuda() else 'without'} CUDA kernels")
    requested = {op: _backend.requested_backend(op) for op in _backend.registered_ops()}
    lines.append(f"requested backend ({_backend.ENV_VAR} / use_backend): {sorted(set(requested.values()))}")
    lines.append("")
    for op in sorted(_backend.registered_ops()):
        lines.append(f"{op}:")
        for device in ("cpu", "cuda"):
            chosen, _ = _backend.auto_choice(op, device)
            lines.append(f"  on {device} tensors, auto picks: {chosen}")
            for backend in _backend.BACKENDS:
                reason = _backend.why_unavailable(op, backend, device)
                lines.append(f"    {backend:<10} {'yes' if reason is None else 'no: ' + reason}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
