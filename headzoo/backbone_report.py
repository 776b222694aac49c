"""What each backbone costs on its own (``headzoo backbones``): parameters, default patch, stages,
and optionally a measured forward + backward step, so a head's cost can be read against it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headzoo.backbone import (
    BACKBONES,
    build_backbone,
    downsampling,
    get_backbone,
    network_from_plans,
    segmentation_layers,
)
from headzoo.measure import PeakMemory, is_out_of_memory, measure_peak_memory, timed

PAPER_CLASSES = 105  # STU-Net's Table 2 counts a 105-class output (TotalSegmentator) and every seg conv


@dataclass
class BackboneSummary:
    name: str
    network_class: str
    parameters: int  # without any segmentation conv: what every head shares
    parameters_paper: int  # the whole network with PAPER_CLASSES outputs at every decoder stage
    default_patch: int
    stages: int
    downsampling: tuple[int, ...]


@dataclass
class BackboneStep:
    patch: tuple[int, ...]
    batch: int
    seconds: float | None  # median forward + backward step (None: out of memory)
    peak: PeakMemory | None


def _parameter_counts(architecture: dict) -> tuple[int, int]:
    """(without segmentation convs, with PAPER_CLASSES-channel ones), counted on the meta device."""
    with torch.device("meta"):
        network = network_from_plans(architecture, 1, PAPER_CLASSES, allow_init=False)
    total = sum(p.numel() for p in network.parameters())
    return total - sum(p.numel() for p in segmentation_layers(network).parameters()), total


def summarize(name: str) -> BackboneSummary:
    architecture, patch = get_backbone(name)
    without, paper = _parameter_counts(architecture)
    return BackboneSummary(
        name,
        architecture["network_class_name"].rsplit(".", 1)[-1],
        without,
        paper,
        patch,
        architecture["arch_kwargs"]["n_stages"],
        downsampling(architecture),
    )


def smallest_patch(name: str, at_least: int = 32) -> tuple[int, ...]:
    """The smallest patch the backbone accepts (bottleneck of 2 voxels per axis), no smaller than `at_least`."""
    return tuple(max(at_least, 2 * f) for f in downsampling(get_backbone(name)[0]))


def measure_step(name: str, patch: tuple[int, ...], batch: int, device: torch.device, repeats: int = 3) -> BackboneStep:
    """Forward + backward of the backbone alone (no head, no optimizer): median seconds and peak memory."""
    backbone, _ = build_backbone(name, 1, seed=0)
    backbone.to(device).train()
    image = torch.randn(batch, 1, *patch, device=device)

    def step() -> None:
        backbone(image).square().mean().backward()
        backbone.zero_grad(set_to_none=True)

    try:
        step()  # warm-up
        peak = measure_peak_memory(step, device, backbone)
        times = sorted(timed(step, device) for _ in range(repeats))
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        return BackboneStep(patch, batch, None, None)
    return BackboneStep(patch, batch, times[len(times) // 2], peak)


def backbone_names(only: str | None) -> list[str]:
    names = list(BACKBONES) if not only else [n.strip() for n in only.split(",") if n.strip()]
    for name in names:
        get_backbone(name)
    return names
