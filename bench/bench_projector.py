"""MLP projector benchmark (targets.md c, c′): from the ViT output to LLM embeddings.

Shapes (bf16 on a GPU): 256, 1792 and 7168 projector tokens (1, 7 and 28 tiles of [1025, 3200] ViT
output, CLS dropped, 0.5 pixel shuffle) at NVLM-72B's D/H projector (LayerNorm(12800) -> 12800x29568
-> GELU -> 29568x8192, no biases) and NVLM-X's single Linear 12800x8192; forward and
forward+backward (the projector is trained in every stage).

Providers: ``triton`` (ours: the shuffle and LayerNorm in the first GEMM's loads, GELU in its
epilogue, cuBLAS for the second GEMM and the backward GEMMs), ``hopper`` (ours for sm_90: the
LayerNorm pass, then a persistent TMA-fed GEMM1 with the GELU epilogue), ``unfused`` (the package's peer
backend, what ``auto`` runs where nothing was measured: one memory-bound gather + LayerNorm pass,
then cuBLAS GEMM1 + bias, GELU, cuBLAS GEMM2 + bias; the op's own backend through
``nk.use_backend("unfused")``, not a copy), ``reference`` (our op's plain-PyTorch
backend), ``eager`` (the InternVL/NVLM way:
slice + pixel_shuffle copies, LayerNorm, Linear, GELU, Linear as nn modules), ``eager+compile``
(the same under torch.compile) and ``hf-internvl`` when transformers ships InternVL: its own pixel
shuffle + ``InternVLMultiModalProjector``, at the one shape it computes — stock InternVL's projector
(the "InternVL" rows: LayerNorm, 12800x8192 + bias, GELU, 8192x8192 + bias on a GPU).
TFLOP/s count the GEMMs only (2·M·K·N each; backward 2× that, dx included); the ``peak MiB``
column is the memory one call allocates beyond its inputs.
Targets (H100): D/H <= 2.8 ms at 1792 tokens; X <= 0.48 ms; never slower than eager at any size.
On a CPU: ``unfused`` (auto's choice there) within 1.5x of eager.

    python bench/bench_projector.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import nvlm_kernels as nk

from common import OUR_KERNELS, Case, close_to, kernel_reason, run_module, skipped

KERNEL = "projector.fwd"
KERNEL_BWD = "projector.fwd+bwd"
BASELINE = "eager"


def _eager_fn(x, ln_w, ln_b, w1, w2, b1=None, b2=None):
    def run():
        t = x[:, 1:]
        n, length, c = t.shape
        side = int(length**0.5)
        t = t.reshape(n, side, side // 2, c * 2).permute(0, 2, 1, 3).contiguous()
        t = t.reshape(n, side // 2, side // 2, c * 4).permute(0, 2, 1, 3).contiguous().reshape(n, -1, c * 4)
        if ln_w is not None:
            t = F.layer_norm(t, (t.shape[-1],), ln_w, ln_b, 1e-5)
        h = F.linear(t, w1, b1)
        return F.linear(F.gelu(h), w2, b2) if w2 is not None else h

    return run


def _op_fn(backend: str):
    """Our op on ``backend``, called the way a model calls it (raw ViT output, shuffle inside)."""

    def factory(x, ln_w, ln_b, w1, w2, b1=None, b2=None):
        def run():
            with nk.use_backend(backend):
                return nk.mlp_projector(x, ln_w, ln_b, w1, w2, b1, b2, pixel_shuffle=0.5, drop_cls=True)

        return run

    return factory


def _compiled_fn(x, ln_w, ln_b, w1, w2, b1=None, b2=None):
    return torch.compile(_eager_fn(x, ln_w, ln_b, w1, w2, b1, b2))


def _hf_reason() -> str | None:
    """None when transformers ships InternVL (its pixel shuffle + ``InternVLMultiModalProjector``)."""
    try:
        from transformers.models.internvl import modeling_internvl  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - optional dependency
        return f"transformers' InternVL is not importable here ({type(exc).__name__})"
    return None


def _hf_fn(x, ln_w, ln_b, w1, w2, b1=None, b2=None):
    """transformers' own InternVL path after the ViT: drop CLS, ``InternVLModel.pixel_shuffle``,
    ``InternVLMultiModalProjector`` (LayerNorm, Linear + bias, GELU, Linear + bias: hidden = out)."""
    from transformers import InternVLConfig
    from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

    vit_c, out = x.shape[-1], w2.shape[0]
    config = InternVLConfig(
        vision_config={"hidden_size": vit_c}, text_config={"model_type": "qwen2", "hidden_size": out},
        downsample_ratio=0.5, projector_hidden_act="gelu",
    )  # fmt: skip
    projector = InternVLMultiModalProjector(config).to(device=x.device, dtype=x.dtype)
    for param, value in zip(projector.parameters(), (ln_w, ln_b, w1, b1, w2, b2), strict=True):
        param.data = value  # the same tensors (and gradients) as the other providers

    def run():
        feats = x[:, 1:]
        n, length, c = feats.shape
        side = int(length**0.5)
        feats = InternVLModel.pixel_shuffle(None, feats.reshape(n, side, side, c), scale_factor=0.5)
        return projector(feats.reshape(n, -1, feats.shape[-1]))

    return run


def _with_backward(factory, x, params):
    leaves = [p.detach().requires_grad_() if p is not None else None for p in params]
    x = x.detach().requires_grad_()
    fn = factory(x, *leaves)

    def run():
        out = fn()
        out.backward(torch.ones_like(out))
        return out

    return run


def cases(device: str, quick: bool = False) -> list[Case]:
    on_gpu = device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    dt = str(dtype).removeprefix("torch.")
    vit_c, side = (3200, 32) if on_gpu else (128, 16)
    # variant -> (hidden, out, biases); "InternVL": stock InternVL's projector (hidden = out = the
    # LLM width, biases), the one shape transformers' own module computes
    if on_gpu:
        shapes = {"D/H": (29568, 8192, False), "X": (None, 8192, False), "InternVL": (8192, 8192, True)}
    else:
        shapes = {"D/H": (1024, 256, False), "X": (None, 256, False), "InternVL": (256, 256, True)}
    tile_counts = [1, 7, 28] if on_gpu else [1, 7]
    if quick:
        tile_counts = tile_counts[:1]
    ours = {provider: kernel_reason("mlp_projector", device, provider) for provider in OUR_KERNELS}
    gen = torch.Generator(device=device).manual_seed(0)
    out: list[Case] = []
    k = 4 * vit_c

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype) * scale

    for variant, (hidden, width, bias) in shapes.items():
        first = hidden or width
        ln_w = 1 + rand(k, scale=0.1) if hidden else None
        ln_b = rand(k, scale=0.1) if hidden else None
        w1 = rand(first, k, scale=k**-0.5)
        w2 = rand(width, hidden, scale=hidden**-0.5) if hidden else None
        b1, b2 = (rand(first, scale=0.1), rand(width, scale=0.1)) if bias else (None, None)
        params = (ln_w, ln_b, w1, w2, b1, b2)
        for tiles in tile_counts:
            x = torch.randn(tiles, side * side + 1, vit_c, generator=gen, device=device, dtype=dtype)
            m = tiles * side * side // 4
            flops = 2 * m * k * first + (2 * m * hidden * width if hidden else 0)
            shape = f"{variant} {m} tokens"
            expected = _eager_fn(x.float(), *(p.float() if p is not None else None for p in params))()
            tolerance = dict(atol=5e-2, rtol=5e-2) if on_gpu else dict(atol=1e-3, rtol=1e-3)
            providers = {
                "triton": _op_fn("triton"),
                "hopper": _op_fn("hopper"),
                "unfused": _op_fn("unfused"),
                "eager": _eager_fn,
                "eager+compile": _compiled_fn,
                "reference": _op_fn("reference"),
                "hf-internvl": _hf_fn,
            }
            for provider, factory in providers.items():
                if ours.get(provider):
                    out += [skipped(k_, provider, shape, dt, ours[provider]) for k_ in (KERNEL, KERNEL_BWD)]
                    continue
                if provider == "hf-internvl":
                    if variant != "InternVL":  # its module has biases and hidden = out: this shape only
                        continue
                    if _hf_reason():
                        out.append(skipped(KERNEL, provider, shape, dt, _hf_reason()))
                        continue
                if provider == "eager+compile" and not on_gpu:
                    out.append(skipped(KERNEL, provider, shape, dt, "torch.compile is benchmarked on CUDA only"))
                    continue
                fn = factory(x, *params)
                check = close_to(fn, expected, **tolerance)
                out.append(Case(KERNEL, provider, shape, dt, fn, flops=flops, check=check))
                if provider != "eager+compile":
                    bwd = _with_backward(factory, x, params)
                    out.append(Case(KERNEL_BWD, provider, shape, dt, bwd, flops=3 * flops))
    for case in out:  # targets.md rows c (D/H) and c′ (X): 1792 tokens (7 tiles), every fast provider
        if case.shape in ("D/H 1792 tokens", "X 1792 tokens") and case.provider not in ("reference", "hf-internvl"):
            case.target = "c" if case.shape.startswith("D/H") else "c′"
    return out


def targets(rows: list[dict]) -> list[str]:
    ok = {(r["kernel"], r["shape"], r["provider"]): float(r["p50_us"]) for r in rows if r["status"] == "ok"}
    if not ok:
        return ["projector targets: not evaluated (no successful rows)"]
    if "CPU" in rows[0]["device"]:  # auto runs the unfused peer on CPUs: it must stay near eager
        lines = []
        for (kern, shape, provider), t in sorted(ok.items()):
            if provider == "unfused" and (kern, shape, BASELINE) in ok:
                r = t / ok[(kern, shape, BASELINE)]
                lines.append(f"{kern} {shape}: unfused {r:.2f}x eager's time -> {'MET' if r <= 1.5 else 'NOT MET'} "
                             "(<= 1.5x on a CPU)")  # fmt: skip
        return lines or ["projector targets: no unfused/eager pair measured"]
    lines = []
    for (kern, shape, provider), t in sorted(ok.items()):
        if provider not in (*OUR_KERNELS, "unfused") or not kern.startswith("projector"):
            continue
        parts = [f"{provider} {t:.0f} us"]
        if provider in OUR_KERNELS and kern == KERNEL and shape == "D/H 1792 tokens":
            parts.append(f"{'MET' if t <= 2800 else 'NOT MET'} (<= 2800 us)")
        if provider in OUR_KERNELS and kern == KERNEL and shape == "X 1792 tokens":
            parts.append(f"{'MET' if t <= 480 else 'NOT MET'} (<= 480 us)")
        peers = ("eager", "eager+compile") + (("unfused",) if provider in OUR_KERNELS else ())
        for peer in peers:
            if (kern, shape, peer) in ok:
                r = ok[(kern, shape, peer)] / t
                need = 1.0
                parts.append(f"{r:.2f}x {peer} -> {'MET' if r >= need else 'NOT MET'} (>= {need}x)")
        lines.append(f"{kern} {shape}: " + "; ".join(parts))
    return lines


if __name__ == "__main__":
    import sys

    run_module(sys.modules[__name__])
