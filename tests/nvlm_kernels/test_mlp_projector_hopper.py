"""The projector's ``hopper`` backend (sm_90: LayerNorm pass + persistent TMA-fed GEMM1) against the
published projector, through the Triton interpreter on CPU (fp16; the interpreter emulates the TMA
descriptors, their out-of-bounds zero fill and clipped stores included) and on a Hopper GPU.

The oracle and the FlashAttention-rule comparison are test_mlp_projector.py's (``check``): the
InternVL / NVLM sequence written out in float64 and in the kernel's dtype.
"""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels import _backend
from nvlm_kernels.mlp_projector import hopper, mlp_projector_bwd_op, mlp_projector_op
from nvlm_kernels.testing import assert_close_flash, require_backend
from tests.nvlm_kernels.test_mlp_projector import _dtypes, check, make_inputs, oracle

OP = "mlp_projector"
BACKEND = "hopper"


@pytest.fixture(params=hopper.FORMS)
def form(request, monkeypatch):
    """Both GEMM1 forms: the LayerNorm pass + TMA A tile, and the LayerNorm applied on load."""
    monkeypatch.setenv(hopper.FORM_ENV_VAR, request.param)
    return request.param


@pytest.mark.parametrize(
    "variant, images, side, hidden",
    [
        ("nvlm-d/h", 1, 2, 96),  # one output token
        ("internvl", 3, 6, 96),  # 27 tokens; N1 = 96: a ragged second column tile, TMA stores
        ("gelu_tanh+ln-x", 2, 8, 40),  # N1 % 8 == 0 but < one tile
        ("nvlm-d/h", 7, 8, 12),  # 112 rows (two row tiles) and N1 % 8 != 0: the pointer-store epilogue
    ],
)
def test_shuffle_and_cls_drop(device, form, variant, images, side, hidden, poison_empty):
    require_backend(OP, BACKEND, device)
    for dtype in _dtypes(device):
        check(variant, images, side, 16, hidden, 24, dtype, device, shuffle=True, drop_cls=True, backend=BACKEND)


@pytest.mark.parametrize("variant", ["nvlm-x", "internvl"])
def test_already_shuffled_tokens(device, form, variant, poison_empty):
    """No shuffle, no CLS: without a LayerNorm (nvlm-x) the ``ln_pass`` form reads x's rows in place."""
    require_backend(OP, BACKEND, device)
    check(variant, 2, 27, 64, 48, 24, torch.float16, device, shuffle=False, drop_cls=False, backend=BACKEND)


def test_persistent_programs_walk_many_tiles(device, monkeypatch):
    """More output tiles than persistent programs, a ragged last round: every tile written once (the
    kernel really runs: its launcher is counted)."""
    require_backend(OP, BACKEND, device)
    monkeypatch.setattr(hopper, "_INTERPRETER_PROGRAMS", 2)
    launches = []
    launch = hopper._gemm1
    monkeypatch.setattr(hopper, "_gemm1", lambda *a: launches.append(a) or launch(*a))
    check("nvlm-d/h", 5, 8, 16, 200, 24, torch.float16, device, shuffle=True, drop_cls=True, backend=BACKEND)
    assert len(launches) == 2  # the call that saves for backward and the no-grad fast path


def test_unaligned_rows_and_strided_weight(device):
    """x's rows not 16-byte aligned (an odd offset view) and a transposed-then-back W1 view: gathered
    and copied once, with the same result as the contiguous inputs."""
    require_backend(OP, BACKEND, device)
    params = make_inputs("nvlm-x", 2, 27, 64, 48, 24, torch.float16, device, shuffle=False, drop_cls=False)
    padded = torch.zeros(2, 27, 65, dtype=torch.float16, device=device)
    padded[..., 1:] = params["x"]
    x = padded[..., 1:]  # rows 130 bytes apart, base 2 bytes off: no TMA descriptor can address it
    w1 = params["w1"].t().contiguous().t()  # strided: features 48 elements apart
    assert hopper._rows_view(x, 1, 0) is None and not hopper.tma_ok(w1)
    with nk.use_backend(BACKEND):
        got = nk.mlp_projector(x, None, None, w1, None, None, None)
    want = oracle(params["x"].double().cpu(), None, None, params["w1"].double().cpu(), None, None, None, eps=1e-5,
                  activation="gelu", shuffle=False, drop_cls=False)  # fmt: skip
    lo = oracle(params["x"].cpu(), None, None, params["w1"].cpu(), None, None, None, eps=1e-5, activation="gelu",
                shuffle=False, drop_cls=False)  # fmt: skip
    assert_close_flash(got.cpu(), lo, want, name="output")


def test_k_not_multiple_of_8_is_refused_by_name(device):
    """TMA needs 16-byte rows: K = 4·3 = 12 features is refused with the reason; auto never picks hopper."""
    require_backend(OP, BACKEND, device)
    params = make_inputs("nvlm-d/h", 1, 4, 3, 16, 8, torch.float16, device, shuffle=True, drop_cls=True)
    with nk.use_backend(BACKEND), pytest.raises(_backend.BackendUnavailableError, match="K % 8 == 0"):
        nk.mlp_projector(*params.values(), pixel_shuffle=0.5, drop_cls=True)


def test_auto_never_picks_the_unmeasured_hopper_backend(device):
    params = make_inputs("nvlm-d/h", 1, 4, 16, 16, 8, torch.float16, device, shuffle=True, drop_cls=True)
    with _backend.record_selections() as picks:
        nk.mlp_projector(*params.values(), pixel_shuffle=0.5, drop_cls=True)
    assert picks and all(p["backend"] != BACKEND for p in picks), picks


def test_opcheck(device):
    require_backend(OP, BACKEND, device)
    params = make_inputs("internvl", 2, 4, 16, 48, 16, torch.float16, device, shuffle=True, drop_cls=True)
    leaves = [v.requires_grad_() for v in params.values()]
    args = (*leaves, 1e-5, "gelu", 2, True, 1, True)
    torch.library.opcheck(mlp_projector_op, (*args, BACKEND))
    out, mean, rstd, pre = mlp_projector_op(*args, BACKEND)
    plain = [v.detach() for v in leaves]
    torch.library.opcheck(
        mlp_projector_bwd_op,
        (torch.randn_like(out).detach(), *plain, mean, rstd, pre, 1e-5, "gelu", 2, True, 1, 0b1111111, BACKEND),
    )


def test_form_environment_variable_is_checked(monkeypatch):
    monkeypatch.setenv(hopper.FORM_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=hopper.FORM_ENV_VAR):
        hopper.form()
