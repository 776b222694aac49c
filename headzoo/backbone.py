"""The shared backbones, each an architecture in nnU-Net's plans format (class name + kwargs, as
nnU-Net ≥ 2.4 stores them): dynamic_network_architectures' ResidualEncoderUNet and STU-Net
(``headzoo.stunet.STUNet``). ``headzoo.plan`` writes them into the frozen plan; the network is
built from the plan by nnU-Net's own ``get_network_from_plans``, with its final 1×1×1 segmentation
conv replaced by the head. Deep supervision is off: heads see only the full-resolution decoder output.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": features,
            "conv_op": None,
            "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
            "n_blocks_per_stage": blocks,
            "n_conv_per_stage_decoder": [1] * (n - 1),
            **_CONV_KWARGS,
        },
        "_kw_requires_import": _REQUIRES_IMPORT,
    }


STUNET_CLASS = "headzoo.stunet.STUNet"
_STUNET_LAYERS = {
    k: _CONV_KWARGS[k] for k in ("conv_op", "conv_bias", "norm_op", "norm_op_kwargs", "nonlin", "nonlin_kwargs")
}


def stunet_architecture(base: int, blocks: int, patch: int) -> dict:
    """STU-Net's fixed topology (6 stages, base·[1, 2, 4, 8, 16, 16] channels, 3³ kernels). Strides are
    weight-free, so the paper takes nnU-Net's for the patch: halve while the edge stays ≥ 4 (nnU-Net's
    smallest feature map), at most 5 times (128³ → 5, as STU-Net's pre-training), then stride 1, as
    STUNetTrainer pads the plan's strides with 1s."""
    downsamplings = min(5, int(math.log2(patch // 4)))
    return {
        "network_class_name": STUNET_CLASS,
        "arch_kwargs": {
            "n_stages": 6,
            "features_per_stage": [base * m for m in (1, 2, 4, 8, 16, 16)],
            "n_blocks_per_stage": [blocks] * 6,
            "kernel_sizes": [[3, 3, 3]] * 6,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * downsamplings + [[1, 1, 1]] * (5 - downsamplings),
            **_STUNET_LAYERS,
        },
        "_kw_requires_import": ["conv_op", "norm_op", "nonlin"],
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
    # STU-Net S/B/L/H (paper Table 2: base width 16/32/64/96, 1/1/2/3 residual blocks per stage). S is
    # sized for a CPU (32³: 3 downsamplings); B/L/H default to the paper's 128³ (5 downsamplings).
    "stu-s": (stunet_architecture(16, 1, 32), 32),
    "stu-b": (stunet_architecture(32, 1, 128), 128),
    "stu-l": (stunet_architecture(64, 2, 128), 128),
    "stu-h": (stunet_architecture(96, 3, 128), 128),
}


def get_backbone(name: str) -> tuple[dict, int]:
    if name not in BACKBONES:
        raise HeadzooError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})")
    return BACKBONES[name]


def downsampling(architecture: dict) -> tuple[int, ...]:
    """How much the architecture's strides shrink each axis from input to bottleneck."""
    strides = architecture["arch_kwargs"]["strides"]
    return tuple(math.prod(s[axis] for s in strides) for axis in range(len(strides[0])))


def _edges_text(edges: tuple[int, ...]) -> str:
    return str(edges[0]) if len(set(edges)) == 1 else "x".join(map(str, edges))


def check_patch(name: str, patch: tuple[int, ...], architecture: dict | None = None) -> None:
    """A one-line error unless `patch` suits the backbone (the table's architecture unless one is given)."""
    factors = downsampling(architecture or get_backbone(name)[0])
    text = "x".join(map(str, patch))
    if any(p % f for p, f in zip(patch, factors)):
        raise HeadzooError(f"patch {text} must be divisible by {_edges_text(factors)} for the '{name}' backbone")
    if any(p < 2 * f for p, f in zip(patch, factors)):  # instance norm needs more than one voxel at the bottleneck
        raise HeadzooError(
            f"patch {text} is too small for the '{name}' backbone: each edge must be at least "
            f"{_edges_text(tuple(2 * f for f in factors))}"
        )


def segmentation_layers(network: nn.Module) -> nn.ModuleList:
    """The network's 1×1×1 segmentation convs, full resolution last (where the head plugs in)."""
    for path in ("decoder.seg_layers", "seg_outputs"):  # dynamic_network_architectures, STU-Net
        try:
            return network.get_submodule(path)
        except AttributeError:
            pass
    raise HeadzooError(
        f"{type(network).__name__} has neither decoder.seg_layers nor seg_outputs: headzoo cannot attach a head to it"
    )


def attach_head(network: nn.Module, head: Head) -> nn.Module:
    """`network` with `head` in its full-resolution seg conv's place and the lower-resolution seg convs removed
    (identities: with deep supervision off no output reads them, and DDP would wait for their gradients). The one
    way a head joins a network, for `headzoo run`, `headzoo estimate` and nnU-Net's trainer and predictor alike, so
    checkpoints keep nnU-Net's module names (``decoder.seg_layers.<last>.*``)."""
    layers = segmentation_layers(network)
    for stage in range(len(layers) - 1):
        layers[stage] = nn.Identity()
    layers[-1] = head
    return network


def head_of(network: nn.Module) -> Head:
    """The head inside a network built by :func:`attach_head` (through DDP / torch.compile wrappers)."""
    module = getattr(network, "module", network)
    module = getattr(module, "_orig_mod", module)
    return segmentation_layers(module)[-1]


def network_from_plans(architecture: dict, in_channels: int, out_channels: int, allow_init: bool) -> nn.Module:
    """nnU-Net's get_network_from_plans on an architecture in plans format, deep supervision off."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        in_channels,
        out_channels,
        allow_init=allow_init,
        deep_supervision=False,
    )


def build_network(architecture: dict, in_channels: int, seed: int | None = None) -> tuple[nn.Module, int]:
    """A plan's architecture built by nnU-Net's get_network_from_plans with deep supervision off, its
    full-resolution seg conv (the head's place) an identity: (network, feature count). The same `seed` gives
    the same weights (None: torch's global generator, as nnU-Net's trainer builds it); :func:`attach_head` puts
    a head in."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        network = network_from_plans(architecture, in_channels, 1, allow_init=True)
    layers = segmentation_layers(network)
    features = layers[-1].in_channels
    layers[-1] = nn.Identity()
    return network, features


def build_backbone(name: str, in_channels: int, seed: int) -> tuple[nn.Module, int]:
    """The table's backbone `name` (runs build theirs from the frozen plan: dataset.build_backbone_from_plan)."""
    return build_network(get_backbone(name)[0], in_channels, seed)
