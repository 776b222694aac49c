"""Where a run ran: the machine and the library versions a result depends on.

On a CPU, the same command on the same kind of machine (CPU model and instruction set, torch threads,
library versions) reproduces bit for bit; a different instruction set (torch's kernel dispatch picks AVX2,
AVX-512 or AMX code), thread count or library version changes the floating-point sums, and training
diverges from there. The record carries all of them so two rows can be told apart.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata

import torch

#: distributions whose version changes what a run computes or measures
LIBRARIES = (
    "torch",
    "numpy",
    "nnunetv2",
    "batchgeneratorsv2",
    "dynamic-network-architectures",
    "schedulefree",
    "faiss-cpu",
    "faiss-gpu",
    "triton",
    "SimpleITK",
    "scipy",
)
#: /proc/cpuinfo flags that decide which vector kernels torch, oneDNN and FAISS run
ISA_PREFIXES = ("sse", "ssse", "avx", "amx", "fma", "f16c", "bmi", "vnni")


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    try:
        text = open("/proc/cpuinfo").read().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def cpu() -> dict:
    info = _cpuinfo()
    flags = sorted(f for f in (info.get("flags") or info.get("Features") or "").split() if f.startswith(ISA_PREFIXES))
    return {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_isa_flags": " ".join(flags) or None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch's dispatch chose
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def gpu(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"gpu_name": None, "gpu_driver": None, "cuda": None, "cudnn": None}
    return {
        "gpu_name": torch.cuda.get_device_name(device),
        "gpu_driver": _nvidia_driver(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def _nvidia_driver() -> str | None:
    try:
        return (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                text=True,
                capture_output=True,
                check=True,
                timeout=30,
            )
            .stdout.splitlines()[0]
            .strip()
        )
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def describe(device: torch.device) -> dict:
    """The record's `environment`: CPU, GPU and library versions."""
    return {**cpu(), **gpu(device), "versions": library_versions()}
