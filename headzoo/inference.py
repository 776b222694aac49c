"""Sliding-window inference that averages the head's K-channel output and predicts once, and Dice
from counts (bincount of prediction and truth), never from a C-channel one-hot."""
from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

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
    """Per-class true positives and voxel counts, accumulated over volumes."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.true_positive = np.zeros(num_classes, np.int64)
        self.predicted = np.zeros(num_classes, np.int64)
        self.reference = np.zeros(num_classes, np.int64)

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        prediction, truth = prediction.ravel(), truth.ravel()
        c = self.num_classes
        self.true_positive += np.bincount(truth[prediction == truth], minlength=c)[:c]
        self.predicted += np.bincount(prediction, minlength=c)[:c]
        self.reference += np.bincount(truth[(truth >= 0) & (truth < c)], minlength=c)[:c]

    def per_class(self) -> np.ndarray:
        """Dice of each foreground class present in the reference (NaN where absent)."""
        present = self.reference > 0
        dice = np.full(self.num_classes, np.nan)
        dice[present] = 2 * self.true_positive[present] / (self.predicted[present] + self.reference[present])
        dice[0] = np.nan
        return dice

    def mean_foreground(self) -> float:
        dice = self.per_class()
        return float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")


def segment(network: nn.Module, head: Head, image: torch.Tensor, patch: tuple[int, ...]) -> np.ndarray:
    output = sliding_window_output(network, image, patch)
    return head.predict(output[None])[0].cpu().numpy()
