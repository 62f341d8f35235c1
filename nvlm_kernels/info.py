"""``python -m nvlm_kernels.info``: versions, devices, and which backend each op can use (and why not).

For every op it prints, per device type (cpu, and cuda), whether each of its backends can run (the
reason when it cannot), what ``auto`` picks where the dispatch table has no measurement (and why),
and the table's measured entries for this device kind (shape bucket, pass, dtype -> backend, with
the device, date and commit of the measurement).
"""

from __future__ import annotations

import platform
import sys

import torch

from nvlm_kernels import __version__, _backend, _dispatch, _extension


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
    try:
        table = _backend.dispatch_table()
        entries = list(table.entries.values())
        user = _dispatch.user_table_path()
        lines.append(
            f"dispatch table: {len(entries)} measured entries ({_dispatch.SHIPPED.name} shipped"
            + (f", {user} from {_dispatch.ENV_VAR}" if user else f"; {_dispatch.ENV_VAR} unset")
            + ")"
        )
    except _dispatch.DispatchTableError as exc:
        table, entries = None, []
        lines.append(f"dispatch table: UNUSABLE: {exc}")
    lines.append("")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op, entry in sorted(_backend.registered_ops().items()):
        lines.append(f"{op}:")
        for device in ("cpu", "cuda"):
            chosen, _ = _backend.auto_choice(op, device)
            if device not in devices:
                default = entry.default_peer.get(device)
                would = f"auto would run {default} where nothing was measured" if default else "kernel order"
                lines.append(f"  on {device} tensors: no CUDA device here ({would})")
                continue
            if entry.peers:
                why = "the default peer" if chosen == entry.default_peer.get(device) else "the first usable"
                lines.append(f"  on {device} tensors, auto picks: {chosen} where nothing was measured ({why})")
            else:
                lines.append(f"  on {device} tensors, auto picks: {chosen} (kernel order; this op has no peers)")
            for backend in entry.backends:
                reason = _backend.why_unavailable(op, backend, device)
                lines.append(f"    {backend:<10} {'yes' if reason is None else 'no: ' + reason}")
            if device in devices and entry.peers:
                kind = _dispatch.device_kind(device)
                mine = sorted((e for e in entries if e.op == op and e.device == kind), key=lambda e: e.key)
                if not mine:
                    lines.append(f"    measured on {kind}: nothing, so every call runs the peer above")
                for e in mine:
                    lines.append(f"    measured: {e.dtype} {e.bucket} {e.pass_} -> {e.backend} ({e.describe()})")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
