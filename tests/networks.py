"""A network for tests that need one without a backbone's cost: a conv, then the head where headzoo attaches every
head (``decoder.seg_layers[-1]``, as in dynamic_network_architectures' UNet), so ``backbone.attach_head`` and
``backbone.head_of`` treat it as they treat nnU-Net's networks."""

from __future__ import annotations

from torch import Tensor, nn

from headzoo.backbone import attach_head
from headzoo.head import Head


class ConvThenHead(nn.Module):
    def __init__(self, conv: nn.Module, head: Head):
        super().__init__()
        self.conv = conv
        self.decoder = nn.Module()
        self.decoder.seg_layers = nn.ModuleList([nn.Identity()])
        attach_head(self, head)

    def forward(self, image: Tensor) -> Tensor:
        return self.decoder.seg_layers[-1](self.conv(image))
