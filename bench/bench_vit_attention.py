"""ViT attention benchmark: InternViT's non-causal attention over tiles, [T, S, H, D] layout.

Providers (forward and backward): ``triton`` (ours, through the public op), every SDPA backend
that runs here (``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``, on transposed
views of the same tensors), ``flex`` (FlexAttention, compiled, no mask), ``reference`` (ours,
float32 math) and ``triton-32heads`` (NVLM's checkpoint pads 25 heads to 32 with zeros: the cost
of running the padded heads). The fused QK-norm op is timed against norm-then-attention, and one
whole InternViT-6B layer with our ops against eager PyTorch.

Work: 4·T·H·S²·D FLOPs forward (useful heads only, also for the padded provider), 2.5× that
backward. Targets (targets.md b, b′; H100, bf16): >= 550 TFLOP/s at S = 1025, D = 128 and
>= 1.6× the best SDPA backend in the same run; >= 1.3× SDPA at the 300M shape (D = 64).

    python bench/bench_vit_attention.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import nvlm_kernels as nk

from common import Case, close_to, run_module, skipped

KERNEL = "vit_attention.fwd"
KERNEL_BWD = "vit_attention.bwd"
KERNEL_NORM = "vit_qk_norm_attention.fwd"
KERNEL_LAYER = "internvit6b_layer.fwd"
BASELINE = "sdpa-flash"

GPU_SHAPES = [  # (T, S, H, D, label)
    (7, 1025, 25, 128, "6B"),
    (7, 1025, 16, 64, "300M"),
    (7, 256, 25, 128, "S=256"),
    (2, 4097, 25, 128, "S=4097"),
]
CPU_SHAPES = [(1, 257, 4, 64, "small")]


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "sdpa-flash": SDPBackend.FLASH_ATTENTION,
        "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa-math": SDPBackend.MATH,
    }[backend_name]

    def attention(q, k, v):
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return attention


def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def attention(q, k, v):
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return attention


def _ours(backend: str):
    def attention(q, k, v):
        with nk.use_backend(backend):
            return nk.vit_attention(q, k, v)

    return attention


def _padded_heads(total_heads: int):
    """NVLM's layout: the real heads plus zero dummy heads, all attended (their output is zero)."""

    def attention(q, k, v):
        pad = total_heads - q.shape[2]
        q, k, v = (torch.cat([x, x.new_zeros(*x.shape[:2], pad, x.shape[3])], dim=2) for x in (q, k, v))
        with nk.use_backend("triton"):
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


def _rms_norm(x, weight, eps=1e-6):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _layer_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """One InternViT-6B layer (7 tiles x 1025 tokens): RMSNorm, QKV, QK-norm, attention, proj,
    layer scale, RMSNorm, MLP with exact GELU, layer scale — eager (SDPA) against our ops."""
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

    def attention_eager(qkv):
        q, k, v = qkv.split(hidden, -1)
        q, k = _rms_norm(q, w["qn"]), _rms_norm(k, w["kn"])
        q, k, v = (y.unflatten(-1, (heads, hidden // heads)).transpose(1, 2) for y in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2)

    def attention_ours(qkv):
        return nk.vit_qk_norm_attention(qkv, w["qn"], w["kn"], num_heads=heads).flatten(-2)

    def layer(attention):
        def run():
            h = F.linear(_rms_norm(x, w["n1"]), w["qkv"])
            y = x + w["ls1"] * F.linear(attention(h), w["proj"], w["proj_b"])
            m = F.linear(F.gelu(F.linear(_rms_norm(y, w["n2"]), w["fc1"], w["fc1_b"])), w["fc2"], w["fc2_b"])
            return y + w["ls2"] * m

        return run

    flops = 2 * t * s * (hidden * 3 * hidden + hidden * hidden + 2 * hidden * mlp) + 4 * t * heads * s * s * 128
    shape, dt = f"{t}x{s}x{hidden}", str(dtype).removeprefix("torch.")
    return [
        Case(KERNEL_LAYER, "eager (sdpa)", shape, dt, layer(attention_eager), flops=flops),
        Case(KERNEL_LAYER, "ours", shape, dt, layer(attention_ours), flops=flops),
    ]


def _fused(qkv, wq, wk, heads: int, backend: str):
    def run():
        with nk.use_backend(backend):
            return nk.vit_qk_norm_attention(qkv, wq, wk, num_heads=heads)

    return run


def _norm_then_attention(qkv, wq, wk, heads: int, backend: str):
    def run():
        q, k, v = qkv.split(qkv.shape[-1] // 3, -1)
        q, k = _rms_norm(q, wq), _rms_norm(k, wk)
        with nk.use_backend(backend):
            return nk.vit_attention(*(y.unflatten(-1, (heads, -1)) for y in (q, k, v)))

    return run


def _norm_cases(device: str, dtype: torch.dtype, dims: tuple, shape: str, flops: int, gen) -> list[Case]:
    """The fused QK-norm op against RMSNorm (eager) + our attention, same inputs."""
    t, s, h, d = dims
    dt = str(dtype).removeprefix("torch.")
    qkv = torch.randn(t, s, 3 * h * d, generator=gen, device=device, dtype=dtype)
    wq, wk = (1 + 0.1 * torch.randn(h * d, generator=gen, device=device, dtype=dtype) for _ in range(2))
    reason = nk.available_backends("vit_qk_norm_attention", device)["triton"]
    backend = "reference" if reason else "triton"
    fused = (
        skipped(KERNEL_NORM, "triton (fused)", shape, dt, reason)
        if reason
        else Case(KERNEL_NORM, "triton (fused)", shape, dt, _fused(qkv, wq, wk, h, "triton"), flops=flops)
    )
    unfused = Case(
        KERNEL_NORM, f"norm + {backend}", shape, dt, _norm_then_attention(qkv, wq, wk, h, backend), flops=flops
    )
    return [fused, unfused]


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
        # every provider is checked against float32 math first (SDPA-math, cheap enough up to 1025)
        expected = None if s > 2048 else _sdpa("sdpa-math")(q.float(), k.float(), v.float())
        tolerance = dict(atol=3e-2, rtol=3e-2) if device == "cuda" else dict(atol=1e-4, rtol=1e-4)
        providers = {
            "triton": _ours("triton"),
            "sdpa-flash": None,
            "sdpa-efficient": None,
            "sdpa-cudnn": None,
            "sdpa-math": None,
            "flex": None,
            "reference": _ours("reference"),
        }
        if label == "6B":
            providers["triton-32heads"] = _padded_heads(32)
        for name in list(providers):
            if name.startswith("sdpa"):
                providers[name] = _sdpa(name)
            elif name == "flex":
                providers[name] = _flex() if device == "cuda" else None
        for name, fn in providers.items():
            if fn is None:
                out.append(skipped(KERNEL, name, shape, dt, "FlexAttention is benchmarked on CUDA only"))
                continue
            if name == "triton" and nk.available_backends("vit_attention", device)["triton"]:
                reason = nk.available_backends("vit_attention", device)["triton"]
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
            if name in ("triton", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "triton-32heads"):
                out.append(Case(KERNEL_BWD, name, shape, dt, _backward(fn, q, k, v), flops=int(2.5 * flops)))

        if label in ("6B", "small"):  # the fused QK-norm at the 6B width
            out += _norm_cases(device, dtype, (t, s, h, d), shape, flops, gen)
    if device == "cuda" and not quick:
        out += _layer_cases(device, dtype)
    return out


def targets(rows: list[dict]) -> list[str]:
    ok = {(r["kernel"], r["shape"], r["provider"]): float(r["value"]) for r in rows if r["status"] == "ok"}
    lines = []
    for label, floor_tflops, ratio in (("6B", 550.0, 1.6), ("300M", None, 1.3)):
        shape = next((r["shape"] for r in rows if r["kernel"] == KERNEL and r["shape"].startswith(label + " ")), None)
        mine = ok.get((KERNEL, shape, "triton")) if shape else None
        sdpa = [v for (kern, sh, p), v in ok.items() if kern == KERNEL and sh == shape and p.startswith("sdpa")]
        if mine is None or not sdpa or "CPU" in next(r["device"] for r in rows):
            continue
        best = max(sdpa)
        parts = [f"{mine:.0f} TFLOP/s, {mine / best:.2f}x the best SDPA ({best:.0f})"]
        if floor_tflops:
            parts.append(f"{'MET' if mine >= floor_tflops else 'NOT MET'} (>= {floor_tflops:.0f} TFLOP/s)")
        parts.append(f"{'MET' if mine / best >= ratio else 'NOT MET'} (>= {ratio}x SDPA)")
        lines.append(f"vit_attention {shape}: " + "; ".join(parts))
    return lines or ["vit_attention targets: not evaluated (needs a CUDA run with Triton and SDPA rows)"]


if __name__ == "__main__":
    import sys

    run_module(sys.modules[__name__])
