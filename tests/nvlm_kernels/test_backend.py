"""Backend selection: environment variable, use_backend(), explicit errors, auto fallback, info, NVTX."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import nvlm_kernels
from nvlm_kernels import _backend, _extension, _nvtx


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert _backend.resolve("pixel_shuffle", "cpu") == "reference"


def test_env_var_and_context(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.requested_backend("pixel_shuffle") == "reference"
    with nvlm_kernels.use_backend("triton"):
        assert _backend.requested_backend("pixel_shuffle") == "triton"
        with nvlm_kernels.use_backend("auto", ops="pixel_shuffle"):
            assert _backend.requested_backend("pixel_shuffle") == "auto"
        assert _backend.requested_backend("pixel_shuffle") == "triton"
    assert _backend.requested_backend("pixel_shuffle") == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, " CUDA ")
    assert _backend.requested_backend("pixel_shuffle") == "cuda"


def test_invalid_names():
    with pytest.raises(ValueError, match="use_backend"):
        with nvlm_kernels.use_backend("cudnn"):
            pass
    with pytest.raises(ValueError, match="unknown ops"):
        with nvlm_kernels.use_backend("reference", ops=["not_an_op"]):
            pass


def test_invalid_env_var_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=_backend.ENV_VAR):
        nvlm_kernels.pixel_shuffle(torch.randn(1, 16, 4))


def test_explicit_unavailable_backend_raises(monkeypatch):
    """An explicit request never falls back silently."""
    monkeypatch.setattr(_backend, "why_unavailable", lambda op, backend, device: "pretend it is missing")
    with nvlm_kernels.use_backend("triton"):
        with pytest.raises(nvlm_kernels.BackendUnavailableError, match="pretend it is missing"):
            nvlm_kernels.pixel_shuffle(torch.randn(1, 16, 4))


def test_auto_falls_back_on_cuda_and_logs(monkeypatch, caplog):
    reasons = {"cuda": "no extension", "triton": "no triton", "reference": None}
    monkeypatch.setattr(_backend, "why_unavailable", lambda op, backend, device: reasons[backend])
    monkeypatch.setattr(_backend, "_warned_fallback", set())
    with caplog.at_level("WARNING", logger="nvlm_kernels"):
        assert _backend.resolve("pixel_shuffle", "cuda") == "reference"
    assert "no extension" in caplog.text and "no triton" in caplog.text


def test_available_backends_reports_reasons():
    status = nvlm_kernels.available_backends("pixel_shuffle", "cpu")
    assert set(status) == set(nvlm_kernels.BACKENDS)
    assert status["reference"] is None
    with pytest.raises(ValueError, match="unknown op"):
        nvlm_kernels.available_backends("flash", "cpu")


def test_info_runs(tmp_path):
    # cwd outside the checkout, so the subprocess imports the same installed package as the tests
    out = subprocess.run(
        [sys.executable, "-m", "nvlm_kernels.info"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=tmp_path,
    ).stdout
    assert "pixel_shuffle:" in out and "auto picks" in out and "reference  yes" in out
    expected = "extension: loaded" if _extension.is_loaded() else "extension: the extension"
    assert expected in out


@pytest.mark.skipif(
    os.environ.get("NVLM_KERNELS_EXPECT_EXTENSION") != "1",
    reason="only where the build is known to include the extension (make test, make cuda-check, gpu_check.sh "
    "set NVLM_KERNELS_EXPECT_EXTENSION=1)",
)
def test_extension_is_built_where_expected():
    """Where the extension was built, the cuda-backend tests must not silently skip for lack of it."""
    assert _extension.load_error() is None
    assert nvlm_kernels.available_backends("pixel_shuffle", "cpu")["cuda"] is None
    if os.environ.get("NVLM_KERNELS_EXPECT_CUDA_KERNELS") == "1":
        assert _extension.built_with_cuda(), "the extension was expected to carry CUDA kernels"
        assert _extension.has_kernel("nvlm_C::pixel_shuffle_fwd", "CUDA")


def test_nvtx_range_labels(monkeypatch):
    labels = []

    class Recorder:
        @staticmethod
        def annotate(label, domain=None):
            labels.append((label, domain))
            return _Null()

    class _Null:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(_nvtx, "_nvtx", Recorder)
    x = torch.randn(1, 16, 4, requires_grad=True)
    nvlm_kernels.pixel_shuffle(x).sum().backward()
    assert ("nvlm.kernels.pixel_shuffle.fwd", "nvlm") in labels
    assert ("nvlm.kernels.pixel_shuffle.bwd", "nvlm") in labels
