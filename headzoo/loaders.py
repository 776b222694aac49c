"""Training batches of a prepared dataset: nnU-Net's ``nnUNetDataLoader`` with nnU-Net's training transforms
(no mirroring, as the paper), each batch with the classes its cases annotate."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from headzoo.dataset import DATA_CONFIGURATION, PreparedDataset


def training_loader(prepared: PreparedDataset, patch: tuple[int, ...], batch: int, seed: int):
    """nnU-Net's data loader with nnU-Net's training transforms, built as nnUNetTrainer builds them."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    folder = str(prepared.preprocessed / prepared.plans_manager.get_configuration(DATA_CONFIGURATION).data_identifier)
    dataset = infer_dataset_class(folder)(folder, prepared.train_identifiers())
    rotation = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)  # nnU-Net's 3D default
    initial_patch = get_patch_size(patch, rotation, rotation, rotation, (0.85, 1.25))
    transforms = nnUNetTrainer.get_training_transforms(
        patch,
        rotation,
        None,
        None,
        False,  # no deep supervision, no mirroring (as the paper), no dummy 2D
        ignore_label=prepared.label_manager.ignore_label,
    )
    np.random.seed(seed)
    torch.manual_seed(seed)
    loader = nnUNetDataLoader(
        dataset,
        batch,
        initial_patch,
        patch,
        prepared.label_manager,
        oversample_foreground_percent=0.33,
        sampling_probabilities=prepared.sampling_probabilities(),
        transforms=transforms,
    )
    loader.rs = np.random.RandomState(seed)
    return loader


def training_batches(prepared: PreparedDataset, patch: tuple[int, ...], batch: int, seed: int) -> Iterator[dict]:
    """Endless batches for ``training.train_and_evaluate``: nnU-Net's ``data`` and ``target`` (and ``keys``), and
    ``annotated``, the (b, C) classes each case annotates where sources annotate subsets (None: all). The loader
    is built, and seeded, now; each batch is made when asked for."""
    loader = training_loader(prepared, patch, batch, seed)

    def annotate(batch: dict) -> dict:
        batch["annotated"] = prepared.annotated_mask(batch["keys"]) if prepared.partial else None
        return batch

    return map(annotate, loader)
