"""ViT attention benchmark: InternViT's non-causal attention over tiles, [T, S, H, D] layout.

Providers (forward and backward), all through the package's public op: ``triton`` (our kernels),
``hopper`` (our sm_90 variants: TMA, FMA-folded scaling, mask-free loop, one-pass backward),
``sdpa`` (the op's ``sdpa`` peer backend, which ``auto`` runs wherever nothing was measured: every
device here until a tuning run says otherwise), the SDPA sub-backends as rows of that same peer
(``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``: ``use_backend("sdpa")`` inside
``torch.nn.attention.sdpa_kernel``; no second copy of the peer here), ``reference`` (float32 math)
and ``triton-32heads`` (NVLM's checkpoint pads 25 heads to 32 with zeros: the cost of running the
padded heads); besides them ``flex`` (FlexAttention, compiled, no mask; not a backend of this op).
The QK-norm op is timed on ``triton`` (norm fused into the attention) against its ``sdpa`` peer
(a separate RMSNorm writing normalized q and k, then SDPA), and one whole InternViT-6B layer with
the attention on the peer (``eager (sdpa)``), on ``auto`` and on ``triton``.

Work: 4·T·H·S²·D FLOPs forward (useful heads only, also for the padded provider), 2.5× that
backward. Targets (targets.md b, b′; H100, bf16): >= 550 TFLOP/s at S = 1025, D = 128 and
>= 1.6× the best SDPA backend in the same run; >= 1.3× SDPA at the 300M shape (D = 64). The cases
at those two shapes carry ``target`` "b" and "b′" (``run_all.py --targets``).

    python bench/bench_vit_attention.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import nvlm_kernels as nk

from common import OUR_KERNELS, Case, close_to, kernel_reason, run_module, skipped

KERNEL = "vit_attention.fwd"
KERNEL_BWD = "vit_attention.bwd"
KERNEL_NORM = "vit_qk_norm_attention.fwd"
KERNEL_LAYER = "internvit6b_layer.fwd"
BASELINE = "sdpa"  # the peer auto runs where nothing was measured

GPU_SHAPES = [  # (T, S, H, D, label)
    (7, 1025, 25, 128, "6B"),
    (7, 1025, 16, 64, "300M"),
    (7, 256, 25, 128, "S=256"),
    (2, 4097, 25, 128, "S=4097"),
]
CPU_SHAPES = [(1, 257, 4, 64, "small")]


SDPA_KERNELS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
BACKWARD_PROVIDERS = (*OUR_KERNELS, "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "triton-32heads")
TARGET_ROWS = {"6B": "b", "300M": "b′"}  # targets.md rows, by shape label
TARGET_PROVIDERS = BACKWARD_PROVIDERS


def _sdpa_kernel(provider: str):
    """The package's sdpa peer with torch's SDPA restricted to one of its kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }[provider]

    def attention(q, k, v):
        with sdpa_kernel([backend]), nk.use_backend("sdpa", ops="vit_attention"):
            return nk.vit_attention(q, k, v)

    return attention


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def attention(q, k, v):
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return attention


def _ours(backend: str):
    """The public op on one of its backends (``auto``: what a user gets)."""

    def attention(q, k, v):
        with nk.use_backend(backend, ops="vit_attention"):
            return nk.vit_attention(q, k, v)

    return attention


def _padded_heads(total_heads: int):
    """NVLM's layout: the real heads plus zero dummy heads, all attended (their output is zero)."""

    def attention(q, k, v):
        pad = total_heads - q.shape[2]
        q, k, v = (torch.cat([x, x.new_zeros(*x.shape[:2], pad, x.shape[3])], dim=2) for x in (q, k, v))
        with nk.use_backend("triton", ops="vit_attention"):
            return nk.vit_attention(q, k, v)[:, :, : total_heads - pad]

    return attention


def _try(fn, *args) -> str | None:
    """None when fn(*args) runs, else why not (a provider that cannot run here is skipped)."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc) else ''}"
    return None


def _backward(fn, q, k, v):
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    grad = torch.randn_like(out)

    def run():
        return torch.autograd.grad(out, leaves, grad, retain_graph=True)

    return run


def _rms_norm(x, weight, eps=1e-6):  # the layer's own RMSNorms (n1, n2), not the attention's
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _layer_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """One InternViT-6B layer (7 tiles x 1025 tokens): RMSNorm, QKV, QK-norm, attention, proj,
    layer scale, RMSNorm, MLP with exact GELU, layer scale; the QK-norm attention on the sdpa peer
    (what eager InternViT runs), on auto and on triton."""
    t, s, hidden, heads, mlp = 7, 1025, 3200, 25, 12800
    gen = torch.Generator(device=device).manual_seed(0)

    def p(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    w = dict(
        n1=1 + p(hidden), qkv=p(3 * hidden, hidden), qn=1 + p(hidden), kn=1 + p(hidden), proj=p(hidden, hidden),
        proj_b=p(hidden), ls1=p(hidden, scale=0.1), n2=1 + p(hidden), fc1=p(mlp, hidden), fc1_b=p(mlp),
        fc2=p(hidden, mlp), fc2_b=p(hidden), ls2=p(hidden, scale=0.1),
    )  # fmt: skip
    x = p(t, s, hidden, scale=1.0)

    def layer(backend: str):
        def attention(qkv):
            with nk.use_backend(backend, ops="vit_qk_norm_attention"):
                return nk.vit_qk_norm_attention(qkv, w["qn"], w["kn"], num_heads=heads).flatten(-2)

        def run():
            h = F.linear(_rms_norm(x, w["n1"]), w["qkv"])
            y = x + w["ls1"] * F.linear(attention(h), w["proj"], w["proj_b"])
            m = F.linear(F.gelu(F.linear(_rms_norm(y, w["n2"]), w["fc1"], w["fc1_b"])), w["fc2"], w["fc2_b"])
            return y + w["ls2"] * m

        return run

    flops = 2 * t * s * (hidden * 3 * hidden + hidden * hidden + 2 * hidden * mlp) + 4 * t * heads * s * s * 128
    shape, dt = f"{t}x{s}x{hidden}", str(dtype).removeprefix("torch.")
    out = [
        Case(KERNEL_LAYER, "eager (sdpa)", shape, dt, layer("sdpa"), flops=flops),
        Case(KERNEL_LAYER, "auto", shape, dt, layer("auto"), flops=flops),
    ]
    reason = nk.available_backends("vit_qk_norm_attention", device)["triton"]
    triton_layer = Case(KERNEL_LAYER, "triton", shape, dt, layer("triton"), flops=flops)
    return out + [skipped(KERNEL_LAYER, "triton", shape, dt, reason) if reason else triton_layer]


def _fused(qkv, wq, wk, heads: int, backend: str):
    def run():
        with nk.use_backend(backend, ops="vit_qk_norm_attention"):
            return nk.vit_qk_norm_attention(qkv, wq, wk, num_heads=heads)

    return run


def _norm_cases(device: str, dtype: torch.dtype, dims: tuple, shape: str, flops: int, gen) -> list[Case]:
    """The QK-norm op on triton (norm applied as q and k are loaded) against its sdpa peer (RMSNorm
    writing normalized q and k, then SDPA), same inputs; both checked against the float32 reference."""
    t, s, h, d = dims
    dt = str(dtype).removeprefix("torch.")
    qkv = torch.randn(t, s, 3 * h * d, generator=gen, device=device, dtype=dtype)
    wq, wk = (1 + 0.1 * torch.randn(h * d, generator=gen, device=device, dtype=dtype) for _ in range(2))
    expected = _fused(qkv.float(), wq.float(), wk.float(), h, "reference")()
    tolerance = dict(atol=3e-2, rtol=3e-2) if device == "cuda" else dict(atol=1e-4, rtol=1e-4)
    out = []
    for provider in (*OUR_KERNELS, "sdpa"):
        reason = kernel_reason("vit_qk_norm_attention", device, provider)
        if reason:
            out.append(skipped(KERNEL_NORM, provider, shape, dt, reason))
            continue
        run = _fused(qkv, wq, wk, h, provider)
        out.append(Case(KERNEL_NORM, provider, shape, dt, run, flops=flops, check=close_to(run, expected, **tolerance)))
    return out


def cases(device: str, quick: bool = False) -> list[Case]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dt = str(dtype).removeprefix("torch.")
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    out: list[Case] = []
    for t, s, h, d, label in shapes:
        gen = torch.Generator(device=device).manual_seed(s + h)
        q, k, v = (torch.randn(t, s, h, d, generator=gen, device=device, dtype=dtype) for _ in range(3))
        flops = 4 * t * h * s * s * d
        shape = f"{label} {t}x{s}x{h}x{d}"
        # every provider is checked against float32 math first (our reference, up to S = 1025)
        expected = None if s > 2048 else _ours("reference")(q.float(), k.float(), v.float())
        tolerance = dict(atol=3e-2, rtol=3e-2) if device == "cuda" else dict(atol=1e-4, rtol=1e-4)
        providers = {
            "triton": _ours("triton"),
            "hopper": _ours("hopper"),
            "sdpa": _ours("sdpa"),
            **{name: _sdpa_kernel(name) for name in SDPA_KERNELS},
            "flex": _flex() if device == "cuda" else None,
            "reference": _ours("reference"),
        }
        if label == "6B":
            providers["triton-32heads"] = _padded_heads(32)
        for name, fn in providers.items():
            if fn is None:
                out.append(skipped(KERNEL, name, shape, dt, "FlexAttention is benchmarked on CUDA only"))
                continue
            if name in (*OUR_KERNELS, "sdpa") and kernel_reason("vit_attention", device, name):
                reason = kernel_reason("vit_attention", device, name)
            elif name == "reference" and device == "cuda" and s > 2048:
                reason = "the float32 reference at this size is not worth the time"
            else:
                reason = _try(fn, q, k, v)
            if reason:
                out.append(skipped(KERNEL, name, shape, dt, reason))
                out.append(skipped(KERNEL_BWD, name, shape, dt, reason))
                continue
            run = lambda f=fn, a=(q, k, v): f(*a)  # noqa: E731
            check = close_to(run, expected, **tolerance) if expected is not None else None
            out.append(Case(KERNEL, name, shape, dt, run, flops=flops, check=check))
            if name in BACKWARD_PROVIDERS:
                out.append(Case(KERNEL_BWD, name, shape, dt, _backward(fn, q, k, v), flops=int(2.5 * flops)))

        if label in ("6B", "small"):  # the fused QK-norm at the 6B width
            out += _norm_cases(device, dtype, (t, s, h, d), shape, flops, gen)
    if device == "cuda" and not quick:
        out += _layer_cases(device, dtype)
    for case in out:  # targets.md rows b (InternViT-6B) and b′ (300M): our kernels and every peer
        label = case.shape.split(" ")[0]
        if case.kernel in (KERNEL, KERNEL_BWD) and label in TARGET_ROWS and case.provider in TARGET_PROVIDERS:
            case.target = TARGET_ROWS[label]
    return out


def targets(rows: list[dict]) -> list[str]:
    ok = {(r["kernel"], r["shape"], r["provider"]): float(r["value"]) for r in rows if r["status"] == "ok"}
    lines = []
    for label, floor_tflops, ratio in (("6B", 550.0, 1.6), ("300M", None, 1.3)):
        shape = next((r["shape"] for r in rows if r["kernel"] == KERNEL and r["shape"].startswith(label + " ")), None)
        sdpa = [v for (kern, sh, p), v in ok.items() if kern == KERNEL and sh == shape and p.startswith("sdpa")]
        if not shape or not sdpa or "CPU" in next(r["device"] for r in rows):
            continue
        best = max(sdpa)
        for provider in OUR_KERNELS:
            mine = ok.get((KERNEL, shape, provider))
            if mine is None:
                continue
            parts = [f"{mine:.0f} TFLOP/s, {mine / best:.2f}x the best SDPA ({best:.0f})"]
            if floor_tflops:
                parts.append(f"{'MET' if mine >= floor_tflops else 'NOT MET'} (>= {floor_tflops:.0f} TFLOP/s)")
            parts.append(f"{'MET' if mine / best >= ratio else 'NOT MET'} (>= {ratio}x SDPA)")
            lines.append(f"vit_attention {shape} {provider}: " + "; ".join(parts))
    return lines or ["vit_attention targets: not evaluated (needs a CUDA run with Triton and SDPA rows)"]


if __name__ == "__main__":
    import sys

    run_module(sys.modules[__name__])
