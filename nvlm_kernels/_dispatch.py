"""The measured dispatch table: which backend ``auto`` runs, per op, device kind, dtype, shape bucket
and pass.

The package ships ``dispatch_table.json`` (measurements made on a GPU lent to the project, with the
device, date and commit of each); a user file named by ``NVLM_KERNELS_DISPATCH`` overrides its
entries key by key (``python -m nvlm_kernels.tune`` writes one for the GPU at hand). The files are
read once, on the first lookup; ``reload()`` reads them again.

Format (``format`` 1)::

    {"format": 1,
     "entries": [
       {"op": "vit_attention", "device": "NVIDIA H100 80GB HBM3", "dtype": "bfloat16",
        "bucket": "S=2048,D=128,TH=256", "pass": "fwd", "backend": "triton",
        "times_us": {"triton": 151.2, "sdpa": 204.9},            # optional: what was measured
        "measured": {"date": "2026-11-29", "commit": "6108b20", "torch": "2.11.0", "shape": "7x1025x25x128"}}
     ]}

``device`` is ``torch.cuda.get_device_name()`` for a GPU and ``cpu:<machine>`` (``cpu:x86_64``)
for a CPU; ``bucket`` is what the op computes from the call's shape (powers of two over the sizes
that vary between calls, exact values of the ones a model fixes); ``pass`` is ``fwd`` (no autograd
graph) or ``fwd+bwd`` (a call whose inputs need gradients).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import platform
import threading
from typing import Any

import torch

ENV_VAR = "NVLM_KERNELS_DISPATCH"
SHIPPED = pathlib.Path(__file__).with_name("dispatch_table.json")
FORMAT = 1
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class DispatchTableError(ValueError):
    """A dispatch table file that cannot be used: names the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Entry:
    op: str
    device: str
    dtype: str
    bucket: str
    pass_: str
    backend: str
    source: str  # the file it came from
    times_us: tuple[tuple[str, float], ...] = ()
    measured: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.op, self.device, self.dtype, self.bucket, self.pass_)

    def describe(self) -> str:
        info = dict(self.measured)
        where = f"measured on {self.device}"
        if info.get("date"):
            where += f", {info['date']}"
        if info.get("commit"):
            where += f", commit {info['commit']}"
        times = ", ".join(f"{b} {t:.1f} us" for b, t in self.times_us)
        return where + (f" ({times})" if times else "") + f" [{os.path.basename(self.source)}]"


def device_kind(device: torch.device | str) -> str:
    """The table's name for the kind of device ``device`` is (a GPU's product name, or the CPU's
    architecture)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return f"{device.type}:{platform.machine() or 'unknown'}"


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _fail(source: str, where: str, problem: str) -> DispatchTableError:
    return DispatchTableError(f"dispatch table {source}: {where}: {problem}")


def _string(raw: dict, name: str, source: str, where: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise _fail(source, where, f"field {name!r} must be a non-empty string, got {value!r}")
    return value


def parse(data: Any, source: str, backends_of: dict[str, tuple[str, ...]]) -> list[Entry]:
    """Entries of one table (the decoded JSON of ``source``), each checked: known op, backend of that
    op, dtype, pass; a wrong one raises ``DispatchTableError`` naming the file and the entry."""
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise _fail(source, "top level", f"must be a JSON object with 'format' and 'entries', got {kind}")
    if data.get("format") != FORMAT:
        raise _fail(source, "top level", f"'format' must be {FORMAT}, got {data.get('format')!r}")
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list):
        raise _fail(source, "top level", "'entries' must be a list")
    entries = []
    for i, raw in enumerate(raw_entries):
        where = f"entry {i}"
        if not isinstance(raw, dict):
            raise _fail(source, where, f"must be an object, got {type(raw).__name__}")
        op = _string(raw, "op", source, where)
        where = f"entry {i} (op {op!r})"
        if op not in backends_of:
            raise _fail(source, where, f"unknown op; known: {sorted(backends_of)}")
        backend = _string(raw, "backend", source, where)
        if backend not in backends_of[op]:
            raise _fail(source, where, f"{op} has no backend {backend!r}; its backends: {list(backends_of[op])}")
        dtype = _string(raw, "dtype", source, where)
        if dtype not in DTYPES:
            raise _fail(source, where, f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        pass_ = _string(raw, "pass", source, where)
        if pass_ not in PASSES:
            raise _fail(source, where, f"pass must be one of {list(PASSES)}, got {pass_!r}")
        device = _string(raw, "device", source, where)
        bucket = raw.get("bucket")
        if not isinstance(bucket, str):
            raise _fail(source, where, f"field 'bucket' must be a string, got {bucket!r}")
        times = raw.get("times_us", {})
        if not isinstance(times, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in times.items()
        ):
            raise _fail(source, where, "'times_us' must map backend names to numbers")
        measured = raw.get("measured", {})
        if not isinstance(measured, dict):
            raise _fail(source, where, "'measured' must be an object")
        entries.append(
            Entry(
                op,
                device,
                dtype,
                bucket,
                pass_,
                backend,
                source,
                tuple((k, float(v)) for k, v in times.items()),
                tuple((str(k), str(v)) for k, v in measured.items()),
            )  # fmt: skip
        )
    return entries


def read(path: str | os.PathLike, backends_of: dict[str, tuple[str, ...]]) -> list[Entry]:
    source = str(path)
    try:
        text = pathlib.Path(path).read_text()
    except OSError as exc:
        raise DispatchTableError(f"dispatch table {source}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DispatchTableError(f"dispatch table {source}: not valid JSON ({exc})") from None
    return parse(data, source, backends_of)


class Table:
    """The shipped entries overlaid with the user's (a user entry replaces a shipped one of the
    same key)."""

    def __init__(self, entries: list[Entry]):
        self.entries: dict[tuple[str, str, str, str, str], Entry] = {}
        for entry in entries:
            self.entries[entry.key] = entry

    def lookup(self, op: str, device: str, dtype: str, bucket: str, pass_: str) -> Entry | None:
        return self.entries.get((op, device, dtype, bucket, pass_))

    def for_op(self, op: str) -> list[Entry]:
        return [e for e in self.entries.values() if e.op == op]


_lock = threading.Lock()
_table: Table | None = None


def user_table_path() -> str | None:
    path = os.environ.get(ENV_VAR, "").strip()
    return path or None


def load(backends_of: dict[str, tuple[str, ...]]) -> Table:
    """The table in effect (read on first use)."""
    global _table
    table = _table
    if table is not None:
        return table
    with _lock:
        if _table is None:
            entries = read(SHIPPED, backends_of) if SHIPPED.exists() else []
            user = user_table_path()
            if user is not None:
                entries += read(user, backends_of)
            _table = Table(entries)
        return _table


def reload() -> None:
    """Forget the loaded table (the next lookup reads the files again, ``NVLM_KERNELS_DISPATCH``
    included)."""
    global _table
    with _lock:
        _table = None


def write(path: str | os.PathLike, entries: list[dict[str, Any]]) -> None:
    """Writes a table file (entries as dicts in the file format), sorted for stable diffs."""
    ordered = sorted(entries, key=lambda e: (e["op"], e["device"], e["dtype"], e["bucket"], e["pass"]))
    pathlib.Path(path).write_text(json.dumps({"format": FORMAT, "entries": ordered}, indent=1) + "\n")
