"""The two practical ceilings of this machine, measured in the same run as the kernels:
a large device-to-device copy (GB/s, bytes read + written) and a large GEMM (TFLOP/s).
targets.md uses them as the practical 100 % (about 3.0 TB/s and 798 TFLOP/s on an H100).

    python bench/ceilings.py            # prints the two rows
"""

from __future__ import annotations

import torch

from common import Case, environment, format_table, measure


def cases(device: str, quick: bool = False) -> list[Case]:
    if device == "cuda":
        copy_elements, gemm_n, gemm_dtype = (1 << 29), 8192, torch.bfloat16  # 1 GiB bf16 each way
    else:
        copy_elements, gemm_n, gemm_dtype = (1 << 24) if quick else (1 << 26), 1024, torch.float32
    src = torch.randn(copy_elements, device=device, dtype=torch.float32).to(gemm_dtype)
    dst = torch.empty_like(src)
    a = torch.randn(gemm_n, gemm_n, device=device, dtype=gemm_dtype)
    b = torch.randn(gemm_n, gemm_n, device=device, dtype=gemm_dtype)
    dtype = str(gemm_dtype).removeprefix("torch.")
    return [
        Case(
            "ceiling.copy",
            "torch.copy_",
            f"{copy_elements * src.element_size() >> 20} MiB",
            dtype,
            lambda: dst.copy_(src),
            bytes_moved=2 * src.numel() * src.element_size(),
            target="0",
        ),
        Case("ceiling.gemm", "torch.mm", f"{gemm_n}^3", dtype, lambda: torch.mm(a, b), flops=2 * gemm_n**3, target="0"),
    ]


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    print(format_table([measure(c, device, env) for c in cases(device)]))


if __name__ == "__main__":
    main()
