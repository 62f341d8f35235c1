"""Shared benchmark machinery: cases, timing, environment, CSV rows, markdown summary, plots.

A bench script (``bench/bench_<op>.py``) returns ``Case`` objects from ``cases(device, quick)``:
one callable per (kernel, provider, shape, dtype) with the bytes and FLOPs of useful work, an
optional correctness check run before timing, and a skip reason where a provider cannot run here.
``run_all.py`` times them all; ``test_benchmarks.py`` hands the same cases to pytest-benchmark.

Timing (design.md §6):
* CUDA: ``triton.testing.do_bench`` (warm-up, then each call timed alone with CUDA events after
  the L2 cache is flushed, so inputs never sit in L2 and the host's launch overhead hides behind
  the flush). p20/p50/p80 in microseconds. ``eager_us`` is the other view: back-to-back calls
  from Python, where launch overhead shows when a kernel is shorter than it.
* CPU: wall clock (``time.perf_counter``) per call after warm-up, quantiles over >= 5 runs.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

from nvlm_kernels import BackendUnavailableError

# Roofline of targets.md (H100 SXM): floor = max(flops / peak_flops, bytes / peak_bandwidth).
H100_PEAK_BANDWIDTH = 3.35e12  # bytes/s
H100_PEAK_BF16_FLOPS = 989e12  # FLOP/s


@dataclasses.dataclass
class Case:
    kernel: str  # e.g. "pixel_shuffle.fwd"
    provider: str  # e.g. "cuda", "triton", "reference", "reference+compile", "internvl"
    shape: str  # e.g. "7x1025x3200 (CLS view)"
    dtype: str
    fn: Callable[[], Any] | None  # one call of the work; None when skipped
    bytes_moved: int = 0  # each input read once + each output written once
    flops: int = 0  # useful FLOPs only
    items: int = 0  # things done per call (images, ...) when a rate says more than bytes or FLOPs
    item_unit: str = "images/s"
    check: Callable[[], None] | None = None  # raises when the provider's result is wrong
    skip_reason: str | None = None
    target: str = ""  # the targets.md row this case measures ("a".."f"; "0" for the ceilings), if any

    @property
    def name(self) -> str:
        return f"{self.kernel}[{self.provider}|{self.shape}|{self.dtype}]"


def close_to(fn: Callable[[], Any], expected: Any, *, atol: float, rtol: float) -> Callable[[], None]:
    """A check for ``Case``: fn() (a tensor) within atol + rtol·|expected| of ``expected``, NaN-free.
    For providers that round differently (bf16 attention kernels against a float32 reference)."""

    def check() -> None:
        got = fn()
        got = got[0] if isinstance(got, tuple) else got
        want = expected() if callable(expected) else expected
        if got.shape != want.shape:
            raise AssertionError(f"shape {tuple(got.shape)} != expected {tuple(want.shape)}")
        if not torch.isfinite(got).all():
            raise AssertionError("non-finite values")
        err = (got.float() - want.float()).abs()
        limit = atol + rtol * want.float().abs()
        if bool((err > limit).any()):
            raise AssertionError(f"max error {err.max().item():.3e} exceeds atol {atol} + rtol {rtol}·|expected|")

    return check


# Our Triton kernel backends: the sm_80-style kernels and the sm_90 variants (unmeasured until a GPU run).
OUR_KERNELS = ("triton", "hopper")


def kernel_reason(op: str, device: str, backend: str) -> str | None:
    """Why ``backend`` of ``op`` cannot run on ``device`` here (None when it can)."""
    import nvlm_kernels as nk

    return nk.available_backends(op, device).get(backend, f"{op} has no {backend!r} backend")


def skipped(kernel: str, provider: str, shape: str, dtype: str, reason: str) -> Case:
    return Case(kernel, provider, shape, dtype, None, skip_reason=reason)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_quantiles_us(fn: Callable[[], Any], device: str) -> tuple[float, float, float]:
    """(p20, p50, p80) of one call, in microseconds."""
    if device == "cuda":
        import triton.testing

        p20, p50, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
        return p20 * 1e3, p50 * 1e3, p80 * 1e3
    for _ in range(2):
        fn()
    samples: list[float] = []
    budget_end = time.perf_counter() + 1.0
    # up to 200 runs in the second: a call of a millisecond or two gets a median that one slow
    # run among 25 no longer moves (measured here: 448² preprocessing varied by 30 % at 25)
    while len(samples) < 5 or (len(samples) < 200 and time.perf_counter() < budget_end):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return q[1], statistics.median(samples), q[7]


def eager_us(fn: Callable[[], Any], device: str, calls: int = 50, budget_s: float = 1.0) -> float:
    """Time per call of back-to-back calls from Python (host overhead included), CUDA only: up to
    ``calls`` calls, fewer when they pass ``budget_s`` (a whole-model step takes a good part of a
    second; 50 of them would eat the GPU run's time limit)."""
    if device != "cuda":
        return math.nan
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    done = 0
    while done < calls and (done < 3 or time.perf_counter() - start < budget_s):
        fn()
        done += 1
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / done * 1e6


def _git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


ROW_FIELDS = [
    "kernel",
    "provider",
    "shape",
    "dtype",
    "status",
    "p20_us",
    "p50_us",
    "p80_us",
    "eager_us",
    "metric",
    "value",
    "floor_us",
    "pct_of_floor",
    "peak_mib",
    "device",
    "torch",
    "triton",
    "cuda",
    "git_sha",
    "date",
]


def _peak_mib(fn: Callable[[], Any]) -> float:
    """GPU memory one call allocates beyond what was allocated before it (MiB, its peak)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure(case: Case, device: str, env: dict[str, str]) -> dict[str, Any]:
    """Check, then time one case; never raises (a failing provider becomes a row saying so)."""
    row: dict[str, Any] = {f: "" for f in ROW_FIELDS}
    row.update(env)
    row.update(kernel=case.kernel, provider=case.provider, shape=case.shape, dtype=case.dtype)
    if case.skip_reason is not None or case.fn is None:
        row["status"] = f"skipped: {case.skip_reason}"
        return row
    try:
        if case.check is not None:
            case.check()
        peak_mib = _peak_mib(case.fn) if device == "cuda" else float("nan")
        p20, p50, p80 = time_quantiles_us(case.fn, device)
        eager = eager_us(case.fn, device)
    except BackendUnavailableError as exc:  # this backend cannot take this call here (e.g. fp32 kernels)
        row["status"] = f"skipped: {str(exc).strip().splitlines()[0][:200]}"
        return row
    except Exception as exc:  # report and go on: one broken provider must not hide the others
        row["status"] = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc) else ''}"
        return row
    floor_us = max(case.flops / H100_PEAK_BF16_FLOPS, case.bytes_moved / H100_PEAK_BANDWIDTH) * 1e6
    if case.items:
        metric, value = case.item_unit, case.items / (p50 * 1e-6)
    elif case.flops:
        metric, value = "TFLOP/s", case.flops / (p50 * 1e-6) / 1e12
    else:
        metric, value = "GB/s", case.bytes_moved / (p50 * 1e-6) / 1e9
    row.update(
        status="ok",
        p20_us=f"{p20:.2f}",
        p50_us=f"{p50:.2f}",
        p80_us=f"{p80:.2f}",
        eager_us="" if math.isnan(eager) else f"{eager:.2f}",
        metric=metric,
        value=f"{value:.4g}",
        floor_us=f"{floor_us:.2f}",
        pct_of_floor=f"{100 * floor_us / p50:.1f}" if device == "cuda" and floor_us > 0 else "",
        peak_mib="" if math.isnan(peak_mib) else f"{peak_mib:.0f}",
    )
    return row


def append_csv(row: dict[str, Any], path: str) -> None:
    """Appends one row (writing the header first when the file is new): a run cut short keeps every
    row it finished."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_table(rows: list[dict[str, Any]], baseline_provider: str | None = None) -> str:
    """A fixed-width table; ``speedup`` is against ``baseline_provider`` at the same kernel/shape/dtype."""
    base = {
        (r["kernel"], r["shape"], r["dtype"]): float(r["p50_us"])
        for r in rows
        if r["provider"] == baseline_provider and r["status"] == "ok"
    }
    header = (
        f"{'kernel':<26} {'shape':<24} {'dtype':<9} {'provider':<18} {'p50 us':>10} {'metric':>14} "
        f"{'floor%':>7} {'speedup':>8}  status"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        ok = r["status"] == "ok"
        key = (r["kernel"], r["shape"], r["dtype"])
        speedup = f"{base[key] / float(r['p50_us']):.2f}x" if ok and key in base else ""
        lines.append(
            f"{r['kernel']:<26} {r['shape']:<24} {r['dtype']:<9} {r['provider']:<18} "
            f"{r['p50_us'] if ok else '':>10} {(r['value'] + ' ' + r['metric']) if ok else '':>14} "
            f"{r['pct_of_floor']:>7} {speedup:>8}  {'' if ok else r['status']}"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], baseline_provider: str | None = None) -> str:
    base = {
        (r["kernel"], r["shape"], r["dtype"]): float(r["p50_us"])
        for r in rows
        if r["provider"] == baseline_provider and r["status"] == "ok"
    }
    lines = [
        "| kernel | shape | dtype | provider | p50 µs (p20–p80) | throughput | % of floor | peak MiB | vs "
        f"{baseline_provider or '-'} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = (r["kernel"], r["shape"], r["dtype"])
        if r["status"] != "ok":
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['provider']} | {r['status']} | | | | |")
            continue
        speedup = f"{base[key] / float(r['p50_us']):.2f}×" if key in base else ""
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['provider']} | {r['p50_us']} "
            f"({r['p20_us']}–{r['p80_us']}) | {r['value']} {r['metric']} | {r['pct_of_floor']} "
            f"| {r.get('peak_mib', '')} | {speedup} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out_dir: str) -> list[str]:
    """One PNG, ``results.png``: a panel per kernel, throughput per provider and shape. Needs
    matplotlib (optional: ``run_all.py --plot-only`` redraws a saved run elsewhere)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    kernels = sorted({r["kernel"] for r in rows if r["status"] == "ok" and not r["kernel"].startswith("ceiling")})
    if not kernels:
        return []
    columns = 2 if len(kernels) > 1 else 1
    panel_rows = (len(kernels) + columns - 1) // columns
    fig, axes = plt.subplots(panel_rows, columns, figsize=(7.5 * columns, 3.8 * panel_rows), squeeze=False)
    for ax, kernel in zip(axes.flat, kernels, strict=False):  # more panels than kernels
        ok = [r for r in rows if r["kernel"] == kernel and r["status"] == "ok"]
        groups = list(dict.fromkeys(f"{r['shape']}\n{r['dtype']}" for r in ok))
        providers = list(dict.fromkeys(r["provider"] for r in ok))
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            values = []
            for g in groups:
                match = [r for r in ok if r["provider"] == provider and f"{r['shape']}\n{r['dtype']}" == g]
                values.append(float(match[0]["value"]) if match else 0.0)
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=provider)
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=7)
        ax.set_ylabel(ok[0]["metric"])
        ax.set_title(kernel, fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(kernels) :]:
        ax.axis("off")
    fig.suptitle(f"nvlm-kernels on {rows[0]['device']} ({rows[0]['git_sha']})", fontsize=11)
    fig.tight_layout()
    path = os.path.join(out_dir, "results.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def run_module(module: Any) -> None:
    """``python bench/bench_<op>.py``: measure that module's cases here, print its table and targets."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    rows = [measure(c, device, env) for c in module.cases(device)]
    print(format_table(rows, getattr(module, "BASELINE", None)))
    if hasattr(module, "targets"):
        print("\n".join(module.targets(rows)))
