"""The head contract every head, built-in or plug-in, implements (see DESIGN.md)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from headzoo.errors import HeadzooError

#: Loss options the runner always passes to a head's constructor, taken from the nnU-Net plan unless the
#: user sets them with --option: ``batch_dice`` (the plan configuration's) and ``ignore_label`` (the dataset's).
#: Every head accepts both (the base class stores them); the defaults are nnU-Net's 3d_fullres ones.
PLAN_OPTIONS = ("batch_dice", "ignore_label")


class Head(nn.Module):
    """A segmentation head on backbone features of shape (b, in_channels, *spatial).

    Subclasses implement ``forward`` (output with K <= C channels), ``loss``, ``predict`` and
    ``logits``. The first line of the class docstring is the description ``headzoo heads`` shows.
    """

    #: whether ``loss`` uses the per-sample annotated-class mask (partially labelled data)
    accepts_annotated: bool = False

    #: option sets the conformance suite runs besides the defaults, e.g. ``({"rank": 4},)``; plug-ins add theirs
    variants: tuple[dict, ...] = ()

    def __init__(self, in_channels: int, num_classes: int, batch_dice: bool = False,
                 ignore_label: int | None = None):
        super().__init__()
        if num_classes < 2:
            raise HeadzooError(f"num_classes must be at least 2 (background and one class), got {num_classes}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.batch_dice = batch_dice
        self.ignore_label = ignore_label

    def forward(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, output: Tensor, target: Tensor, annotated: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def predict(self, output: Tensor) -> Tensor:
        raise NotImplementedError

    def logits(self, output: Tensor, classes: slice) -> Tensor:
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict] | None:
        """Optional hook: the optimizer parameter groups for this head's parameters.

        Return ``None`` (the default) to train every parameter with the runner's settings.
        A group is a dict as ``torch.optim`` takes it (``params`` plus any overrides).
        """
        return None

    def check_target(self, output: Tensor, target: Tensor, annotated: Tensor | None = None) -> None:
        """Reject targets that do not fit the contract, with one clear line."""
        ignore_label = self.ignore_label
        if target.ndim != output.ndim or target.shape[1] != 1 or target.shape[0] != output.shape[0] \
                or target.shape[2:] != output.shape[2:]:
            raise HeadzooError(f"target must have shape {(output.shape[0], 1, *output.shape[2:])}, "
                               f"got {tuple(target.shape)}")
        if target.dtype.is_floating_point and not torch.equal(target, target.round()):
            raise HeadzooError("target must hold integer labels")
        low, high = int(target.min()), int(target.max())
        valid = (0 <= low) and (high < self.num_classes or (ignore_label is not None and high == ignore_label))
        if not valid:
            bad = low if low < 0 else high
            raise HeadzooError(f"label {bad} is outside [0, {self.num_classes}) "
                               f"for a head with {self.num_classes} classes")
        if annotated is not None:
            if not self.accepts_annotated:
                raise HeadzooError(f"the {type(self).__name__} head cannot use partial labels (annotated=...); "
                                   "use a head that supports them, e.g. 'sigmoid'")
            if annotated.shape != (output.shape[0], self.num_classes) or annotated.dtype != torch.bool:
                raise HeadzooError(f"annotated must be a bool tensor of shape {(output.shape[0], self.num_classes)}")
