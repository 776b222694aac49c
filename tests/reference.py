"""Independent float64 restatement of nnU-Net's DC_and_CE_loss (MemoryEfficientSoftDiceLoss + mean CE).

Written from the formula, not from headzoo's code: materialised softmax, one-hot by comparison.
"""

import torch


def reference_dc_and_ce(
    logits, target, batch_dice=True, do_bg=False, smooth=1e-5, weight_ce=1.0, weight_dice=1.0, ignore_label=None
):
    logits = logits.double()
    y = target[:, 0].long()
    mask = torch.ones_like(y, dtype=torch.float64) if ignore_label is None else (y != ignore_label).double()
    y = torch.where(mask.bool(), y, 0)
    classes = torch.arange(logits.shape[1]).view(1, -1, *[1] * (logits.ndim - 2))
    onehot = (y.unsqueeze(1) == classes).double() * mask.unsqueeze(1)
    log_p = torch.log_softmax(logits, 1)
    p = log_p.exp() * mask.unsqueeze(1)
    axes = tuple(range(2, logits.ndim))
    ce = -(log_p * onehot).sum() / mask.sum() if mask.sum() > 0 else 0.0
    intersect, sum_p, sum_gt = (p * onehot).sum(axes), p.sum(axes), onehot.sum(axes)
    if batch_dice:
        intersect, sum_p, sum_gt = intersect.sum(0), sum_p.sum(0), sum_gt.sum(0)
    dice = (2 * intersect + smooth) / (sum_gt + sum_p + smooth).clamp_min(1e-8)
    dice = dice[..., (0 if do_bg else 1) :]
    return weight_ce * ce - weight_dice * dice.mean()
