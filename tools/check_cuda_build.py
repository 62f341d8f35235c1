"""Checks the CUDA code inside a built extension, with no GPU (`make cuda-check` runs it).

Reads the device code embedded in ``nvlm_kernels/_C*.so`` with the ``cuobjdump`` shipped inside the
triton package and fails when:

* an expected architecture is missing (default: sm_80 and sm_90a);
* any kernel spills to local memory or keeps a stack frame (``-res-usage``: LOCAL or STACK > 0);
* a kernel misses an instruction its design depends on (``SASS_EXPECTATIONS``: the memory-bound
  kernels must move 16 bytes per load and store).

Prints one row per kernel and architecture: registers, shared memory, stack, local memory.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import subprocess
import sys

# Kernel-name pattern (on the demangled name) -> SASS instructions each architecture must contain.
SASS_EXPECTATIONS: dict[str, list[str]] = {
    # 16-byte units: one 128-bit load and store per unit (pixel_shuffle.cuh).
    r"pixel_shuffle_kernel<nvlm::Bytes16, (true|false), true>": ["LDG.E.128", "STG.E.128"],
}


def cuobjdump() -> str:
    import triton

    bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("cuobjdump")
    if not found:
        raise SystemExit("cuobjdump not found (neither in the triton package nor on PATH)")
    return found


def run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def demangle(names: list[str]) -> dict[str, str]:
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


def resource_usage(tool: str, so: str) -> list[tuple[str, str, dict[str, int]]]:
    """(arch, mangled kernel name, {REG, STACK, SHARED, LOCAL}) for every kernel."""
    rows = []
    arch = "?"
    name = None
    for line in run(tool, "-res-usage", so).splitlines():
        line = line.strip()
        if line.startswith("arch ="):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function "):
            name = line[len("Function ") :].rstrip(":")
        elif name and line.startswith("REG:"):
            usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            rows.append((arch, name, usage))
            name = None
    return rows


def sass_by_kernel(tool: str, so: str, arch: str) -> dict[str, str]:
    text = run(tool, "-sass", "-arch", arch, so)
    kernels: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            current = match.group(1)
            kernels[current] = []
        elif current:
            kernels[current].append(line)
    return {k: "\n".join(v) for k, v in kernels.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared_object", help="path to the built nvlm_kernels/_C*.so")
    parser.add_argument("--arch", action="append", help="architecture that must be present (default sm_80, sm_90a)")
    args = parser.parse_args()
    archs = args.arch or ["sm_80", "sm_90a"]
    tool = cuobjdump()
    failures: list[str] = []

    elves = run(tool, "--list-elf", args.shared_object)
    for arch in archs:
        if f".{arch}.cubin" not in elves:
            failures.append(f"no {arch} code in the extension (cuobjdump --list-elf:\n{elves})")

    rows = resource_usage(tool, args.shared_object)
    if not rows:
        failures.append("no kernels found in the extension")
    names = demangle(sorted({name for _, name, _ in rows}))
    print(f"{'kernel':<72} {'arch':>7} {'REG':>4} {'SHARED':>7} {'STACK':>5} {'LOCAL':>5}")
    for arch, name, usage in rows:
        short = re.sub(r"\(.*\)$", "", names[name]).replace("nvlm::pixel_shuffle::", "")
        print(
            f"{short[:72]:<72} {arch:>7} {usage.get('REG', -1):>4} {usage.get('SHARED', -1):>7} "
            f"{usage.get('STACK', -1):>5} {usage.get('LOCAL', -1):>5}"
        )
        if usage.get("STACK", 0) or usage.get("LOCAL", 0):
            failures.append(f"{names[name]} on {arch}: stack frame or local-memory spill {usage}")

    for arch in archs:
        sass = sass_by_kernel(tool, args.shared_object, arch)
        readable = demangle(list(sass))
        for pattern, instructions in SASS_EXPECTATIONS.items():
            matched = [k for k in sass if re.search(pattern, readable[k])]
            if not matched:
                failures.append(f"{arch}: no kernel matches {pattern!r}")
            for kernel in matched:
                for instruction in instructions:
                    if instruction not in sass[kernel]:
                        failures.append(f"{arch}: {readable[kernel]} lacks {instruction}")

    kernels = len({name for _, name, _ in rows})
    if failures:
        print("\n".join(["", "FAILED:", *failures]))
        return 1
    print(f"\n{kernels} kernels x {len(archs)} architectures: no spills, no stack frames, SASS expectations met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
