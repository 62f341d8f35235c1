"""``nvlm``: run an NVLM model on an image from the command line, or profile that run.

    nvlm run --preset tiny-d                              # random weights, the bundled example image
    nvlm run --preset tiny-h --image cat.png --prompt "What is this?" --max-new-tokens 16
    nvlm run --preset nvlm-d-72b --checkpoint ~/NVLM-D-72B --tokenizer ~/NVLM-D-72B --device cuda
    nvlm profile --preset tiny-x --trace trace.json       # torch.profiler Chrome trace, NVTX ranges on

(also ``python -m nvlm ...``). A run prints the tile plan of each image, the tokens each stage
handles, the generated text and the wall time of each stage (``nvlm.profiling.StageTimer``).

Weights are random unless ``--checkpoint`` names a directory in our own layout
(``nvlm.checkpoint.save_checkpoint``) or in the Hugging Face NVLM-D layout; which one is told by the
tensor names. A directory with a ``config.json`` (a downloaded ``nvidia/NVLM-D-72B``, or ours saved
with its config) is loaded with ``nvlm.from_pretrained`` and needs no ``--preset``; without one the
preset's model is built and the weights loaded into it. The tiny presets use the built-in byte
tokenizer; the real ones need ``--tokenizer`` (a local Hugging Face tokenizer directory, read with
transformers), which defaults to the checkpoint directory when that holds a tokenizer (NVLM-D-72B's
does).

Tensor parallelism: ``torchrun --nproc-per-node N -m nvlm run --preset ... --tp N`` (``nvlm.parallel``):
the process group is initialized here (gloo on CPU, nccl on CUDA, one GPU per rank), every rank
builds and loads only its shards, only rank 0 prints, and ``profile`` writes one trace per rank
(``trace.rank{r}.json``). A bad ``--tp`` (not dividing the heads, or not the number of processes)
and a rank failing to load end with the error on every rank.

Bad input (an unknown preset, a missing image, a checkpoint directory without weights, ...) ends
with one ``nvlm <command>: error: ...`` line and exit status 2, as argparse does for its own errors.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import io
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nvlm_kernels import _nvtx

DEFAULT_PROMPT = "Describe this image."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXIT_USAGE = 2  # argparse's status for bad command lines; ours for bad input files too
# Seconds a step must run before its progress bar appears: short runs stay clean.
PROGRESS_DELAY_S = 1.0


class CLIError(Exception):
    """Bad input: reported as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------
# command line


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="model preset (tiny-d, tiny-x, tiny-h, nvlm-d-72b, ...)")
    parser.add_argument(
        "--image", action="append", default=None, metavar="PATH",
        help="image file (repeat for several); default: an example image bundled with nvlm",
    )  # fmt: skip
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the user message (default: {DEFAULT_PROMPT!r})")
    parser.add_argument(
        "--checkpoint", metavar="DIR",
        help="weights: Hugging Face NVLM-D or our safetensors layout (with a config.json --preset is optional)",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer", metavar="DIR",
        help="a local Hugging Face tokenizer (needs transformers); default: the checkpoint directory if it has one",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate (default 32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--warmup", type=int, default=None, metavar="N", help="untimed runs first (see each command)")
    parser.add_argument("--nvtx", action="store_true", help="open NVTX ranges (as NVLM_NVTX=1 does)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--tp", type=int, default=None, metavar="N",
        help="tensor-parallel size: launch with torchrun --nproc-per-node N (default: the number of processes)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvlm", description="Run or profile an NVLM-1.0 (D / X / H) model on an image."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run", help="generate text for an image; print the tile plan, token counts and stage times",
        description="Generate text for an image and print the tile plan, the token counts and the time of each "
        "stage. --warmup defaults to 0.",
    )  # fmt: skip
    _add_run_options(run)
    profile = commands.add_parser(
        "profile", help="the same run under torch.profiler, exported as a Chrome trace",
        description="The same run under torch.profiler with NVTX ranges on, exported as a Chrome trace (open it "
        "in chrome://tracing or https://ui.perfetto.dev). --warmup defaults to 1, so that one-time costs (kernel "
        "compilation, caches) stay out of the trace. On a GPU it also prints nsys and ncu command lines for this run.",
    )  # fmt: skip
    _add_run_options(profile)
    profile.add_argument("--trace", required=True, metavar="PATH", help="where to write the Chrome trace (JSON)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The ``nvlm`` console script. Returns the exit status (0, or 2 for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.command == "profile" else 0
    ranges_were_enabled = _nvtx.is_enabled()  # restored: main may run inside another program (tests)
    started_group = False
    try:
        tp, started_group = _init_tensor_parallel(args)
        request = _check_request(args, tp)
        # only rank 0 prints its report (every rank prints its errors, below)
        quiet_rank = contextlib.redirect_stdout(io.StringIO()) if tp.rank else contextlib.nullcontext()
        with quiet_rank:
            if args.command == "profile":
                _profile(args, request)
            else:
                _run(args, request)
    except CLIError as error:
        print(f"nvlm {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        _nvtx.enable(ranges_were_enabled)
        if started_group:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _init_tensor_parallel(args: argparse.Namespace):
    """(TPGroup, whether we initialized the process group). Under torchrun (WORLD_SIZE set) the
    process group is started here; --tp must equal the number of processes."""
    import torch.distributed as dist

    from nvlm.parallel import TPGroup, init_from_env

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp is None:
        args.tp = world
    if args.tp < 1:
        raise CLIError(f"--tp must be at least 1, got {args.tp}")
    if args.tp != world:
        how = "run it under torchrun --nproc-per-node" if world == 1 else "torchrun --nproc-per-node must equal --tp"
        raise CLIError(f"--tp {args.tp} but {world} processes were started ({how})")
    if world == 1:
        return TPGroup(), False
    started = not dist.is_initialized()
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_from_env(device_type), started


# --------------------------------------------------------------------------------------------------
# checking the request before anything slow runs


@dataclass
class Request:
    """What the command line asks for, checked."""

    config: Any  # NVLMConfig
    device: torch.device
    dtype: torch.dtype
    images: list[Path]
    checkpoint: Path | None
    checkpoint_kind: str | None  # "ours" or "hf-nvlm-d"
    tokenizer_dir: Path | None
    trace: Path | None  # profile only
    tp: Any = None  # nvlm.parallel.TPGroup
    pretrained: bool = False  # the checkpoint has a config.json: nvlm.from_pretrained builds and loads


def example_image_path() -> Path:
    """The image ``nvlm run`` uses without ``--image`` (installed with the package)."""
    return Path(str(importlib.resources.files("nvlm") / "assets" / "example.png"))


def _checkpoint_kind(directory: Path) -> str:
    """A checkpoint's layout, "ours" or "hf-nvlm-d", told by the tensor names of its index (or file)."""
    from nvlm.checkpoint import INDEX_FILE, SINGLE_FILE

    if not directory.is_dir():
        raise CLIError(f"--checkpoint {directory}: not a directory")
    if (directory / INDEX_FILE).is_file():
        try:
            names = list(json.loads((directory / INDEX_FILE).read_text())["weight_map"])
        except (ValueError, KeyError) as error:
            raise CLIError(f"--checkpoint {directory}: {INDEX_FILE} has no readable weight_map ({error})") from None
    elif (directory / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(directory / SINGLE_FILE, framework="pt") as f:
            names = list(f.keys())
    else:
        raise CLIError(f"--checkpoint {directory}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
    # HF NVLM-D names its parts vision_model. / mlp1. / language_model.; ours vision. / projector. / llm.
    if any(name.startswith(("vision_model.", "language_model.", "mlp1.")) for name in names):
        return "hf-nvlm-d"
    if any(name.startswith(("vision.", "projector.", "llm.")) for name in names):
        return "ours"
    raise CLIError(f"--checkpoint {directory}: tensor names of neither our layout nor Hugging Face NVLM-D")


# A directory holding a Hugging Face tokenizer (NVLM-D-72B ships Qwen2.5's next to its weights).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def _check_request(args: argparse.Namespace, tp=None) -> Request:
    from nvlm.checkpoint import CONFIG_FILE, pretrained_config
    from nvlm.config import PRESETS
    from nvlm.parallel import TPGroup, check_tp, rank_path

    tp = tp if tp is not None else TPGroup()

    checkpoint = Path(args.checkpoint).expanduser() if args.checkpoint else None
    kind = _checkpoint_kind(checkpoint) if checkpoint is not None else None
    if args.preset is not None and args.preset not in PRESETS:
        raise CLIError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    pretrained = checkpoint is not None and (checkpoint / CONFIG_FILE).is_file()
    if pretrained:
        try:
            config, _ = pretrained_config(checkpoint)  # the checkpoint knows its shapes better than a preset name
        except (ValueError, TypeError, KeyError, FileNotFoundError) as error:
            raise CLIError(f"--checkpoint {checkpoint}: {CONFIG_FILE}: {error}") from None
    elif args.preset is not None:
        config = PRESETS[args.preset]
    else:
        raise CLIError("--preset is required (unless --checkpoint holds a config.json)")

    images = [Path(p).expanduser() for p in args.image] if args.image else [example_image_path()]
    for image in images:
        if not image.is_file():
            raise CLIError(f"--image {image}: no such file")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.warmup < 0:
        raise CLIError(f"--warmup must be at least 0, got {args.warmup}")

    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available to this torch")
    device = torch.device(device_name)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    tokenizer_dir = Path(args.tokenizer).expanduser() if args.tokenizer else None
    if tokenizer_dir is None and checkpoint is not None and any((checkpoint / f).is_file() for f in TOKENIZER_FILES):
        tokenizer_dir = checkpoint
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise CLIError(f"--tokenizer {tokenizer_dir}: not a directory")
    if tokenizer_dir is None and not config.name.startswith("tiny"):
        raise CLIError(
            f"{config.name} needs --tokenizer DIR (a local Hugging Face tokenizer); only the tiny presets run with "
            "the built-in byte tokenizer"
        )
    try:
        check_tp(config, tp.size)
    except ValueError as error:
        raise CLIError(f"--tp {tp.size}: {error}") from None
    _check_memory(config, device, dtype, tp.size)
    trace = None
    if args.command == "profile":
        trace = Path(args.trace).expanduser()
        if trace.is_dir():
            raise CLIError(f"--trace {trace}: is a directory; name the JSON file to write")
        trace = rank_path(trace, tp.rank, tp.size)  # one trace per rank
    return Request(
        config=config, device=device, dtype=dtype, images=images, checkpoint=checkpoint, checkpoint_kind=kind,
        tokenizer_dir=tokenizer_dir, trace=trace, tp=tp, pretrained=pretrained,
    )  # fmt: skip


def llm_weight_bytes(config, dtype: torch.dtype) -> int:
    """A lower bound of the weights' size: the decoder's matrices (embedding, head, attention, MLP),
    by far the largest part at NVLM's sizes. Counted from the config, as counting a model built on
    the meta device would import torch._dynamo (seconds) for a check that tiny models never fail."""
    llm = config.llm
    kv_width = llm.num_kv_heads * llm.head_dim
    per_layer = 2 * llm.hidden_size**2 + 2 * llm.hidden_size * kv_width + 3 * llm.hidden_size * llm.intermediate_size
    embeddings = llm.vocab_size * llm.hidden_size * (1 if llm.tie_embeddings else 2)
    return (embeddings + llm.num_layers * per_layer) * torch.finfo(dtype).bits // 8


def _check_memory(config, device: torch.device, dtype: torch.dtype, tp: int = 1) -> None:
    """Refuse, before minutes of building, a model whose weights alone exceed the device's memory
    (at tensor-parallel size ``tp``: this rank's share)."""
    weight_bytes = llm_weight_bytes(config, dtype) // tp
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        # all of RAM, not what is free now: page cache is reclaimable, and a false refusal is worse
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:  # pragma: no cover - not Linux
        return
    if weight_bytes > available:
        raise CLIError(
            f"{config.name} in {str(dtype).removeprefix('torch.')} needs more than {weight_bytes / 2**30:.0f} GiB for "
            f"its weights, but {device.type} has {available / 2**30:.0f} GiB"
        )


# --------------------------------------------------------------------------------------------------
# model, tokenizer, inputs


def _progress(quiet: bool, **kw: Any):
    from tqdm.auto import tqdm

    return tqdm(disable=quiet, delay=PROGRESS_DELAY_S, leave=False, dynamic_ncols=True, **kw)


def build_model(request: Request, *, quiet: bool):
    """The model on the request's device and dtype, random or from the checkpoint, in eval mode. A
    progress bar (after PROGRESS_DELAY_S) counts the layers built: a 72B model takes minutes. A
    checkpoint with a config.json goes through ``nvlm.from_pretrained`` (built on the meta device,
    each weight written once)."""
    from nvlm.checkpoint import from_pretrained, load_checkpoint, load_hf_nvlm_d
    from nvlm.llm import DecoderLayer
    from nvlm.model import NVLM
    from nvlm.vision import InternViTLayer
    from nvlm.xattn import GatedCrossAttentionBlock

    if request.pretrained:
        if not quiet:
            print(f"loading {request.checkpoint} ...", file=sys.stderr)
        try:
            return from_pretrained(request.checkpoint, dtype=request.dtype, device=request.device, tp=request.tp)
        except (ValueError, FileNotFoundError) as error:  # missing keys, shape mismatches: the user's files
            raise CLIError(f"--checkpoint {request.checkpoint}: {error}") from None

    config = request.config
    layer_types = (InternViTLayer, DecoderLayer, GatedCrossAttentionBlock)
    num_xattn = len(config.xattn.layer_indices(config.llm.num_layers)) if config.xattn is not None else 0
    total = config.vision.num_layers + config.llm.num_layers + num_xattn
    with _progress(quiet, total=total, desc=f"building {config.name}", unit="layer") as bar:

        def count_layer(_parent, _name, submodule):
            if isinstance(submodule, layer_types):
                bar.update(1)

        # A layer is registered with its parent right after its constructor (and weight init) ran.
        hook = torch.nn.modules.module.register_module_module_registration_hook(count_layer)
        try:
            model = NVLM(config, device=request.device, dtype=request.dtype, tp=request.tp)
        finally:
            hook.remove()
    if request.checkpoint is not None:
        if not quiet:
            print(f"loading {request.checkpoint} ...", file=sys.stderr)
        try:
            if request.checkpoint_kind == "hf-nvlm-d":
                load_hf_nvlm_d(model, request.checkpoint, dtype=request.dtype)
            else:
                load_checkpoint(model, request.checkpoint, dtype=request.dtype)
        except (ValueError, FileNotFoundError) as error:  # missing keys, shape mismatches: the user's files
            raise CLIError(f"--checkpoint {request.checkpoint}: {error}") from None
    return model.eval()


def load_tokenizer(request: Request):
    if request.tokenizer_dir is None:
        from nvlm.tokenizer import ByteTokenizer

        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CLIError("--tokenizer needs transformers (pip install 'nvlm-kernels[hf]')") from None
    from transformers.utils import logging as hf_logging

    # transformers 5 reads the directory's config.json too: NVLM-D's names remote code (auto_map),
    # which a tokenizer never needs (no prompt asking to run it), and its model type is unknown to
    # transformers (a warning about it, silenced: the weights are ours to load, not transformers').
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(request.tokenizer_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise CLIError(f"--tokenizer {request.tokenizer_dir}: {error}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _stop_token_ids(tokenizer, config) -> list[int]:
    """``<|im_end|>`` ends an assistant turn (ChatML); the tokenizer's own EOS, when different, too."""
    ids = {int(tokenizer.convert_tokens_to_ids(config.tokens.im_end))}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


class _TokenProgress:
    """A range observer that advances a progress bar per generated token: the prefill yields the
    first, every ``nvlm.generate.step`` one more. Through the ranges, generate needs no callback."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def range_enter(self, label: str) -> None:
        pass

    def range_exit(self, label: str) -> None:
        if label in ("nvlm.llm.prefill", "nvlm.generate.step"):
            self.bar.update(1)


def generate_once(model, processor, tokenizer, request: Request, args: argparse.Namespace):
    """Preprocess, prefill and decode one request: ``(inputs, GenerationOutput)``."""
    import nvlm_kernels as nk

    conversation = [{"role": "user", "content": args.prompt}]
    try:
        inputs = processor(conversation, [str(p) for p in request.images], device=request.device)
    except nk.ImageError as error:  # a file that is not an image: the user's input
        raise CLIError(f"--image: {error}") from None
    except ValueError as error:  # <image> markers that do not match the images, a prompt too long
        raise CLIError(str(error)) from None
    with _progress(args.quiet, total=args.max_new_tokens, desc="generating", unit="tok") as bar:
        observer = None if args.quiet else _TokenProgress(bar)  # --quiet: no observer on the ranges' path
        if observer is not None:
            _nvtx.add_observer(observer)
        try:
            output = model.generate(
                inputs,
                max_new_tokens=args.max_new_tokens,
                stop_token_ids=_stop_token_ids(tokenizer, request.config),
                pad_token_id=int(getattr(tokenizer, "pad_token_id", None) or 0),
            )
        except ValueError as error:  # e.g. prompt + max_new_tokens beyond config.max_seq_len
            raise CLIError(str(error)) from None
        finally:
            if observer is not None:
                _nvtx.remove_observer(observer)
    return inputs, output


# --------------------------------------------------------------------------------------------------
# the report


def tile_plan_lines(request: Request, inputs) -> list[str]:
    lines = []
    for index, (path, plan) in enumerate(zip(request.images, inputs.plans[0], strict=True)):
        thumbnail = " + thumbnail" if plan.has_thumbnail else ""
        lines.append(
            f"  image {index + 1} {path.name} ({plan.width}x{plan.height}): grid {plan.cols}x{plan.rows} (cols x rows) "
            f"-> {plan.num_tiles} tile{'s' if plan.num_tiles != 1 else ''}{thumbnail} = {plan.total} tiles of "
            f"{plan.tile_size}x{plan.tile_size}"
        )
    return lines


def cross_attention_keys(config, inputs) -> int:
    """Keys the cross-attention blocks attend over, as ``NVLM.cross_attention_inputs`` builds them:
    NVLM-X every tile with the thumbnail, NVLM-H the regular tiles, each after its tag's tokens."""
    tiles = [plan.total for plan in inputs.plans[0]]
    if config.variant == "X":
        return sum(tiles) * config.tokens_per_tile
    if config.variant == "H":
        regular = sum(n - 1 for n in tiles if n > 1)
        return regular * (config.tokens_per_tile + inputs.tag_tokens_per_tile)
    return 0


def token_count_lines(config, inputs, output) -> list[str]:
    tiles = int(inputs.tiles_per_image.sum())
    prompt = int(inputs.attention_mask.sum())
    image_tokens = int(inputs.image_token_mask.sum())
    rows = [
        ("tiles (preprocess)", tiles),
        ("ViT tokens (tiles x (patches + CLS))", tiles * config.vision.seq_len),
        ("image tokens after pixel shuffle", tiles * config.tokens_per_tile),
        ("prompt tokens in the decoder (prefill)", prompt),
        ("  of which image tokens", image_tokens),
        ("cross-attention keys", cross_attention_keys(config, inputs)),
        ("generated tokens (decode)", int(output.lengths[0])),
    ]
    width = max(len(name) for name, _ in rows)
    return [f"  {name:<{width}}  {count:>8}" for name, count in rows]


def printable(text: str) -> str:
    """Random weights generate arbitrary bytes: escape control characters (a terminal would act on
    them) and keep newlines and tabs."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode() for c in text)


def decode_generated(tokenizer, ids: list[int]) -> str:
    """The text of ``ids``, special tokens dropped. The tiny presets' vocabulary (320) is larger than
    the byte tokenizer's (260), so random weights can pick ids no tokenizer knows: shown as <id N>."""
    vocab = len(tokenizer)
    pieces, run = [], []
    for token_id in ids:
        if 0 <= token_id < vocab:
            run.append(token_id)
            continue
        pieces += [tokenizer.decode(run, skip_special_tokens=True), f"<id {token_id}>"]
        run = []
    pieces.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(pieces)


def _report(request: Request, model, tokenizer, inputs, output, timer, elapsed_build: float) -> None:
    from nvlm.model import count_parameters

    config = request.config
    weights = f"checkpoint {request.checkpoint}" if request.checkpoint else "random weights"
    params = count_parameters(model)["total"]
    tp = request.tp.size if request.tp is not None else 1
    per_rank = f" per rank, tensor parallel {tp}" if tp > 1 else ""
    print(
        f"{config.name} (NVLM-{config.variant}, {params / 1e6:,.1f}M parameters{per_rank}, {weights}) on "
        f"{request.device}, "
        f"{str(request.dtype).removeprefix('torch.')}; built in {elapsed_build:.2f} s"
    )
    print("tile plan:")
    print("\n".join(tile_plan_lines(request, inputs)))
    print("tokens:")
    print("\n".join(token_count_lines(config, inputs, output)))
    generated = output.sequences[0, : int(output.lengths[0])].tolist()
    print("generated text:")
    print("  " + printable(decode_generated(tokenizer, generated)))
    print("stage times:" + (" (CUDA synchronized at stage boundaries)" if timer.sync else ""))
    print("\n".join("  " + line for line in timer.table().splitlines()))


# --------------------------------------------------------------------------------------------------
# commands


def _prepare(args: argparse.Namespace, request: Request):
    # The first custom-op call imports torch._dynamo (seconds): import it now, or it is timed as ViT.
    import torch._dynamo  # noqa: F401

    from nvlm.processor import NVLMProcessor

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model = build_model(request, quiet=args.quiet)
    elapsed_build = time.perf_counter() - started
    tokenizer = load_tokenizer(request)
    try:
        processor = NVLMProcessor(tokenizer, request.config)
    except ValueError as error:  # a tokenizer without the ChatML / image tokens
        raise CLIError(f"tokenizer: {error}") from None
    for _ in range(args.warmup):
        generate_once(model, processor, tokenizer, request, args)
    return model, tokenizer, processor, elapsed_build


def _timed_run(args, request, model, tokenizer, processor):
    from nvlm.profiling import StageTimer

    with StageTimer(sync=request.device.type == "cuda") as timer:
        inputs, output = generate_once(model, processor, tokenizer, request, args)
    return inputs, output, timer


def _run(args: argparse.Namespace, request: Request) -> None:
    if args.nvtx:
        _nvtx.enable()
    model, tokenizer, processor, elapsed_build = _prepare(args, request)
    inputs, output, timer = _timed_run(args, request, model, tokenizer, processor)
    _report(request, model, tokenizer, inputs, output, timer, elapsed_build)


def _profile(args: argparse.Namespace, request: Request) -> None:
    from torch.profiler import ProfilerActivity, profile

    _nvtx.enable()  # the trace is read by range names: they must be there
    model, tokenizer, processor, elapsed_build = _prepare(args, request)
    activities = [ProfilerActivity.CPU]
    if request.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as profiler:
        inputs, output, timer = _timed_run(args, request, model, tokenizer, processor)
    request.trace.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(request.trace))
    _report(request, model, tokenizer, inputs, output, timer, elapsed_build)
    print(f"Chrome trace (times above include the profiler's overhead): {request.trace}")
    if request.device.type == "cuda":
        print("Nsight command lines for this run:")
        print("\n".join("  " + line for line in nsight_commands(args, request)))


def _run_command_line(args: argparse.Namespace, request: Request, *, max_new_tokens: int | None = None) -> list[str]:
    """``python -m nvlm run ...`` repeating this request, NVTX on, no progress bars."""
    argv = [sys.executable, "-m", "nvlm", "run", "--preset", request.config.name]
    if args.preset is None:  # the config came from the checkpoint
        argv = argv[:-2]
    for image in args.image or ():
        argv += ["--image", str(Path(image).expanduser().resolve())]
    if args.prompt != DEFAULT_PROMPT:
        argv += ["--prompt", args.prompt]
    for option, value in (("--checkpoint", request.checkpoint), ("--tokenizer", request.tokenizer_dir)):
        if value is not None:
            argv += [option, str(value.resolve())]
    argv += ["--max-new-tokens", str(max_new_tokens or args.max_new_tokens), "--device", request.device.type]
    argv += ["--dtype", str(request.dtype).removeprefix("torch."), "--seed", str(args.seed)]
    argv += ["--warmup", str(args.warmup), "--nvtx", "--quiet"]
    return argv


def nsight_commands(args: argparse.Namespace, request: Request) -> list[str]:
    """An nsys timeline of the whole run, and ncu kernel profiles of the ViT (the largest stage at
    NVLM's shapes) and of its attention op.

    ncu filters on push/pop NVTX ranges as ``<domain>@<range>/`` (the trailing "/" marks a push/pop
    range, "@" separates a domain other than the default one): Nsight Compute CLI documentation,
    "NVTX Filtering". Our ranges live in the domain ``nvlm_kernels._nvtx.DOMAIN``. Labels with "[" or
    "]" (``nvlm.llm.layer[0]``) clash with ncu's stack-position syntax, so the filters below use
    labels without them.
    """
    name = request.config.name
    run = _run_command_line(args, request)
    one_token = _run_command_line(args, request, max_new_tokens=1)  # kernel replay is slow: profile the prefill
    attention_op = "vit_qk_norm_attention" if request.config.vision.qk_norm else "vit_attention"

    def ncu(range_label: str, launch_count: int, report: str) -> list[str]:
        nvtx_filter = f"{_nvtx.DOMAIN}@{range_label}/"
        return ["ncu", "--nvtx", "--nvtx-include", nvtx_filter, "--launch-count", str(launch_count), "--set", "full",
                "-f", "-o", report, *one_token]  # fmt: skip

    return [
        shlex.join(["nsys", "profile", "--trace=cuda,nvtx", "--force-overwrite=true", "-o", f"nvlm-{name}", *run]),
        shlex.join(ncu("nvlm.vision", 20, f"nvlm-{name}-vit")),
        shlex.join(ncu(f"nvlm.kernels.{attention_op}.fwd", 4, f"nvlm-{name}-{attention_op}")),
    ]


if __name__ == "__main__":  # pragma: no cover - ``python -m nvlm`` goes through nvlm/__main__.py
    sys.exit(main())
