"""``python -m nvlm_kernels.tune``: measure every backend of each op here and write a dispatch table.

For each case (an op at one shape and dtype) and pass (``fwd``: no autograd graph; ``fwd+bwd``: a
forward and the backward of all differentiable inputs), every backend that can run the call here is
checked against the op's default peer (a backend whose result is wrong is reported and never
chosen), then timed; the fastest becomes the table's entry for the call's shape bucket (the bucket
the op itself computes, read with ``_backend.record_selections``), with every time measured, the
device, date, commit and versions. Use the file it writes with ``NVLM_KERNELS_DISPATCH=path``
(or copy entries into the package's ``dispatch_table.json``).

    python -m nvlm_kernels.tune                          # targets.md shapes (GPU) or small shapes (CPU)
    python -m nvlm_kernels.tune --preset nvlm-d-72b      # the shapes of a model (nvlm presets)
    python -m nvlm_kernels.tune --case vit_attention:T=3,S=257,H=16,D=64 --dtype float16
    python -m nvlm_kernels.tune --budget 120 --out table.json   # stop starting cases after 120 s

Timing: CUDA ``triton.testing.do_bench`` (median, L2 flushed), CPU wall clock (median of a few).
The file is rewritten after every case, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import nvlm_kernels as nk
from nvlm_kernels import _backend, _dispatch

DTYPES = _dispatch.DTYPES


@dataclasses.dataclass
class TuneCase:
    """One op at one shape: ``make(device, dtype)`` returns (run, differentiable inputs), where
    ``run()`` calls the public op on the inputs under whatever backend is in effect."""

    op: str
    label: str
    make: Callable[[torch.device, torch.dtype], tuple[Callable[[], torch.Tensor], list[torch.Tensor]]]
    passes: tuple[str, ...] = ("fwd", "fwd+bwd")


def _randn(*shape, device, dtype, scale: float = 1.0, gen=None) -> torch.Tensor:
    return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)


# --------------------------------------------------------------------------------------------------
# cases


def vit_case(t: int, s: int, h: int, d: int) -> TuneCase:
    def make(device, dtype):
        q, k, v = (_randn(t, s, h, d, device=device, dtype=dtype) for _ in range(3))
        return (lambda: nk.vit_attention(q, k, v)), [q, k, v]

    return TuneCase("vit_attention", f"{t}x{s}x{h}x{d}", make)


def vit_qk_norm_case(t: int, s: int, h: int, d: int, norm_features: int | None = None) -> TuneCase:
    def make(device, dtype):
        qkv = _randn(t, s, 3 * h * d, device=device, dtype=dtype)
        wq, wk = (1 + _randn(h * d, device=device, dtype=dtype, scale=0.1) for _ in range(2))
        run = lambda: nk.vit_qk_norm_attention(qkv, wq, wk, num_heads=h, norm_features=norm_features)  # noqa: E731
        return run, [qkv, wq, wk]

    suffix = f",norm{norm_features}" if norm_features else ""
    return TuneCase("vit_qk_norm_attention", f"{t}x{s}x{h}x{d}{suffix}", make)


def cross_case(
    b: int, sq: int, skv_tiles: int, hq: int, hkv: int, d: int, *, images: int = 1, tokens_per_tile: int = 256
) -> TuneCase:
    """NVLM-X layout: ``images`` images of ``skv_tiles // images`` tiles each, spread over the text,
    each tile's tag token before it; Sq = 1 is decoding (every row sees all keys)."""
    skv = skv_tiles * tokens_per_tile

    def make(device, dtype):
        q = _randn(b, sq, hq, d, device=device, dtype=dtype)
        k, v = (_randn(b, skv, hkv, d, device=device, dtype=dtype) for _ in range(2))
        gate = torch.full((1,), 0.5, device=device, dtype=dtype)
        if sq == 1:
            start = torch.zeros((b, 1), dtype=torch.int32, device=device)
            end = torch.full((b, 1), skv, dtype=torch.int32, device=device)
        else:
            per_image = skv_tiles // images
            positions = torch.tensor([[i * sq // images + 1 for i in range(images)]] * b, device=device)
            tiles = torch.full((b, images), per_image, device=device)
            tag_tiles = torch.full((b, sq), -1, dtype=torch.long, device=device)
            for i in range(images):  # each image's tile tags follow its position
                for tile in range(per_image):
                    tag_tiles[:, int(positions[0, i]) + 1 + tile] = i * per_image + tile
            start, end = nk.cross_attention_ranges(
                positions, tiles, sq, policy="nvlm-x", tag_tiles=tag_tiles, tokens_per_tile=tokens_per_tile
            )
        run = lambda: nk.gated_cross_attention(q, k, v, start, end, gate)  # noqa: E731
        return run, [q, k, v, gate]

    label = f"B{b},Sq{sq},Skv{skv},{hq}/{hkv}x{d}" + (f",{images}img" if images > 1 else "")
    return TuneCase("gated_cross_attention", label, make, ("fwd",) if sq == 1 else ("fwd", "fwd+bwd"))


def projector_case(
    tiles: int, side: int, channels: int, hidden: int | None, out: int, *, layer_norm: bool = True
) -> TuneCase:
    """The ViT output [tiles, side² + 1, channels] through CLS drop + 2x2 shuffle + LayerNorm +
    Linear (+ GELU + Linear when ``hidden``)."""
    k = 4 * channels

    def make(device, dtype):
        x = _randn(tiles, side * side + 1, channels, device=device, dtype=dtype)
        ln_w = (1 + _randn(k, device=device, dtype=dtype, scale=0.1)) if layer_norm else None
        ln_b = _randn(k, device=device, dtype=dtype, scale=0.1) if layer_norm else None
        first = hidden or out
        w1 = _randn(first, k, device=device, dtype=dtype, scale=k**-0.5)
        w2 = _randn(out, hidden, device=device, dtype=dtype, scale=hidden**-0.5) if hidden else None
        run = lambda: nk.mlp_projector(x, ln_w, ln_b, w1, w2, pixel_shuffle=0.5, drop_cls=True)  # noqa: E731
        return run, [t for t in (x, ln_w, ln_b, w1, w2) if t is not None]

    layers = f"{k}->{hidden}->{out}" if hidden else f"{k}->{out}"
    return TuneCase("mlp_projector", f"{tiles * side * side // 4}tok,{layers}", make)


def target_cases() -> list[TuneCase]:
    """targets.md rows b, b', c, c', d, d', d'' (NVLM-72B shapes)."""
    return [
        vit_qk_norm_case(7, 1025, 25, 128),  # b: InternViT-6B (QK-norm form)
        vit_case(7, 1025, 25, 128),  # b: the attention alone
        vit_case(7, 1025, 16, 64),  # b': InternViT-300M
        projector_case(7, 32, 3200, 29568, 8192),  # c: NVLM-D/H
        projector_case(7, 32, 3200, None, 8192, layer_norm=False),  # c': NVLM-X
        cross_case(1, 2048, 7, 64, 8, 128),  # d
        cross_case(1, 2048, 7, 64, 8, 128, images=7),  # d': 1/7 of the mask set
        cross_case(64, 1, 7, 64, 8, 128),  # d'': decoding
    ]


def small_cases() -> list[TuneCase]:
    """Shapes that run in seconds on a CPU (and in the Triton interpreter): what a CPU run and the
    GPU check's dry run measure."""
    return [
        vit_case(2, 65, 4, 64),
        vit_qk_norm_case(2, 65, 4, 64),
        projector_case(2, 8, 32, 64, 48),
        cross_case(2, 64, 2, 4, 2, 64, tokens_per_tile=16),
        cross_case(3, 1, 2, 4, 2, 64, tokens_per_tile=16),
    ]


def preset_cases(name: str) -> list[TuneCase]:
    """The shapes of an ``nvlm`` preset: a request of 6 tiles + thumbnail and 2048 text tokens.
    (The model layer lives above this package; it is imported only for this option.)"""
    from nvlm.config import NVLMConfig

    cfg = NVLMConfig.from_preset(name)
    vision, llm, tiles = cfg.vision, cfg.llm, 7
    cases = []
    if vision.qk_norm:
        cases.append(vit_qk_norm_case(tiles, vision.seq_len, vision.num_heads, vision.head_dim))
    else:
        cases.append(vit_case(tiles, vision.seq_len, vision.num_heads, vision.head_dim))
    side = vision.grid
    proj = cfg.projector
    cases.append(
        projector_case(tiles, side, vision.hidden_size, proj.hidden, llm.hidden_size, layer_norm=proj.layer_norm)
    )
    if cfg.xattn is not None:
        hq = cfg.xattn.num_heads or llm.num_heads
        hkv = cfg.xattn.num_kv_heads or llm.num_kv_heads
        cases.append(cross_case(1, 2048, tiles, hq, hkv, llm.head_dim, tokens_per_tile=cfg.tokens_per_tile))
        cases.append(cross_case(64, 1, tiles, hq, hkv, llm.head_dim, tokens_per_tile=cfg.tokens_per_tile))
    return cases


def parse_case(text: str) -> TuneCase:
    """``op:K=V,...``: vit_attention:T,S,H,D; vit_qk_norm_attention:T,S,H,D[,F];
    mlp_projector:TILES,SIDE,C,HIDDEN(0: one layer),OUT[,LN=0]; gated_cross_attention:B,SQ,TILES,HQ,HKV,D[,IMAGES,P]."""
    op, _, spec = text.partition(":")
    values = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if not value.lstrip("-").isdigit():
            raise SystemExit(f"--case {text!r}: {part!r} is not KEY=INTEGER")
        values[key.strip().upper()] = int(value)

    def need(*keys):
        missing = [k for k in keys if k not in values]
        if missing:
            raise SystemExit(f"--case {text!r}: missing {', '.join(missing)}")
        return [values[k] for k in keys]

    if op == "vit_attention":
        return vit_case(*need("T", "S", "H", "D"))
    if op == "vit_qk_norm_attention":
        return vit_qk_norm_case(*need("T", "S", "H", "D"), values.get("F"))
    if op == "mlp_projector":
        tiles, side, c, hidden, out = need("TILES", "SIDE", "C", "HIDDEN", "OUT")
        return projector_case(tiles, side, c, hidden or None, out, layer_norm=bool(values.get("LN", 1)))
    if op == "gated_cross_attention":
        b, sq, tiles, hq, hkv, d = need("B", "SQ", "TILES", "HQ", "HKV", "D")
        return cross_case(
            b, sq, tiles, hq, hkv, d, images=values.get("IMAGES", 1), tokens_per_tile=values.get("P", 256)
        )
    raise SystemExit(f"--case {text!r}: unknown op {op!r}")


# --------------------------------------------------------------------------------------------------
# measuring


def _timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Median microseconds of one call."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3

    def cpu(fn):
        fn()
        samples = []
        end = time.perf_counter() + 0.5
        while len(samples) < 3 or (len(samples) < 15 and time.perf_counter() < end):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e6)
        return statistics.median(samples)

    return cpu


def _pass_fn(run, inputs, pass_: str) -> Callable[[], list[torch.Tensor]]:
    if pass_ == "fwd":

        def forward():
            with torch.no_grad():
                return [run()]

        return forward
    for x in inputs:  # run() closes over these leaves
        x.requires_grad_(True)
    grad_out: list[torch.Tensor] = []  # one fixed upstream gradient, the same for every backend

    def forward_backward():
        for x in inputs:
            x.grad = None
        out = run()
        if not grad_out:
            gen = torch.Generator(device="cpu").manual_seed(1)
            grad_out.append(torch.randn(out.shape, generator=gen).to(out))
        out.backward(grad_out[0])
        return [out, *[x.grad for x in inputs]]

    return forward_backward


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> str | None:
    """None when ``got`` agrees with ``want`` to a loose tolerance (relative to each tensor's size):
    the check is against wrong results, not rounding."""
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g is None or w is None:
            if g is not w:
                return f"result {i}: one backend returned no gradient"
            continue
        g, w = g.double(), w.double()
        if not torch.isfinite(g).all():
            return f"result {i}: non-finite values"
        scale = w.abs().max().item() if w.numel() else 0.0
        err = (g - w).abs().max().item() if w.numel() else 0.0
        if err > 0.03 * scale + 1e-6:  # 3 % of the largest value: far above rounding, far below a wrong result
            return f"result {i}: max error {err:.3g} against the default peer's (scale {scale:.3g})"
    return None


def _git_commit() -> str:
    try:
        here = pathlib.Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def candidates(op: str, device: torch.device, skip: tuple[str, ...] = ()) -> list[str]:
    """The backends of ``op`` that can run on ``device`` here, the default peer first (it is the
    baseline the others are checked against)."""
    info = _backend.registered_ops()[op]
    default = info.default_peer.get(device.type)
    order = ([default] if default else []) + [b for b in info.backends if b != default]
    return [b for b in order if b not in skip and _backend.why_unavailable(op, b, device) is None]


def measure_case(
    case: TuneCase,
    device: torch.device,
    dtype: torch.dtype,
    log=print,
    skip: tuple[str, ...] = (),
    deadline: float = math.inf,
) -> list[dict]:
    """Entries (dicts in the table's format) for one case, one per pass that could be measured.
    Past ``deadline`` (a ``time.perf_counter()`` value) nothing new starts, and a pass whose
    backends were not all measured writes no entry (it could not name the fastest)."""
    timer = _timer(device)
    entries = []
    for pass_ in case.passes:
        if time.perf_counter() > deadline:
            break
        run, inputs = case.make(device, dtype)
        fn = _pass_fn(run, inputs, pass_)
        baseline: list[torch.Tensor] | None = None
        times: dict[str, float] = {}
        bucket = None
        complete = True
        for backend in candidates(case.op, device, skip):
            if time.perf_counter() > deadline:
                complete = False
                log(f"  {case.op} {case.label} {pass_}: out of time before {backend}; no entry")
                break
            try:
                with nk.use_backend(backend, ops=case.op), _backend.record_selections() as calls:
                    result = [r.detach().clone() if r is not None else None for r in fn()]
                    mine = [c for c in calls if c["op"] == case.op]
                    if mine:
                        bucket = mine[0]["bucket"]
                    wrong = _close(result, baseline) if baseline is not None else None
                    if baseline is None:
                        baseline = result
                    if wrong:
                        log(f"  {case.op} {case.label} {pass_}: {backend} is WRONG ({wrong}); not a candidate")
                        continue
                    times[backend] = timer(fn)
            except nk.BackendUnavailableError as exc:
                log(f"  {case.op} {case.label} {pass_}: {backend} cannot run it ({str(exc).split(': ')[-1]})")
                continue
            except Exception as exc:  # noqa: BLE001 - one failing backend must not stop the tuning
                log(f"  {case.op} {case.label} {pass_}: {backend} FAILED: {type(exc).__name__}: {exc}")
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
        if not times or bucket is None or not complete:
            continue
        best = min(times, key=times.get)
        log(
            f"{case.op:<24} {case.label:<34} {pass_:<8} -> {best:<10} "
            + "  ".join(f"{b} {t:.1f}us" for b, t in sorted(times.items(), key=lambda kv: kv[1]))
        )
        entries.append(
            {
                "op": case.op, "device": _dispatch.device_kind(device), "dtype": _backend.dtype_name(dtype),
                "bucket": bucket, "pass": pass_, "backend": best,
                "times_us": {b: round(t, 2) for b, t in times.items()},
                "measured": {
                    "date": datetime.date.today().isoformat(), "commit": _git_commit(), "shape": case.label,
                    "torch": torch.__version__, "triton": _triton_version(), "host": platform.node(),
                },
            }
        )  # fmt: skip
    return entries


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return "none"


def tune(
    cases: list[TuneCase],
    device: torch.device,
    dtypes: list[torch.dtype],
    out: str | os.PathLike,
    budget_s: float = math.inf,
    log=print,
    skip: tuple[str, ...] = (),
) -> list[dict]:
    """Measures ``cases`` in each dtype and writes the table to ``out`` after every case; returns
    the entries. Stops starting new cases once ``budget_s`` seconds have passed."""
    start = time.perf_counter()
    deadline = start + budget_s
    entries: list[dict] = []
    keys: dict[tuple, int] = {}
    for dtype in dtypes:
        for case in cases:
            if time.perf_counter() > deadline:
                log(f"budget of {budget_s:.0f} s spent: stopping before {case.op} {case.label}")
                _dispatch.write(out, entries)
                return entries
            for entry in measure_case(case, device, dtype, log, skip, deadline):
                key = (entry["op"], entry["device"], entry["dtype"], entry["bucket"], entry["pass"])
                if key in keys:  # two cases in one bucket: keep the later one
                    entries[keys[key]] = entry
                else:
                    keys[key] = len(entries)
                    entries.append(entry)
            _dispatch.write(out, entries)
    _dispatch.write(out, entries)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="nvlm_dispatch.json", help="the table to write (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="repeatable (default: bfloat16 "
                        "on CUDA, float32 on CPU)")  # fmt: skip
    parser.add_argument("--preset", action="append", default=[], help="an nvlm preset's shapes (repeatable)")
    parser.add_argument(
        "--case", action="append", default=[], help="explicit shape, e.g. vit_attention:T=7,S=1025,H=25,D=128"
    )
    parser.add_argument("--targets", action="store_true", help="targets.md shapes (the default on CUDA)")
    parser.add_argument("--small", action="store_true", help="small shapes (the default on CPU)")
    parser.add_argument("--ops", default="", help="comma-separated ops to keep")
    parser.add_argument("--budget", type=float, default=math.inf, help="seconds; no new case starts after")
    parser.add_argument("--skip", default=None, help="comma-separated backends not to measure (default on CUDA: "
                        "reference, the slow oracle)")  # fmt: skip
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtypes = [DTYPES[d] for d in (args.dtype or (["bfloat16"] if device.type == "cuda" else ["float32"]))]
    cases = [parse_case(c) for c in args.case]
    for preset in args.preset:
        cases += preset_cases(preset)
    if args.targets or (not cases and not args.small and device.type == "cuda"):
        cases += target_cases()
    if args.small or not cases:
        cases += small_cases()
    if args.ops:
        keep = {o.strip() for o in args.ops.split(",")}
        unknown = keep - set(_backend.registered_ops())
        if unknown:
            raise SystemExit(f"--ops: unknown {sorted(unknown)}")
        cases = [c for c in cases if c.op in keep]
    print(
        f"tuning {len(cases)} cases x {len(dtypes)} dtypes on {_dispatch.device_kind(device)} "
        f"(torch {torch.__version__}); writing {args.out}",
        flush=True,
    )
    skip = args.skip if args.skip is not None else ("reference" if device.type == "cuda" else "")
    skip = tuple(b.strip() for b in skip.split(",") if b.strip())
    entries = tune(cases, device, dtypes, args.out, args.budget, log=lambda m: print(m, flush=True), skip=skip)
    print(f"wrote {len(entries)} entries to {args.out}; use it with {_dispatch.ENV_VAR}={os.path.abspath(args.out)}")
    print(json.dumps({e["op"]: e["backend"] for e in entries}, indent=None) if entries else "nothing measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
