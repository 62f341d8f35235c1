"""Compile every Triton kernel ahead of time for real GPUs, with no GPU present (`make triton-aot`).

Each ``nvlm_kernels/<op>/triton.py`` (and ``hopper.py``, the sm_90 variants) lists its kernels and
NVLM-shaped signatures in ``aot_specs()`` (a spec with an ``"arch"`` key is compiled for that
architecture only: autotuned kernels give each architecture its own block configuration).
For each, and for sm_90 (H100) and sm_80 (A100), this compiles to PTX and cubin with
``triton.compile(ASTSource(...), target=GPUTarget(...))`` and checks what the interpreter cannot:
that it compiles at all, that shared memory fits the device, and (with the cuobjdump shipped in the
triton package) that no kernel spills to local memory or keeps a stack frame. Matrix kernels can
ask for ``"expect_ptx": {90: ["wgmma"]}`` to verify the Hopper path uses warpgroup MMA, and for
``"expect_sass": {90: ["UTMALDG", "HGMMA"]}`` to find those opcodes in the SASS (cuobjdump -sass):
TMA loads and warpgroup MMA in the machine code, not only in the PTX.

Exit code 1 on any failure. Works with triton 3.6 and 3.8 (the ASTSource API moved before 3.2).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

# Shared memory per block that a kernel may use (opt-in maximum), per architecture.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ROOT = pathlib.Path(__file__).resolve().parents[1]


KERNEL_MODULES = ("triton", "hopper")  # <op>/triton.py: sm_80 and sm_90; <op>/hopper.py: sm_90 variants


def discover_modules() -> list[str]:
    return sorted(
        f"nvlm_kernels.{p.parent.name}.{p.stem}"
        for name in KERNEL_MODULES
        for p in (ROOT / "nvlm_kernels").glob(f"*/{name}.py")
        if not p.parent.name.startswith("_")
    )


def cuobjdump_path() -> pathlib.Path:
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def cuobjdump(cubin: bytes, flag: str) -> str:
    """cuobjdump's output for ``cubin`` with ``flag`` (-res-usage, -sass)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(cuobjdump_path()), flag, f.name], capture_output=True, text=True, check=True).stdout


def sass_opcodes(sass: str) -> set[str]:
    """The opcodes of a cuobjdump -sass listing, with and without their modifiers (HGMMA.64x128x16.F32
    gives HGMMA.64x128x16.F32 and HGMMA)."""
    opcodes = set()
    for match in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass):
        opcode = match.group(1)
        opcodes.update((opcode, opcode.split(".")[0]))
    return opcodes


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of the (single) kernel in ``cubin``, read with cuobjdump -res-usage."""
    text = cuobjdump(cubin, "-res-usage")
    usage = {key: int(val) for key, val in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    if not usage:
        raise RuntimeError(f"could not parse cuobjdump output:\n{text}")
    return usage


def compile_spec(spec: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["fn"]
    constexprs = dict(spec.get("constexprs", {}))
    signature = dict(spec["signature"])
    for name in constexprs:
        signature[name] = "constexpr"
    # Every argument of the kernel must be in the signature, in order.
    signature = {name: signature[name] for name in fn.arg_names}
    index = fn.arg_names.index
    attrs = {(index(name),): [["tt.divisibility", 16]] for name in spec.get("divisible_by_16", [])}
    src = ASTSource(fn=fn, signature=signature, constexprs={(index(k),): v for k, v in constexprs.items()}, attrs=attrs)
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def check_one(task: tuple[str, int, int]) -> tuple[str, int, dict, float, list[str]]:
    """Compile spec ``index`` of ``module_name`` for ``arch`` and check it (runs in a worker)."""
    module_name, index, arch = task
    spec = importlib.import_module(module_name).aot_specs()[index]
    start = time.perf_counter()
    problems = []
    usage = {"REG": -1, "SHARED": -1, "STACK": -1, "LOCAL": -1}
    try:
        compiled = compile_spec(spec, arch)
        usage = resource_usage(compiled.asm["cubin"])
        shared = max(compiled.metadata.shared, usage["SHARED"])
        usage["SHARED"] = shared
        if shared > SHARED_LIMIT[arch]:
            problems.append(f"shared memory {shared} B > {SHARED_LIMIT[arch]} B")
        if usage["LOCAL"] or usage["STACK"]:
            problems.append("spills to local memory / stack frame")
        for expected in spec.get("expect_ptx", {}).get(arch, []):
            if expected not in compiled.asm["ptx"]:
                problems.append(f"PTX lacks {expected!r}")
        expect_sass = spec.get("expect_sass", {}).get(arch, [])
        if expect_sass:
            opcodes = sass_opcodes(cuobjdump(compiled.asm["cubin"], "-sass"))
            problems += [f"SASS lacks {op}" for op in expect_sass if op not in opcodes]
    except Exception as exc:  # report every kernel, then fail
        problems.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
    return spec["name"], arch, usage, time.perf_counter() - start, problems


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability (default: 90 and 80)")
    parser.add_argument("-k", default="", help="only kernels whose name contains this")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    args = parser.parse_args()
    archs = args.arch or [90, 80]

    _worker_init()  # real compilation, not the interpreter; the source tree's kernels (no GPU, no _C)
    import triton

    print(f"triton {triton.__version__}: compiling for {', '.join(f'sm_{a}' for a in archs)}, {args.jobs} jobs")
    header = f"{'kernel':<52} {'arch':>5} {'REG':>4} {'SHARED':>7} {'STACK':>5} {'LOCAL':>5} {'sec':>5}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    tasks = []
    for module_name in discover_modules():
        module = importlib.import_module(module_name)
        if not hasattr(module, "aot_specs"):
            print(f"{module_name}: no aot_specs(); every Triton module must list its kernels")
            failures += 1
            continue
        for index, spec in enumerate(module.aot_specs()):
            if args.k in spec["name"]:
                # a spec with an "arch" key carries that architecture's own block configuration
                tasks += [(module_name, index, arch) for arch in archs if spec.get("arch", arch) == arch]
    if args.jobs > 1 and len(tasks) > 1:
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # no forked CUDA/Triton state
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_worker_init) as pool:
            results = list(pool.map(check_one, tasks))
    else:
        results = [check_one(task) for task in tasks]
    for name, arch, usage, seconds, problems in results:
        result = "ok" if not problems else "FAIL: " + "; ".join(problems)
        failures += bool(problems)
        print(
            f"{name:<52} {'sm_' + str(arch):>5} {usage['REG']:>4} {usage['SHARED']:>7} "
            f"{usage['STACK']:>5} {usage['LOCAL']:>5} {seconds:>5.1f}  {result}"
        )
    if not tasks:
        print("no kernels compiled")
        return 1
    print(f"{len(tasks) - failures}/{len(tasks)} kernel compilations passed (triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
