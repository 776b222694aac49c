"""The shared backbone: a dynamic_network_architectures ResidualEncoderUNet built from the frozen
plan by nnU-Net's own ``get_network_from_plans``, with its final 1×1×1 segmentation conv replaced by
the head. Deep supervision is off: heads see only the full-resolution decoder output.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from headzoo.errors import HeadzooError
from headzoo.head import Head

RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
_CONV_KWARGS = {
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def _resenc(features: list[int], blocks: list[int]) -> dict:
    n = len(features)
    return {
        "network_class_name": RESENC_CLASS,
        "arch_kwargs": {"n_stages": n, "features_per_stage": features, "conv_op": None,
                        "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                        "n_blocks_per_stage": blocks, "n_conv_per_stage_decoder": [1] * (n - 1),
                        **_CONV_KWARGS},
        "_kw_requires_import": _REQUIRES_IMPORT,
    }


# name → (architecture in nnU-Net plans format, default patch edge)
BACKBONES: dict[str, tuple[dict, int]] = {
    # A CPU-sized ResEnc UNet: 4 stages, 16..128 features.
    "small": (_resenc([16, 32, 64, 128], [1, 1, 2, 2]), 32),
    # nnU-Net's 3D ResEnc layout (6 stages, 32..320 features, 1-3-4-6-6-6 residual blocks). nnU-Net's
    # M and L presets differ in the VRAM target their planner sizes the patch for; headzoo freezes
    # the topology, so they share it and differ in the default patch (the paper's 192³ for L).
    "resenc-m": (_resenc([32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6]), 128),
    "resenc-l": (_resenc([32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6]), 192),
}


def get_backbone(name: str) -> tuple[dict, int]:
    if name not in BACKBONES:
        raise HeadzooError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})")
    return BACKBONES[name]


def check_patch(name: str, patch: tuple[int, ...]) -> None:
    architecture, _ = get_backbone(name)
    factor = math.prod(s[0] for s in architecture["arch_kwargs"]["strides"])
    if any(p % factor for p in patch):
        raise HeadzooError(f"patch {'x'.join(map(str, patch))} must be divisible by {factor} "
                           f"for the '{name}' backbone")
    if min(patch) < 2 * factor:  # instance norm needs more than one voxel at the bottleneck
        raise HeadzooError(f"patch {'x'.join(map(str, patch))} is too small for the '{name}' backbone: "
                           f"each edge must be at least {2 * factor}")


class SegmentationNetwork(nn.Module):
    """Backbone features → head output; the backbone's last seg conv is an identity."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, image: Tensor) -> Tensor:
        return self.head(self.backbone(image))


def build_backbone(name: str, in_channels: int, seed: int) -> tuple[nn.Module, int]:
    """The backbone and its feature count; the same seed gives the same weights whatever the head."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    architecture, _ = get_backbone(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                          architecture["_kw_requires_import"], in_channels, 1,
                                          allow_init=True, deep_supervision=False)
    backbone.decoder.seg_layers[-1] = nn.Identity()
    return backbone, architecture["arch_kwargs"]["features_per_stage"][0]
