"""vLLM serving NVLM-D-like and InternVL-like models with the plugin on vs off (run it in .venv-vllm).

    .venv-vllm/bin/python bench/bench_vllm.py                  # tiny CPU models (make vllm-check's venv)
    .venv-vllm/bin/python bench/bench_vllm.py --tiles 1,6 --requests 8 --out results.csv
    python bench/bench_vllm.py --gpu                           # CUDA vLLM: real widths, random weights

Providers (one engine each, in its own process: vLLM loads plugins once per process):

* ``vllm`` -- the plugin off (``VLLM_PLUGINS=``): vLLM's own preprocessing in the frontend, its
  InternViT attention and projector;
* ``plugin`` -- on, worker preprocessing (the default): the frontend sends uint8 pixels and the
  tile plan, the worker runs ``preprocess_images`` on the model's device;
* ``plugin-frontend`` -- on, ``NVLM_KERNELS_VLLM_PREPROCESS=frontend``: our CPU path in the frontend.

Rows, for each family and each tile count (the grid's tiles, 1 to 6; the thumbnail comes on top
for grids of more than one tile):

* ``requests/s`` -- ``--requests`` requests submitted together (``LLM.generate``), each with its own
  image (no cache hit in vLLM's multimodal caches), ``--max-tokens`` greedy tokens each;
* ``ttft_ms`` -- time to first token of a lone request (``max_tokens=1``, a fresh image; median of
  ``--repeats``): preprocessing, the encoder and the prefill, as one user sees them;
* ``frontend_ms_per_image`` (wall) and ``frontend_cpu_ms_per_image`` (the frontend process's CPU
  time, all threads) -- the image processor alone as the frontend calls it (vLLM's
  ``InternVLImageProcessor``, ours in worker mode: the tile plan and the uint8 copy, ours in frontend
  mode: our CPU path); what the plugin takes off the frontend.

Each engine is checked before it is timed: greedy tokens of the first request must equal the
``vllm`` provider's (a provider that differs is reported as an error row), and with the plugin on,
the worker must have run our ops (``collective_rpc`` reads its counters).

Shapes. CPU (default): ``write_checkpoint``'s tiny models (56-px tiles, 2 ViT and 2 LLM layers,
float32) -- they show the harness works and the frontend's share, not GPU speed. ``--gpu``: 448-px
tiles, bfloat16, weights random (``load_format="dummy"``): NVLM-D-72B-like (InternViT-6B: 3200
wide, 25 heads + 7 dummy of 128, all 45 layers; projector 12800 -> 29568 -> 8192; Qwen2-72B's width
with ``--llm-layers`` of its 80 layers) and InternVL2.5-8B-like (InternViT-300M, all 24 layers;
Qwen2.5-7B's width, ``--llm-layers``). No GPU has run it yet.

The engine runs vLLM's default multiprocess mode (frontend, engine core and worker in separate
processes, so the frontend's preprocessing overlaps the worker as in serving); ``--in-process``
runs all in one process.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = ("nvlm-d", "internvl")
PROVIDERS = {
    "vllm": {"VLLM_PLUGINS": ""},
    "plugin": {"VLLM_PLUGINS": "nvlm_kernels", "NVLM_KERNELS_VLLM_PREPROCESS": "worker"},
    "plugin-frontend": {"VLLM_PLUGINS": "nvlm_kernels", "NVLM_KERNELS_VLLM_PREPROCESS": "frontend"},
}
# grid tiles -> (width, height) in tiles of the image (its aspect ratio picks that grid)
GRIDS = {1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2), 5: (5, 1), 6: (3, 2)}

GPU_SHAPES = {
    "nvlm-d": {
        "vision": {"hidden_size": 3200, "num_attention_heads": 25, "intermediate_size": 12800, "num_hidden_layers": 45},
        "llm": {
            "hidden_size": 8192,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 29568,
            "vocab_size": 152064,
        },  # fmt: skip
    },
    "internvl": {
        "vision": {"hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096, "num_hidden_layers": 24},
        "llm": {
            "hidden_size": 3584,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "intermediate_size": 18944,
            "vocab_size": 152064,
        },  # fmt: skip
    },
}


def _image(grid_tiles: int, tile: int, seed: int):
    from nvlm_kernels.integrations.vllm.testing import sample_images

    cols, rows = GRIDS[grid_tiles]
    # a little off the exact grid size, so every resize does work
    return sample_images(((cols * tile + 7, rows * tile + 5),), seed=seed)[0]


def _frontend_per_image(family: str, provider: str, tile: int, grid_tiles: int, n: int) -> tuple[float, float]:
    """(wall ms, CPU ms) per image of the image processor the frontend runs for this provider."""
    from vllm.transformers_utils.processors.internvl import InternVLImageProcessor

    base = InternVLImageProcessor(
        image_size=tile, min_dynamic_patch=1, max_dynamic_patch=6, dynamic_image_size=True, use_thumbnail=True
    )
    if provider == "vllm":
        processor = base
    else:
        from nvlm_kernels.integrations.vllm._models import NvlmImageProcessor

        processor = NvlmImageProcessor.like(base, PROVIDERS[provider]["NVLM_KERNELS_VLLM_PREPROCESS"])
    images = [_image(grid_tiles, tile, 1000 + i) for i in range(n)]
    processor(images[:1], return_tensors="pt")  # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    for image in images:
        processor([image], return_tensors="pt")
    return (time.perf_counter() - wall) * 1e3 / n, (time.process_time() - cpu) * 1e3 / n


def child(spec: dict) -> list[dict]:
    """One provider's engine (this process, its env already set): every tile count's rows."""
    from vllm import LLM, SamplingParams

    from nvlm_kernels.integrations.vllm import testing

    family, provider, gpu = spec["family"], spec["provider"], spec["gpu"]
    tile = 448 if gpu else 56
    shapes = GPU_SHAPES[family] if gpu else {}
    llm_shape = {**shapes.get("llm", {}), **({"num_hidden_layers": spec["llm_layers"]} if gpu else {})}
    path = testing.write_checkpoint(
        spec["dir"], family, image_size=tile, vision=shapes.get("vision"), llm=llm_shape or None, weights=not gpu
    )
    engine = dict(testing.ENGINE_DEFAULTS, max_num_seqs=max(4, spec["requests"]), max_model_len=4096 if gpu else 1024,
                  max_num_batched_tokens=8192 if gpu else 1024, limit_mm_per_prompt={"image": 1})  # fmt: skip
    if gpu:
        engine.update(dtype="bfloat16", load_format="dummy", enforce_eager=False, gpu_memory_utilization=0.85)
        engine.pop("kv_cache_memory_bytes")
    llm = LLM(path, **engine)
    prompt = testing.PROMPTS[1]
    rows, seed = [], 0

    def generate(images, max_tokens):
        requests = [{"prompt": prompt, "multi_modal_data": {"image": image}} for image in images]
        return llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)

    for grid_tiles in spec["tiles"]:
        base = {"family": family, "provider": provider, "tiles": grid_tiles, "device": "cuda" if gpu else "cpu"}
        seed += 1
        llm.collective_rpc(testing.worker_start_counting)
        check = generate([_image(grid_tiles, tile, seed)], spec["max_tokens"])[0]
        counts = llm.collective_rpc(testing.worker_counts)[0]
        ran_ours = counts["ops"]["mlp_projector"] > 0
        for _ in range(spec["repeats"]):  # warm-up of this shape
            seed += 1
            generate([_image(grid_tiles, tile, seed)], 1)
        ttft = []
        for _ in range(spec["repeats"]):
            seed += 1
            image = _image(grid_tiles, tile, seed)
            start = time.perf_counter()
            generate([image], 1)
            ttft.append((time.perf_counter() - start) * 1e3)
        images = [_image(grid_tiles, tile, seed + 1 + i) for i in range(spec["requests"])]
        seed += spec["requests"]
        start = time.perf_counter()
        generate(images, spec["max_tokens"])
        per_s = spec["requests"] / (time.perf_counter() - start)
        wall_ms, cpu_ms = _frontend_per_image(family, provider, tile, grid_tiles, spec["repeats"])
        rows.append({**base, "check_tokens": list(check.outputs[0].token_ids), "ran_our_ops": ran_ours,
                     "requests_per_s": per_s, "ttft_ms": statistics.median(ttft),
                     "frontend_ms_per_image": wall_ms, "frontend_cpu_ms_per_image": cpu_ms})  # fmt: skip
    return rows


def _run_provider(spec: dict, env_overrides: dict[str, str], in_process: bool, timeout: int) -> list[dict] | str:
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "dir": os.path.join(tmp, spec["family"])}
        out = os.path.join(tmp, "rows.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_PLUGINS", "NVLM_KERNELS_VLLM"))}
        env.update(env_overrides)
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc sends the counter functions
        env.update(VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1")  # nothing leaves the machine
        if in_process:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec), "--child-out", out],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            return f"error: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}"
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="real widths on CUDA (bfloat16, random weights)")
    parser.add_argument("--family", choices=FAMILIES, action="append", help="default: both")
    parser.add_argument("--provider", choices=list(PROVIDERS), action="append", help="default: all")
    parser.add_argument("--tiles", default="1,2,3,4,6", help="grid tile counts (1-6), comma-separated")
    parser.add_argument("--requests", type=int, default=8, help="requests per throughput batch")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="lone requests for TTFT (median)")
    parser.add_argument("--llm-layers", type=int, default=4, help="--gpu: LLM layers kept")
    parser.add_argument("--in-process", action="store_true", help="VLLM_ENABLE_V1_MULTIPROCESSING=0")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per provider's engine")
    parser.add_argument("--out", help="write the rows as CSV here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(json.loads(args.child))))
        return
    tiles = [int(t) for t in args.tiles.split(",")]
    if any(t not in GRIDS for t in tiles):
        parser.error(f"--tiles must be among {sorted(GRIDS)}")
    rows = []
    for family in args.family or FAMILIES:
        reference = None
        for provider in args.provider or list(PROVIDERS):
            spec = {"family": family, "provider": provider, "gpu": args.gpu, "tiles": tiles, "requests": args.requests,
                    "max_tokens": args.max_tokens, "repeats": args.repeats, "llm_layers": args.llm_layers}  # fmt: skip
            print(f"# {family} / {provider} ...", file=sys.stderr, flush=True)
            result = _run_provider(spec, PROVIDERS[provider], args.in_process, args.timeout)
            if isinstance(result, str):
                rows.append({"family": family, "provider": provider, "status": result})
                continue
            if provider == "vllm":
                reference = {r["tiles"]: r["check_tokens"] for r in result}
            for row in result:
                status = "ok"
                if provider != "vllm" and not row["ran_our_ops"]:
                    status = "error: the worker ran none of our ops"
                elif reference is not None and reference.get(row["tiles"]) != row["check_tokens"]:
                    status = "error: greedy tokens differ from vLLM's own"
                rows.append({**row, "status": status})
    _print(rows)
    if args.out:
        fields = ["family", "provider", "tiles", "device", "status", "requests_per_s", "ttft_ms",
                  "frontend_ms_per_image", "frontend_cpu_ms_per_image"]  # fmt: skip
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def _print(rows: list[dict]) -> None:
    print(f"{'family':9} {'provider':16} {'tiles':>5} {'req/s':>8} {'ttft ms':>9} {'front ms/img':>12} ", end="")
    print(f"{'cpu ms/img':>10}")
    for r in rows:
        if "requests_per_s" not in r or r.get("status", "ok") != "ok":
            print(f"{r['family']:9} {r['provider']:16} {r.get('tiles', ''):>5} {r['status']}")
            continue
        print(
            f"{r['family']:9} {r['provider']:16} {r['tiles']:>5} {r['requests_per_s']:8.2f} {r['ttft_ms']:9.1f} "
            f"{r['frontend_ms_per_image']:12.2f} {r['frontend_cpu_ms_per_image']:10.2f}"
        )


if __name__ == "__main__":
    main()
