"""NVLM-D vs NVLM-X vs NVLM-H training and forward throughput on our model code (nvlm-spec §11).

The paper's Table 3 (Yi-34B, SFT with the LLM unfrozen, 128 H100, 6+1 tiles, 1024 text tokens):
X 50.6, H 36.2, D 28.8 samples/s, decoder lengths X 1024, H 1280, D 2816 — X/D 1.76, H/D 1.26.
This bench runs the same comparison through ``nvlm.NVLM`` on one device, with one model per variant
built from the ``nvlm-{d,x,h}-34b`` presets, scaled as follows.

Kept from the 34B presets (all three variants): the batch layout — per sample one image of 6 + 1
tiles (thumbnail last) of 448 px in 14 px patches (1025 ViT tokens per tile, 256 image tokens per
tile after the 0.5 pixel shuffle) and a text budget of 1024 tokens; the block structure — InternViT
pre-norm layers with QK-RMSNorm, the projector of each variant (D/H: LayerNorm -> Linear -> GELU ->
Linear with the LLM's intermediate width; X: one Linear), the Qwen2/Yi decoder (GQA 7:1, SwiGLU) and
for X/H a gated cross-attention block (with gated FFN) before every 6th LLM layer; the ratios
intermediate/hidden (LLM 20480/7168, ViT 4x); the SFT freezing of ``nvlm.freeze_for_stage``
(ViT frozen; D trains projector + LLM, X cross-attention + LLM, H all three).

Scaled:

* CUDA (bf16, batch 2): every width / 4 — LLM hidden 7168 -> 1792 (14 heads, 2 KV heads, head dim
  128 kept), intermediate 20480 -> 5120, vocabulary 64000 -> 16000; ViT hidden 3200 -> 768 (6 heads
  of 128; 800 would need head dim 32, which our kernels do not take), MLP 12800 -> 3072. Depth kept:
  60 LLM layers (10 cross-attention blocks for X/H), 45 ViT layers. About 2.1B LLM + 0.3B ViT
  parameters, so one GPU holds a training step. Attention's share of the LLM's FLOPs grows about 4x
  at a quarter of the width (14 % instead of 3.6 % for D's 2816 tokens), which favours X a little.
* CPU (float32, batch 1): tiny width, NOT comparable to the paper — LLM hidden 64 (1 head of 64),
  intermediate 192, 12 layers (cross-attention before layers 0 and 6), vocabulary 2048; ViT hidden
  64 (1 head), 2 layers. Token counts as on CUDA (1024 text, 7 x 256 image tokens). At this width
  attention dominates, so the CPU ratios say nothing about the paper's.
* ``quick`` on a CPU (pytest / CI): additionally 112 px tiles (16 image tokens per tile), 64 text
  tokens, 2-id tags and a 4-id header — every token count / 16, their proportions kept (D 176,
  X 64, H 80 positions). ``quick`` on CUDA changes nothing (one shape per variant anyway).

Inputs are built here, not by the processor (synthetic ids, no tokenizer), in the processor's
layout: ``[16 header ids] <Image> ... </Image> [question ids] [answer ids]``. The tile tags
(``<tile_1>`` .. ``<tile_global>``, 4 ids each) count inside the 1024 text tokens, so the decoder
holds exactly D: 1024 + 7 x 256 = 2816 positions (a tag before each tile's 256 image positions),
X: 1024 (the 7 tags in the text, ``tag_tiles`` set; cross-attention over 7 x 256 keys),
H: 1024 + 256 = 1280 (the thumbnail tag and its 256 image positions; cross-attention over
6 x (4 tag + 256) keys). Labels: the last 512 text tokens (the answer), -100 elsewhere.

Cases: ``models.fwd`` (forward with the loss, no grad) and ``models.fwd+bwd`` (forward + backward
of the loss; the gradients are freed after each call, so each call allocates them as a training
step does and ``peak MiB`` is activations + gradients beyond the resident model; no optimizer
step), providers ``nvlm-d`` (the baseline), ``nvlm-x``, ``nvlm-h``; throughput in samples/s, so the
table's speedup column is X/D and H/D. ``targets`` prints per variant the decoder length, samples/s
and peak MiB, and the ratios next to the paper's. No FLOPs are counted (the floor columns stay
empty). Each case first checks a finite loss and logits of the decoder's shape (fwd+bwd: finite
gradients on exactly the SFT-trainable parameters). A model is built on its case's first call, and
only one variant's model is resident at a time (the last one stays until the process ends).

    python bench/bench_models.py
    python bench/bench_models.py --tp 8                                 # weights per rank of the big presets
    torchrun --nproc-per-node 2 bench/bench_models.py --tp 2            # + time and memory per rank
"""

from __future__ import annotations

import dataclasses
import functools
import re

import torch

import nvlm
import nvlm.parallel
import nvlm_kernels as nk
from nvlm.model import IGNORE_INDEX
from nvlm.training import trainable_components

from common import Case, run_module

KERNEL = "models.fwd"
KERNEL_BWD = "models.fwd+bwd"
BASELINE = "nvlm-d"
VARIANTS = ("D", "X", "H")
PAPER = {"D": 28.8, "X": 50.6, "H": 36.2}  # samples/s, Table 3 (34B, 128 H100, SFT)
TILES = 7  # 6 regular tiles + the thumbnail


@dataclasses.dataclass(frozen=True)
class Scale:
    """One scaled setting: model widths/depths and the batch."""

    label: str
    batch: int
    text: int  # text tokens per sample (tags included)
    image_size: int  # tile side in pixels (14 px patches; tokens per tile = (size / 28)²)
    llm: dict
    vision: dict
    tag_tokens: int = 4  # ids per tile tag (a BPE tokenizer splits "<tile_1>" into a few)
    header_tokens: int = 16  # system + user turn headers before the image

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // 28) ** 2


GPU = Scale(
    label="CUDA bf16, 34B presets at 1/4 width: LLM 1792 wide (14x128 heads, 2 KV), SwiGLU 5120, 60 layers, "
    "vocab 16000; ViT 768 wide (6x128 heads), MLP 3072, 45 layers; X/H cross-attention before every 6th layer",
    batch=2,
    text=1024,
    image_size=448,
    llm=dict(hidden_size=1792, num_heads=14, num_kv_heads=2, intermediate_size=5120, vocab_size=16000),
    vision=dict(hidden_size=768, num_heads=6, mlp_size=3072, num_dummy_heads=0),
)
CPU = Scale(
    label="CPU: tiny width, not comparable to the paper: LLM 64 wide (1 head of 64), SwiGLU 192, 12 layers, "
    "vocab 2048; ViT 64 wide, 2 layers; cross-attention before layers 0 and 6; 1024 text + 7x256 image tokens",
    batch=1,
    text=1024,
    image_size=448,
    llm=dict(hidden_size=64, num_heads=1, num_kv_heads=1, intermediate_size=192, vocab_size=2048, num_layers=12),
    vision=dict(hidden_size=64, num_heads=1, mlp_size=256, num_layers=2, num_dummy_heads=0),
)
CPU_QUICK = dataclasses.replace(
    CPU,
    label="CPU quick: tiny width AND token counts / 16 (64 text + 7x16 image tokens, 112 px tiles), "
    "not comparable to the paper: LLM 64 wide, 12 layers; ViT 64 wide, 2 layers",
    text=64,
    image_size=112,
    tag_tokens=2,
    header_tokens=4,
)


def scale_for(device: str, quick: bool) -> Scale:
    if device == "cuda":
        return GPU
    return CPU_QUICK if quick else CPU


def config(variant: str, scale: Scale) -> nvlm.NVLMConfig:
    """The ``nvlm-<variant>-34b`` preset at ``scale`` (the projector's hidden width follows the LLM's
    intermediate width, as in the presets)."""
    base = nvlm.NVLMConfig.from_preset(f"nvlm-{variant.lower()}-34b")
    projector = {} if variant == "X" else {"hidden": scale.llm["intermediate_size"]}
    return base.replace(
        name=f"bench-{variant.lower()}-34b-scaled",
        llm=scale.llm,
        vision={**scale.vision, "image_size": scale.image_size},
        projector=projector,
    )


def decoder_length(variant: str, text: int, tokens_per_tile: int) -> int:
    return {"D": text + TILES * tokens_per_tile, "X": text, "H": text + tokens_per_tile}[variant]


def make_inputs(cfg: nvlm.NVLMConfig, scale: Scale, device: str, seed: int = 0) -> nvlm.NVLMInputs:
    """A batch of ``scale.batch`` identical-layout samples, one 6+1-tile image each (module docstring)."""
    variant, per_tile, text = cfg.variant, cfg.tokens_per_tile, scale.text
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.llm.vocab_size
    # kinds: "t" text, "i" image position, "g<k>" a tag token of tile k (X: tag_tiles)
    kinds: list[str] = ["t"] * scale.header_tokens
    image_position = len(kinds)
    kinds.append("t")  # <Image>
    if variant == "D":
        for _ in range(TILES):
            kinds += ["t"] * scale.tag_tokens + ["i"] * per_tile
    elif variant == "X":
        for tile in range(TILES):
            kinds += [f"g{tile}"] * scale.tag_tokens
    else:  # H: the thumbnail (tag + image positions); the regular tiles' tags go to the keys
        kinds += ["t"] * scale.tag_tokens + ["i"] * per_tile
    kinds.append("t")  # </Image>
    used_text = sum(k != "i" for k in kinds)
    answer = text // 2
    if used_text + answer > text:
        raise ValueError(f"text budget {text} too small for the header, tags and a {answer}-token answer")
    kinds += ["t"] * (text - used_text)  # question, then the answer (the last `answer` text tokens)
    seq = len(kinds)
    assert seq == decoder_length(variant, text, per_tile), (variant, seq)

    batch = scale.batch
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    is_image = torch.tensor([k == "i" for k in kinds]).expand(batch, seq).contiguous()
    tag_tiles = torch.tensor([int(k[1:]) if k.startswith("g") else -1 for k in kinds]).expand(batch, seq)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
    labels[:, -answer:] = ids[:, -answer:]
    size = cfg.vision.image_size
    pixel_values = torch.randn(batch * TILES, 3, size, size, generator=gen)
    tag_ids = None
    if variant == "H":
        tag_ids = torch.randint(0, vocab, (batch * (TILES - 1), scale.tag_tokens), generator=gen)
    plan = nk.TilePlan(width=3 * size, height=2 * size, cols=3, rows=2, tile_size=size, has_thumbnail=True)
    inputs = nvlm.NVLMInputs(
        input_ids=ids,
        attention_mask=torch.ones((batch, seq), dtype=torch.bool),
        pixel_values=pixel_values,
        tiles_per_image=torch.full((batch, 1), TILES, dtype=torch.long),
        image_positions=torch.full((batch, 1), image_position, dtype=torch.long),
        image_token_mask=is_image,
        tag_tiles=tag_tiles.contiguous(),
        xattn_tag_ids=tag_ids,
        tag_tokens_per_tile=scale.tag_tokens if variant == "H" else 0,
        labels=labels,
        plans=[[plan] for _ in range(batch)],
        num_images=[1] * batch,
    )
    return inputs.to(device)


class _Variant:
    """The model and batch of one variant, built on first use. One variant is resident at a time
    (``cases`` runs at import under pytest and for every ``run_all`` filter: building nothing there)."""

    resident: _Variant | None = None

    def __init__(self, variant: str, scale: Scale, device: str) -> None:
        self.variant, self.scale, self.device = variant, scale, device
        self.cfg = config(variant, scale)
        self.model: nvlm.NVLM | None = None
        self.inputs: nvlm.NVLMInputs | None = None

    def get(self) -> tuple[nvlm.NVLM, nvlm.NVLMInputs]:
        if _Variant.resident is not self:
            if _Variant.resident is not None:
                _Variant.resident.release()
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            torch.manual_seed(0)
            self.model = nvlm.build_model(self.cfg, device=self.device, dtype=dtype)
            nvlm.freeze_for_stage(self.model, "sft")
            self.inputs = make_inputs(self.cfg, self.scale, self.device)
            _Variant.resident = self
        return self.model, self.inputs

    def release(self) -> None:
        self.model = self.inputs = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    # the timed calls ------------------------------------------------------------------------------

    def forward(self) -> torch.Tensor:
        model, inputs = self.get()
        with torch.no_grad():
            return model(inputs).loss

    def train_step(self) -> torch.Tensor:
        """Forward + backward; the gradients are freed at the end, so each call allocates them anew
        (the peak MiB column: activations + gradients of one step beyond the resident model)."""
        model, _ = self.get()
        loss = self._backward()
        model.zero_grad(set_to_none=True)
        return loss

    def _backward(self) -> torch.Tensor:
        model, inputs = self.get()
        loss = model(inputs).loss
        loss.backward()
        return loss.detach()

    # the checks -----------------------------------------------------------------------------------

    def check_forward(self) -> None:
        model, inputs = self.get()
        with torch.no_grad():
            out = model(inputs)
        seq = decoder_length(self.variant, self.scale.text, self.cfg.tokens_per_tile)
        want = (self.scale.batch, seq, self.cfg.llm.vocab_size)
        if tuple(out.logits.shape) != want:
            raise AssertionError(f"logits {tuple(out.logits.shape)}, expected {want}")
        if out.loss is None or not bool(torch.isfinite(out.loss)):
            raise AssertionError(f"loss {out.loss} is not finite")

    def check_train_step(self) -> None:
        model, _ = self.get()
        model.zero_grad(set_to_none=True)
        loss = self._backward()
        try:
            if not bool(torch.isfinite(loss)):
                raise AssertionError(f"loss {loss.item()} is not finite")
            trainable = set(trainable_components(self.variant, "sft"))
            for name, param in model.named_parameters():
                part = name.split(".", 1)[0]
                if (param.grad is not None) != (part in trainable):
                    raise AssertionError(f"{name}: gradient {'missing' if param.grad is None else 'on a frozen part'}")
                if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                    raise AssertionError(f"{name}: non-finite gradient")
        finally:
            model.zero_grad(set_to_none=True)


def _shape(scale: Scale) -> str:
    return f"{scale.batch}x({scale.text} txt+{TILES}x{scale.tokens_per_tile} img)"


def cases(device: str, quick: bool = False) -> list[Case]:
    scale = scale_for(device, quick)
    dt = "bfloat16" if device == "cuda" else "float32"
    out: list[Case] = []
    for variant in VARIANTS:
        v = _Variant(variant, scale, device)
        provider = f"nvlm-{variant.lower()}"
        common = dict(items=scale.batch, item_unit="samples/s")
        out.append(Case(KERNEL, provider, _shape(scale), dt, v.forward, check=v.check_forward, **common))
        out.append(Case(KERNEL_BWD, provider, _shape(scale), dt, v.train_step, check=v.check_train_step, **common))
    return out


def targets(rows: list[dict]) -> list[str]:
    mine = [r for r in rows if r["kernel"] in (KERNEL, KERNEL_BWD)]
    if not mine:
        return []
    on_cpu = "CPU" in mine[0]["device"]
    match = re.fullmatch(r"\d+x\((\d+) txt\+\d+x(\d+) img\)", mine[0]["shape"])
    text, per_tile = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    scale = GPU if not on_cpu else (CPU if text == CPU.text else CPU_QUICK)
    rate = {(r["kernel"], r["provider"][-1].upper()): float(r["value"]) for r in mine if r["status"] == "ok"}
    peak = {r["provider"][-1].upper(): r["peak_mib"] for r in mine if r["kernel"] == KERNEL_BWD and r["peak_mib"]}
    lines = [f"models: {scale.label}"]
    for v in VARIANTS:
        parts = [f"decoder {decoder_length(v, text, per_tile)} tokens"]
        for kernel in (KERNEL, KERNEL_BWD):
            what = kernel.removeprefix("models.")
            parts.append(f"{what} {rate[(kernel, v)]:.4g} samples/s" if (kernel, v) in rate else f"{what} -")
        if v in peak:
            parts.append(f"fwd+bwd peak {peak[v]} MiB")
        lines.append(f"models NVLM-{v}: " + ", ".join(parts) + f" (paper: {PAPER[v]} samples/s on 128 H100)")
    for kernel in (KERNEL_BWD, KERNEL):
        ratios = [
            f"{v}/D {rate[(kernel, v)] / rate[(kernel, 'D')]:.2f} (paper {PAPER[v] / PAPER['D']:.2f})"
            for v in ("X", "H")
            if (kernel, v) in rate and (kernel, "D") in rate
        ]
        note = "" if kernel == KERNEL_BWD else " (the paper's are training ratios)"
        lines.append(f"models: {kernel.removeprefix('models.')} " + (", ".join(ratios) or "no ratios") + note)
    if on_cpu:
        lines.append("models: CPU: tiny width, not comparable to the paper (the comparison needs a CUDA run)")
    return lines


# --------------------------------------------------------------------------------------------------
# --tp N: per-rank weights of the big presets (computed), and per-rank time and memory (torchrun)

TINY_TP = dataclasses.replace(CPU_QUICK, label="tiny presets (56 px tiles, 4 image tokens per tile)", image_size=56)
TP_CALLS = 5  # fixed on every rank: a collective inside the timed call must be entered by all ranks


def tp_weight_table(tp: int) -> list[str]:
    """Weights per rank at TP ``tp`` in bf16, from the sharded parameter counts (no memory used)."""
    lines = [f"weights per rank at TP {tp} (bf16, from nvlm.parameter_counts(name, tp={tp})):"]
    for name in ("nvlm-d-72b", "nvlm-x-72b", "nvlm-h-72b", "nvlm-d-34b", "nvlm-x-34b", "nvlm-h-34b", "tiny-h"):
        try:
            counts = nvlm.parameter_counts(name, tp=tp)
        except ValueError as exc:  # the heads do not divide
            lines.append(f"  {name:<12} not shardable at TP {tp}: {exc}")
            continue
        gb = counts["total"] * 2 / 1e9
        lines.append(f"  {name:<12} {counts['total'] / 1e9:7.3f}B parameters = {gb:6.2f} GB per rank")
    return lines


def _tp_configs(device: str) -> list[tuple[str, nvlm.NVLMConfig, Scale]]:
    """The tiny presets (6+1 tiles allowed), and on CUDA also the scaled 34B configs."""
    out = [(f"tiny-{v.lower()}", nvlm.NVLMConfig.from_preset(f"tiny-{v.lower()}").replace(tiling={"max_tiles": 6}),
            TINY_TP) for v in VARIANTS]  # fmt: skip
    if device == "cuda":
        out += [(f"scaled-{v.lower()}-34b", config(v, GPU), GPU) for v in VARIANTS]
    return out


def _tp_step(model: nvlm.NVLM, inputs: nvlm.NVLMInputs, what: str, name: str) -> None:
    if what == "fwd":
        with torch.no_grad():
            loss = model(inputs).loss
    else:
        loss = model(inputs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    if not bool(torch.isfinite(loss)):
        raise AssertionError(f"{name} {what}: loss {loss} is not finite")


def run_tp(tp: int) -> None:
    """Under ``torchrun --nproc-per-node tp``: every rank builds its shards of each model, checks the
    loss, then times ``TP_CALLS`` forward and forward+backward calls; rank 0 prints every rank's p50
    and (CUDA) peak memory."""
    import statistics
    import time

    import torch.distributed as dist

    from nvlm.parallel import init_from_env

    device = "cuda" if torch.cuda.is_available() else "cpu"
    group = init_from_env(device)
    if group.size != tp:
        raise SystemExit(
            f"bench_models --tp {tp}: launched with {group.size} processes (use torchrun --nproc-per-node {tp})"
        )
    rows = []
    for name, cfg, scale in _tp_configs(device):
        try:
            nvlm.parallel.check_tp(cfg, tp)
        except ValueError as exc:
            rows.append((name, "skipped", str(exc), "", ""))
            continue
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = nvlm.build_model(cfg, device=device, dtype=dtype)
        nvlm.freeze_for_stage(model, "sft")
        inputs = make_inputs(cfg, scale, device)
        for what in ("fwd", "fwd+bwd"):
            call = functools.partial(_tp_step, model, inputs, what, name)
            call()  # warm-up and check
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(TP_CALLS):
                dist.barrier()
                start = time.perf_counter()
                call()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - start) * 1e3)
            peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device == "cuda" else ""
            rows.append((name, what, f"{statistics.median(times):.1f}", peak, f"{scale.batch}"))
        del model, inputs
    gathered = [None] * tp
    dist.all_gather_object(gathered, rows)
    if group.rank == 0:
        print(f"bench_models --tp {tp} on {device}: p50 of {TP_CALLS} steps per rank, CUDA peak memory per rank")
        print(f"{'model':<16} {'step':<8} " + " ".join(f"{'rank ' + str(r) + ' ms':>12} {'MiB':>7}" for r in range(tp)))
        for i, (name, what, *_rest) in enumerate(rows):
            if what == "skipped":
                print(f"{name:<16} skipped: {rows[i][2]}")
                continue
            cells = " ".join(f"{g[i][2]:>12} {g[i][3]:>7}" for g in gathered)
            print(f"{name:<16} {what:<8} {cells}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import argparse
    import os
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor-parallel size (per-rank weights; under torchrun also time and memory per rank)",
    )
    args = parser.parse_args()
    if args.tp is not None:
        if int(os.environ.get("RANK", "0")) == 0:
            print("\n".join(tp_weight_table(args.tp)) + "\n")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            run_tp(args.tp)
        else:
            print(
                f"(per-rank time and memory: torchrun --nproc-per-node {args.tp} bench/bench_models.py --tp {args.tp})"
            )
        sys.exit(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"bench_models: {scale_for(device, quick=False).label}\n")
    run_module(sys.modules[__name__])
