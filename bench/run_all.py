"""Runs every benchmark on the device here and writes the results (``make bench``).

    python bench/run_all.py [--out DIR] [--quick] [-k PATTERN] [--targets] [--budget SECONDS]
    python bench/run_all.py --plot-only DIR/results.csv     # PNGs from a saved run (needs matplotlib)

Runs the ceilings (copy bandwidth, GEMM) first, then each ``bench_<op>.py``; prints one table, and
writes to DIR (default ``bench/results/local``): ``results.csv`` (one row per kernel, provider,
shape and dtype; columns in common.ROW_FIELDS; appended as each row finishes), ``summary.md``
(tables + targets; rewritten after each module) and ``results.png`` (a panel per kernel). On a CPU
it measures the CPU paths at small shapes.

``--targets`` keeps the cases of targets.md's rows (a-f, ceilings first, in that order);
``--budget`` starts no new case after that many seconds (what finished is written).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import ceilings  # noqa: E402
from common import append_csv, environment, format_table, markdown_table, measure, plot, read_csv  # noqa: E402


def bench_modules() -> list:
    # bench_vllm.py is a script of its own (vLLM's engines need their own processes and venv): no cases()
    modules = [importlib.import_module(p.stem) for p in sorted(HERE.glob("bench_*.py"))]
    return [m for m in modules if hasattr(m, "cases")]


def write_summary(out: str, env: dict, sections: list, rows: list) -> list[str]:
    """summary.md from the rows so far (tables per module, then every module's targets lines)."""
    target_lines: list[str] = []
    for module in bench_modules():
        if hasattr(module, "targets"):
            target_lines += module.targets(rows)
    md = [
        f"# Benchmarks on {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, git {env['git_sha']}, {env['date']}.",
        "Times: p50 (p20–p80) of one call; CUDA: triton.testing.do_bench with L2 flushed before each call; "
        "CPU: wall clock. Throughput counts each input read once and each output written once. "
        "% of floor: the targets.md roofline (H100: 3.35 TB/s, 989 TFLOP/s) over the measured time.",
        "",
    ]
    for name, section_rows, baseline in sections:
        if section_rows:
            md += [f"## {name}", "", markdown_table(section_rows, baseline), ""]
    md += ["## Targets", "", *[f"- {line}" for line in target_lines], ""]
    pathlib.Path(out, "summary.md").write_text("\n".join(md))
    return target_lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results" / "local"))
    parser.add_argument("--quick", action="store_true", help="fewer shapes (CPU smoke run)")
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    parser.add_argument("--plot-only", metavar="CSV", help="only draw the PNGs of a saved results.csv")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--targets", action="store_true", help="only the cases of targets.md's rows, in row order")
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds; no new case starts after")
    args = parser.parse_args()

    if args.plot_only:
        written = plot(read_csv(args.plot_only), os.path.dirname(os.path.abspath(args.plot_only)))
        print("\n".join(written) if written else "matplotlib is not installed: no plots")
        return 0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    os.makedirs(args.out, exist_ok=True)
    print(
        f"benchmarks on {env['device']}: torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
        f"git {env['git_sha']}"
    )
    start = time.perf_counter()
    # Cases are cheap to list (inputs are made lazily or are small); listing them all first gives the
    # progress bar its total.
    planned = [("ceilings", [c for c in ceilings.cases(device, args.quick) if args.k in c.name or not args.k], None)]
    for module in bench_modules():
        cases = [c for c in module.cases(device, args.quick) if args.k in c.name]
        planned.append((module.__name__, cases, getattr(module, "BASELINE", None)))
    if args.targets:  # targets.md's rows in order (a, b, ...): the most valuable first
        planned = [(name, [c for c in cases if c.target], baseline) for name, cases, baseline in planned]
        planned.sort(key=lambda section: min((c.target for c in section[1]), default="~"))
    csv_path = os.path.join(args.out, "results.csv")
    if os.path.exists(csv_path):
        os.remove(csv_path)
    progress = tqdm(total=sum(len(c) for _, c, _ in planned), unit="case", disable=args.quiet, mininterval=1.0)
    rows, sections = [], []
    out_of_time = False
    for name, cases, baseline in planned:
        module_rows = []
        for case in cases:
            if time.perf_counter() - start > args.budget:
                out_of_time = True
                break
            progress.set_postfix_str(f"{case.name} {case.provider}", refresh=False)
            row = measure(case, device, env)
            module_rows.append(row)
            append_csv(row, csv_path)
            progress.update()
        rows += module_rows
        sections.append((name, module_rows, baseline))
        write_summary(args.out, env, sections, rows)
        if out_of_time:
            print(f"\nbudget of {args.budget:.0f} s spent: stopped before the rest of {name}", flush=True)
            break
    progress.close()
    target_lines = write_summary(args.out, env, sections, rows)
    plots = plot(rows, args.out)

    for name, section_rows, baseline in sections:
        if section_rows:
            print(f"\n== {name}" + (f" (speedup vs {baseline})" if baseline else ""))
            print(format_table(section_rows, baseline))
    print("\n" + "\n".join(target_lines))
    print(f"\nwrote {csv_path}, summary.md" + (f", {len(plots)} PNG" if plots else " (no PNG: matplotlib missing)"))
    print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s")
    errors = [r for r in rows if r["status"].startswith("error")]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
