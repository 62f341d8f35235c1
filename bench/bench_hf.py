"""Hugging Face transformers models, patched (``apply_nvlm_kernels``) vs unpatched.

What is timed (random weights, built from transformers' own config and model classes, a few layers):

* ``hf_image_encoding.fwd`` / ``.fwd+bwd`` -- a batch of tiles through the vision tower and the
  projector: InternVL's ``InternVLModel.get_image_features`` (tower, CLS drop, pixel shuffle,
  ``multi_modal_projector``), Mllama's ``vision_model`` + ``multi_modal_projector`` (as
  ``MllamaModel.forward`` runs them);
* ``hf_cross_attention.fwd`` / ``.fwd+bwd`` -- Mllama's ``MllamaModel`` with one text layer, a
  cross-attention layer, given the projected vision states (``cross_attention_states``) and the
  processor's tile mask (``cross_attention_mask`` [B, S, images, tiles]; one sample with a padding
  tile), so the patch's mask-to-ranges step is inside the timed call.

``fwd`` runs without autograd (inference); ``fwd+bwd`` is forward plus the backward of sum(out · g)
into every parameter (the gradients are freed after each call, so each call allocates them as a
training step does: ``peak MiB`` is activations + gradients beyond the resident model).

Providers: ``hf-sdpa`` (the model as transformers builds it, ``attn_implementation="sdpa"``: the
baseline), ``patched`` (``apply_nvlm_kernels`` on a deep copy, ``auto`` backend: what a user gets
today, i.e. the dispatch table's measured choice and the peers where nothing was measured),
``patched+triton`` (the same copy under ``use_backend("triton")``: our kernels), and for InternVL's
image encoding ``attn=nvlm+triton`` (the zero-patch route: the unpatched model with
``attn_implementation="nvlm"`` on its vision config, so only the attention changes). A provider
whose patch is not importable here is a skipped row saying why. Each case first checks its result
against ``hf-sdpa`` on the same inputs (relative error of the output, and for fwd+bwd of all
gradients together) and that our ops ran (``OpCalls``); ``hf-sdpa`` must run none.

Shapes. CPU (float32): tiny configs, to show the script works (not comparable). CUDA (bfloat16):

* ``InternVL-2B-like``: InternViT-300M (hidden 1024, 16 heads of 64, MLP 4096, LayerNorm, no
  QK-norm), 4 of its 24 layers, 7 tiles of 448 px (1025 tokens), projector 4096 -> 2048 -> 2048;
* ``NVLM-D-72B-like``: InternViT-6B at NVLM's sizes through InternVL's classes (hidden 3200, 25
  heads of 128, MLP 12800, RMSNorm, full-width QK-norm), 2 of 45 layers, 7 tiles, projector
  LN(12800) -> 8192 -> 8192 (transformers' InternVL projector is as wide as the LLM in the middle;
  NVLM-D's ``mlp1`` is 12800 -> 29568 -> 8192 without biases, and its checkpoint pads 25 heads to 32:
  ``bench_projector.py`` and ``bench_vit_attention.py`` time those exact shapes);
* ``Llama-3.2-11B-Vision-like``: vision hidden 1280, 16 heads of 80, MLP 5120, 5 local layers (all
  five feeding the 7680-wide output, as the 11B's five intermediate layers do) + 1 global layer,
  2 samples of one image with 4 and 3 tiles of 560 px (1601 tokens, padded to 1608); projector
  7680 -> 4096; cross-attention: text hidden 4096, 32 heads, 8 KV heads of 128, MLP 14336, 1024
  text tokens over 4 x 1601 keys.

    python bench/bench_hf.py                 # the shapes of this device
    python bench/bench_hf.py --gpu-shapes    # the CUDA shapes here (on a CPU: float32, slow)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import math
from collections.abc import Callable

import torch

import nvlm_kernels as nk
from nvlm_kernels.testing import OpCalls

from common import Case, run_module, skipped

KERNEL_IMAGE = "hf_image_encoding"
KERNEL_XATTN = "hf_cross_attention"
BASELINE = "hf-sdpa"
PASSES = ("fwd", "fwd+bwd")


# --------------------------------------------------------------------------------------------------
# model specs: config, inputs and the timed call of each workload


@dataclasses.dataclass(frozen=True)
class Spec:
    label: str
    family: str  # "internvl" or "mllama": the patch module (_internvl, _mllama) that must exist
    kernel: str
    build: Callable[[], torch.nn.Module]  # the unpatched model, float32, on the current default device
    inputs: Callable[[torch.device, torch.dtype], dict]
    call: Callable[[torch.nn.Module, dict], torch.Tensor]
    items: int  # tiles (image encoding) or text tokens (cross-attention) per call
    item_unit: str
    shape: str
    ops: tuple[str, ...]  # the ops the patched model must run
    zero_patch: bool = False  # an attn=nvlm row (only where that route reaches the timed work)


def _internvl_spec(label: str, vision: dict, text_hidden: int, tiles: int) -> Spec:
    def build():
        from transformers import InternVLConfig, InternVLModel

        # the text model is built but never run: one small layer at the LLM's width (the projector's)
        text = dict(
            model_type="qwen2", hidden_size=text_hidden, num_hidden_layers=1, num_attention_heads=text_hidden // 128,
            num_key_value_heads=1, intermediate_size=256, vocab_size=512,
        )  # fmt: skip
        image_tokens = (vision["image_size"] // 28) ** 2
        config = InternVLConfig(vision_config=vision, text_config=text, image_seq_length=image_tokens)
        return InternVLModel._from_config(config, attn_implementation="sdpa")

    size = vision["image_size"]

    def inputs(device, dtype):
        gen = torch.Generator(device=device).manual_seed(0)
        return {"pixel_values": torch.randn(tiles, 3, size, size, generator=gen, device=device).to(dtype)}

    def call(model, x):
        out = model.get_image_features(
            pixel_values=x["pixel_values"], vision_feature_layer=-1, vision_feature_select_strategy="default"
        )
        return out.pooler_output if hasattr(out, "pooler_output") else out

    qk_norm = vision.get("use_qk_norm", False)
    tokens = (size // vision["patch_size"]) ** 2 + 1
    return Spec(
        label=label, family="internvl", kernel=KERNEL_IMAGE, build=build, inputs=inputs, call=call, items=tiles,
        item_unit="tiles/s", shape=f"{label} {tiles}x{tokens}x{vision['hidden_size']}",
        ops=("vit_qk_norm_attention" if qk_norm else "vit_attention", "mlp_projector"), zero_patch=True,
    )  # fmt: skip


def _mllama_config(vision: dict, text: dict):
    from transformers import MllamaConfig

    text = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **text}  # within the small vocabulary
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=text["vocab_size"] - 1)


def _mllama_image_inputs(vision: dict, tiles: list[int]):
    """pixel_values [B, 1, max_tiles, 3, H, W], aspect ratio ids and masks for one image per sample
    with ``tiles[b]`` real tiles (aspect ratio 1 x n)."""
    ratios = vision["supported_aspect_ratios"]

    def inputs(device, dtype):
        gen = torch.Generator(device=device).manual_seed(1)
        size, max_tiles = vision["image_size"], vision["max_num_tiles"]
        pixels = torch.randn(len(tiles), 1, max_tiles, 3, size, size, generator=gen, device=device).to(dtype)
        ids = torch.tensor([[ratios.index([1, n]) + 1] for n in tiles], device=device)
        mask = torch.tensor([[[1] * n + [0] * (max_tiles - n)] for n in tiles], device=device)
        return {"pixel_values": pixels, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}

    return inputs


def _mllama_image_spec(label: str, vision: dict, text: dict, tiles: list[int]) -> Spec:
    def build():
        from transformers import MllamaModel

        return MllamaModel._from_config(_mllama_config(vision, text), attn_implementation="sdpa")

    def call(model, x):
        states = model.vision_model(**x).last_hidden_state  # as MllamaModel.forward runs the tower
        return model.multi_modal_projector(states).reshape(-1, states.shape[-2], model.hidden_size)

    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    shape = f"{label} {len(tiles)}x{vision['max_num_tiles']}x{tokens}x{vision['hidden_size']}"
    return Spec(
        label=label, family="mllama", kernel=KERNEL_IMAGE, build=build, inputs=_mllama_image_inputs(vision, tiles),
        call=call, items=sum(tiles), item_unit="tiles/s", shape=shape,
        # every call of Mllama's vision encoder has padding patches (1601 is not a multiple of 8): the
        # patch serves it with gated_cross_attention over reordered keys
        ops=("gated_cross_attention",),
    )  # fmt: skip


def _mllama_cross_spec(label: str, vision: dict, text: dict, tiles: list[int], text_tokens: int) -> Spec:
    """MllamaModel with one text layer, a cross-attention layer, on projected vision states."""
    text = {**text, "num_hidden_layers": 1, "cross_attention_layers": [0]}
    tokens_per_tile = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    max_tiles = vision["max_num_tiles"]

    def build():
        from transformers import MllamaModel

        # the vision model is built but never run (the states are given): one small layer
        small_vision = {**vision, "hidden_size": 64, "attention_heads": 1, "intermediate_size": 64,
                        "num_hidden_layers": 1, "num_global_layers": 1, "intermediate_layers_indices": [0],
                        "vision_output_dim": 128}  # fmt: skip
        return MllamaModel._from_config(_mllama_config(small_vision, text), attn_implementation="sdpa")

    def inputs(device, dtype):
        gen = torch.Generator(device=device).manual_seed(2)
        batch = len(tiles)
        ids = torch.randint(0, text["vocab_size"] - 1, (batch, text_tokens), generator=gen, device=device)
        image_at = min(16, text_tokens // 4)
        ids[:, image_at] = text["vocab_size"] - 1  # the <|image|> token
        mask = torch.zeros(batch, text_tokens, 1, max_tiles, dtype=torch.long, device=device)
        for b, n in enumerate(tiles):  # the processor's rule: from the image token on, its real tiles
            mask[b, image_at:, 0, :n] = 1
        states = torch.randn(batch * max_tiles, tokens_per_tile, text["hidden_size"], generator=gen, device=device)
        return {
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "cross_attention_mask": mask,
            "cross_attention_states": states.to(dtype), "use_cache": False,
        }  # fmt: skip

    def call(model, x):
        return model(**x).last_hidden_state

    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    shape = f"{label} {len(tiles)}x{text_tokens}x{heads}/{kv}h over {max_tiles}x{tokens_per_tile}"
    return Spec(
        label=label, family="mllama", kernel=KERNEL_XATTN, build=build, inputs=inputs, call=call,
        items=len(tiles) * text_tokens, item_unit="tokens/s", shape=shape, ops=("gated_cross_attention",),
    )  # fmt: skip


def _specs(gpu_shapes: bool) -> list[Spec]:
    if not gpu_shapes:
        tiny_vit = dict(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=56,
            patch_size=14,
        )  # fmt: skip
        ml_vision = dict(
            hidden_size=128, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=256,
            vision_output_dim=384, image_size=56, patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0, 1],
            supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
        )  # fmt: skip
        ml_text = dict(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=256, vocab_size=256, cross_attention_layers=[1],
        )  # fmt: skip
        return [
            _internvl_spec("tiny-InternVL", tiny_vit, 128, tiles=3),
            _internvl_spec("tiny-InternVL-QKnorm", {**tiny_vit, "use_qk_norm": True, "norm_type": "rms_norm"}, 128, 3),
            _mllama_image_spec("tiny-Mllama", ml_vision, ml_text, tiles=[2, 1]),
            _mllama_cross_spec("tiny-Mllama", ml_vision, ml_text, tiles=[2, 1], text_tokens=32),
        ]
    internvit_300m = dict(
        hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=4096, image_size=448,
        patch_size=14, norm_type="layer_norm", use_qk_norm=False,
    )  # fmt: skip
    internvit_6b = dict(
        hidden_size=3200, num_hidden_layers=2, num_attention_heads=25, intermediate_size=12800, image_size=448,
        patch_size=14, norm_type="rms_norm", use_qk_norm=True,
    )  # fmt: skip
    ml_vision = dict(
        hidden_size=1280, num_hidden_layers=5, num_global_layers=1, attention_heads=16, intermediate_size=5120,
        vision_output_dim=7680, image_size=560, patch_size=14, max_num_tiles=4,
        intermediate_layers_indices=[0, 1, 2, 3, 4],
    )  # fmt: skip
    ml_vision["supported_aspect_ratios"] = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
    ml_text = dict(
        hidden_size=4096, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=1024, cross_attention_layers=[0],
    )  # fmt: skip
    return [
        _internvl_spec("InternVL-2B-like", internvit_300m, 2048, tiles=7),
        _internvl_spec("NVLM-D-72B-like", internvit_6b, 8192, tiles=7),
        _mllama_image_spec("Llama-3.2-11B-Vision-like", ml_vision, ml_text, tiles=[4, 3]),
        _mllama_cross_spec("Llama-3.2-11B-Vision-like", ml_vision, ml_text, tiles=[4, 3], text_tokens=1024),
    ]


# --------------------------------------------------------------------------------------------------
# one workload: the unpatched model, its patched copy, inputs; built on the first call


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


class Workload:
    def __init__(self, spec: Spec, device: str, dtype: torch.dtype) -> None:
        self.spec, self.device, self.dtype = spec, torch.device(device), dtype
        self._models: dict[str, torch.nn.Module] = {}
        self._inputs: dict | None = None
        self._cotangent: torch.Tensor | None = None
        self.tolerance = (3e-2, 6e-2) if dtype in (torch.float16, torch.bfloat16) else (1e-4, 1e-3)  # (out, grads)

    def _base(self) -> torch.nn.Module:
        if "hf-sdpa" not in self._models:
            torch.manual_seed(0)
            with self.device:  # the weights are made where they run
                self._models["hf-sdpa"] = self.spec.build().to(dtype=self.dtype)
            self._inputs = self.spec.inputs(self.device, self.dtype)
        return self._models["hf-sdpa"]

    def model(self, provider: str) -> torch.nn.Module:
        base = self._base()
        key = provider.removesuffix("+triton")
        if key not in self._models:
            model = copy.deepcopy(base)  # the same weights; the baseline stays as transformers built it
            if key == "patched":
                from nvlm_kernels.integrations.transformers import apply_nvlm_kernels

                report = apply_nvlm_kernels(model)
                if not report.replaced:
                    raise RuntimeError(f"apply_nvlm_kernels replaced nothing:\n{report}")
            elif key == "attn=nvlm":
                from nvlm_kernels.integrations.transformers import register_nvlm_attention

                register_nvlm_attention()
                model.vision_tower.set_attn_implementation("nvlm")
            else:
                raise ValueError(f"unknown provider {provider!r}")
            self._models[key] = model
        return self._models[key]

    def _run(self, provider: str, grad: bool) -> torch.Tensor:
        model = self.model(provider)
        backend = "triton" if provider.endswith("+triton") else "auto"
        model.train(grad)
        with nk.use_backend(backend), torch.set_grad_enabled(grad):
            out = self.spec.call(model, self._inputs)
            if grad:
                if self._cotangent is None:
                    gen = torch.Generator(device=self.device).manual_seed(3)
                    self._cotangent = torch.randn(out.shape, generator=gen, device=self.device).to(out.dtype)
                (out * self._cotangent).sum().backward()
        return out.detach()

    def forward(self, provider: str) -> torch.Tensor:
        return self._run(provider, grad=False)

    def train_step(self, provider: str) -> None:
        self._run(provider, grad=True)
        self.model(provider).zero_grad(set_to_none=True)  # each call allocates its gradients, as a step does

    def _grads(self, provider: str) -> dict[str, torch.Tensor]:
        model = self.model(provider)
        model.zero_grad(set_to_none=True)
        self._run(provider, grad=True)
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    def _check_ops(self, provider: str, calls: OpCalls) -> None:
        ran = {label.split(".")[2] for label in calls.labels}
        if provider == BASELINE:
            if ran:
                raise AssertionError(f"the unpatched model ran our ops {sorted(ran)}")
            return
        wanted = {"vit_attention"} if provider.startswith("attn=nvlm") else set(self.spec.ops)
        if not wanted <= ran:
            raise AssertionError(f"{provider}: expected our ops {sorted(wanted)} to run, saw {sorted(ran)}")

    def check_forward(self, provider: str) -> None:
        want = self.forward(BASELINE)
        with OpCalls() as calls:
            got = self.forward(provider)
        self._check_ops(provider, calls)
        if got.shape != want.shape or not torch.isfinite(got).all():
            finite = bool(torch.isfinite(got).all())
            raise AssertionError(f"output {tuple(got.shape)} (all finite: {finite}) vs hf-sdpa's {tuple(want.shape)}")
        err = _rel_error(got, want)
        if err > self.tolerance[0]:
            raise AssertionError(f"output differs from hf-sdpa's: relative error {err:.2e} > {self.tolerance[0]:.0e}")

    def check_train_step(self, provider: str) -> None:
        want = self._grads(BASELINE)
        with OpCalls() as calls:
            got = self._grads(provider)
        self._check_ops(provider, calls)
        if got.keys() != want.keys() or not got:
            raise AssertionError(f"gradients of {len(got)} parameters, hf-sdpa has {len(want)}")
        num = sum(((got[n].double() - want[n].double()) ** 2).sum().item() for n in want)
        den = sum((want[n].double() ** 2).sum().item() for n in want)
        err = math.sqrt(num / max(den, 1e-300))
        if not math.isfinite(err) or err > self.tolerance[1]:
            raise AssertionError(f"gradients differ from hf-sdpa's: relative error {err:.2e} > {self.tolerance[1]:.0e}")


# --------------------------------------------------------------------------------------------------
# cases


def _patch_missing(family: str) -> str | None:
    """Why the family's patch cannot be applied here (None when it can)."""
    try:
        module = importlib.import_module(f"nvlm_kernels.integrations.transformers._{family}")
        module.apply  # noqa: B018 - the entry point apply_nvlm_kernels dispatches to
    except (ImportError, AttributeError) as exc:
        return f"the {family} patch is not available: {type(exc).__name__}: {exc}"
    return None


def _triton_missing(ops: tuple[str, ...], device: str) -> str | None:
    for op in ops:
        reason = nk.available_backends(op, device)["triton"]
        if reason:
            return f"triton unavailable for {op} on {device}: {reason}"
    return None


def cases(device: str, quick: bool = False, gpu_shapes: bool | None = None) -> list[Case]:
    gpu_shapes = device == "cuda" if gpu_shapes is None else gpu_shapes
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dt = str(dtype).removeprefix("torch.")
    specs = _specs(gpu_shapes)
    try:
        importlib.import_module("transformers")
        no_transformers = None
    except ImportError:
        no_transformers = "Hugging Face transformers is not installed"
    out: list[Case] = []
    for spec in specs:
        providers = [BASELINE, "patched", "patched+triton"] + (["attn=nvlm+triton"] if spec.zero_patch else [])
        work = Workload(spec, device, dtype)
        for provider in providers:
            reason = no_transformers
            if reason is None and provider.startswith("patched"):
                reason = _patch_missing(spec.family)
            if reason is None and provider == "patched+triton":
                reason = _triton_missing(spec.ops, device)
            if reason is None and provider == "attn=nvlm+triton":
                reason = _triton_missing(("vit_attention",), device)
            for which in PASSES:
                kernel = f"{spec.kernel}.{which}"
                if reason:
                    out.append(skipped(kernel, provider, spec.shape, dt, reason))
                    continue
                fn, check = (
                    (work.forward, work.check_forward) if which == "fwd" else (work.train_step, work.check_train_step)
                )
                out.append(
                    Case(
                        kernel,
                        provider,
                        spec.shape,
                        dt,
                        functools.partial(fn, provider),
                        items=spec.items,
                        item_unit=spec.item_unit,
                        check=functools.partial(check, provider),
                    )  # fmt: skip
                )
    return out


def targets(rows: list[dict]) -> list[str]:
    """Per shape and pass: each provider's speedup and peak memory against hf-sdpa."""
    ok = {(r["kernel"], r["shape"], r["provider"]): r for r in rows if r["status"] == "ok"}
    lines = []
    for (kernel, shape, provider), row in ok.items():
        base = ok.get((kernel, shape, BASELINE))
        if not kernel.startswith(("hf_image", "hf_cross")) or provider == BASELINE or base is None:
            continue
        speed = float(base["p50_us"]) / float(row["p50_us"])
        memory = ""
        if row.get("peak_mib") and base.get("peak_mib") and float(base["peak_mib"]) > 0:
            ratio = float(row["peak_mib"]) / float(base["peak_mib"])
            memory = f", peak {row['peak_mib']} MiB vs {base['peak_mib']} ({ratio:.2f}x)"
        lines.append(f"{kernel} {shape}: {provider} {speed:.2f}x hf-sdpa{memory}")
    return lines or ["hf (transformers) rows: none measured"]


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-shapes", action="store_true", help="the CUDA shapes on this device")
    args = parser.parse_args()
    module = sys.modules[__name__]
    if args.gpu_shapes:
        module.cases = lambda device, quick=False, _cases=cases: _cases(device, quick, gpu_shapes=True)
    run_module(module)
