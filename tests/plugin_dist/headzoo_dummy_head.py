"""A plug-in head as a third party would write one: 1×1×1 conv to C logits, plain cross-entropy.

With HEADZOO_DUMMY_HEAD_FAILS set, its loss raises: the sweep's tests use it for an error that only training
can find (everything a request can get wrong is refused before a cell starts)."""

import os

import torch.nn.functional as F
from torch import nn

from headzoo import Head


class DummyHead(Head):
    """Plug-in example: C logits, cross-entropy only."""

    def __init__(self, in_channels, num_classes, **plan_options):
        super().__init__(in_channels, num_classes, **plan_options)
        self.conv = nn.Conv3d(in_channels, num_classes, 1)

    def forward(self, features):
        return self.conv(features)

    def loss(self, output, target, annotated=None):
        self.check_target(output, target, annotated)
        if os.environ.get("HEADZOO_DUMMY_HEAD_FAILS"):
            raise RuntimeError("the dummy head failed on purpose (HEADZOO_DUMMY_HEAD_FAILS)")
        return F.cross_entropy(output, target[:, 0].long())

    def predict(self, output):
        return output.argmax(1)

    def logits(self, output, classes):
        return output[:, classes]
