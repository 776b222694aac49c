"""Triton kernels for the chunked head's exact softmax CE + soft Dice: logit tiles never leave the chip.

The same loss and gradients as ``ChunkedSoftmaxDiceCELoss`` (heads/chunked.py), fused. Every kernel
recomputes a (voxels × classes) logit tile z = xᵀ·E with ``tl.dot`` in registers and keeps only
per-voxel and per-class vectors in global memory (x: the basis (b, R, S), E: the operator (R, C)):

1. ``_lse_kernel``: per voxel, the online log-sum-exp over class tiles and the target's logit;
2. ``_class_sums_kernel``: per class and sample, Σ m·p, Σ m·p·[y = c] and Σ m·[y = c];
3. ``_dice_slope_kernel`` (backward): per voxel t_v = Σ_c m·p_cv (β_c + a_c·[y_v = c]);
4. ``_grad_basis_kernel``: ∂x_v = Σ_c e_c ∂z_cv, one voxel block per program, looping over classes;
5. ``_grad_operator_kernel``: ∂e_c = Σ_v x_v ∂z_cv, one class tile per program and voxel split.

Per-class sums are split over a fixed number of voxel splits, each written to its own slot of a
(…, splits, C) buffer and added by torch afterwards: no atomics, so a fixed launch is bitwise
reproducible. Accumulation is fp32 for fp32, fp16 and bf16 inputs.

Precision and launch, chosen from the sm_90 code Triton 3.7.1 generates (``tests/triton_aot.py``
compiles the kernels ahead of time for sm_90 on a CPU and reads ``ptxas -v``; rank 32, 64×64 tiles):

- fp32 tiles (what ``custom_fwd(cast_inputs=float32)`` hands over under autocast, so every AMP step)
  use ``input_precision="tf32x3"``: three TF32 tensor-core products per dot (a = a_hi + a_lo; the
  a_lo·b_lo term is dropped, about 2⁻²² relative per product), near fp32 accuracy. With ``"ieee"``
  all five kernels lowered to FMA dots (no mma instruction), 255 registers and 324–664 B/thread of
  spill stores; with ``"tf32x3"`` and 4 warps they use tensor cores with 0–64 B of spill, and with
  8 warps 0–12 B (``_grad_operator_kernel``'s 12 B; the other four none). Plain ``"tf32"`` (one
  product, 10-bit mantissas) would be faster but is not the torch path's accuracy.
- fp16 and bf16 tiles go to the tensor cores as they are (``input_precision`` only applies to fp32);
  with 4 warps none spills.
- ``NUM_WARPS = 8`` for every kernel. Rank 64 still spills in the two gradient kernels (168 and
  592 B at 8 warps) and rank 256 needs 260–390 KB of shared memory, more than an sm_90 block may
  have (227 KB: Triton's ``OutOfResources``, recorded as ``oom``): tiles for large ranks are not tuned.
- Tiles are powers of two of at least 16: ``tl.dot`` needs 16 on a GPU (8×8 tiles run in the
  interpreter and fail to compile for sm_90), so smaller ones are refused with one line.

Triton decides at import time whether kernels compile for the GPU or run in its CPU interpreter:
``TRITON_INTERPRET=1`` must be set before this module is imported for CPU tensors to work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from headzoo.errors import HeadzooError
from headzoo.heads.chunked import summed_over_ranks

#: whether the kernels below were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
#: warps per program for every kernel (see the module docstring); the interpreter ignores it
NUM_WARPS = 8
#: tl.dot's smallest tile edge on a GPU
MIN_BLOCK = 16


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for tiles of `dtype` (see the module docstring): tf32x3 for fp32; for fp16 and
    bf16 the setting does not apply (Triton's default, tf32, is passed)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def _basis_tile(x_ptr, sample, offs_v, S, R, BLOCK_R: tl.constexpr):
    """xᵀ of one voxel block of one sample, (BLOCK_V, BLOCK_R), zero beyond S and R."""
    offs_r = tl.arange(0, BLOCK_R)
    base = x_ptr + sample.to(tl.int64) * R * S
    return tl.load(
        base + offs_r[None, :] * S + offs_v[:, None], mask=(offs_v[:, None] < S) & (offs_r[None, :] < R), other=0.0
    )


@triton.jit
def _operator_tile(e_ptr, offs_c, R, C, BLOCK_R: tl.constexpr):
    """E's columns offs_c, (BLOCK_R, BLOCK_C), zero beyond R and C."""
    offs_r = tl.arange(0, BLOCK_R)
    return tl.load(
        e_ptr + offs_r[:, None] * C + offs_c[None, :], mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0
    )


@triton.jit
def _voxel_block(y_ptr, lse_ptr, sample, offs_v, S):
    """Labels (−1: ignored or beyond S), the voxel mask m and the log-sum-exp of one voxel block."""
    index = sample.to(tl.int64) * S + offs_v
    y = tl.load(y_ptr + index, mask=offs_v < S, other=-1)
    lse = tl.load(lse_ptr + index, mask=offs_v < S, other=0.0)
    return y, y >= 0, lse


@triton.jit
def _masked_probabilities(z, lse, valid_v, offs_c, C):
    """m_v·softmax(z)_cv of a logit tile, zero for ignored voxels and classes beyond C."""
    keep = valid_v[:, None] & (offs_c[None, :] < C)
    return tl.where(keep, tl.exp(z - lse[:, None]), 0.0)


@triton.jit
def _logit_gradient(p, hit, per_voxel, per_class, target_slope, target_offset):
    """∂L/∂z_cv = p_cv (per_voxel_v + per_class_c) + [y_v = c] (target_slope_c p_cv − target_offset)."""
    return p * (per_voxel[:, None] + per_class[None, :]) + tl.where(hit, target_slope[None, :] * p - target_offset, 0.0)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST_BF16: tl.constexpr):
    """a·b with fp32 accumulation. UPCAST_BF16: Triton 3.7's interpreter multiplies bf16 bit patterns as
    integers, so there bf16 tiles go to fp32 first (exact), which is what a GPU's bf16 dot computes."""
    if UPCAST_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _lse_kernel(
    x_ptr,
    e_ptr,
    y_ptr,
    lse_ptr,
    target_logit_ptr,
    S,
    R,
    C,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    block, sample = tl.program_id(0), tl.program_id(1)
    offs_v = block * BLOCK_V + tl.arange(0, BLOCK_V)
    xt = _basis_tile(x_ptr, sample, offs_v, S, R, BLOCK_R)
    y = tl.load(y_ptr + sample.to(tl.int64) * S + offs_v, mask=offs_v < S, other=-1)
    running_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_V], tl.float32)
    target_logit = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        z = _dot(xt, _operator_tile(e_ptr, offs_c, R, C, BLOCK_R), PRECISION, UPCAST_BF16)
        z = tl.where(offs_c[None, :] < C, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, 1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
        running_max = new_max
        target_logit += tl.sum(tl.where(offs_c[None, :] == y[:, None], z, 0.0), 1)
    index = sample.to(tl.int64) * S + offs_v
    tl.store(lse_ptr + index, running_max + tl.log(running_sum), mask=offs_v < S)
    tl.store(target_logit_ptr + index, target_logit, mask=offs_v < S)


@triton.jit
def _class_sums_kernel(
    x_ptr,
    e_ptr,
    y_ptr,
    lse_ptr,
    sums_ptr,
    S,
    R,
    C,
    splits,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    """sums[k, sample, split, c] for k = (Σ m·p, Σ m·p·[y = c], Σ m·[y = c]) over the split's voxel blocks."""
    tile, split, sample = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    e = _operator_tile(e_ptr, offs_c, R, C, BLOCK_R)
    sum_p = tl.zeros([BLOCK_C], tl.float32)
    intersect = tl.zeros([BLOCK_C], tl.float32)
    sum_gt = tl.zeros([BLOCK_C], tl.float32)
    for block in range(split, tl.cdiv(S, BLOCK_V), splits):
        offs_v = block * BLOCK_V + tl.arange(0, BLOCK_V)
        y, valid_v, lse = _voxel_block(y_ptr, lse_ptr, sample, offs_v, S)
        z = _dot(_basis_tile(x_ptr, sample, offs_v, S, R, BLOCK_R), e, PRECISION, UPCAST_BF16)
        p = _masked_probabilities(z, lse, valid_v, offs_c, C)
        hit = offs_c[None, :] == y[:, None]
        sum_p += tl.sum(p, 0)
        intersect += tl.sum(tl.where(hit, p, 0.0), 0)
        sum_gt += tl.sum(hit.to(tl.float32), 0)
    slot = (sample * splits + split).to(tl.int64) * C + offs_c
    stride = tl.num_programs(2).to(tl.int64) * splits * C
    tl.store(sums_ptr + slot, sum_p, mask=offs_c < C)
    tl.store(sums_ptr + stride + slot, intersect, mask=offs_c < C)
    tl.store(sums_ptr + 2 * stride + slot, sum_gt, mask=offs_c < C)


@triton.jit
def _dice_slope_kernel(
    x_ptr,
    e_ptr,
    y_ptr,
    lse_ptr,
    a_ptr,
    beta_ptr,
    t_ptr,
    S,
    R,
    C,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    """t_v = Σ_c m·p_cv (β_c + a_c·[y_v = c]) = Σ_c p_cv ∂L_dice/∂p_cv, with a, β of the voxel's sample."""
    block, sample = tl.program_id(0), tl.program_id(1)
    offs_v = block * BLOCK_V + tl.arange(0, BLOCK_V)
    xt = _basis_tile(x_ptr, sample, offs_v, S, R, BLOCK_R)
    y, valid_v, lse = _voxel_block(y_ptr, lse_ptr, sample, offs_v, S)
    t = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        z = _dot(xt, _operator_tile(e_ptr, offs_c, R, C, BLOCK_R), PRECISION, UPCAST_BF16)
        p = _masked_probabilities(z, lse, valid_v, offs_c, C)
        a = tl.load(a_ptr + sample * C + offs_c, mask=offs_c < C, other=0.0)
        beta = tl.load(beta_ptr + sample * C + offs_c, mask=offs_c < C, other=0.0)
        t += tl.sum(p * (beta[None, :] + tl.where(offs_c[None, :] == y[:, None], a[None, :], 0.0)), 1)
    tl.store(t_ptr + sample.to(tl.int64) * S + offs_v, t, mask=offs_v < S)


@triton.jit
def _grad_basis_kernel(
    x_ptr,
    e_ptr,
    y_ptr,
    lse_ptr,
    per_voxel_ptr,
    per_class_ptr,
    target_slope_ptr,
    target_offset_ptr,
    grad_x_ptr,
    S,
    R,
    C,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    block, sample = tl.program_id(0), tl.program_id(1)
    offs_v = block * BLOCK_V + tl.arange(0, BLOCK_V)
    xt = _basis_tile(x_ptr, sample, offs_v, S, R, BLOCK_R)
    y, valid_v, lse = _voxel_block(y_ptr, lse_ptr, sample, offs_v, S)
    per_voxel = tl.load(per_voxel_ptr + sample.to(tl.int64) * S + offs_v, mask=offs_v < S, other=0.0)
    target_offset = tl.load(target_offset_ptr)
    grad_xt = tl.zeros([BLOCK_V, BLOCK_R], tl.float32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        e = _operator_tile(e_ptr, offs_c, R, C, BLOCK_R)
        p = _masked_probabilities(_dot(xt, e, PRECISION, UPCAST_BF16), lse, valid_v, offs_c, C)
        per_class = tl.load(per_class_ptr + sample * C + offs_c, mask=offs_c < C, other=0.0)
        target_slope = tl.load(target_slope_ptr + sample * C + offs_c, mask=offs_c < C, other=0.0)
        grad_z = _logit_gradient(p, offs_c[None, :] == y[:, None], per_voxel, per_class, target_slope, target_offset)
        grad_xt += _dot(grad_z.to(e.dtype), tl.trans(e), PRECISION, UPCAST_BF16)
    offs_r = tl.arange(0, BLOCK_R)
    base = grad_x_ptr + sample.to(tl.int64) * R * S
    tl.store(
        base + offs_r[None, :] * S + offs_v[:, None],
        grad_xt.to(grad_x_ptr.dtype.element_ty),
        mask=(offs_v[:, None] < S) & (offs_r[None, :] < R),
    )


@triton.jit
def _grad_operator_kernel(
    x_ptr,
    e_ptr,
    y_ptr,
    lse_ptr,
    per_voxel_ptr,
    per_class_ptr,
    target_slope_ptr,
    target_offset_ptr,
    partial_ptr,
    S,
    R,
    C,
    splits,
    BLOCK_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_BF16: tl.constexpr,
):
    """partial[sample, split, :, c] = Σ_v x_v ∂z_cv over the split's voxel blocks of one sample."""
    tile, split, sample = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    e = _operator_tile(e_ptr, offs_c, R, C, BLOCK_R)
    per_class = tl.load(per_class_ptr + sample * C + offs_c, mask=offs_c < C, other=0.0)
    target_slope = tl.load(target_slope_ptr + sample * C + offs_c, mask=offs_c < C, other=0.0)
    target_offset = tl.load(target_offset_ptr)
    grad_e = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for block in range(split, tl.cdiv(S, BLOCK_V), splits):
        offs_v = block * BLOCK_V + tl.arange(0, BLOCK_V)
        xt = _basis_tile(x_ptr, sample, offs_v, S, R, BLOCK_R)
        y, valid_v, lse = _voxel_block(y_ptr, lse_ptr, sample, offs_v, S)
        per_voxel = tl.load(per_voxel_ptr + sample.to(tl.int64) * S + offs_v, mask=offs_v < S, other=0.0)
        p = _masked_probabilities(_dot(xt, e, PRECISION, UPCAST_BF16), lse, valid_v, offs_c, C)
        grad_z = _logit_gradient(p, offs_c[None, :] == y[:, None], per_voxel, per_class, target_slope, target_offset)
        grad_e += _dot(tl.trans(xt), grad_z.to(xt.dtype), PRECISION, UPCAST_BF16)
    offs_r = tl.arange(0, BLOCK_R)
    base = partial_ptr + (sample * splits + split).to(tl.int64) * R * C
    tl.store(base + offs_r[:, None] * C + offs_c[None, :], grad_e, mask=(offs_r[:, None] < R) & (offs_c[None, :] < C))


def _dice_terms(
    intersect: Tensor, sum_p: Tensor, sum_gt: Tensor, do_bg: bool, smooth: float, count: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Σ_c dice_c and the slopes of −mean dice: ∂/∂p_cv = m_v (a_c·[y_v = c] + β_c), as the torch path has them."""
    raw = sum_gt + sum_p + smooth
    denominator = raw.clamp_min(1e-8)
    numerator = 2 * intersect + smooth
    included = (torch.arange(raw.shape[-1], device=raw.device) >= (0 if do_bg else 1)).to(raw.dtype)
    live = (raw > 1e-8).to(raw.dtype) * included
    dice_sum = (numerator / denominator * included).sum()
    return dice_sum, -2 / (count * denominator) * live, numerator / (count * denominator**2) * live


def _voxel_splits(class_tiles: int, samples: int, voxel_blocks: int, device: torch.device) -> int:
    """How many voxel splits the per-class kernels use: enough programs to fill a GPU (4 per SM), 1 elsewhere."""
    if device.type != "cuda":
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(voxel_blocks, programs // (class_tiles * samples)))


class TritonChunkedSoftmaxDiceCELoss(torch.autograd.Function):
    """``ChunkedSoftmaxDiceCELoss`` by the fused kernels above: same inputs (no chunk) and settings, ddp included."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # as the torch path, under autocast
    def forward(
        ctx,
        basis: Tensor,
        operator: Tensor,
        target: Tensor,
        batch_dice: bool,
        do_bg: bool,
        smooth: float,
        weight_ce: float,
        weight_dice: float,
        ignore_label: int | None,
        ddp: bool,
        block_voxels: int,
        block_classes: int,
        voxel_splits: int | None,
    ) -> Tensor:
        dtype = torch.promote_types(basis.dtype, operator.dtype)
        x = basis.detach().to(dtype).contiguous()
        e = operator.detach().to(dtype).contiguous()
        b, rank = x.shape[:2]
        voxels = x[0, 0].numel()
        num_classes = e.shape[1]
        y = target.reshape(b * voxels).to(torch.int32)
        if ignore_label is not None:
            y = torch.where(y == ignore_label, -1, y)
        class_tiles, voxel_blocks = triton.cdiv(num_classes, block_classes), triton.cdiv(voxels, block_voxels)
        splits = voxel_splits or _voxel_splits(class_tiles, b, voxel_blocks, x.device)
        blocks = dict(
            BLOCK_V=block_voxels,
            BLOCK_C=block_classes,
            BLOCK_R=max(16, triton.next_power_of_2(rank)),
            PRECISION=dot_precision(dtype),
            UPCAST_BF16=INTERPRETED and dtype == torch.bfloat16,
            num_warps=NUM_WARPS,
        )

        lse = torch.empty(b * voxels, device=x.device, dtype=torch.float32)
        target_logit = torch.empty_like(lse)
        _lse_kernel[(voxel_blocks, b)](x, e, y, lse, target_logit, voxels, rank, num_classes, **blocks)
        sums = torch.empty(3, b, splits, num_classes, device=x.device, dtype=torch.float32)
        _class_sums_kernel[(class_tiles, splits, b)](x, e, y, lse, sums, voxels, rank, num_classes, splits, **blocks)
        sum_p, intersect, sum_gt = sums.sum(2)
        if batch_dice:
            sum_p, intersect, sum_gt = sum_p.sum(0), intersect.sum(0), sum_gt.sum(0)
        gather = ddp and batch_dice
        if gather:
            sum_p, intersect, sum_gt = summed_over_ranks(torch.stack((sum_p, intersect, sum_gt)))

        mask = (y >= 0).to(torch.float32)
        num_valid = mask.sum().clamp_min(1)  # no valid voxel: every term below is 0, as in the torch path
        ce = ((lse - target_logit) * mask).sum() / num_valid
        count = (num_classes - (0 if do_bg else 1)) * (1 if batch_dice else b)
        dice_sum, a, beta = _dice_terms(intersect, sum_p, sum_gt, do_bg, smooth, count)
        loss = weight_ce * ce - weight_dice * dice_sum / count

        a, beta = a.expand(b, num_classes).contiguous(), beta.expand(b, num_classes).contiguous()
        ctx.save_for_backward(x, e, y, lse, mask, a, beta, weight_ce / num_valid)
        ctx.settings = (basis.dtype, operator.dtype, weight_dice, splits, blocks, gather)
        return loss.to(basis.dtype)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_output: Tensor):
        x, e, y, lse, mask, a, beta, ce_coefficient = ctx.saved_tensors
        basis_dtype, operator_dtype, weight_dice, splits, blocks, gather = ctx.settings
        b, rank = x.shape[:2]
        voxels = x[0, 0].numel()
        num_classes = e.shape[1]
        class_tiles = triton.cdiv(num_classes, blocks["BLOCK_C"])
        voxel_blocks = triton.cdiv(voxels, blocks["BLOCK_V"])
        g = grad_output.to(torch.float32)
        g_dice = summed_over_ranks(g.clone()) if gather else g  # AllGatherGrad's backward: the group's gradients

        t = torch.empty_like(lse)
        _dice_slope_kernel[(voxel_blocks, b)](x, e, y, lse, a, beta, t, voxels, rank, num_classes, **blocks)
        # ∂L/∂z_cv = m_v p_cv (g w_ce/N − g w_dice t_v + g w_dice β_c) + [y_v = c] (g w_dice a_c p_cv − g w_ce/N)
        per_voxel = g * ce_coefficient * mask - g_dice * weight_dice * t
        per_class, target_slope = (g_dice * weight_dice) * beta, (g_dice * weight_dice) * a
        target_offset = (g * ce_coefficient).reshape(1)
        gradient_terms = (per_voxel, per_class, target_slope, target_offset)

        grad_x = torch.empty_like(x)
        _grad_basis_kernel[(voxel_blocks, b)](
            x, e, y, lse, *gradient_terms, grad_x, voxels, rank, num_classes, **blocks
        )
        partial = torch.empty(b, splits, rank, num_classes, device=x.device, dtype=torch.float32)
        _grad_operator_kernel[(class_tiles, splits, b)](
            x, e, y, lse, *gradient_terms, partial, voxels, rank, num_classes, splits, **blocks
        )
        grad_e = partial.sum((0, 1))
        return (
            grad_x.to(basis_dtype),
            grad_e.to(operator_dtype),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def triton_chunked_dc_and_ce_loss(
    basis: Tensor,
    operator: Tensor,
    target: Tensor,
    batch_dice: bool = True,
    do_bg: bool = False,
    smooth: float = 1e-5,
    weight_ce: float = 1.0,
    weight_dice: float = 1.0,
    ignore_label: int | None = None,
    ddp: bool = False,
    block_voxels: int = 64,
    block_classes: int = 64,
    voxel_splits: int | None = None,
) -> Tensor:
    """``chunked_dc_and_ce_loss`` by fused Triton kernels: logits Eᵀ·basis are tiles in registers only.

    block_voxels and block_classes (powers of two, at least 16) are the tile; voxel_splits how many
    partial per-class sums there are (default: enough programs for the GPU, 1 elsewhere).
    """
    for name, block in (("block_voxels", block_voxels), ("block_classes", block_classes)):
        if block < MIN_BLOCK or block & (block - 1):
            raise HeadzooError(
                f"{name} must be a power of two of at least {MIN_BLOCK} (tl.dot's smallest tile on a GPU), got {block}"
            )
    return TritonChunkedSoftmaxDiceCELoss.apply(
        basis,
        operator,
        target,
        batch_dice,
        do_bg,
        smooth,
        weight_ce,
        weight_dice,
        ignore_label,
        ddp,
        block_voxels,
        block_classes,
        voxel_splits,
    )
