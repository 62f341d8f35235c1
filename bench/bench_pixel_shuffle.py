"""Pixel shuffle benchmark: NVLM's [T, 1025, 3200] ViT output, CLS dropped, -> [T, 256, 12800].

Providers (forward): ``cuda`` and ``triton`` (our kernels through the public op), ``reference``
(our eager view/permute/clone), ``reference+compile`` (the same under torch.compile: the honest
baseline), ``internvl`` (InternVL / NVLM-D's code: slice CLS, two permute+contiguous copies) and
``hf-transformers`` (transformers' InternVL ``pixel_shuffle``, when importable). Backward: the
inverse permutation for cuda, triton, reference and reference+compile.

Work: bytes = input read once + output written once; the floor is bytes / 3.35 TB/s (targets.md a).
Target (H100, 7 tiles, bf16): >= 90 % of the measured copy bandwidth and >= 3x the InternVL path.

    python bench/bench_pixel_shuffle.py          # this op only; run_all.py runs every op
"""

from __future__ import annotations

import math

import torch

import nvlm_kernels as nk
from nvlm_kernels.pixel_shuffle import reference

from common import Case, run_module, skipped

KERNEL_FWD = "pixel_shuffle.fwd"
KERNEL_BWD = "pixel_shuffle.bwd"
SCALE = 0.5
OUR_PROVIDERS = ("cuda", "triton")


def internvl_pixel_shuffle(vit_embeds: torch.Tensor, scale_factor: float = SCALE) -> torch.Tensor:
    """InternVL's extract_feature tail (modeling_internvl_chat.py), as NVLM-D runs it (ps_version v2)."""
    vit_embeds = vit_embeds[:, 1:, :]
    h = w = int(vit_embeds.shape[1] ** 0.5)
    x = vit_embeds.reshape(vit_embeds.shape[0], h, w, -1)
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _hf_transformers_fn():
    """transformers' InternVL pixel_shuffle (v2 semantics) on [N, side, side, C], or the reason it is absent."""
    try:
        from transformers.models.internvl.modeling_internvl import InternVLModel
    except Exception as exc:  # optional peer
        return None, f"transformers' InternVL is not importable ({type(exc).__name__})"
    fn = getattr(InternVLModel, "pixel_shuffle", None)
    if fn is None:
        return None, "this transformers version has no InternVLModel.pixel_shuffle"

    def run(vit_out: torch.Tensor) -> torch.Tensor:
        x = vit_out[:, 1:, :]
        side = math.isqrt(x.shape[1])
        y = fn(None, x.reshape(x.shape[0], side, side, -1), scale_factor=SCALE)
        return y.reshape(y.shape[0], -1, y.shape[-1])

    return run, None


def _available(provider: str, device: str) -> str | None:
    return nk.available_backends("pixel_shuffle", device)[provider]


def _on_backend(backend: str, fn):
    def run():
        with nk.use_backend(backend):
            return fn()

    return run


def _checked_case(kernel: str, provider: str, shape: str, dtype: str, nbytes: int, fn, expected) -> Case:
    def check() -> None:
        got = fn()
        if got.shape != expected.shape or not torch.equal(got, expected):
            raise AssertionError(f"{provider}: result differs from the reference")

    return Case(kernel, provider, shape, dtype, fn, bytes_moved=nbytes, check=check)


def shapes(device: str, quick: bool) -> list[tuple[int, torch.dtype]]:
    if device == "cuda":
        return [(1, torch.bfloat16), (7, torch.bfloat16), (28, torch.bfloat16)]
    return [(1, torch.bfloat16)] if quick else [(1, torch.bfloat16), (7, torch.bfloat16)]


def cases(device: str, quick: bool = False) -> list[Case]:
    out: list[Case] = []
    compiled_fwd = torch.compile(reference.pixel_shuffle_fwd, dynamic=False)
    compiled_bwd = torch.compile(reference.pixel_shuffle_bwd, dynamic=False)
    hf_fn, hf_reason = _hf_transformers_fn()
    for tiles, dtype in shapes(device, quick):
        gen = torch.Generator().manual_seed(tiles)
        vit_out = torch.randn(tiles, 1025, 3200, generator=gen).to(device=device, dtype=dtype)
        x = vit_out[:, 1:]  # the CLS-less view, read in place
        expected = reference.pixel_shuffle_fwd(x, 2, True)
        grad_out = torch.randn(expected.shape, generator=gen).to(device=device, dtype=dtype)
        shape, dt = f"{tiles}x1025x3200 CLS view", str(dtype).removeprefix("torch.")
        nbytes = 2 * x.numel() * x.element_size()

        # per kernel: the expected result, our public call, and the other providers (or why absent)
        work = {
            KERNEL_FWD: (
                expected,
                lambda x=x: nk.pixel_shuffle(x, SCALE),
                {
                    "reference": lambda x=x: reference.pixel_shuffle_fwd(x, 2, True),
                    "reference+compile": lambda x=x: compiled_fwd(x, 2, True),
                    "internvl": lambda v=vit_out: internvl_pixel_shuffle(v),
                    "hf-transformers": (lambda v=vit_out: hf_fn(v)) if hf_fn else hf_reason,
                },
            ),
            KERNEL_BWD: (
                reference.pixel_shuffle_bwd(grad_out, 2, True),
                lambda g=grad_out: torch.ops.nvlm_kernels.pixel_shuffle_bwd(g, 2, True),
                {
                    "reference": lambda g=grad_out: reference.pixel_shuffle_bwd(g, 2, True),
                    "reference+compile": lambda g=grad_out: compiled_bwd(g, 2, True),
                },
            ),
        }
        for kernel, (want, ours, others) in work.items():
            providers = {p: _available(p, device) or _on_backend(p, ours) for p in OUR_PROVIDERS} | others
            for provider, fn in providers.items():
                if isinstance(fn, str):
                    out.append(skipped(kernel, provider, shape, dt, fn))
                else:
                    out.append(_checked_case(kernel, provider, shape, dt, nbytes, fn, want))
    for case in out:  # targets.md row a: the 7-tile forward
        if case.kernel == KERNEL_FWD and case.shape.startswith("7x"):
            case.target = "a"
    return out


BASELINE = "internvl"


def targets(rows: list[dict]) -> list[str]:
    """Issue 2's targets, evaluated on this run's rows (CUDA only): at 7 tiles bf16, the best of our
    providers reaches >= 90 % of the measured copy bandwidth and >= 3x the InternVL path."""
    copy = [r for r in rows if r["kernel"] == "ceiling.copy" and r["status"] == "ok"]
    at_target = [
        r
        for r in rows
        if r["kernel"] == KERNEL_FWD
        and r["shape"].startswith("7x")
        and r["dtype"] == "bfloat16"
        and r["status"] == "ok"
    ]
    ours = [r for r in at_target if r["provider"] in OUR_PROVIDERS]
    internvl = [r for r in at_target if r["provider"] == BASELINE]
    if not copy or not ours or not internvl or "CPU" in ours[0]["device"]:
        return ["pixel_shuffle targets: not evaluated (needs a CUDA run with the copy ceiling and both providers)"]
    best = min(ours, key=lambda r: float(r["p50_us"]))
    bandwidth_fraction = float(best["value"]) / float(copy[0]["value"])
    speedup = float(internvl[0]["p50_us"]) / float(best["p50_us"])
    return [
        f"pixel_shuffle 7 tiles bf16, best = {best['provider']} at {best['p50_us']} us: "
        f"{100 * bandwidth_fraction:.1f} % of measured copy bandwidth ({copy[0]['value']} GB/s) "
        f"-> {'MET' if bandwidth_fraction >= 0.9 else 'NOT MET'} (target >= 90 %); "
        f"{speedup:.2f}x the InternVL path -> {'MET' if speedup >= 3 else 'NOT MET'} (target >= 3x)"
    ]


if __name__ == "__main__":
    import sys

    run_module(sys.modules[__name__])
