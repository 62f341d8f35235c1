"""Gated cross-attention benchmark (NVLM-X): text rows over image tokens, per-row key ranges.

Shapes (targets.md d, d′, d″; bf16 on a GPU): 2048 text × 1792 image tokens (7 tiles × 256),
64 query / 8 key-value heads × 128, with three masks — NVLM-X single image (tile-tag rows see one
tile, text before the image sees nothing), two interleaved images, and seven one-tile images (each
row sees 1/7 of the keys) — and decoding: batch 64, one query token over 1792 cached image keys.

Providers, all through the package's public op (one definition of each peer, in the package):
``triton`` (ours), ``hopper`` (our sm_90 variants), ``auto`` (what a user gets: the dispatch table's
choice, else the default peer — flex on CUDA, sdpa on CPU), ``sdpa`` (the op's sdpa peer: SDPA with a
dense boolean mask, as vLLM's Mllama does; torch picks the SDPA kernel) and, on CUDA, that same peer
restricted to one SDPA kernel (``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``: ``use_backend("sdpa")`` inside
``torch.nn.attention.sdpa_kernel``; flash takes no mask), ``flex`` (the op's flex peer with its
BlockMask kept from the previous call, as the cross-attention layers of one forward share it),
``flex+build`` (the BlockMask built again in every call: what one layer pays alone), ``flex-build``
(building it alone), ``reference`` (ours, dense float32). FlexAttention runs compiled on CUDA and
eagerly (forward only) on CPU. Useful TFLOP/s count only the allowed (query, key) pairs: 4·D·Hq·pairs
forward, 2.5× that backward.
Targets (H100): single image <= 200 µs; >= 2× the best SDPA row; >= 1.2× flex+build; time falling
with the mask density; decode >= 1.5× the best SDPA row.

    python bench/bench_cross_attention.py
"""

from __future__ import annotations

import contextlib

import torch

import nvlm_kernels as nk
from nvlm_kernels.cross_attention import flex as flex_backend

from common import OUR_KERNELS, Case, close_to, kernel_reason, run_module, skipped

OP = "gated_cross_attention"
KERNEL = "cross_attention.fwd"
KERNEL_BWD = "cross_attention.bwd"
KERNEL_DECODE = "cross_attention.decode"
BASELINE = "sdpa"  # the dense-mask peer
TPT = 256
SDPA_KERNELS = ("sdpa-efficient", "sdpa-cudnn", "sdpa-math")
TARGET_ROWS = {0: "d", 2: "d′"}  # targets.md rows, by layout index (decode: d″)


def _layouts(sq: int, tiles: int, device: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (kv_start, kv_end) [1, sq] for the three masks."""
    tags = torch.full((1, sq), -1, device=device)
    for tile in range(tiles):  # NVLM-X: each tile's tag is a few tokens right after the image token
        tags[0, 65 + 5 * tile : 70 + 5 * tile] = tile
    single = nk.cross_attention_ranges(
        torch.tensor([[64]], device=device), torch.tensor([[tiles]], device=device), sq, policy="nvlm-x",
        tag_tiles=tags, tokens_per_tile=TPT,
    )  # fmt: skip
    halves = torch.tensor([[(tiles + 1) // 2, tiles // 2]], device=device)
    two = nk.cross_attention_ranges(
        torch.tensor([[100, sq // 2]], device=device), halves, sq, policy="nvlm-x", tokens_per_tile=TPT
    )
    step = sq // tiles
    seven = nk.cross_attention_ranges(
        torch.arange(tiles, device=device)[None] * step, torch.ones(1, tiles, dtype=torch.long, device=device), sq,
        policy="flamingo", tokens_per_tile=TPT,
    )  # fmt: skip
    return {"nvlm-x 1 image": single, "2 images": two, f"{tiles} images (1/{tiles})": seven}


def _sdpa_context(provider: str):
    """torch's SDPA restricted to one kernel for the ``sdpa-<kernel>`` rows; nothing otherwise."""
    if provider not in SDPA_KERNELS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
              "sdpa-math": SDPBackend.MATH}[provider]  # fmt: skip
    return sdpa_kernel([kernel])


def _provider(provider: str):
    """factory(q, k, v, s, e, gate) -> one call of the public op on that provider's backend."""
    backend = {"flex+build": "flex"}.get(provider, "sdpa" if provider in SDPA_KERNELS else provider)

    def factory(q, k, v, s, e, gate):
        def run():
            if provider == "flex+build":
                flex_backend.clear_cache()  # no BlockMask kept from the previous call
            with _sdpa_context(provider), nk.use_backend(backend, ops=OP):
                return nk.gated_cross_attention(q, k, v, s, e, gate)

        return run

    return factory


def _flex_build(s, e, sq, skv):
    def run():
        flex_backend.clear_cache()
        return flex_backend.block_mask(s, e, sq, skv)

    return run


def _backward(fn_factory, q, k, v, s, e, gate):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn_factory(*leaves, s, e, gate)()
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)


def _available(fn) -> str | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - any failure: the provider cannot run here
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc) else ''}"
    return None


def _case(kernel, provider, shape, dt, fn, target="", **kwargs) -> Case:
    reason = _available(fn)
    if reason:
        return skipped(kernel, provider, shape, dt, reason)
    return Case(kernel, provider, shape, dt, fn, target=target, **kwargs)


def cases(device: str, quick: bool = False) -> list[Case]:
    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    dt = str(dtype).removeprefix("torch.")
    sq, tiles, hq, hkv, d = (2048, 7, 64, 8, 128) if on_gpu else (256, 2, 8, 2, 64)
    skv = tiles * TPT
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, sq, hq, d, generator=gen, device=device, dtype=dtype)
    k, v = (torch.randn(1, skv, hkv, d, generator=gen, device=device, dtype=dtype) for _ in range(2))
    gate = torch.tensor([0.5], device=device, dtype=dtype)
    ours = {provider: kernel_reason(OP, device, provider) for provider in OUR_KERNELS}  # provider -> why not
    reference = _provider("reference")
    tolerance = dict(atol=3e-2, rtol=3e-2) if on_gpu else dict(atol=1e-4, rtol=1e-4)
    sdpa_rows = ("sdpa", *SDPA_KERNELS) if on_gpu else ("sdpa",)
    forward = (*OUR_KERNELS, "auto", *sdpa_rows, "flex", "flex+build", "reference")
    backward = (*OUR_KERNELS, "auto", *sdpa_rows[:3], "flex")
    out: list[Case] = []
    layouts = list(_layouts(sq, tiles, device).items())
    if quick:
        layouts = layouts[:1]
    for index, (name, (s, e)) in enumerate(layouts):
        pairs = int((e - s).clamp(min=0).sum())
        flops = 4 * d * hq * pairs
        shape = f"{name} {sq}x{skv} {hq}/{hkv}h"
        target = TARGET_ROWS.get(index, "")
        expected = reference(q, k, v, s, e, gate)()  # float32 math: the check of every provider
        for provider in forward:
            row_target = "" if provider == "reference" else target
            if ours.get(provider):
                out.append(skipped(KERNEL, provider, shape, dt, ours[provider]))
                continue
            fn = _provider(provider)(q, k, v, s, e, gate)
            check = close_to(fn, expected, **tolerance)
            out.append(_case(KERNEL, provider, shape, dt, fn, row_target, flops=flops, check=check))
            if provider == "flex+build":
                out.append(_case(KERNEL, "flex-build", shape, dt, _flex_build(s, e, sq, skv), row_target))
        for provider in backward:
            if ours.get(provider):
                out.append(skipped(KERNEL_BWD, provider, shape, dt, ours[provider]))
                continue
            reason = _available(lambda p=provider, s=s, e=e: _backward(_provider(p), q, k, v, s, e, gate))
            if reason:  # e.g. flex on CPU: FlexAttention has no CPU backward
                out.append(skipped(KERNEL_BWD, provider, shape, dt, reason))
                continue
            fn = _backward(_provider(provider), q, k, v, s, e, gate)
            out.append(_case(KERNEL_BWD, provider, shape, dt, fn, target, flops=int(2.5 * flops)))

    # decoding: one query token per batch row over the cached image keys/values
    batch = 64 if on_gpu else 4
    qd = torch.randn(batch, 1, hq, d, generator=gen, device=device, dtype=dtype)
    kd, vd = (torch.randn(batch, skv, hkv, d, generator=gen, device=device, dtype=dtype) for _ in range(2))
    cache = torch.zeros(batch, 2, dtype=torch.int32, device=device)
    cache[:, 1] = skv
    sd, ed = cache[:, :1], cache[:, 1:]  # [B, 1] columns of one tensor, as the model's decode cache keeps
    shape = f"batch {batch} x 1 x {skv} {hq}/{hkv}h"
    flops = 4 * d * hq * batch * skv
    expected = reference(qd, kd, vd, sd, ed, gate)()
    for provider in (*OUR_KERNELS, "auto", *sdpa_rows, "flex", "reference"):
        if ours.get(provider):
            out.append(skipped(KERNEL_DECODE, provider, shape, dt, ours[provider]))
            continue
        fn = _provider(provider)(qd, kd, vd, sd, ed, gate)
        check = close_to(fn, expected, **tolerance)
        row_target = "" if provider == "reference" else "d″"
        out.append(_case(KERNEL_DECODE, provider, shape, dt, fn, row_target, flops=flops, check=check))
    return out


def _best_sdpa(ok: dict, kernel: str, shape: str) -> tuple[str, float] | None:
    rows = [(p, t) for (kern, sh, p), t in ok.items() if kern == kernel and sh == shape and p.startswith("sdpa")]
    return min(rows, key=lambda row: row[1]) if rows else None


def targets(rows: list[dict]) -> list[str]:
    ok = {(r["kernel"], r["shape"], r["provider"]): float(r["p50_us"]) for r in rows if r["status"] == "ok"}
    if not ok or "CPU" in rows[0]["device"]:
        return ["cross_attention targets: not evaluated (needs a CUDA run)"]
    lines = []
    fwd = sorted({sh for (kern, sh, _p) in ok if kern == KERNEL})
    for shape, provider in ((sh, p) for sh in fwd for p in OUR_KERNELS):
        mine = ok.get((KERNEL, shape, provider))
        if mine is None:
            continue
        parts = [f"{provider} {mine:.0f} us"]
        if shape.startswith("nvlm-x 1 image"):
            parts.append(f"{'MET' if mine <= 200 else 'NOT MET'} (<= 200 us)")
        best = _best_sdpa(ok, KERNEL, shape)
        if best is not None:
            r = best[1] / mine
            parts.append(f"{r:.2f}x {best[0]} (best SDPA) -> {'MET' if r >= 2.0 else 'NOT MET'} (>= 2x)")
        if (KERNEL, shape, "flex+build") in ok:
            r = ok[(KERNEL, shape, "flex+build")] / mine
            parts.append(f"{r:.2f}x flex+build -> {'MET' if r >= 1.2 else 'NOT MET'} (>= 1.2x)")
        if (KERNEL, shape, "auto") in ok:
            parts.append(f"auto {ok[(KERNEL, shape, 'auto')]:.0f} us")
        lines.append(f"cross_attention {shape}: " + "; ".join(parts))
    for (kern, shape, provider), t in ok.items():
        if kern == KERNEL_DECODE and provider in OUR_KERNELS:
            best = _best_sdpa(ok, KERNEL_DECODE, shape)
            if best is not None:
                r = best[1] / t
                verdict = "MET" if r >= 1.5 else "NOT MET"
                lines.append(
                    f"cross_attention decode {shape} {provider}: {t:.0f} us, {r:.2f}x {best[0]} -> {verdict} (>= 1.5x)"
                )
    return lines


if __name__ == "__main__":
    import sys

    run_module(sys.modules[__name__])
