"""Compile heads/chunked_triton.py's kernels ahead of time for a GPU target and read ``ptxas -v``, on any machine.

Triton lowers a kernel to PTX in-process and assembles it with the ``ptxas`` its wheel ships, so the code
a GPU would run (registers, spill stores, shared memory, tensor-core instructions) can be read without
one. Run without TRITON_INTERPRET (interpreted kernels cannot be compiled); prints one JSON line per kernel:

    python tests/triton_aot.py --dtype fp32 --rank 32 [--block-voxels 64 --block-classes 64 --arch 90]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from headzoo.heads import chunked_triton

KERNELS = ("_lse_kernel", "_class_sums_kernel", "_dice_slope_kernel", "_grad_basis_kernel", "_grad_operator_kernel")
INPUT_POINTERS = ("x_ptr", "e_ptr", "grad_x_ptr")  # the basis' and operator's dtype; every other buffer is fp32
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def signature(kernel, dtype: str, constants: dict) -> dict[str, str]:
    """Triton's type string per argument, as a launch with the loss's tensors would specialise it."""
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in INPUT_POINTERS:
            types[name] = f"*{dtype}"
        elif name == "y_ptr":
            types[name] = "*i32"
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        else:
            types[name] = "i32"
    return types


def compile_kernel(
    name: str, dtype: str, rank: int, block_voxels: int, block_classes: int, arch: int, num_warps: int
) -> dict:
    """ptxas's report of one kernel: registers, spill stores (bytes per thread), shared memory, mma instructions."""
    kernel = getattr(chunked_triton, name)
    constants = dict(
        BLOCK_V=block_voxels,
        BLOCK_C=block_classes,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
        PRECISION=chunked_triton.dot_precision(DTYPES[dtype]),
        UPCAST_BF16=False,
    )
    source = ASTSource(fn=kernel, signature=signature(kernel, dtype, constants), constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run(
            [str(PTXAS), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", ptx.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return {
        "kernel": name,
        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
        "spill_store_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        "shared_bytes": compiled.metadata.shared,
        "mma_instructions": len(re.findall(r"\b(?:wgmma|mma)\.", compiled.asm["ptx"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--block-voxels", type=int, default=64)
    parser.add_argument("--block-classes", type=int, default=64)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--num-warps", type=int, default=chunked_triton.NUM_WARPS)
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=KERNELS)
    args = parser.parse_args()
    for name in args.kernels:
        try:
            row = compile_kernel(
                name, args.dtype, args.rank, args.block_voxels, args.block_classes, args.arch, args.num_warps
            )
        except Exception as error:  # noqa: BLE001 — the report says which kernel failed to compile, and why
            row = {"kernel": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
