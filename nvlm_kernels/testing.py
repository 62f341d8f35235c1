"""Tolerance helpers shared by tests and benchmarks (design.md §5).

* Pointwise / norms: ``assert_close_pointwise`` with one per-dtype table (torch's defaults).
* Attention / GEMM-like: FlashAttention's rule, ``assert_close_flash``: with ``ref_hi`` the reference
  in fp64 and ``ref_lo`` the same reference computed in the kernel's dtype,
  ``max|out - ref_hi| <= factor * max|ref_lo - ref_hi| + 2 * max|round(ref_hi) - ref_hi| + floor``
  (and at least one ulp of the largest value for float16/bfloat16 outputs). It adapts to shape
  and dtype.
* Data movement: exact (``torch.equal``), no helper needed.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# (rtol, atol): torch.testing's defaults for each dtype.
POINTWISE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for pointwise comparisons in ``dtype``."""
    try:
        return POINTWISE_TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for dtype {dtype}") from None


def assert_close_pointwise(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None) -> None:
    rtol, atol = tolerance(dtype or actual.dtype)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


def flash_error_bound(
    ref_lo: torch.Tensor,
    ref_hi: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> float:
    """The allowed max abs error of a kernel output: ``factor * max|ref_lo - ref_hi|``, plus (as
    FlashAttention's tests do) twice the error of merely rounding ``ref_hi`` to the output dtype,
    plus ``floor``; and for float16/bfloat16 outputs at least one ulp of the largest value (where
    the low-precision reference happens to be exact, e.g. a softmax over one key, twice its error
    is zero, yet an output rounded to the dtype can do no better than that)."""
    hi = ref_hi.double()
    bound = factor * (ref_lo.double() - hi).abs().max().item() + floor
    if out_dtype is not None and out_dtype != torch.float64:
        bound += 2 * (hi.to(out_dtype).double() - hi).abs().max().item()
        if out_dtype in (torch.float16, torch.bfloat16):
            bound = max(bound, torch.finfo(out_dtype).eps * hi.abs().max().item())
    return bound


def assert_close_flash(
    out: torch.Tensor,
    ref_lo: torch.Tensor,
    ref_hi: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float = 1e-5,
    name: str = "output",
) -> None:
    """FlashAttention's accuracy rule: the kernel may be at most ``factor`` times as far from the
    fp64 truth as the reference computed in the kernel's own dtype, plus a small floor."""
    if out.shape != ref_hi.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_hi.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: non-finite values in the kernel output")
    err = (out.double() - ref_hi.double()).abs().max().item() if out.numel() else 0.0
    bound = flash_error_bound(ref_lo, ref_hi, factor=factor, floor=floor, out_dtype=out.dtype) if out.numel() else floor
    if err > bound:
        raise AssertionError(
            f"{name}: max abs error {err:.3e} exceeds {factor}x the reference's own error ({bound:.3e})"
        )


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floating) so unwritten outputs are caught by comparisons."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


def require_backend(op: str, backend: str, device: str) -> None:
    """In a pytest test: skip, giving the reason, when ``backend`` cannot run ``op`` on ``device`` here."""
    import pytest

    from nvlm_kernels import available_backends

    reason = available_backends(op, device)[backend]
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable for {op} on {device}: {reason}")


class HostSyncCounter(TorchDispatchMode):
    """Counts what brings a device value to the host while it is active: ``aten._local_scalar_dense``,
    ``is_nonzero``, ``item`` (``int(t)``, ``bool(t)``, ``t.item()``), ``nonzero`` (its output size
    needs one) and ``Tensor.tolist`` (which reads the data without dispatching an op). It also sees
    inside our own custom ops (re-run below the mode with the mode on; a dispatch mode alone would
    see only the op) and inside higher-order ops (FlexAttention). On a GPU each is a device sync
    that stalls the host and breaks CUDA-graph capture; on a CPU the same code makes the same calls,
    which is how CPU tests check for them.

        with HostSyncCounter() as syncs:
            model.decode_step(...)
        assert syncs.calls == []
    """

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        aten = torch.ops.aten
        self.watched = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default}
        self.watched.add(aten.nonzero.default)
        self.calls: list[str] = []
        self._tolist = None

    def __enter__(self):
        self._tolist = tolist = torch.Tensor.tolist
        calls = self.calls
        torch.Tensor.tolist = lambda t: calls.append("Tensor.tolist") or tolist(t)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            with self:
                return func.dispatch(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        if func in self.watched:
            self.calls.append(str(func))
        if func.namespace == "nvlm_kernels":
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            key = torch._C.DispatchKey.CUDA if any(t.is_cuda for t in tensors) else torch._C.DispatchKey.CPU
            with self:
                return func.redispatch(torch._C.DispatchKeySet(key), *args, **kwargs)
        return func(*args, **kwargs)


class OpCalls:
    """Counts the ranges our ops open while it is active (``nvlm_kernels._nvtx`` observers: every
    public op opens ``nvlm.kernels.<op>.<pass>``), to show that a patched model really runs our ops.

        with OpCalls() as calls:
            model(**inputs)
        assert calls.count("vit_qk_norm_attention") == num_layers
    """

    def __init__(self) -> None:
        self.labels: list[str] = []

    def range_enter(self, label: str) -> None:
        self.labels.append(label)

    def range_exit(self, label: str) -> None:
        pass

    def count(self, op: str, kind: str = "fwd") -> int:
        """Calls of ``op`` (``kind``: "fwd", "bwd", "decode", ... or "" for any)."""
        prefix = f"nvlm.kernels.{op}."
        return sum(1 for label in self.labels if label.startswith(prefix) and (not kind or label.endswith(f".{kind}")))

    def __enter__(self) -> OpCalls:
        from nvlm_kernels import _nvtx

        _nvtx.add_observer(self)
        return self

    def __exit__(self, *exc) -> None:
        from nvlm_kernels import _nvtx

        _nvtx.remove_observer(self)
