"""Sliding-window inference that averages the head's K-channel output and predicts once, exported to the
original geometry as nnU-Net exports; Dice per case and class as nnU-Net's evaluation computes it, from counts
(bincount of prediction and truth), never from a C-channel one-hot."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from headzoo.errors import ContractViolation, HeadzooError
from headzoo.head import Head


@torch.no_grad()
def sliding_window_output(
    network: nn.Module, image: torch.Tensor, patch: tuple[int, ...], step_size: float = 0.5
) -> torch.Tensor:
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


def class_counts(
    prediction: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_label: int | None = None
) -> np.ndarray:
    """(3, C) per-class true positives, false positives and false negatives of two label maps (bincounts, on
    the maps' device, never a C-channel one-hot); voxels whose target is `ignore_label` left out."""
    if ignore_label is not None:
        keep = target != ignore_label
        prediction, target = prediction[keep], target[keep]
    prediction, target = prediction.reshape(-1), target.reshape(-1)
    true_positive = torch.bincount(target[prediction == target], minlength=num_classes)[:num_classes]
    predicted = torch.bincount(prediction, minlength=num_classes)[:num_classes]
    reference = torch.bincount(target, minlength=num_classes)[:num_classes]
    return torch.stack([true_positive, predicted - true_positive, reference - true_positive]).cpu().numpy()


class DiceCounter:
    """Dice as nnU-Net's evaluation (``nnunetv2.evaluation.evaluate_predictions``) computes it, from per-case,
    per-class counts (bincounts of prediction and reference, never a C-channel one-hot).

    Per test case and foreground class: Dice = 2·TP / (2·TP + FP + FN) with ignore-label voxels left out;
    a class in neither the reference nor the prediction of a case is not scored there (NaN), a class
    predicted where the reference lacks it scores 0 (a false positive speck counts as much as a missed
    organ). A class's Dice is its mean over the cases that score it; ``mean_foreground`` is the mean over
    classes, nnU-Net's ``foreground_mean`` (which is NaN as soon as one label is scored in no case: here
    such a class is left out instead). ``pooled_mean`` sums the counts over all cases first (headzoo's Dice
    before schema 3), which hides false positives in cases that lack the class.
    """

    def __init__(self, num_classes: int, ignore_label: int | None = None):
        self.num_classes, self.ignore_label = num_classes, ignore_label
        self.cases: list[str] = []
        self._counts: list[np.ndarray] = []  # per case: (3, C) true positives, false positives, false negatives

    def update(self, prediction: np.ndarray, truth: np.ndarray, case: str = "a test case", head: str = "the") -> None:
        prediction, truth = np.asarray(prediction).ravel(), np.asarray(truth).ravel()
        if prediction.shape != truth.shape:
            raise ContractViolation(
                f"{head} head's prediction of {case} has {prediction.size} voxels, the reference {truth.size}"
            )
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
        self._counts.append(
            class_counts(
                torch.from_numpy(prediction.astype(np.int64, copy=False)),
                torch.from_numpy(truth.astype(np.int64, copy=False)),
                c,
            )
        )
        self.cases.append(case)

    @staticmethod
    def _dice(counts: np.ndarray) -> np.ndarray:
        """Dice from (3, ...) counts; NaN where a class has no TP, FP or FN."""
        true_positive, false_positive, false_negative = counts.astype(np.float64)
        denominator = 2 * true_positive + false_positive + false_negative
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, 2 * true_positive / denominator, np.nan)

    def per_case(self) -> np.ndarray:
        """(cases, C) Dice of each case and class; NaN where not scored (and for the background, column 0)."""
        dice = self._dice(np.stack(self._counts, axis=1)) if self._counts else np.empty((0, self.num_classes))
        dice[:, 0] = np.nan
        return dice

    def per_class(self) -> np.ndarray:
        """Each class's mean Dice over the cases that score it (nnU-Net's ``mean``); NaN where none does."""
        dice = self.per_case()
        scored = np.isfinite(dice).sum(axis=0)
        with np.errstate(invalid="ignore"):
            return np.where(scored > 0, np.nansum(dice, axis=0) / np.maximum(scored, 1), np.nan)

    def pooled_per_class(self) -> np.ndarray:
        """Dice of each class from counts summed over all cases (TP, FP, FN pooled); NaN where not scored."""
        dice = self._dice(sum(self._counts)) if self._counts else np.full(self.num_classes, np.nan)
        dice[0] = np.nan
        return dice

    def classes_scored(self) -> int:
        return int(np.isfinite(self.per_class()).sum())

    def mean_foreground(self) -> float | None:
        """nnU-Net's ``foreground_mean``: the mean over scored foreground classes of their per-case mean."""
        return _mean(self.per_class())

    def pooled_mean(self) -> float | None:
        return _mean(self.pooled_per_class())

    def worst_mean(self, fraction: float) -> float | None:
        """Mean Dice of the worst `fraction` of scored classes (at least one): what a mean over 1000 hides."""
        dice = self.per_class()
        dice = np.sort(dice[np.isfinite(dice)])
        return float(dice[: max(1, int(np.ceil(fraction * dice.size)))].mean()) if dice.size else None


def _mean(dice: np.ndarray) -> float | None:
    return float(np.nanmean(dice)) if np.isfinite(dice).any() else None


def segment(
    network: nn.Module,
    head: Head,
    image: torch.Tensor,
    patch: tuple[int, ...],
    properties: dict,
    plans_manager,
    configuration_manager,
    dataset_json: dict,
) -> np.ndarray:
    """A preprocessed case's label map in its original geometry: the head's K channels averaged over sliding
    windows, exported as nnU-Net exports logits (resampled, cropping reverted, axes transposed back), the head
    predicting once at the end."""
    from headzoo.nnunet.predictor import segmentation_in_original_geometry

    output = sliding_window_output(network, image, patch).cpu()
    return segmentation_in_original_geometry(
        output, properties, configuration_manager, plans_manager, dataset_json, head, threads=torch.get_num_threads()
    )
