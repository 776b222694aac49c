"""One data pipeline for every head, through nnU-Net itself.

nnU-Net's fingerprint and ResEnc planner run once per dataset; the plan is then **frozen**: every
C-dependent choice (patch, batch, topology) is replaced by headzoo's fixed values, one configuration
per backbone, so every head and class count trains on the same plan. The plan is the truth: runs build
the network and take the default patch from their backbone's configuration (edit the JSON to change
them). nnU-Net's preprocessor writes
the training cases; nnU-Net's ``nnUNetDataLoader`` and training transforms (no mirroring, as the
paper) make the batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import NamedTuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headzoo.backbone import BACKBONES, build_network
from headzoo.errors import HeadzooError
from headzoo.locking import file_lock
from headzoo.paths import cache_root, nnunet_preprocessed, nnunet_raw
from headzoo.progress import progress_bar
from headzoo.toy import get_preset, write_toy_dataset
from headzoo.validation import verify_raw_dataset

PLANS_NAME = "headzooPlans"
READY_MARKER = "headzoo_ready.json"
DATA_CONFIGURATION = "3d_fullres"
NUM_PROCESSES = 2
# nnU-Net samples 10⁸ foreground voxels per channel for its intensity statistics, with replacement: 13–16 GiB
# of peak RSS for the 16-channel protocol toy. Where no channel is normalised as CT nothing reads them, so
# such datasets sample 10⁵ (only those unused statistics in the fingerprint and plans change).
UNUSED_INTENSITY_SAMPLES = 10**5


def configuration_name(backbone: str) -> str:
    return f"headzoo_{backbone}"


@dataclass(frozen=True)
class PreparedDataset:
    name: str
    plans: dict
    dataset_json: dict
    fingerprint: str | None = None  # a --dataset folder's content fingerprint (folder_fingerprint); None: the toy

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
        return {"network_class_name": configuration.network_arch_class_name,
                "arch_kwargs": configuration.network_arch_init_kwargs,
                "_kw_requires_import": configuration.network_arch_init_kwargs_req_import}

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


def _dataset_id(key: str) -> int:
    return 10000 + int(hashlib.sha1(key.encode()).hexdigest(), 16) % 90000


def _lock(name: str):
    """Serialise preparation of one dataset across processes (a sweep runs cells side by side)."""
    return file_lock(cache_root() / "locks" / f"{name}.lock")


def backbone_configurations() -> dict[str, dict]:
    """One plan configuration per backbone: its architecture, default patch and batch."""
    return {configuration_name(backbone): {"inherits_from": DATA_CONFIGURATION, "patch_size": [patch] * 3,
                                           "batch_size": 2, "architecture": architecture}
            for backbone, (architecture, patch) in BACKBONES.items()}


def frozen_plans(plans: dict) -> dict:
    """nnU-Net's plan with every C-dependent choice replaced by headzoo's fixed values."""
    configurations = {DATA_CONFIGURATION: plans["configurations"][DATA_CONFIGURATION], **backbone_configurations()}
    return {**plans, "plans_name": PLANS_NAME, "configurations": configurations}


def build_backbone_from_plan(prepared: PreparedDataset, backbone: str, seed: int) -> tuple[nn.Module, int]:
    """The backbone as the frozen plan's configuration describes it, built by nnU-Net's
    get_network_from_plans: (network with the head's seam, feature count). Editing the plan changes it."""
    return build_network(prepared.architecture(backbone), len(prepared.dataset_json["channel_names"]), seed)


@contextlib.contextmanager
def _environment(**values: str):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quietly():
    """nnU-Net prints its progress to stdout; keep it in the cache's log instead."""
    with open(cache_root() / "nnunet.log", "a") as log, contextlib.redirect_stdout(log):
        yield


def _reads_intensity_statistics(dataset_json: dict) -> bool:
    """Whether a channel is normalised as CT, the only normalisation that reads the fingerprint's intensities."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme
    return any(get_normalization_scheme(channel) is CTNormalization for channel in dataset_json["channel_names"].values())


def _plan_and_preprocess(name: str) -> None:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import \
        nnUNetPlannerResEncM
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    out = nnunet_preprocessed() / name
    shutil.rmtree(out, ignore_errors=True)
    with _quietly():
        extractor = DatasetFingerprintExtractor(name, NUM_PROCESSES)
        extractor.show_progress_bar = False
        if not _reads_intensity_statistics(extractor.dataset_json):
            extractor.num_foreground_voxels_for_intensitystats = UNUSED_INTENSITY_SAMPLES
        extractor.run()
        planner = nnUNetPlannerResEncM(name)
        with _environment(nnUNet_n_proc_DA=str(NUM_PROCESSES)):  # the planner sets torch's threads from it
            planner.plan_experiment()
    plans = json.loads((out / f"{planner.plans_identifier}.json").read_text())
    plans = frozen_plans(plans)
    (out / f"{PLANS_NAME}.json").write_text(json.dumps(plans, indent=1))
    shutil.copy(nnunet_raw() / name / "dataset.json", out / "dataset.json")

    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration(DATA_CONFIGURATION)
    dataset_json = json.loads((out / "dataset.json").read_text())
    cases = get_filenames_of_train_images_and_targets(str(nnunet_raw() / name), dataset_json)
    target = out / configuration.data_identifier
    target.mkdir(parents=True, exist_ok=True)
    preprocessor = DefaultPreprocessor(verbose=False)
    shapes = {}
    with progress_bar() as bar, _quietly():
        task = bar.add_task("nnU-Net preprocessing", total=len(cases))
        for key, files in cases.items():
            preprocessor.run_case_save(str(target / key), files["images"], files["label"], plans_manager,
                                       configuration, dataset_json)
            shapes[key] = list(_load_case(target, key)[0].shape[1:])
            bar.advance(task)
    (out / "shapes.json").write_text(json.dumps(shapes))
    (out / READY_MARKER).write_text(json.dumps({"cases": len(cases)}))


def _load_case(folder: Path, key: str):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    return infer_dataset_class(str(folder))(str(folder), [key]).load_case(key)


def _load_prepared(name: str) -> PreparedDataset:
    out = nnunet_preprocessed() / name
    return PreparedDataset(name, json.loads((out / f"{PLANS_NAME}.json").read_text()),
                           json.loads((out / "dataset.json").read_text()))


def _add_new_backbones(name: str) -> None:
    """A plan frozen before a backbone joined the table gains its configuration; existing ones
    (possibly edited by the user) are left as they are."""
    path = nnunet_preprocessed() / name / f"{PLANS_NAME}.json"
    plans = json.loads(path.read_text())
    missing = {k: v for k, v in backbone_configurations().items() if k not in plans["configurations"]}
    if missing:
        plans["configurations"].update(missing)
        path.write_text(json.dumps(plans, indent=1))


def _ensure_preprocessed(name: str) -> PreparedDataset:
    if not (nnunet_preprocessed() / name / READY_MARKER).is_file():
        _plan_and_preprocess(name)
    _add_new_backbones(name)
    return _load_prepared(name)


def prepare_toy(preset: str, classes: int, seed: int, sources: int = 1) -> PreparedDataset:
    """The toy dataset for (preset, classes, seed, sources), generated and preprocessed once, then cached."""
    layout = hashlib.sha1(repr(get_preset(preset)).encode()).hexdigest()[:8]  # a changed preset is a new dataset
    partial = f"-p{sources}" if sources > 1 else ""
    key = f"toy-{preset}-{layout}-C{classes}-s{seed}{partial}"
    name = f"Dataset{_dataset_id(key)}_HeadzooToy_{preset}_C{classes}_s{seed}{partial.replace('-', '_')}"
    with _lock(name):
        if not (nnunet_raw() / name / "dataset.json").is_file():
            shutil.rmtree(nnunet_raw() / name, ignore_errors=True)
            write_toy_dataset(nnunet_raw() / name, classes, preset, seed, sources)
        return _ensure_preprocessed(name)


def validate_raw_dataset(folder: Path) -> dict:
    """The dataset.json of an nnU-Net raw dataset folder, or a one-line error saying what is wrong."""
    if not folder.is_dir():
        raise HeadzooError(f"dataset folder {folder} does not exist")
    try:
        dataset_json = json.loads((folder / "dataset.json").read_text())
    except (OSError, ValueError) as error:
        raise HeadzooError(f"{folder} is not an nnU-Net raw dataset: dataset.json unreadable ({error})") from error
    missing = [k for k in ("labels", "channel_names", "file_ending", "numTraining") if k not in dataset_json]
    if missing:
        raise HeadzooError(f"{folder}/dataset.json lacks {', '.join(missing)}: not an nnU-Net raw dataset")
    ending = dataset_json["file_ending"]
    for split in ("Tr", "Ts"):
        images = sorted((folder / f"images{split}").glob(f"*_0000{ending}"))
        labels = sorted((folder / f"labels{split}").glob(f"*{ending}"))
        if not images or len(images) != len(labels):
            raise HeadzooError(f"{folder}: images{split}/ and labels{split}/ must hold matching cases "
                               f"({len(images)} images, {len(labels)} labels)")
    return dataset_json


def folder_fingerprint(folder: Path) -> str:
    """A raw dataset folder's identity: a hash of every file's relative path, size and modification time.

    Names, sizes and mtimes, not contents: an edit rewrites a file (new mtime), and hashing the contents
    of a real CT dataset would cost minutes on every run."""
    folder = Path(folder).resolve()
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def prepare_folder(folder: Path) -> PreparedDataset:
    """A dataset already in nnU-Net raw format (e.g. from `headzoo toy --out`), linked into the cache and
    preprocessed once per content fingerprint: a changed folder is preprocessed again."""
    folder = Path(folder).resolve()
    dataset_json = validate_raw_dataset(folder)
    fingerprint = folder_fingerprint(folder)
    key = f"{folder}:{fingerprint}"
    name = f"Dataset{_dataset_id(key)}_{''.join(c if c.isalnum() else '_' for c in folder.name)}"
    with _lock(name):
        link = nnunet_raw() / name
        if not link.exists():
            link.symlink_to(folder, target_is_directory=True)
        if not (nnunet_preprocessed() / name / READY_MARKER).is_file():
            verify_raw_dataset(folder, dataset_json)
        try:
            return dataclasses.replace(_ensure_preprocessed(name), fingerprint=fingerprint)
        except HeadzooError:
            raise
        except Exception as error:
            raise HeadzooError(f"nnU-Net could not preprocess {folder}: {type(error).__name__}: {error}") from error


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
        patch, rotation, None, None, False,  # no deep supervision, no mirroring (as the paper), no dummy 2D
        ignore_label=prepared.label_manager.ignore_label)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loader = nnUNetDataLoader(dataset, batch, initial_patch, patch, prepared.label_manager,
                              oversample_foreground_percent=0.33,
                              sampling_probabilities=prepared.sampling_probabilities(), transforms=transforms)
    loader.rs = np.random.RandomState(seed)
    return loader


class HeldOutCase(NamedTuple):
    key: str
    image: torch.Tensor      # (c, *shape) preprocessed as nnU-Net's predictor preprocesses
    properties: dict         # nnU-Net's properties: crop box, spacing, shapes (for the export)
    reference: np.ndarray    # the raw label file as nnU-Net's reader returns it (original geometry)


def test_cases(prepared: PreparedDataset) -> Iterator[HeldOutCase]:
    """Held-out cases: the images preprocessed by nnU-Net as its predictor does, the raw reference labels
    (never the preprocessed ones, where nnU-Net's crop marks background outside the body as -1)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    ending = prepared.dataset_json["file_ending"]
    preprocessor = DefaultPreprocessor(verbose=False)
    configuration = prepared.plans_manager.get_configuration(DATA_CONFIGURATION)
    reader = prepared.plans_manager.image_reader_writer_class()
    for label_file in sorted((prepared.raw / "labelsTs").glob(f"*{ending}")):
        key = label_file.name[: -len(ending)]
        images = sorted(str(p) for p in (prepared.raw / "imagesTs").glob(f"{key}_[0-9][0-9][0-9][0-9]{ending}"))
        with _quietly():
            data, _, properties = preprocessor.run_case(images, None, prepared.plans_manager, configuration,
                                                        prepared.dataset_json)
        reference, _ = reader.read_seg(str(label_file))
        yield HeldOutCase(key, torch.from_numpy(data).float(), properties, reference[0].astype(np.int64))


def count_test_cases(prepared: PreparedDataset) -> int:
    return len(list((prepared.raw / "labelsTs").glob(f"*{prepared.dataset_json['file_ending']}")))
