"""``chunked``: a low-rank basis head with an exact chunked softmax CE + Dice loss.

The chunked-basis paper (Jaubert et al., MIDL 2026) §2.2–2.3: a 1×1×1 conv maps features to R basis maps B and a
learnable operator E (R × C) gives the logits of any class range as Eᵀ·B. The loss streams over
class chunks and keeps only per-voxel and per-class vectors, never a b×C×S tensor.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from headzoo.errors import HeadzooError
from headzoo.head import Head, check_option
from headzoo.heads.chunking import chunked_argmax, chunked_logsumexp, chunks, flatten_basis, probabilities


def in_process_group() -> bool:
    """Whether torch.distributed's default process group is up (nnU-Net's trainer under -num_gpus > 1)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def summed_over_ranks(tensor: Tensor) -> Tensor:
    """`tensor` summed over the processes of the default group, in place: what nnU-Net's ``ddp=True`` batch Dice
    computes as ``AllGatherGrad.apply(t).sum(0)``, in one all-reduce."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def _target_terms(e: Tensor, x: Tensor, y: Tensor, lse: Tensor, ones: Tensor, b: int, batch_dice: bool):
    """The one-class-per-voxel terms, by a gather: log p of each voxel's target, and per (sample,) class the
    Dice intersection I_c = Σ_v p_cv [y_v = c] and ground-truth size G_c."""
    n = x.shape[1]
    num_classes = e.shape[1]
    log_p_target = torch.einsum("rn,rn->n", e[:, y], x).sub_(lse)
    p_target = log_p_target.exp()
    flat = torch.arange(b, device=x.device).repeat_interleave(n // b) * num_classes + y
    intersect = x.new_zeros(b * num_classes).index_add_(0, flat, p_target * ones).view(b, num_classes)
    sum_gt = x.new_zeros(b * num_classes).index_add_(0, flat, ones).view(b, num_classes)
    if batch_dice:
        intersect, sum_gt = intersect.sum(0), sum_gt.sum(0)
    return log_p_target, p_target, intersect, sum_gt


def _dice_pass(
    e: Tensor,
    x: Tensor,
    lse: Tensor,
    weight: Tensor | None,
    intersect: Tensor,
    sum_gt: Tensor,
    chunk: int,
    b: int,
    batch_dice: bool,
    smooth: float,
    first: int,
    count: int,
    gather: bool,
):
    """One pass over class chunks: P_c, the Dice sum, and ∂(−mean Dice)/∂p_cv = m_v (a_c·[y_v = c] + β_c)
    as a_c, β_c (zero for excluded classes and clamped denominators) and Σ_c β_c p_cv per voxel.
    gather: P_c summed over the process group, chunk by chunk, before β_c needs it."""
    n = x.shape[1]
    voxels = n // b
    a, beta = torch.zeros_like(intersect), torch.zeros_like(intersect)
    dice_sum = x.new_zeros(())
    p_beta = x.new_zeros(n)
    for start, stop in chunks(e.shape[1], chunk):
        p = probabilities(e, x, start, stop, lse, weight)
        sum_p = p.view(stop - start, b, voxels).sum(-1).T
        if batch_dice:
            sum_p = sum_p.sum(0)
        if gather:
            sum_p = summed_over_ranks(sum_p)
        raw = sum_gt[..., start:stop] + sum_p + smooth
        denominator = raw.clamp_min(1e-8)
        numerator = 2 * intersect[..., start:stop] + smooth
        included = (torch.arange(start, stop, device=x.device) >= first).to(x.dtype)
        dice_sum += (numerator / denominator * included).sum()
        live = (raw > 1e-8).to(x.dtype) * included
        a[..., start:stop] = -2 / (count * denominator) * live
        beta[..., start:stop] = numerator / (count * denominator**2) * live
        if batch_dice:
            p_beta += beta[start:stop] @ p
        else:
            for i in range(b):
                block = slice(i * voxels, (i + 1) * voxels)
                p_beta[block] += beta[i, start:stop] @ p[:, block]
    return dice_sum, a, beta, p_beta


class ChunkedSoftmaxDiceCELoss(torch.autograd.Function):
    """nnU-Net's DC_and_CE_loss (MemoryEfficientSoftDiceLoss, mean CE) on logits Eᵀ·B, streamed over class chunks.

    Soft Dice through softmax couples all classes: ∂L/∂z_cv needs t_v = Σ_c p_cv ∂L_dice/∂p_cv. Its
    class-sum part Σ_c β_c p_cv only needs class c's own statistics (β_c from I_c, G_c and P_c), and P_c
    is complete as soon as chunk c's probabilities exist. So:

    - forward pass 1 (chunked_logsumexp): per-voxel log-sum-exp, online over chunks;
    - _target_terms (one class per voxel) by a gather: CE, I_c and G_c;
    - forward pass 2 (_dice_pass): per chunk, P_c → the chunk's Dice terms and β_c → accumulate Σ_c β_c p_cv;
    - backward, one pass: per chunk, the logit gradient, multiplied into the basis and E gradients.

    Per-voxel and per-class vectors only: no b×C×S tensor in forward or backward.

    ddp (with batch_dice): I_c, G_c and P_c are summed over the process group, so each GPU's Dice is the
    whole batch's, and the Dice part of the backward takes the group's summed upstream gradient: what
    nnU-Net's ``ddp=True`` loss does with ``AllGatherGrad`` (gather forward, all-reduce backward).
    """

    @staticmethod
    def forward(
        ctx,
        basis: Tensor,
        operator: Tensor,
        target: Tensor,
        chunk: int,
        batch_dice: bool,
        do_bg: bool,
        smooth: float,
        weight_ce: float,
        weight_dice: float,
        ignore_label: int | None,
        ddp: bool,
    ) -> Tensor:
        b = basis.shape[0]
        num_classes = operator.shape[1]
        dtype = torch.promote_types(basis.dtype, operator.dtype)
        x = flatten_basis(basis).to(dtype)
        e = operator.detach().to(dtype)
        n = x.shape[1]
        y = target.reshape(n).long()
        weight = None
        if ignore_label is not None:
            valid = y != ignore_label
            y = torch.where(valid, y, 0)
            weight = valid.to(dtype)
        ones = torch.ones(n, device=x.device, dtype=dtype) if weight is None else weight

        lse = chunked_logsumexp(e, x, chunk)
        log_p_target, p_target, intersect, sum_gt = _target_terms(e, x, y, lse, ones, b, batch_dice)
        gather = ddp and batch_dice
        if gather:
            intersect, sum_gt = summed_over_ranks(torch.stack((intersect, sum_gt)))
        num_valid = ones.sum().clamp_min(1e-8)  # as nnU-Net's masked CE: 0, not NaN, when every voxel is ignored
        ce = -(log_p_target * ones).sum() / num_valid
        ce_coefficient = weight_ce / num_valid
        first = 0 if do_bg else 1
        count = (num_classes - first) * (1 if batch_dice else b)
        dice_sum, a, beta, p_beta = _dice_pass(
            e, x, lse, weight, intersect, sum_gt, chunk, b, batch_dice, smooth, first, count, gather
        )
        loss = weight_ce * ce - weight_dice * dice_sum / count

        if batch_dice:
            a, beta = a.expand(b, num_classes), beta.expand(b, num_classes)
        ctx.save_for_backward(x, e, y, lse, p_target, weight, a.contiguous(), beta.contiguous(), p_beta, ce_coefficient)
        ctx.settings = (basis.shape, basis.dtype, operator.dtype, chunk, weight_dice, gather)
        return loss.to(basis.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, e, y, lse, p_target, weight, a, beta, p_beta, ce_coefficient = ctx.saved_tensors
        basis_shape, basis_dtype, operator_dtype, chunk, weight_dice, gather = ctx.settings
        b = basis_shape[0]
        rank, n = x.shape
        voxels = n // b
        num_classes = e.shape[1]
        g = grad_output.to(x.dtype)
        g_dice = summed_over_ranks(g.clone()) if gather else g  # AllGatherGrad's backward: the group's gradients
        a_target = a[torch.arange(b, device=x.device).repeat_interleave(voxels), y]
        ones = torch.ones_like(p_target) if weight is None else weight
        t = ones * a_target * p_target + p_beta  # Σ_c p_cv ∂L_dice/∂p_cv (p_beta is already masked)

        # ∂L/∂z_cv = p_cv (m_v w_ce/N − w_dice t_v + w_dice m_v β_c) + [y_v = c] m_v (w_dice a_c p_cv − w_ce/N)
        per_voxel = g * ce_coefficient * ones - g_dice * weight_dice * t
        per_class = (g_dice * weight_dice) * beta
        grad_x = torch.zeros_like(x)
        grad_e = torch.empty_like(e)
        for start, stop in chunks(num_classes, chunk):
            p = probabilities(e, x, start, stop, lse, weight)
            grad_z = p * per_voxel
            grad_z.view(stop - start, b, voxels).addcmul_(
                p.view(stop - start, b, voxels), per_class[:, start:stop].T.unsqueeze(-1)
            )
            grad_x.addmm_(e[:, start:stop], grad_z)
            torch.mm(x, grad_z.T, out=grad_e[:, start:stop])
        target_term = ones * (g_dice * weight_dice * a_target * p_target - g * ce_coefficient)
        grad_x.addcmul_(e[:, y], target_term)
        grad_e.index_add_(1, y, x * target_term)

        grad_basis = grad_x.view(rank, b, voxels).transpose(0, 1).reshape(basis_shape).to(basis_dtype)
        return grad_basis, grad_e.to(operator_dtype), None, None, None, None, None, None, None, None, None


def chunked_dc_and_ce_loss(
    basis: Tensor,
    operator: Tensor,
    target: Tensor,
    chunk: int = 30,
    batch_dice: bool = True,
    do_bg: bool = False,
    smooth: float = 1e-5,
    weight_ce: float = 1.0,
    weight_dice: float = 1.0,
    ignore_label: int | None = None,
    ddp: bool = False,
) -> Tensor:
    """The exact nnU-Net Dice + CE loss of logits Eᵀ·basis, never holding b×C×S.

    Under nnU-Net's autocast it runs in fp32 with autocast off for the tensors' own device (the forward
    promotes a half basis to the operator's fp32), and its backward runs where the step's backward runs,
    outside autocast. Named by device rather than fixed to CUDA, so an autocast emulated on the CPU
    (headzoo.cuda_autocast) is switched off here as CUDA's is on a GPU."""
    with torch.autocast(basis.device.type, enabled=False):
        return ChunkedSoftmaxDiceCELoss.apply(
            basis, operator, target, chunk, batch_dice, do_bg, smooth, weight_ce, weight_dice, ignore_label, ddp
        )


def _triton_kernels():
    """heads/chunked_triton.py, imported on first use (it needs triton): one clear line when it cannot be."""
    try:
        from headzoo.heads import chunked_triton
    except ImportError as error:
        message = f"kernel=triton needs triton ({error}); install it with: pip install 'headzoo[triton]'"
        raise HeadzooError(message) from None
    return chunked_triton


@functools.cache
def _triton_imports() -> bool:
    try:
        _triton_kernels()
    except HeadzooError:
        return False
    return True


def _cpu_triton_error() -> HeadzooError:
    return HeadzooError(
        "kernel=triton runs on CUDA tensors, or on the CPU under Triton's interpreter: "
        "set TRITON_INTERPRET=1 before headzoo starts"
    )


class ChunkedHead(Head):
    """Low-rank basis (R maps) + operator E; exact chunked softmax CE + Dice; chunked argmax.

    kernel: ``torch`` (the chunked loop above; the default until the fused kernels have run on a GPU —
    so far they are checked only under Triton's interpreter), ``triton`` (heads/chunked_triton.py's fused
    kernels; ``chunk`` does not apply) or ``auto`` (triton on CUDA tensors when triton imports, else torch).
    ddp: with batch_dice, the Dice statistics of every process in the group (nnU-Net's ``ddp=True``; the
    nnU-Net trainers set it under ``-num_gpus`` > 1).
    """

    variants = ({"rank": 3, "chunk": 4},)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        batch_dice: bool = False,
        ignore_label: int | None = None,
        rank: int | None = None,
        chunk: int = 30,
        do_bg: bool = False,
        smooth: float = 1e-5,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
        kernel: str = "torch",
        ddp: bool = False,
    ):
        super().__init__(in_channels, num_classes, batch_dice, ignore_label)
        if kernel not in ("torch", "triton", "auto"):
            raise HeadzooError(f"kernel must be torch, triton or auto, got '{kernel}'")
        if kernel == "triton" and not _triton_kernels().INTERPRETED and not torch.cuda.is_available():
            raise _cpu_triton_error()
        self.kernel = kernel
        rank = min(32, num_classes) if rank is None else rank
        if not 1 <= rank <= num_classes:
            raise HeadzooError(f"rank must be in [1, {num_classes}] (at most C), got {rank}")
        if chunk < 1:
            raise HeadzooError(f"chunk must be positive, got {chunk}")
        for name, value in (("smooth", smooth), ("weight_ce", weight_ce), ("weight_dice", weight_dice)):
            check_option(name, value, value >= 0, "at least 0")
        check_option("ddp", ddp, not ddp or in_process_group(), "false outside a torch.distributed process group")
        self.rank, self.chunk = rank, chunk
        self.loss_settings = dict(
            batch_dice=batch_dice,
            do_bg=do_bg,
            smooth=smooth,
            weight_ce=weight_ce,
            weight_dice=weight_dice,
            ignore_label=ignore_label,
            ddp=ddp,
        )
        self.basis = nn.Conv3d(in_channels, rank, kernel_size=1)
        self.operator = nn.Parameter(torch.randn(rank, num_classes) / math.sqrt(rank))

    def forward(self, features: Tensor) -> Tensor:
        return self.basis(features)

    def loss(self, output: Tensor, target: Tensor, annotated: Tensor | None = None) -> Tensor:
        self.check_target(output, target, annotated)
        if self._uses_triton(output):
            return _triton_kernels().triton_chunked_dc_and_ce_loss(output, self.operator, target, **self.loss_settings)
        return chunked_dc_and_ce_loss(output, self.operator, target, self.chunk, **self.loss_settings)

    def _uses_triton(self, output: Tensor) -> bool:
        if self.kernel == "auto":
            return output.is_cuda and _triton_imports()
        if self.kernel == "triton" and not output.is_cuda and not _triton_kernels().INTERPRETED:
            raise _cpu_triton_error()
        return self.kernel == "triton"

    def predict(self, output: Tensor) -> Tensor:
        return chunked_argmax(output, self.operator, self.chunk)

    def logits(self, output: Tensor, classes: slice) -> Tensor:
        return torch.einsum("br...,rc->bc...", output, self.operator[:, classes])
