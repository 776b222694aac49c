"""A head on an nnU-Net plan's network, for nnU-Net's own trainer and predictor, and the one merge of the
plan's loss settings with the user's head options (``headzoo run`` and the trainers).

The network is ``backbone.build_network``'s, the one `headzoo run` trains too, with the head in the
full-resolution seg conv's place, so checkpoints and pretrained weights keep nnU-Net's module names. Deep
supervision is off; unlike a run's, the lower-resolution seg convs are removed: nnU-Net wraps the network in
DDP, which fails on parameters no loss reaches.
"""

from __future__ import annotations

from torch import nn

from headzoo.backbone import build_network, segmentation_layers
from headzoo.head import PLAN_OPTIONS, Head
from headzoo.registry import create_head


def head_options(options: dict, configuration_manager, label_manager) -> dict:
    """The head's options: nnU-Net's own loss settings from the plan (as ``nnUNetTrainer._build_loss`` reads them;
    every head takes them, ``head.PLAN_OPTIONS``), overridden by the user's `options`."""
    plan = {"batch_dice": configuration_manager.batch_dice, "ignore_label": label_manager.ignore_label}
    return {**{k: plan[k] for k in PLAN_OPTIONS}, **options}


def build_head_network(
    configuration_manager, num_input_channels: int, num_classes: int, head_name: str, options: dict
) -> nn.Module:
    """The plan configuration's network (``build_network``), the head in its full-resolution seg conv's place."""
    network, features = build_network(configuration_manager.configuration["architecture"], num_input_channels)
    layers = segmentation_layers(network)
    for stage in range(len(layers) - 1):
        layers[stage] = nn.Identity()
    layers[-1] = create_head(head_name, features, num_classes, **options)
    return network


def head_of(network: nn.Module) -> Head:
    """The head inside a network built by :func:`build_head_network` (through DDP / torch.compile wrappers)."""
    module = getattr(network, "module", network)
    module = getattr(module, "_orig_mod", module)
    return segmentation_layers(module)[-1]
