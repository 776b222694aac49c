"""The network of an nnU-Net plan with its final 1×1×1 segmentation conv replaced by a head.

Deep supervision is off: a head replaces only the full-resolution segmentation layer, so the
lower-resolution segmentation layers are removed (no unused parameters under DDP).
"""
from __future__ import annotations

from torch import nn

from headzoo.backbone import segmentation_layers
from headzoo.head import PLAN_OPTIONS, Head
from headzoo.registry import create_head


def plan_defaults(configuration_manager, label_manager) -> dict:
    """nnU-Net's own loss settings from the plan (as ``nnUNetTrainer._build_loss``); every head takes them."""
    plan = {"batch_dice": configuration_manager.batch_dice, "ignore_label": label_manager.ignore_label}
    return {k: plan[k] for k in PLAN_OPTIONS}


def build_head_network(configuration_manager, num_input_channels: int, num_classes: int, head_name: str,
                       options: dict) -> nn.Module:
    """nnU-Net's ``get_network_from_plans`` network, its last decoder seg layer replaced by the head."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    network = get_network_from_plans(configuration_manager.network_arch_class_name,
                                     configuration_manager.network_arch_init_kwargs,
                                     configuration_manager.network_arch_init_kwargs_req_import,
                                     num_input_channels, 1, allow_init=True, deep_supervision=False)
    seg_layers = segmentation_layers(network)  # ResEnc's decoder.seg_layers or STU-Net's seg_outputs
    in_channels = seg_layers[-1].in_channels
    for stage in range(len(seg_layers) - 1):
        seg_layers[stage] = nn.Identity()
    seg_layers[-1] = create_head(head_name, in_channels, num_classes, **options)
    return network


def head_of(network: nn.Module) -> Head:
    """The head inside a network built by :func:`build_head_network` (through DDP / torch.compile wrappers)."""
    module = getattr(network, "module", network)
    module = getattr(module, "_orig_mod", module)
    return segmentation_layers(module)[-1]
