"""STU-Net (Huang et al., *STU-Net: Scalable and Transferable Medical Image Segmentation Models Empowered by
Large-Scale Supervised Pre-training*, arXiv 2304.06716, https://github.com/uni-medical/STU-Net), ported from the reference
``STUNet`` in uni-medical/STU-Net ``nnUNet-2.2/nnunetv2/training/nnUNetTrainer/STUNetTrainer.py``.

The reference builds the network inside a trainer whose ``build_network_architecture`` signature
only fits nnU-Net 2.2. Here it is a plain class whose constructor takes the keyword arguments an
nnU-Net ≥ 2.4 plan stores for a configuration (``architecture.arch_kwargs``), so nnU-Net's
``get_network_from_plans`` builds it from its dotted name ``headzoo.stunet.STUNet``.

Module and parameter names are the reference's (``conv_blocks_context``, ``upsample_layers``,
``conv_blocks_localization``, ``seg_outputs``; ``conv1``/``norm1``/``conv2``/``norm2``/``conv3`` in
each block), so STU-Net's published checkpoints load with ``load_state_dict``. Layer types are
constructor arguments as in dynamic_network_architectures; the defaults are the reference's
(Conv3d with bias, affine InstanceNorm3d, LeakyReLU(0.01)). Like the reference, the network keeps
PyTorch's default initialisation (no ``initialize`` hook).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


def _edges(value: int | Sequence[int], dims: int) -> list[int]:
    return [value] * dims if isinstance(value, int) else list(value)


class BasicResBlock(nn.Module):
    """conv-norm-act, conv-norm, plus the input (through a strided 1×1 conv where shape changes), act."""

    def __init__(
        self,
        input_channels: int,
        output_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int] | int = 1,
        use_1x1conv: bool = False,
        conv_op: type = nn.Conv3d,
        conv_bias: bool = True,
        norm_op: type = nn.InstanceNorm3d,
        norm_op_kwargs: dict | None = None,
        nonlin: type = nn.LeakyReLU,
        nonlin_kwargs: dict | None = None,
    ):
        super().__init__()
        padding = [k // 2 for k in kernel_size]
        norm_op_kwargs = norm_op_kwargs or {}
        nonlin_kwargs = nonlin_kwargs or {}
        self.conv1 = conv_op(
            input_channels, output_channels, kernel_size, stride=stride, padding=padding, bias=conv_bias
        )
        self.norm1 = norm_op(output_channels, **norm_op_kwargs)
        self.act1 = nonlin(**nonlin_kwargs)
        self.conv2 = conv_op(output_channels, output_channels, kernel_size, padding=padding, bias=conv_bias)
        self.norm2 = norm_op(output_channels, **norm_op_kwargs)
        self.act2 = nonlin(**nonlin_kwargs)
        # the reference always gives this conv a bias (nn.Conv3d's default)
        self.conv3 = conv_op(input_channels, output_channels, kernel_size=1, stride=stride) if use_1x1conv else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        if self.conv3 is not None:
            x = self.conv3(x)
        y += x
        return self.act2(y)


class UpsampleLayerNearest(nn.Module):
    """Weight-free nearest interpolation by the stage's stride, then a 1×1 conv to the skip's channels."""

    def __init__(self, input_channels: int, output_channels: int, scale: Sequence[int], conv_op: type = nn.Conv3d):
        super().__init__()
        self.conv = conv_op(input_channels, output_channels, kernel_size=1)
        self.scale = [float(s) for s in scale]

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest"))


class _DeepSupervisionSwitch(nn.Module):
    """Holds ``deep_supervision`` where nnU-Net's trainer toggles it (``network.decoder.deep_supervision``)."""

    def __init__(self, deep_supervision: bool):
        super().__init__()
        self.deep_supervision = deep_supervision


class STUNet(nn.Module):
    """STU-Net: residual encoder stages (downsampling in each stage's first block), nearest-upsampling decoder.

    ``strides`` follows nnU-Net's convention, one entry per stage (the first is usually 1); the
    reference takes the plan's pooling strides and pads them with 1s to five, so stages beyond the
    patch's downsampling budget keep their resolution and their weights.
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        n_stages: int = 6,
        features_per_stage: Sequence[int] = (32, 64, 128, 256, 512, 512),
        n_blocks_per_stage: Sequence[int] = (1, 1, 1, 1, 1, 1),
        kernel_sizes: Sequence[Sequence[int]] | None = None,
        strides: Sequence[Sequence[int]] | None = None,
        conv_op: type = nn.Conv3d,
        conv_bias: bool = True,
        norm_op: type = nn.InstanceNorm3d,
        norm_op_kwargs: dict | None = None,
        nonlin: type = nn.LeakyReLU,
        nonlin_kwargs: dict | None = None,
        deep_supervision: bool = False,
    ):
        super().__init__()
        dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[conv_op]
        kernel_sizes = [_edges(k, dims) for k in (kernel_sizes or [3] * n_stages)]
        strides = [_edges(s, dims) for s in (strides or [1] + [2] * (n_stages - 1))]
        if not len(features_per_stage) == len(n_blocks_per_stage) == len(kernel_sizes) == len(strides) == n_stages:
            raise ValueError(
                f"STUNet: features_per_stage, n_blocks_per_stage, kernel_sizes and strides need "
                f"{n_stages} entries each (n_stages)"
            )
        layers = {
            "conv_op": conv_op,
            "conv_bias": conv_bias,
            "norm_op": norm_op,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True} if norm_op_kwargs is None else norm_op_kwargs,
            "nonlin": nonlin,
            "nonlin_kwargs": {"inplace": True} if nonlin_kwargs is None else nonlin_kwargs,
        }
        self.input_channels, self.num_classes = input_channels, num_classes
        self.strides = strides
        self.decoder = _DeepSupervisionSwitch(deep_supervision)

        def stage(in_channels: int, d: int, stride: Sequence[int]) -> nn.Sequential:
            return nn.Sequential(
                BasicResBlock(in_channels, features_per_stage[d], kernel_sizes[d], stride, use_1x1conv=True, **layers),
                *[
                    BasicResBlock(features_per_stage[d], features_per_stage[d], kernel_sizes[d], **layers)
                    for _ in range(n_blocks_per_stage[d] - 1)
                ],
            )

        self.conv_blocks_context = nn.ModuleList(
            [stage(input_channels if d == 0 else features_per_stage[d - 1], d, strides[d]) for d in range(n_stages)]
        )
        # decoder stage u works at encoder stage d = n_stages - 2 - u
        decoder_stages = range(n_stages - 2, -1, -1)
        self.upsample_layers = nn.ModuleList(
            [
                UpsampleLayerNearest(features_per_stage[d + 1], features_per_stage[d], strides[d + 1], conv_op)
                for d in decoder_stages
            ]
        )
        self.conv_blocks_localization = nn.ModuleList(
            [stage(2 * features_per_stage[d], d, [1] * dims) for d in decoder_stages]
        )
        self.seg_outputs = nn.ModuleList(
            [conv_op(features_per_stage[d], num_classes, kernel_size=1) for d in decoder_stages]
        )

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        skips = []
        for block in self.conv_blocks_context[:-1]:
            x = block(x)
            skips.append(x)
        x = self.conv_blocks_context[-1](x)
        outputs = []
        for u, (upsample, block) in enumerate(zip(self.upsample_layers, self.conv_blocks_localization)):
            x = block(torch.cat((upsample(x), skips[-(u + 1)]), dim=1))
            if self.decoder.deep_supervision or u == len(self.conv_blocks_localization) - 1:
                outputs.append(self.seg_outputs[u](x))
        # nnU-Net ≥ 2.4's order: full resolution first
        return outputs[::-1] if self.decoder.deep_supervision else outputs[-1]
