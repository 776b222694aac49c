"""Sliding-window inference that averages the head's K-channel output and predicts once, and Dice
from counts (bincount of prediction and truth), never from a C-channel one-hot."""
from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from headzoo.errors import ContractViolation, HeadzooError
from headzoo.head import Head


@torch.no_grad()
def sliding_window_output(network: nn.Module, image: torch.Tensor, patch: tuple[int, ...],
                          step_size: float = 0.5) -> torch.Tensor:
    """Gaussian-weighted average of the network output (K, *shape) over overlapping windows, as nnU-Net."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
    device = next(network.parameters()).device
    shape = tuple(image.shape[1:])
    gaussian = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, device=device)
    total, weight = None, torch.zeros(shape, device=device)
    for corner in itertools.product(*compute_steps_for_sliding_window(shape, patch, step_size)):
        window = tuple(slice(start, start + edge) for start, edge in zip(corner, patch))
        output = network(image[(slice(None), *window)][None].to(device))[0]
        if total is None:
            total = torch.zeros((output.shape[0], *shape), device=device)
        total[(slice(None), *window)] += output * gaussian
        weight[window] += gaussian
    return total / weight


class DiceCounter:
    """Per-class true positives and voxel counts accumulated over volumes, as nnU-Net's evaluation counts:
    ignore-label voxels are left out, and a class predicted where the reference lacks it scores Dice 0
    (a false positive); a class absent from both is not scored."""

    def __init__(self, num_classes: int, ignore_label: int | None = None):
        self.num_classes, self.ignore_label = num_classes, ignore_label
        self.true_positive = np.zeros(num_classes, np.int64)
        self.predicted = np.zeros(num_classes, np.int64)
        self.reference = np.zeros(num_classes, np.int64)

    def update(self, prediction: np.ndarray, truth: np.ndarray, case: str = "a test case", head: str = "the") -> None:
        prediction, truth = prediction.ravel(), truth.ravel()
        if self.ignore_label is not None:
            keep = truth != self.ignore_label
            prediction, truth = prediction[keep], truth[keep]
        c = self.num_classes
        if truth.size and (truth.min() < 0 or truth.max() >= c):
            bad = truth.min() if truth.min() < 0 else truth.max()
            raise HeadzooError(f"{case} has label {bad}, outside [0, {c}) for {c} classes")
        if prediction.size and (prediction.min() < 0 or prediction.max() >= c):
            bad = prediction.min() if prediction.min() < 0 else prediction.max()
            raise ContractViolation(f"{head} head predicted label {bad}, outside [0, {c})")
        self.true_positive += np.bincount(truth[prediction == truth], minlength=c)
        self.predicted += np.bincount(prediction, minlength=c)
        self.reference += np.bincount(truth, minlength=c)

    def per_class(self) -> np.ndarray:
        """Dice of each foreground class in the reference or the prediction (NaN where in neither)."""
        scored = (self.reference + self.predicted) > 0
        dice = np.full(self.num_classes, np.nan)
        dice[scored] = 2 * self.true_positive[scored] / (self.predicted[scored] + self.reference[scored])
        dice[0] = np.nan
        return dice

    def classes_scored(self) -> int:
        return int(np.isfinite(self.per_class()).sum())

    def mean_foreground(self) -> float | None:
        dice = self.per_class()
        return float(np.nanmean(dice)) if np.isfinite(dice).any() else None

    def worst_mean(self, fraction: float) -> float | None:
        """Mean Dice of the worst `fraction` of scored classes (at least one): what a mean over 1000 hides."""
        dice = np.sort(self.per_class()[np.isfinite(self.per_class())])
        return float(dice[:max(1, int(np.ceil(fraction * dice.size)))].mean()) if dice.size else None


def segment(network: nn.Module, head: Head, image: torch.Tensor, patch: tuple[int, ...]) -> np.ndarray:
    output = sliding_window_output(network, image, patch)
    return head.predict(output[None])[0].cpu().numpy()
