"""``dense``: a 1×1×1 conv to all C logits, trained with nnU-Net's own Dice + CE loss."""

from __future__ import annotations

from torch import Tensor, nn

from headzoo.head import Head, check_option
from headzoo.heads.chunked import in_process_group


def build_nnunet_loss(
    batch_dice: bool = True,
    do_bg: bool = False,
    smooth: float = 1e-5,
    weight_ce: float = 1.0,
    weight_dice: float = 1.0,
    ignore_label: int | None = None,
    ddp: bool = False,
) -> nn.Module:
    """nnU-Net's ``DC_and_CE_loss`` exactly as ``nnUNetTrainer._build_loss`` builds it (``ddp``: its batch Dice
    statistics all-gathered over the process group, as under ``-num_gpus`` > 1)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    return DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": smooth, "do_bg": do_bg, "ddp": ddp},
        {},
        weight_ce=weight_ce,
        weight_dice=weight_dice,
        ignore_label=ignore_label,
        dice_class=MemoryEfficientSoftDiceLoss,
    )


class DenseHead(Head):
    """Full-logit baseline: 1×1×1 conv to C channels, nnU-Net's DC_and_CE_loss, argmax."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        batch_dice: bool = False,
        ignore_label: int | None = None,
        do_bg: bool = False,
        smooth: float = 1e-5,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
        ddp: bool = False,
    ):
        super().__init__(in_channels, num_classes, batch_dice, ignore_label)
        for name, value in (("smooth", smooth), ("weight_ce", weight_ce), ("weight_dice", weight_dice)):
            check_option(name, value, value >= 0, "at least 0")
        self.conv = nn.Conv3d(in_channels, num_classes, kernel_size=1)
        check_option("ddp", ddp, not ddp or in_process_group(), "false outside a torch.distributed process group")
        self.criterion = build_nnunet_loss(batch_dice, do_bg, smooth, weight_ce, weight_dice, ignore_label, ddp)

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(features)

    def loss(self, output: Tensor, target: Tensor, annotated: Tensor | None = None) -> Tensor:
        self.check_target(output, target, annotated)
        return self.criterion(output, target)

    def predict(self, output: Tensor) -> Tensor:
        return output.argmax(1)

    def logits(self, output: Tensor, classes: slice) -> Tensor:
        return output[:, classes]
