"""Gated cross-attention benchmark (NVLM-X): text rows over image tokens, per-row key ranges.

Shapes (targets.md d, d′, d″; bf16 on a GPU): 2048 text × 1792 image tokens (7 tiles × 256),
64 query / 8 key-value heads × 128, with three masks — NVLM-X single image (tile-tag rows see one
tile, text before the image sees nothing), two interleaved images, and seven one-tile images (each
row sees 1/7 of the keys) — and decoding: batch 64, one query token over 1792 cached image keys.

Providers: ``triton`` (ours), ``sdpa-dense`` (SDPA with the dense boolean mask, as vLLM's Mllama
does; empty rows made finite and zeroed afterwards, as Meta's reference does), ``flex``
(FlexAttention with a block mask; ``flex+build`` adds the block-mask construction, which
``flex-build`` times alone), ``reference`` (ours, dense float32). Useful TFLOP/s count only the
allowed (query, key) pairs: 4·D·Hq·pairs forward, 2.5× that backward.
Targets (H100): single image <= 200 µs; >= 2× sdpa-dense; >= 1.2× flex+build; time falling with
the mask density; decode >= 1.5× SDPA.

    python bench/bench_cross_attention.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import nvlm_kernels as nk

from common import Case, close_to, run_module, skipped

KERNEL = "cross_attention.fwd"
KERNEL_BWD = "cross_attention.bwd"
KERNEL_DECODE = "cross_attention.decode"
BASELINE = "sdpa-dense"
TPT = 256


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


def _dense(kv_start, kv_end, skv):
    keys = torch.arange(skv, device=kv_start.device)
    return (keys >= kv_start[..., None]) & (keys < kv_end[..., None])  # [B, Sq, Skv]


def _ours(q, k, v, s, e, gate):
    def run():
        with nk.use_backend("triton"):
            return nk.gated_cross_attention(q, k, v, s, e, gate)

    return run


def _sdpa_dense(q, k, v, s, e, gate):
    mask = _dense(s, e, k.shape[1])
    empty = ~mask.any(-1)  # [B, Sq]
    mask = (mask | empty[..., None])[:, None]  # a finite softmax for empty rows; zeroed below
    keep = (~empty)[..., None, None].to(q.dtype)

    def run():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
        ).transpose(1, 2)
        return out * keep * torch.tanh(gate)

    return run


def _flex_parts(q, k, v, s, e, gate):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    b, sq = s.shape
    skv = k.shape[1]

    def mask_mod(batch, head, q_idx, kv_idx):
        return (kv_idx >= s[batch, q_idx]) & (kv_idx < e[batch, q_idx])

    def build():
        return create_block_mask(mask_mod, b, None, sq, skv, device=q.device)

    keep = (e > s)[..., None, None].to(q.dtype)

    def attend(block_mask):
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, enable_gqa=True)
        return out.transpose(1, 2) * keep * torch.tanh(gate)

    block_mask = build()
    return build, (lambda: attend(block_mask)), (lambda: attend(build()))


def _reference(q, k, v, s, e, gate):
    def run():
        with nk.use_backend("reference"):
            return nk.gated_cross_attention(q, k, v, s, e, gate)

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
    triton_reason = nk.available_backends("gated_cross_attention", device)["triton"]
    out: list[Case] = []
    layouts = _layouts(sq, tiles, device)
    if quick:
        layouts = dict(list(layouts.items())[:1])
    for name, (s, e) in layouts.items():
        pairs = int((e - s).clamp(min=0).sum())
        flops = 4 * d * hq * pairs
        shape = f"{name} {sq}x{skv} {hq}/{hkv}h"
        expected = _reference(q, k, v, s, e, gate)()  # float32 math: the check of every provider
        tolerance = dict(atol=3e-2, rtol=3e-2) if on_gpu else dict(atol=1e-4, rtol=1e-4)
        providers = {"triton": _ours, "sdpa-dense": _sdpa_dense, "reference": _reference}
        for provider, factory in providers.items():
            if provider == "triton" and triton_reason:
                out += [
                    skipped(KERNEL, provider, shape, dt, triton_reason),
                    skipped(KERNEL_BWD, provider, shape, dt, triton_reason),
                ]
                continue
            fn = factory(q, k, v, s, e, gate)
            reason = _available(fn)
            if reason:
                out.append(skipped(KERNEL, provider, shape, dt, reason))
                continue
            out.append(Case(KERNEL, provider, shape, dt, fn, flops=flops, check=close_to(fn, expected, **tolerance)))
            if provider != "reference":
                out.append(
                    Case(
                        KERNEL_BWD, provider, shape, dt, _backward(factory, q, k, v, s, e, gate), flops=int(2.5 * flops)
                    )
                )
        if on_gpu:
            reason = _available(lambda s=s, e=e: _flex_parts(q, k, v, s, e, gate))
            if reason:
                out.append(skipped(KERNEL, "flex", shape, dt, reason))
            else:
                build, attend, both = _flex_parts(q, k, v, s, e, gate)
                out.append(Case(KERNEL, "flex-build", shape, dt, build))
                check = close_to(attend, expected, **tolerance)
                out.append(Case(KERNEL, "flex", shape, dt, attend, flops=flops, check=check))
                out.append(Case(KERNEL, "flex+build", shape, dt, both, flops=flops))
        else:
            out.append(skipped(KERNEL, "flex", shape, dt, "FlexAttention is benchmarked on CUDA only"))

    # decoding: one query token per batch row over the cached image keys/values
    batch = 64 if on_gpu else 4
    qd = torch.randn(batch, 1, hq, d, generator=gen, device=device, dtype=dtype)
    kd, vd = (torch.randn(batch, skv, hkv, d, generator=gen, device=device, dtype=dtype) for _ in range(2))
    sd = torch.zeros(batch, 1, dtype=torch.int32, device=device)
    ed = torch.full((batch, 1), skv, dtype=torch.int32, device=device)
    shape = f"batch {batch} x 1 x {skv} {hq}/{hkv}h"
    flops = 4 * d * hq * batch * skv
    expected = _reference(qd, kd, vd, sd, ed, gate)()
    tolerance = dict(atol=3e-2, rtol=3e-2) if on_gpu else dict(atol=1e-4, rtol=1e-4)
    for provider, factory in (("triton", _ours), ("sdpa-dense", _sdpa_dense)):
        if provider == "triton" and triton_reason:
            out.append(skipped(KERNEL_DECODE, provider, shape, dt, triton_reason))
            continue
        fn = factory(qd, kd, vd, sd, ed, gate)
        out.append(Case(KERNEL_DECODE, provider, shape, dt, fn, flops=flops, check=close_to(fn, expected, **tolerance)))
    return out


def targets(rows: list[dict]) -> list[str]:
    ok = {(r["kernel"], r["shape"], r["provider"]): float(r["p50_us"]) for r in rows if r["status"] == "ok"}
    if not ok or "CPU" in rows[0]["device"]:
        return ["cross_attention targets: not evaluated (needs a CUDA run)"]
    lines = []
    fwd = sorted({sh for (kern, sh, _p) in ok if kern == KERNEL})
    for shape in fwd:
        mine = ok.get((KERNEL, shape, "triton"))
        if mine is None:
            continue
        parts = [f"{mine:.0f} us"]
        if shape.startswith("nvlm-x 1 image"):
            parts.append(f"{'MET' if mine <= 200 else 'NOT MET'} (<= 200 us)")
        for peer, ratio in (("sdpa-dense", 2.0), ("flex+build", 1.2)):
            if (KERNEL, shape, peer) in ok:
                r = ok[(KERNEL, shape, peer)] / mine
                parts.append(f"{r:.2f}x {peer} -> {'MET' if r >= ratio else 'NOT MET'} (>= {ratio}x)")
        lines.append(f"cross_attention {shape}: " + "; ".join(parts))
    for (kern, shape, provider), t in ok.items():
        if kern == KERNEL_DECODE and provider == "triton" and (kern, shape, "sdpa-dense") in ok:
            r = ok[(kern, shape, "sdpa-dense")] / t
            verdict = "MET" if r >= 1.5 else "NOT MET"
            lines.append(f"cross_attention decode {shape}: {t:.0f} us, {r:.2f}x sdpa-dense -> {verdict} (>= 1.5x)")
    return lines


if __name__ == "__main__":
    import sys

    run_module(sys.modules[__name__])
