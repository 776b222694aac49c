"""torch's MemTracker for a CPU peak of live tensor bytes, imported only where memory is measured on the CPU:
``torch.distributed._tools`` pulls in dynamo and inductor, seconds that a refused or CUDA run should not pay."""

from __future__ import annotations

from torch.distributed._tools.mem_tracker import MemTracker

__all__ = ["MemTracker", "TotalPeakTracker"]


class TotalPeakTracker(MemTracker):
    """torch's MemTracker keeping only the total peak: MemTracker's per-module statistics refuse a module called
    again at the top level (sliding-window prediction calls the network once per window); without them, tensors
    alive before the block count only when passed as `tracked` (the module hooks also count a module's inputs and
    parameters when it is first called). `headzoo estimate`'s tracker builds on it."""

    def _pre_fw_hook(self, module, inputs) -> None:
        pass

    def _post_fw_hook(self, module, inputs, outputs) -> None:
        pass

    def _pre_bw_hook(self, module, args) -> None:
        pass

    def _post_bw_hook(self, module, args) -> None:
        pass
