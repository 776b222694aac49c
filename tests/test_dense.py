import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

import headzoo
from reference import reference_dc_and_ce


@pytest.mark.parametrize("batch_dice", [True, False])
def test_dense_loss_equals_nnunet_dc_and_ce_loss(batch_dice):
    torch.manual_seed(0)
    head = headzoo.create_head("dense", 4, 11, batch_dice=batch_dice)
    features = torch.randn(2, 4, 6, 5, 4)
    target = torch.randint(0, 11, (2, 1, 6, 5, 4))
    output = head(features)
    nnunet = DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    torch.testing.assert_close(head.loss(output, target), nnunet(output, target), rtol=0, atol=0)
    torch.testing.assert_close(
        head.loss(output, target).double(), reference_dc_and_ce(output, target, batch_dice), rtol=1e-6, atol=1e-6
    )
