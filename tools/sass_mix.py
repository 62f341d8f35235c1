"""The instruction mix of the attention forward kernels' main loops on sm_90, per score element.

For every sm_90 forward spec of ``nvlm_kernels/<op>/triton.py`` (the current kernels) and
``nvlm_kernels/<op>/hopper.py`` (the Hopper variants) whose name contains ``-k``, this compiles the
kernel ahead of time (``tools/triton_aot.py``'s ``compile_spec``), disassembles it with the cuobjdump
shipped in the triton package, finds the main loop (the innermost backward branch, before the
kernel's last EXIT, whose body holds both warpgroup MMAs and MUFU.EX2: the key-block loop) and counts
its floating-point instructions. Each thread of a BLOCK_M x BLOCK_N score tile owns
BLOCK_M · BLOCK_N / (32 · num_warps) scores, so a count divided by that is the instructions per score
element and per key block. TMA loads (UTMALDG) and masking selects (FSEL) in the loop are counted too.

``--check``: every Hopper variant's loop must load by UTMALDG (when it is compiled with TMA), hold no
FSEL (its steady state is mask-free), and spend fewer FMUL + FFMA + FADD + FSEL + MUFU.EX2 per score
element than the current kernel at the same head dim and QK-norm flag with the same tile (or, when no
current config has its tile, than the current kernel's best). Exit code 1 otherwise.

Nothing here runs a kernel: these are static counts of machine code, not a measurement of speed.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import importlib
import multiprocessing
import os
import re
import sys

import triton_aot

OPS = ("vit_attention", "cross_attention")
COUNTED = ("FMUL", "FFMA", "FADD", "FMNMX", "FSEL", "MUFU.EX2")
SCORE_WORK = ("FMUL", "FFMA", "FADD", "FSEL", "MUFU.EX2")  # what --check compares
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def main_loop(sass: str) -> collections.Counter:
    """Opcode counts (MUFU.EX2 kept whole, other modifiers dropped) of the innermost loop that holds
    warpgroup / warp MMAs and MUFU.EX2; empty when there is none."""
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in _LINE.finditer(sass)]
    exits = [addr for addr, op, _ in ins if op == "EXIT"]
    if not exits:
        return collections.Counter()
    loops = []
    for addr, op, rest in ins:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.split(".")[0] == "BRA" else None
        # backward branches of the kernel body; those after its last EXIT are out-of-line retry stubs
        if target and int(target.group(1), 16) < addr <= exits[-1]:
            loops.append((int(target.group(1), 16), addr))
    best = collections.Counter()
    best_span = None
    for lo, hi in loops:
        counts = collections.Counter(
            op if op.startswith("MUFU") else op.split(".")[0] for addr, op, _ in ins if lo <= addr <= hi
        )
        mma = counts["HGMMA"] + counts["HMMA"]
        if mma and counts["MUFU.EX2"] and (best_span is None or hi - lo < best_span):
            best, best_span = counts, hi - lo
    return best


def discover(name_filter: str = "") -> list[tuple[str, int]]:
    """(module, spec index) of every sm_90 forward spec of the attention ops whose name contains
    ``name_filter``."""
    found = []
    for op in OPS:
        for kind in triton_aot.KERNEL_MODULES:
            name = f"nvlm_kernels.{op}.{kind}"
            try:
                module = importlib.import_module(name)
            except ModuleNotFoundError:
                continue
            for index, spec in enumerate(module.aot_specs()):
                if spec.get("arch") == 90 and "_fwd[" in spec["name"] and name_filter in spec["name"]:
                    found.append((name, index))
    return found


def analyse(task: tuple[str, int]) -> dict:
    module_name, index = task
    spec = importlib.import_module(module_name).aot_specs()[index]
    compiled = triton_aot.compile_spec(spec, 90)
    counts = main_loop(triton_aot.cuobjdump(compiled.asm["cubin"], "-sass"))
    constexprs = spec["constexprs"]
    scores = constexprs["BLOCK_M"] * constexprs["BLOCK_N"] / (32 * spec["num_warps"])
    return {
        "name": spec["name"],
        "hopper": module_name.endswith(".hopper"),
        "op": module_name.split(".")[1],
        "group": (module_name.split(".")[1], constexprs["HEAD_DIM"], bool(constexprs.get("QK_NORM", False)),
                  spec["name"].split("[")[1].split(",")[0]),
        "tile": (constexprs["BLOCK_M"], constexprs["BLOCK_N"]),
        "tma": bool(constexprs.get("USE_TMA", True)) and "UTMALDG" in spec.get("expect_sass", {}).get(90, []),
        "per_score": {op: counts[op] / scores for op in COUNTED},
        "utmaldg": counts["UTMALDG"],
        "instructions": sum(counts.values()) / scores,
        "found": bool(counts),
    }  # fmt: skip


def _work(row: dict) -> float:
    return sum(row["per_score"][op] for op in SCORE_WORK)


def check(rows: list[dict]) -> list[str]:
    problems = []
    current = [r for r in rows if not r["hopper"] and r["found"]]
    for row in (r for r in rows if r["hopper"]):
        name = row["name"]
        if not row["found"]:
            problems.append(f"{name}: no main loop with MMAs and MUFU.EX2 found")
            continue
        if row["tma"] and not row["utmaldg"]:
            problems.append(f"{name}: its main loop has no UTMALDG")
        if row["per_score"]["FSEL"]:
            problems.append(f"{name}: its main loop masks (FSEL {row['per_score']['FSEL']:.2f} per score)")
        peers = [r for r in current if r["group"] == row["group"]]
        same_tile = [r for r in peers if r["tile"] == row["tile"]]
        if peers:
            baseline = min(_work(r) for r in (same_tile or peers))
            if _work(row) >= baseline:
                problems.append(f"{name}: {_work(row):.2f} score instructions per element, current {baseline:.2f}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="bf16", help="only kernels whose name contains this (default: bf16)")
    parser.add_argument("--check", action="store_true", help="fail unless every Hopper loop does less work")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    triton_aot._worker_init()
    import triton

    tasks = discover(args.k)
    if not tasks:
        print("no kernels matched")
        return 1
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        args.jobs, mp_context=context, initializer=triton_aot._worker_init
    ) as pool:
        rows = list(pool.map(analyse, tasks))
    print(f"main loop of each forward kernel on sm_90 (triton {triton.__version__}): instructions per score element")
    header = f"{'kernel':<46} " + " ".join(f"{op:>8}" for op in COUNTED) + f" {'all':>6} {'UTMALDG':>7}"
    print(header)
    print("-" * len(header))
    for row in sorted(rows, key=lambda r: (r["group"], r["tile"], r["hopper"])):
        cells = " ".join(f"{row['per_score'][op]:>8.2f}" for op in COUNTED)
        print(f"{row['name']:<46} {cells} {row['instructions']:>6.2f} {row['utmaldg']:>7}")
    if not args.check:
        return 0
    problems = check(rows)
    for problem in problems:
        print("FAIL:", problem)
    print(f"{'FAIL' if problems else 'ok'}: {len(rows)} kernels, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
