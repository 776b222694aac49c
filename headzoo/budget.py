"""A memory budget for the current process, so the memory wall shows up as `oom` without a GPU."""

from __future__ import annotations

import resource

import torch


def apply_memory_limit(limit_bytes: int | None, device: str) -> None:
    """On CPU cap the address space (allocations past it fail); on CUDA cap the caching allocator."""
    if limit_bytes is None:
        return
    if device in ("cuda", "auto") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total))
    else:
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
