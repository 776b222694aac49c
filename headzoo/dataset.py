"""A prepared dataset as a run reads it: the frozen plan (one configuration per backbone), the training cases
nnU-Net preprocessed, and the held-out cases with what exporting a prediction to their geometry needs.

``headzoo.plan`` makes it (plans, freezes, preprocesses, caches); ``headzoo.loaders`` turns its training cases
into batches; ``training.train_and_evaluate`` takes those batches and a ``HeldOutSet``.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from headzoo.backbone import build_network
from headzoo.errors import HeadzooError
from headzoo.paths import cache_root, nnunet_preprocessed, nnunet_raw

PLANS_NAME = "headzooPlans"
DATA_CONFIGURATION = "3d_fullres"  # nnU-Net's configuration that preprocesses the data every backbone trains on


def configuration_name(backbone: str) -> str:
    return f"headzoo_{backbone}"


@contextlib.contextmanager
def nnunet_log():
    """nnU-Net prints its progress to stdout; keep it in the cache's log instead."""
    with open(cache_root() / "nnunet.log", "a") as log, contextlib.redirect_stdout(log):
        yield


@dataclass(frozen=True)
class PreparedDataset:
    name: str
    plans: dict
    dataset_json: dict
    fingerprint: str | None = None  # a --dataset folder's content fingerprint (plan.folder_fingerprint); None: the toy

    @property
    def raw(self) -> Path:
        return nnunet_raw() / self.name

    @property
    def preprocessed(self) -> Path:
        return nnunet_preprocessed() / self.name

    # built once per dataset: the training loop asks for them every step (annotated masks)
    @functools.cached_property
    def num_classes(self) -> int:
        return len(self.label_manager.foreground_labels) + 1

    @functools.cached_property
    def plans_manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(self.plans)

    @functools.cached_property
    def label_manager(self):
        return self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def plans_file(self) -> Path:
        return self.preprocessed / f"{PLANS_NAME}.json"

    def configuration(self, backbone: str):
        """nnU-Net's ConfigurationManager for the frozen plan's configuration of `backbone`."""
        name = configuration_name(backbone)
        if name not in self.plans["configurations"]:
            raise HeadzooError(f"{self.plans_file} has no configuration '{name}' for the '{backbone}' backbone")
        return self.plans_manager.get_configuration(name)

    def architecture(self, backbone: str) -> dict:
        """The plan's architecture for `backbone`, in nnU-Net's plans format (class name + kwargs)."""
        configuration = self.configuration(backbone)
        return {
            "network_class_name": configuration.network_arch_class_name,
            "arch_kwargs": configuration.network_arch_init_kwargs,
            "_kw_requires_import": configuration.network_arch_init_kwargs_req_import,
        }

    def patch_size(self, backbone: str) -> tuple[int, ...]:
        """The default patch: the plan's configuration for `backbone`."""
        return tuple(self.configuration(backbone).patch_size)

    def _shapes(self) -> dict[str, list[int]]:
        """Training case → shape after preprocessing (written by the preprocessing step)."""
        return json.loads((self.preprocessed / "shapes.json").read_text())

    def volume_shape(self) -> tuple[int, ...]:
        """The smallest training volume's shape after preprocessing."""
        return tuple(int(s) for s in np.min(np.array(list(self._shapes().values())), axis=0))

    @property
    def partial(self) -> bool:
        """Whether training cases come from sources that each annotate a subset of the classes."""
        return self.dataset_json.get("headzoo", {}).get("sources", 1) > 1

    def annotated_mask(self, keys) -> torch.Tensor:
        """(b, C) bool: the classes annotated in each case (background always)."""
        info = self.dataset_json["headzoo"]
        mask = torch.zeros(len(keys), self.num_classes, dtype=torch.bool)
        mask[:, 0] = True
        for row, key in enumerate(keys):
            mask[row, info["source_classes"][info["case_sources"][str(key)]]] = True
        return mask

    def sampling_probabilities(self) -> np.ndarray | None:
        """MultiTalent's sampling: each case ∝ 1/√n of its source dataset's size (None: uniform)."""
        if not self.partial:
            return None
        sources = self.dataset_json["headzoo"]["case_sources"]
        sizes = np.bincount(list(sources.values()))
        weights = np.array([1 / np.sqrt(sizes[sources[k]]) for k in self.train_identifiers()])
        return weights / weights.sum()

    def train_identifiers(self) -> list[str]:
        return sorted(self._shapes())


def build_backbone_from_plan(prepared: PreparedDataset, backbone: str, seed: int) -> tuple[nn.Module, int]:
    """The backbone as the frozen plan's configuration describes it, built by nnU-Net's
    get_network_from_plans: (network with the head's seam, feature count). Editing the plan changes it."""
    return build_network(prepared.architecture(backbone), len(prepared.dataset_json["channel_names"]), seed)


class HeldOutCase(NamedTuple):
    key: str
    image: torch.Tensor  # (c, *shape) preprocessed as nnU-Net's predictor preprocesses
    properties: dict  # nnU-Net's properties: crop box, spacing, shapes (for the export)
    reference: np.ndarray  # the raw label file as nnU-Net's reader returns it (original geometry)


def _test_label_files(prepared: PreparedDataset) -> list[Path]:
    return sorted((prepared.raw / "labelsTs").glob(f"*{prepared.dataset_json['file_ending']}"))


def test_cases(prepared: PreparedDataset) -> Iterator[HeldOutCase]:
    """Held-out cases: the images preprocessed by nnU-Net as its predictor does, the raw reference labels
    (never the preprocessed ones, where nnU-Net's crop marks background outside the body as -1)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    ending = prepared.dataset_json["file_ending"]
    preprocessor = DefaultPreprocessor(verbose=False)
    configuration = prepared.plans_manager.get_configuration(DATA_CONFIGURATION)
    reader = prepared.plans_manager.image_reader_writer_class()
    for label_file in _test_label_files(prepared):
        key = label_file.name[: -len(ending)]
        images = sorted(str(p) for p in (prepared.raw / "imagesTs").glob(f"{key}_[0-9][0-9][0-9][0-9]{ending}"))
        with nnunet_log():
            data, _, properties = preprocessor.run_case(
                images, None, prepared.plans_manager, configuration, prepared.dataset_json
            )
        reference, _ = reader.read_seg(str(label_file))
        yield HeldOutCase(key, torch.from_numpy(data).float(), properties, reference[0].astype(np.int64))


@dataclass(frozen=True)
class _PreprocessedOnEachPass:
    """A prepared dataset's held-out cases, preprocessed anew on each pass (one case in memory at a time)."""

    prepared: PreparedDataset

    def __len__(self) -> int:
        return len(_test_label_files(self.prepared))

    def __iter__(self) -> Iterator[HeldOutCase]:
        return test_cases(self.prepared)


@dataclass(frozen=True)
class HeldOutSet:
    """What held-out Dice reads: the cases (sized, iterated once per evaluation) and what nnU-Net's export of a
    prediction to their original geometry needs (the plan, its data configuration, dataset.json)."""

    cases: Collection[HeldOutCase]
    plans_manager: Any  # nnU-Net's PlansManager
    configuration: Any  # nnU-Net's ConfigurationManager the cases were preprocessed with
    dataset_json: dict

    @property
    def ignore_label(self) -> int | None:
        return self.plans_manager.get_label_manager(self.dataset_json).ignore_label

    @classmethod
    def of(cls, prepared: PreparedDataset) -> HeldOutSet:
        """The prepared dataset's test cases (imagesTs, labelsTs), preprocessed as nnU-Net's predictor does."""
        return cls(
            _PreprocessedOnEachPass(prepared),
            prepared.plans_manager,
            prepared.plans_manager.get_configuration(DATA_CONFIGURATION),
            prepared.dataset_json,
        )
