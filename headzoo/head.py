"""The head contract every head, built-in or plug-in, implements: the README's "Writing a head (plug-ins)" states
it, tests/contract.py checks it and tests/test_conformance.py runs those checks over every registered head."""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing

import torch
from torch import Tensor, nn

from headzoo.errors import HeadzooError

#: Constructor arguments the runner passes (the backbone's feature count, the dataset's classes), never options.
NOT_OPTIONS = ("in_channels", "num_classes")

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

    def __init__(self, in_channels: int, num_classes: int, batch_dice: bool = False, ignore_label: int | None = None):
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

    def configure_optimizer(self, lr: float, betas: tuple[float, float], weight_decay: float) -> list[dict] | None:
        """Optional hook: optimizer parameter groups for this head's parameters, given the run's shared
        settings (learning rate, Adam betas, weight decay; headzoo.training).

        Return ``None`` (the default) to train every parameter with the shared settings. A group is a dict
        as ``torch.optim`` takes it (``params`` plus any overrides) and states its ``weight_decay``: pass
        `weight_decay` on, or 0.0 for a no-decay group. Parameters in no group get the shared settings.
        """
        return None

    def resolved_options(self, device: torch.device) -> dict:
        """Optional hook: options whose value is only decided on the run's device (knn's ``knn_backend=auto``
        → faiss or torch); the record's ``options_resolved`` shows what ran. Default: none."""
        return {}

    def external_memory_bytes(self) -> int:
        """Optional hook: device memory the head holds outside torch's allocator (e.g. a FAISS GPU index and its
        temporary pool), which the allocator's peak cannot see; the record adds it beside the peak. Default 0."""
        return 0

    def check_target(self, output: Tensor, target: Tensor, annotated: Tensor | None = None) -> None:
        """Reject targets that do not fit the contract, with one clear line. Shapes always; label values only
        for host tensors (`check_labels`): the training step checks its batch on the host before it reaches
        the device, so a loss on the device never waits for the device to read a value back."""
        if (
            target.ndim != output.ndim
            or target.shape[1] != 1
            or target.shape[0] != output.shape[0]
            or target.shape[2:] != output.shape[2:]
        ):
            raise HeadzooError(
                f"target must have shape {(output.shape[0], 1, *output.shape[2:])}, got {tuple(target.shape)}"
            )
        if target.device.type == "cpu":
            self.check_labels(target)
        if annotated is not None:
            if not self.accepts_annotated:
                raise HeadzooError(
                    f"the {type(self).__name__} head cannot use partial labels (annotated=...); "
                    "use a head that supports them, e.g. 'sigmoid'"
                )
            if annotated.shape != (output.shape[0], self.num_classes) or annotated.dtype != torch.bool:
                raise HeadzooError(f"annotated must be a bool tensor of shape {(output.shape[0], self.num_classes)}")

    def check_labels(self, target: Tensor) -> None:
        """Integer labels in [0, C), or the ignore label. Reads the values: call it on host tensors. Fake tensors
        (`headzoo estimate`) have no values and pass."""
        if is_fake(target):
            return
        if target.dtype.is_floating_point and not torch.equal(target, target.round()):
            raise HeadzooError("target must hold integer labels")
        low, high = int(target.min()), int(target.max())
        ignore_label = self.ignore_label
        if low < 0 or not (high < self.num_classes or (ignore_label is not None and high == ignore_label)):
            bad = low if low < 0 else high
            raise HeadzooError(
                f"label {bad} is outside [0, {self.num_classes}) for a head with {self.num_classes} classes"
            )


def is_fake(tensor: Tensor) -> bool:
    """Whether `tensor` has shapes but no values (torch's FakeTensor, as `headzoo estimate` runs heads on)."""
    from torch._subclasses.fake_tensor import is_fake as torch_is_fake

    return torch_is_fake(tensor)


def check_option(name: str, value, valid: bool, expected: str) -> None:
    """A head constructor's range check: one line naming the option, what it must be and what it got."""
    if not valid:
        raise HeadzooError(f"{name} must be {expected}, got {value!r}")


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", type(None): "null"}


def _accepts(value, allowed: tuple) -> bool:
    """Whether `value` (a JSON value) is one of the `allowed` types (an int is a float; a bool is neither)."""
    if value is None or isinstance(value, bool):
        return type(value) in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return isinstance(value, float) and float in allowed or isinstance(value, str) and str in allowed


def check_head_options(name: str, cls: type[Head], options: dict) -> None:
    """One line for an option the head does not take or a value its constructor's annotation does not allow
    (bool, int, float, str, None); a NaN or infinity is never an option. Ranges are the constructor's to check."""
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    named = [
        k
        for k, p in parameters.items()
        if k != "self" and k not in NOT_OPTIONS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not evaluate: the constructor checks its own values
        hints = {}
    for key, value in options.items():
        if key in NOT_OPTIONS:
            raise HeadzooError(
                f"head '{name}' rejected its options {options}: {key} is set by the run "
                "(the backbone's features, the dataset's classes), not an option"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise HeadzooError(f"head '{name}' rejected its options {options}: {key}={value} is not a finite number")
        if key not in named:
            if takes_any:
                continue
            close = difflib.get_close_matches(key, named, n=1)
            suggestion = f"did you mean '{close[0]}'? " if close else ""
            raise HeadzooError(
                f"head '{name}' rejected its options {options}: no option '{key}' "
                f"({suggestion}its options: {', '.join(named)})"
            )
        hint = hints.get(key)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        allowed = typing.get_args(hint) if union else (hint,)
        if all(a in _TYPE_WORDS for a in allowed) and not _accepts(value, allowed):
            words = " or ".join(_TYPE_WORDS[a] for a in allowed)
            raise HeadzooError(f"head '{name}' rejected its options {options}: {key} must be {words}, got {value!r}")
