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


@pytest.fixture
def nvtx_enabled():
    """Ranges are off by default (NVLM_NVTX unset): these tests turn them on and restore the state."""
    was_enabled = _nvtx.is_enabled()
    _nvtx.enable()
    yield
    _nvtx.enable(was_enabled)


def test_nvtx_range_labels(monkeypatch, nvtx_enabled):
    """Every public op opens nvlm.kernels.<op>.fwd / .bwd, balanced."""
    events = []
    monkeypatch.setattr(_nvtx, "_domain", object())  # ranges are active even where nvtx is absent
    monkeypatch.setattr(_nvtx, "push", lambda label: events.append(("push", label)))
    monkeypatch.setattr(_nvtx, "pop", lambda: events.append(("pop", None)))
    x = torch.randn(1, 16, 4, requires_grad=True)
    nvlm_kernels.pixel_shuffle(x).sum().backward()
    nvlm_kernels.pixel_shuffle(x.detach())  # the eager fast path opens the same range
    assert [e for e in events if e[0] == "push"] == [
        ("push", "nvlm.kernels.pixel_shuffle.fwd"),
        ("push", "nvlm.kernels.pixel_shuffle.bwd"),
        ("push", "nvlm.kernels.pixel_shuffle.fwd"),
    ]
    assert sum(e[0] == "pop" for e in events) == 3


def test_nvtx_domain_calls_work(nvtx_enabled):
    """The real nvtx package (a no-op without a profiler attached) accepts our calls."""
    if _nvtx._domain is None:
        pytest.skip("the nvtx package is not installed: ranges are no-ops")
    with _nvtx.range("nvlm.test.range"):
        pass
    assert "nvlm.test.range" in _nvtx._attributes


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_fast_path_skips_the_registered_op_only_when_unobservable(monkeypatch):
    """Plain eager calls run the backend directly; autograd, dispatch modes and fake tensors go
    through the registered op (so they see it and get its autograd formula and fake kernel)."""
    ps_module = sys.modules["nvlm_kernels.pixel_shuffle"]  # the attribute of that name is the function

    calls = []
    real_op = ps_module.pixel_shuffle_op
    monkeypatch.setattr(ps_module, "pixel_shuffle_op", lambda *a: calls.append(a) or real_op(*a))
    x = torch.randn(2, 16, 4)

    y = nvlm_kernels.pixel_shuffle(x)
    assert calls == [] and _backend.eager_fast_path(x)
    with torch.no_grad():
        nvlm_kernels.pixel_shuffle(x.clone().requires_grad_())
    assert calls == []

    xr = x.clone().requires_grad_()
    assert torch.equal(nvlm_kernels.pixel_shuffle(xr), y)
    assert len(calls) == 1 and not _backend.eager_fast_path(xr)

    with _OpRecorder() as recorder:
        assert torch.equal(nvlm_kernels.pixel_shuffle(x), y)
    assert any("nvlm_kernels.pixel_shuffle" in op for op in recorder.ops), recorder.ops
    assert len(calls) == 2

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        out = nvlm_kernels.pixel_shuffle(fake)
    assert out.shape == (2, 4, 16) and len(calls) == 3
    assert not _backend.eager_fast_path(torch.empty(2, 16, 4, device="meta"))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_backward_runs_on_the_forward_backend(monkeypatch, backend):
    """``with use_backend(b): y = op(x)`` then ``y.backward()`` outside the block: the backward
    runs on b too (it is computed from what b's forward saved)."""
    if _backend.why_unavailable("mlp_projector", backend, "cpu"):
        pytest.skip(f"{backend}: {_backend.why_unavailable('mlp_projector', backend, 'cpu')}")
    module = _backend.implementation("nvlm_kernels.mlp_projector", backend)
    calls = []
    original = module.projector_bwd
    monkeypatch.setattr(module, "projector_bwd", lambda *a: calls.append(backend) or original(*a))
    dtype = torch.float16 if backend == "triton" else torch.float32
    x = torch.randn(1, 4, 32, dtype=dtype, requires_grad=True)
    w1 = torch.randn(16, 32, dtype=dtype, requires_grad=True)
    with nvlm_kernels.use_backend(backend):
        y = nvlm_kernels.mlp_projector(x, None, None, w1)
    with nvlm_kernels.use_backend("reference" if backend == "triton" else "auto"):
        y.float().sum().backward()
    assert calls == [backend]


def test_autotune_can_be_limited_to_one_config(monkeypatch):
    """NVLM_KERNELS_AUTOTUNE=0 (gpu_check.sh's smoke step): one compile per kernel, the first
    allowed configuration; unset: every allowed one."""
    monkeypatch.delenv(_backend.AUTOTUNE_ENV_VAR, raising=False)
    assert _backend.autotune_configs(["a", "b", "c"]) == ["a", "b", "c"]
    monkeypatch.setenv(_backend.AUTOTUNE_ENV_VAR, "0")
    assert _backend.autotune_configs(["a", "b", "c"]) == ["a"]
