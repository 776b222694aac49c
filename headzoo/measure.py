"""Peak memory and step time of a whole training step (DESIGN.md "Measurements")."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PeakMemory:
    bytes: int       # CUDA allocator peak, or on CPU the peak of live tensor bytes
    kind: str        # "cuda_allocator" or "cpu_live_tensors"
    rss_bytes: int | None  # the process's peak resident set during the step (cross-check); None if unknown


def reset_peak_rss() -> bool:
    """Start the process's peak resident set (VmHWM) afresh: Linux's ``/proc/self/clear_refs`` "5" (proc(5)).

    Without it the peak would be the whole process's, nnU-Net's planning and preprocessing included."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    """The peak resident set since the last `reset_peak_rss` (Linux's VmHWM); None where /proc lacks it."""
    try:
        with open("/proc/self/status") as handle:
            return next((int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def measure_peak_memory(step: Callable[[], object], device: torch.device, *tracked: object) -> PeakMemory:
    """Run `step` once and report its peak memory; `tracked` (modules, optimizers) exist before it."""
    rss_known = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_allocator"
    else:
        from torch.distributed._tools.mem_tracker import MemTracker
        tracker = MemTracker()
        tracker.track_external(*tracked)
        with tracker:
            step()
        peak, kind = int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]), "cpu_live_tensors"
    return PeakMemory(peak, kind, peak_rss_bytes() if rss_known else None)


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
