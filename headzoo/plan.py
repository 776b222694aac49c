"""One plan for every head, through nnU-Net itself, made once per dataset and cached.

nnU-Net's fingerprint and ResEnc planner run once per dataset; the plan is then **frozen**: every
C-dependent choice (patch, batch, topology) is replaced by headzoo's fixed values, one configuration
per backbone, so every head and class count trains on the same plan. The plan is the truth: runs build
the network and take the default patch from their backbone's configuration (edit the JSON to change
them). nnU-Net's preprocessor writes the training cases. Each dataset has a name in nnU-Net's folders
derived from what it is (the toy's settings, a raw folder's path and content fingerprint), and a lock
that serialises its preparation across processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from headzoo.backbone import BACKBONES
from headzoo.dataset import DATA_CONFIGURATION, PLANS_NAME, PreparedDataset, configuration_name, nnunet_log
from headzoo.errors import HeadzooError
from headzoo.locking import file_lock
from headzoo.paths import cache_root, nnunet_preprocessed, nnunet_raw
from headzoo.progress import progress_bar
from headzoo.toy import get_preset, write_toy_dataset
from headzoo.validation import validate_raw_dataset, verify_raw_dataset

READY_MARKER = "headzoo_ready.json"
NUM_PROCESSES = 2
# nnU-Net samples 10⁸ foreground voxels per channel for its intensity statistics, with replacement: 13–16 GiB
# of peak RSS for the 16-channel protocol toy. Where no channel is normalised as CT nothing reads them, so
# such datasets sample 10⁵ (only those unused statistics in the fingerprint and plans change).
UNUSED_INTENSITY_SAMPLES = 10**5


def _dataset_id(key: str) -> int:
    return 10000 + int(hashlib.sha1(key.encode()).hexdigest(), 16) % 90000


def _lock(name: str):
    """Serialise preparation of one dataset across processes (a sweep runs cells side by side)."""
    return file_lock(cache_root() / "locks" / f"{name}.lock")


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


def backbone_configurations() -> dict[str, dict]:
    """One plan configuration per backbone: its architecture, default patch and batch."""
    return {
        configuration_name(backbone): {
            "inherits_from": DATA_CONFIGURATION,
            "patch_size": [patch] * 3,
            "batch_size": 2,
            "architecture": architecture,
        }
        for backbone, (architecture, patch) in BACKBONES.items()
    }


def frozen_plans(plans: dict) -> dict:
    """nnU-Net's plan with every C-dependent choice replaced by headzoo's fixed values."""
    configurations = {DATA_CONFIGURATION: plans["configurations"][DATA_CONFIGURATION], **backbone_configurations()}
    return {**plans, "plans_name": PLANS_NAME, "configurations": configurations}


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


def _reads_intensity_statistics(dataset_json: dict) -> bool:
    """Whether a channel is normalised as CT, the only normalisation that reads the fingerprint's intensities."""
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    return any(
        get_normalization_scheme(channel) is CTNormalization for channel in dataset_json["channel_names"].values()
    )


def _plan_and_preprocess(name: str) -> None:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
        nnUNetPlannerResEncM,
    )
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    out = nnunet_preprocessed() / name
    shutil.rmtree(out, ignore_errors=True)
    with nnunet_log():
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
    with progress_bar() as bar, nnunet_log():
        task = bar.add_task("nnU-Net preprocessing", total=len(cases))
        for key, files in cases.items():
            preprocessor.run_case_save(
                str(target / key), files["images"], files["label"], plans_manager, configuration, dataset_json
            )
            shapes[key] = list(_load_case(target, key)[0].shape[1:])
            bar.advance(task)
    (out / "shapes.json").write_text(json.dumps(shapes))
    (out / READY_MARKER).write_text(json.dumps({"cases": len(cases)}))


def _load_case(folder: Path, key: str):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    return infer_dataset_class(str(folder))(str(folder), [key]).load_case(key)


def _load_prepared(name: str) -> PreparedDataset:
    out = nnunet_preprocessed() / name
    return PreparedDataset(
        name, json.loads((out / f"{PLANS_NAME}.json").read_text()), json.loads((out / "dataset.json").read_text())
    )


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
