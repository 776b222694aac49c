"""Peak memory and step time of a whole training step (DESIGN.md "Measurements")."""
from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PeakMemory:
    bytes: int       # CUDA allocator peak, or on CPU the peak of live tensor bytes
    kind: str        # "cuda_allocator" or "cpu_live_tensors"
    rss_bytes: int   # the process's peak resident set so far (cross-check)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_peak_memory(step: Callable[[], object], device: torch.device, *tracked: object) -> PeakMemory:
    """Run `step` once and report its peak memory; `tracked` (modules, optimizers) exist before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return PeakMemory(torch.cuda.max_memory_allocated(device), "cuda_allocator", peak_rss_bytes())
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(*tracked)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    return PeakMemory(int(peak), "cpu_live_tensors", peak_rss_bytes())


def timed(step: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of `step` takes, synchronising around it on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def summarize_times(times: list[float]) -> dict[str, float | None]:
    if not times:
        return {"step_time_median_s": None, "step_time_p20_s": None, "step_time_p80_s": None}
    p20, median, p80 = np.percentile(times, [20, 50, 80])
    return {"step_time_median_s": float(median), "step_time_p20_s": float(p20), "step_time_p80_s": float(p80)}


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA OOM, or a CPU allocation refused (e.g. under a --memory-limit budget)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text
                                                or "not enough memory" in text)
