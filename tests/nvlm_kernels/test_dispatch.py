"""The measured dispatch table and auto's rules: no entry -> the op's default peer (never an
unmeasured kernel of ours; never FlexAttention on a CPU); a usable measured entry wins; the user
file overrides the shipped one; malformed files fail clearly; choices are cached per shape bucket,
read no tensor values, and are constants of a torch.compile graph; the tuner writes valid tables."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels import _backend, _dispatch

TOY = "toy_dispatch_op"
CPU_KIND = _dispatch.device_kind("cpu")


@pytest.fixture(autouse=True)
def fresh(monkeypatch, tmp_path):
    """A toy op with two peers, an empty shipped table, no user table, and empty caches."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"format": 1, "entries": []}))
    monkeypatch.setattr(_dispatch, "SHIPPED", shipped)
    entry = _backend.OpBackends(TOY, True, None, ("sdpa", "flex"), {"cpu": "sdpa", "cuda": "flex"})
    monkeypatch.setitem(_backend._REGISTRY, TOY, entry)
    _backend.reset_caches()
    yield shipped
    _backend.reset_caches()


def _entry(**changes) -> dict:
    entry = {
        "op": TOY, "device": CPU_KIND, "dtype": "float32", "bucket": "S=64", "pass": "fwd", "backend": "triton",
        "times_us": {"triton": 1.0, "sdpa": 2.0}, "measured": {"date": "2026-11-29", "commit": "abc1234"},
    }  # fmt: skip
    entry.update(changes)
    return entry


def _table(path, *entries) -> str:
    path.write_text(json.dumps({"format": 1, "entries": list(entries)}))
    return str(path)


def _select(bucket="S=64", grad=False, unsupported=(), dtype=torch.float32, device="cpu"):
    return _backend.select(TOY, torch.device(device), dtype, bucket, grad, unsupported)


def test_no_measurement_takes_the_default_peer():
    assert _select() == "sdpa"
    why = _backend.explain(TOY, "cpu", torch.float32, "S=64").reason
    assert "no measurement" in why and "default peer" in why


def test_flex_is_never_auto_on_a_cpu(monkeypatch):
    entry = _backend.OpBackends(TOY, True, None, ("flex", "sdpa"), {"cpu": "flex"})
    monkeypatch.setitem(_backend._REGISTRY, TOY, entry)
    _backend.reset_caches()
    assert _select() == "sdpa"
    assert _backend.auto_choice(TOY, "cpu")[0] == "sdpa"


def test_ops_without_peers_keep_the_kernel_order():
    assert _backend.select("pixel_shuffle", torch.device("cpu"), torch.float32, "", False) == "reference"


def test_no_peer_usable_falls_back_to_the_reference_not_our_kernels(monkeypatch):
    monkeypatch.setattr(_backend, "why_unavailable", lambda op, b, d: None if b in ("reference", "triton") else "no")
    _backend.reset_caches()
    assert _select() == "reference"


def test_a_usable_measured_entry_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(_dispatch.ENV_VAR, _table(tmp_path / "user.json", _entry()))
    assert _select() == "triton"
    why = _backend.explain(TOY, "cpu", torch.float32, "S=64").reason
    assert "measured on" in why and "abc1234" in why and "2026-11-29" in why
    # the entry is for one (dtype, bucket, pass): anything else is unmeasured
    assert _select(bucket="S=128") == "sdpa"
    assert _select(grad=True) == "sdpa"
    assert _select(dtype=torch.float16) == "sdpa"


def test_a_measured_backend_that_cannot_run_the_call_falls_back_to_the_peer(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(_dispatch.ENV_VAR, _table(tmp_path / "user.json", _entry()))
    with caplog.at_level(logging.INFO, logger="nvlm_kernels"):
        assert _select(unsupported=(("triton", "not this dtype"),)) == "sdpa"
    assert "measured fastest but unusable here: not this dtype" in caplog.text


def test_user_file_overrides_shipped_entries(fresh, monkeypatch, tmp_path):
    _table(fresh, _entry(backend="flex"), _entry(bucket="S=128", backend="flex"))
    monkeypatch.setenv(_dispatch.ENV_VAR, _table(tmp_path / "user.json", _entry(backend="triton")))
    assert _select() == "triton"  # the user's entry replaced the shipped one of the same key
    assert _select(bucket="S=128") == "flex"  # flex is measured here, so auto may take it (cpu forward)


def test_explicit_requests_never_fall_back():
    with nk.use_backend("unfused"):
        with pytest.raises(nk.BackendUnavailableError, match="has no 'unfused' backend"):
            _select()
    with nk.use_backend("triton"):
        with pytest.raises(nk.BackendUnavailableError, match="float32 is not taken"):
            _select(unsupported=(("triton", "float32 is not taken"),))
        assert _select() == "triton"


BAD_TABLES = [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "top level: must be a JSON object"),
    (json.dumps({"format": 2, "entries": []}), "'format' must be 1"),
    (json.dumps({"format": 1, "entries": {}}), "'entries' must be a list"),
    (json.dumps({"format": 1, "entries": [_entry(), "x"]}), "entry 1: must be an object"),
    (json.dumps({"format": 1, "entries": [_entry(), _entry(op="nope")]}), "entry 1 (op 'nope'): unknown op"),
]
BAD_ENTRIES = [
    ({"backend": "unfused"}, f"{TOY} has no backend 'unfused'"),
    ({"dtype": "fp8"}, "dtype must be one of"),
    ({"pass": "bwd"}, "pass must be one of"),
    ({"device": ""}, "field 'device' must be a non-empty string"),
    ({"bucket": 3}, "field 'bucket' must be a string"),
    ({"times_us": {"a": "x"}}, "'times_us' must map"),
]
BAD_TABLES += [
    (json.dumps({"format": 1, "entries": [_entry(), _entry(**change)]}), f"entry 1 (op '{TOY}'): {message}")
    for change, message in BAD_ENTRIES
]


@pytest.mark.parametrize("text, message", BAD_TABLES, ids=[m for _, m in BAD_TABLES])
def test_a_malformed_table_names_the_file_and_the_entry(monkeypatch, tmp_path, text, message):
    path = tmp_path / "bad table.json"
    path.write_text(text)
    monkeypatch.setenv(_dispatch.ENV_VAR, str(path))
    with pytest.raises(_dispatch.DispatchTableError) as info:
        _select()
    assert str(path) in str(info.value) and message in str(info.value)


def test_a_missing_user_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(_dispatch.ENV_VAR, str(tmp_path / "absent.json"))
    with pytest.raises(_dispatch.DispatchTableError, match="absent.json: cannot be read"):
        _select()


def test_choices_are_cached_per_bucket(monkeypatch, tmp_path):
    monkeypatch.setenv(_dispatch.ENV_VAR, _table(tmp_path / "user.json", _entry()))
    lookups = []
    table = _backend.dispatch_table()
    real = table.lookup
    monkeypatch.setattr(table, "lookup", lambda *a: lookups.append(a) or real(*a))
    for _ in range(5):
        assert _select() == "triton"
        assert _select(bucket="S=128") == "sdpa"
    assert len(lookups) == 2


def test_the_shipped_table_is_valid():
    entries = _dispatch.read(_dispatch.pathlib.Path(nk.__file__).with_name("dispatch_table.json"), {
        name: op.backends for name, op in _backend.registered_ops().items()
    })  # fmt: skip
    for entry in entries:  # every shipped measurement says where and when it was made
        info = dict(entry.measured)
        assert entry.device and info.get("date") and info.get("commit"), entry


def test_select_is_a_constant_of_a_compiled_graph():
    """Under torch.compile(fullgraph=True) the choice is made once, at trace time, from a bucket
    that guards on ranges of the (dynamic) size, not on its value."""

    def f(x):
        bucket = f"S={_backend.pow2_bucket(x.shape[1])}"
        backend = _backend.select(TOY, x.device, x.dtype, bucket, False)
        return x * 2 if backend == "sdpa" else x * 3

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="eager")
    with _backend.record_selections() as calls:
        assert torch.equal(compiled(torch.ones(2, 40)), torch.full((2, 40), 2.0))
        assert torch.equal(compiled(torch.ones(2, 50)), torch.full((2, 50), 2.0))  # same bucket: no retrace
        with nk.use_backend("reference"):  # baked into the graph: takes a recompile to change
            assert torch.equal(compiled(torch.ones(2, 60)), torch.full((2, 60), 2.0))
    assert [c["bucket"] for c in calls] == ["S=64"]


def test_pow2_bucket():
    assert [_backend.pow2_bucket(n) for n in (0, 1, 2, 3, 64, 65, 1025)] == [1, 1, 2, 4, 64, 128, 2048]


def test_tuner_writes_a_table_that_auto_then_follows(monkeypatch, tmp_path):
    """One small case on the CPU: every backend measured, the fastest written with its times, and
    the written file, used as the user table, decides auto for that bucket."""
    from nvlm_kernels import tune

    out = tmp_path / "tuned.json"
    case = tune.vit_case(1, 33, 2, 64)
    case.passes = ("fwd",)
    entries = tune.tune([case], torch.device("cpu"), [torch.float32], out, log=lambda m: None)
    assert len(entries) == 1
    entry = entries[0]
    assert entry["op"] == "vit_attention" and entry["pass"] == "fwd" and entry["device"] == CPU_KIND
    assert set(entry["times_us"]) >= {"sdpa", "reference"} and entry["backend"] == min(
        entry["times_us"], key=entry["times_us"].get
    )
    assert _dispatch.read(out, {n: o.backends for n, o in _backend.registered_ops().items()})
    monkeypatch.setenv(_dispatch.ENV_VAR, str(out))
    _backend.reset_caches()
    q = torch.randn(1, 33, 2, 64)
    with _backend.record_selections() as calls:
        nk.vit_attention(q, q, q)
    assert calls[0]["bucket"] == entry["bucket"] and calls[0]["backend"] == entry["backend"]


def test_info_shows_measurements(tmp_path):
    path = _table(tmp_path / "user.json", _entry(op="vit_attention", backend="reference", bucket="S=1024,D=64,TH=8"))
    out = subprocess.run(
        [sys.executable, "-m", "nvlm_kernels.info"], capture_output=True, text=True, check=True, timeout=120,
        cwd=tmp_path, env={**__import__("os").environ, _dispatch.ENV_VAR: path},
    ).stdout  # fmt: skip
    assert "measured: float32 S=1024,D=64,TH=8 fwd -> reference" in out
    assert "auto picks: sdpa where nothing was measured (the default peer)" in out


def test_tuner_case_specs():
    """--preset takes a model's shapes; --case parses explicit ones (nothing measured here)."""
    from nvlm_kernels import tune

    cases = {c.op: c for c in tune.preset_cases("nvlm-x-72b")}
    assert cases["vit_qk_norm_attention"].label == "7x1025x25x128"
    assert cases["mlp_projector"].label == "1792tok,12800->8192"  # NVLM-X: one Linear
    assert "B1,Sq2048,Skv1792,64/8x128" in [c.label for c in tune.preset_cases("nvlm-x-72b")]
    assert [c.op for c in tune.preset_cases("nvlm-d-72b")] == ["vit_qk_norm_attention", "mlp_projector"]
    assert tune.parse_case("vit_attention:T=7,S=1025,H=16,D=64").label == "7x1025x16x64"
    with pytest.raises(SystemExit, match="missing D"):
        tune.parse_case("vit_attention:T=7,S=1025,H=16")
    with pytest.raises(SystemExit, match="unknown op"):
        tune.parse_case("flash:T=1")
