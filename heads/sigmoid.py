"""``sigmoid``: MultiTalent's per-class sigmoid heads with the class-adaptive loss (Ulrich et al., MICCAI 2023,
https://arxiv.org/abs/2303.14444, §2.2).

One sigmoid channel per foreground class (labels 1..C−1, no background channel). The loss is eq. (2)
as MultiTalent's code reduces it, with the per-sample annotated-class mask m (b × C):

    L = Σ_c Σ_b m_bc · mean_voxels BCE(s_bc, y_bc) − Σ_c 2·Σ_{b,z} m_bc p y / max(Σ_{b,z} m_bc (p + y), 1e−7)

summed over classes, no smoothing, batch Dice over the samples where the class is annotated. With
``rank=R`` the head is chunked: an R-channel basis and an operator E give each class chunk's logits,
and the loss streams over chunks (per-class terms are independent, so each chunk is checkpointed:
one pass forward, one recomputing pass backward), never holding b×C×S. With ``ddp`` (set by the nnU-Net
trainers under ``-num_gpus`` > 1) the batch Dice's sums are all-gathered over the process group with
nnU-Net's ``AllGatherGrad``, as nnU-Net's ``ddp=True`` batch Dice does.

``prior=π`` starts every class's logit bias at log(π / (1 − π)) instead of 0 (the prior initialisation of
Lin et al., *Focal Loss for Dense Object Detection*, ICCV 2017, https://arxiv.org/abs/1708.02002): every
sigmoid starts at π, not 0.5. Off by default (MultiTalent initialises as nnU-Net does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from headzoo.errors import HeadzooError
from headzoo.head import Head
from headzoo.heads.chunked import in_process_group
from headzoo.heads.chunking import chunked_max, chunks


def sigmoid_class_loss(
    logits: Tensor, labels: Tensor, target: Tensor, annotated: Tensor, valid: Tensor | None = None, gather: bool = False
) -> Tensor:
    """Eq. (2) for the classes `labels` (k,): logits (b, k, S), target (b, S), annotated (b, k) float. With
    `valid` (b, S) float, voxels where it is 0 (the ignore label) are left out: the BCE is each sample's mean
    over its valid voxels (as nnU-Net's DC_and_BCE_loss masks its BCE), and Dice counts only valid voxels.
    gather: the Dice sums of every process in the group (nnU-Net's AllGatherGrad, then summed)."""
    onehot = (target.unsqueeze(1) == labels.view(1, -1, 1)).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p = torch.sigmoid(logits)
    if valid is None:
        bce = bce.mean(-1)
    else:
        bce = (bce * valid[:, None]).sum(-1) / valid.sum(-1, keepdim=True).clamp_min(1)
        p, onehot = p * valid[:, None], onehot * valid[:, None]
    intersect = (annotated * (p * onehot).sum(-1)).sum(0)
    denominator = (annotated * (p + onehot).sum(-1)).sum(0)
    if gather:
        from nnunetv2.utilities.ddp_allgather import AllGatherGrad

        intersect, denominator = AllGatherGrad.apply(intersect).sum(0), AllGatherGrad.apply(denominator).sum(0)
    return (annotated * bce).sum() - (2 * intersect / denominator.clamp_min(1e-7)).sum()


class SigmoidHead(Head):
    """MultiTalent: per-class sigmoid, class-adaptive BCE + Dice over annotated classes; rank=R streams chunks."""

    accepts_annotated = True

    variants = ({"rank": 4, "chunk": 3},)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        batch_dice: bool = False,
        ignore_label: int | None = None,
        rank: int | None = None,
        chunk: int = 30,
        ddp: bool = False,
        prior: float | None = None,
    ):
        """``batch_dice`` is unused: MultiTalent's Dice is always over the batch (eq. 2); ``ddp``: over the
        batches of every process in the group."""
        super().__init__(in_channels, num_classes, batch_dice, ignore_label)
        foreground = num_classes - 1
        if rank is not None and not 1 <= rank <= foreground:
            raise HeadzooError(f"rank must be in [1, {foreground}] (at most C−1), got {rank}")
        if chunk < 1:
            raise HeadzooError(f"chunk must be positive, got {chunk}")
        if ddp and not in_process_group():
            raise HeadzooError("ddp must be false outside a torch.distributed process group, got True")
        if prior is not None and not 0 < prior < 1:
            raise HeadzooError(f"prior must be in (0, 1), got {prior}")
        self.rank, self.chunk, self.ddp = rank, chunk, ddp
        self.conv = nn.Conv3d(in_channels, rank or foreground, kernel_size=1)
        if rank is not None:
            self.operator = nn.Parameter(torch.randn(rank, foreground) / math.sqrt(rank))
            self.class_bias = nn.Parameter(torch.zeros(foreground))
        if prior is not None:  # with rank=R the basis's own bias is zeroed so every class logit starts at the prior
            nn.init.constant_(self.conv.bias, math.log(prior / (1 - prior)) if rank is None else 0.0)
            if rank is not None:
                nn.init.constant_(self.class_bias, math.log(prior / (1 - prior)))

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(features)

    def _chunk_logits(self, flat: Tensor, start: int, stop: int, operator: Tensor, bias: Tensor) -> Tensor:
        """Logits of foreground channels [start, stop) from the basis (b, R, S): (b, k, S)."""
        return torch.matmul(operator[:, start:stop].T, flat) + bias[start:stop, None]

    def logits(self, output: Tensor, classes: slice) -> Tensor:
        """Per-class sigmoid logits; background's score is the constant 0 (every sigmoid's 0.5 threshold),
        so predict is the argmax over all C scores."""
        start, stop, _ = classes.indices(self.num_classes)
        first = max(start, 1)
        if self.rank is None:
            foreground = output[:, first - 1 : stop - 1]
        else:
            foreground = self._chunk_logits(
                output.flatten(2), first - 1, stop - 1, self.operator, self.class_bias
            ).view(output.shape[0], stop - first, *output.shape[2:])
        if start == 0:
            return torch.cat([torch.zeros_like(output[:, :1]), foreground], 1)
        return foreground

    def loss(self, output: Tensor, target: Tensor, annotated: Tensor | None = None) -> Tensor:
        self.check_target(output, target, annotated)
        b = output.shape[0]
        if annotated is None:
            annotated = torch.ones(b, self.num_classes, dtype=torch.bool, device=output.device)
        mask = annotated[:, 1:].to(output.dtype)
        y = target.reshape(b, -1).long()
        valid = None if self.ignore_label is None else (y != self.ignore_label).to(output.dtype)
        labels = torch.arange(1, self.num_classes, device=output.device)
        if self.rank is None:
            return sigmoid_class_loss(output.flatten(2), labels, y, mask, valid, self.ddp)
        flat = output.flatten(2)
        total = output.new_zeros(())
        for start, stop in chunks(self.num_classes - 1, self.chunk):
            total = total + checkpoint(
                self._chunk_loss,
                flat,
                self.operator,
                self.class_bias,
                labels[start:stop],
                y,
                mask[:, start:stop],
                valid,
                start,
                stop,
                use_reentrant=False,
            )
        return total

    def _chunk_loss(self, flat, operator, bias, labels, y, mask, valid, start, stop):
        return sigmoid_class_loss(
            self._chunk_logits(flat, start, stop, operator, bias), labels, y, mask, valid, self.ddp
        )

    @torch.no_grad()
    def predict(self, output: Tensor) -> Tensor:
        """The class with the highest sigmoid probability; background where no class exceeds 0.5."""
        if self.rank is None:
            value, index = output.max(1)
        else:
            shifted = torch.cat([output, torch.ones_like(output[:, :1])], 1)  # bias as a constant basis map
            value, index = chunked_max(shifted, torch.cat([self.operator, self.class_bias[None]]), self.chunk)
        return torch.where(value > 0, index + 1, torch.zeros_like(index))
