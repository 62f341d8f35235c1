"""Every benchmark case under pytest-benchmark (quick shapes on a CPU, the full set on a GPU).

Each case's correctness check runs first; CUDA work is synchronized inside the timed call so the
time is the device's, not the launch's.
"""

from __future__ import annotations

import importlib
import pathlib

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODULES = ["ceilings"] + sorted(p.stem for p in pathlib.Path(__file__).resolve().parent.glob("bench_*.py"))


def _all_cases():
    for name in MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "cases"):  # bench_vllm.py is a script of its own (its own processes and venv)
            yield from module.cases(DEVICE, quick=DEVICE == "cpu")


CASES = list(_all_cases())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_benchmark(benchmark, case):
    if case.skip_reason is not None:
        pytest.skip(case.skip_reason)
    if case.check is not None:
        case.check()

    def call():
        case.fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(bytes=case.bytes_moved, flops=case.flops, provider=case.provider)
    benchmark.pedantic(call, rounds=20 if DEVICE == "cuda" else 5, warmup_rounds=3)
