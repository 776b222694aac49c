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


#: what torch's RuntimeErrors say when an allocation fails: the CPU allocator's, CUDA's, and cuBLAS's and cuDNN's
#: own workspace and handle allocations (these do not go through torch's allocator and raise no OutOfMemoryError)
OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory", "not enough memory", "CUBLAS_STATUS_ALLOC_FAILED",
                          "CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA OOM (torch's allocator, cuBLAS, cuDNN), a Triton kernel needing more shared memory or registers than
    an SM has (triton's OutOfResources), or a CPU allocation refused (e.g. under a --memory-limit budget)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    if any(kind.__name__ == "OutOfResources" and kind.__module__.startswith("triton") for kind in type(error).__mro__):
        return True  # matched by name: triton is an optional dependency
    text = str(error)
    return isinstance(error, RuntimeError) and any(message in text for message in OUT_OF_MEMORY_MESSAGES)


def optimizer_state_complete(optimizer: torch.optim.Optimizer, parameters=None) -> bool:
    """Whether every parameter (of `parameters`, default the optimizer's) has its optimizer state: Adam's moments
    and ScheduleFree's z exist only after a parameter's first real step, and a GradScaler skips the steps whose
    gradients overflowed. A step measured for memory before then would leave that state (8 B a parameter for
    AdamW) out of the peak."""
    if parameters is None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
    return bool(parameters) and all(optimizer.state.get(p) for p in parameters)


class GradientReceivers:
    """The parameters of `module` that have received a gradient since this was made (post-accumulate-grad hooks):
    the ones an optimizer makes state for. A parameter no loss reaches (nnU-Net's lower-resolution seg layers
    with deep supervision off) never gets state. ``close`` removes the hooks."""

    def __init__(self, module: torch.nn.Module):
        self.received: set = set()
        self._handles = [p.register_post_accumulate_grad_hook(self.received.add) for p in module.parameters()
                         if p.requires_grad]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def configure_cuda_timing(device: torch.device) -> dict:
    """nnU-Net's CUDA settings for a training run (run_training.py: cuDNN benchmarks its convolution
    algorithms, not deterministic), and the record's fields that say how steps were run: ``cudnn_benchmark``
    and ``compiled`` (headzoo never torch.compiles the network; nnU-Net's own trainers do by default)."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
    return {"cudnn_benchmark": device.type == "cuda" and torch.backends.cudnn.benchmark, "compiled": False}
