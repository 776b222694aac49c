"""A head on an nnU-Net plan's network, for nnU-Net's own trainer and predictor, and the one merge of the
plan's loss settings with the user's head options (``headzoo run`` and the trainers).

The network is ``backbone.build_network``'s with ``backbone.attach_head``'s head, exactly as `headzoo run` builds
it, so checkpoints and pretrained weights keep nnU-Net's module names.
"""

from __future__ import annotations

from torch import nn

from headzoo.backbone import attach_head, build_network
from headzoo.head import PLAN_OPTIONS
from headzoo.registry import create_head


def head_options(options: dict, configuration_manager, label_manager) -> dict:
    """The head's options: nnU-Net's own loss settings from the plan (as ``nnUNetTrainer._build_loss`` reads them;
    every head takes them, ``head.PLAN_OPTIONS``), overridden by the user's `options`."""
    plan = {"batch_dice": configuration_manager.batch_dice, "ignore_label": label_manager.ignore_label}
    return {**{k: plan[k] for k in PLAN_OPTIONS}, **options}


def build_head_network(
    configuration_manager, num_input_channels: int, num_classes: int, head_name: str, options: dict
) -> nn.Module:
    """The plan configuration's network (``build_network``) with the head attached (``attach_head``)."""
    network, features = build_network(configuration_manager.configuration["architecture"], num_input_channels)
    return attach_head(network, create_head(head_name, features, num_classes, **options))
