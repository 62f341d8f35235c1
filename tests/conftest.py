"""Test configuration shared by the whole suite.

The Triton interpreter is chosen when kernels are *decorated*, so ``TRITON_INTERPRET`` must be set
before any nvlm_kernels module is imported. Without a CUDA device we turn it on, so the Triton
kernels run on CPU tensors; on a GPU machine we leave it as the caller set it (off), so they run on
the device. ``make test`` sets it explicitly.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import nvlm_kernels  # noqa: E402, F401 - imported here, after TRITON_INTERPRET is set, before any test module

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# the kernel backends every op test runs over; the sm_90 "hopper" variants have their own tests
@pytest.fixture(params=["cuda", "triton", "reference"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def poison_empty():
    """Make every ``torch.empty`` in the code under test return NaN-filled memory, so an output
    element a kernel forgets to write cannot pass an equality check by luck."""
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = old_fill
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
