"""Train one head on the shared backbone and pipeline, measure it, and return one result record."""

from __future__ import annotations

import dataclasses
import errno
import platform
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import headzoo
from headzoo.backbone import attach_head, check_patch
from headzoo.config import TOY_CLASSES, RunConfig, new_run_id, to_record
from headzoo.environment import describe
from headzoo.errors import HeadzooError
from headzoo.measure import configure_cuda_timing, is_out_of_memory
from headzoo.nnunet.network import head_options
from headzoo.paths import require_cache
from headzoo.dataset import HeldOutSet, PreparedDataset, build_backbone_from_plan, configuration_name
from headzoo.loaders import training_batches
from headzoo.plan import folder_fingerprint, prepare_folder, prepare_toy
from headzoo.preflight import validate
from headzoo.registry import create_head
from headzoo.results import SCHEMA_VERSION
from headzoo.training import train_and_evaluate


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_sha() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def prepare(config: RunConfig) -> PreparedDataset:
    """The run's dataset, generated or validated and preprocessed (cached); a full disk is one line."""
    root = require_cache()
    try:
        return _prepare(config)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise HeadzooError(f"no space left on {root} (HEADZOO_CACHE) while preparing the dataset") from None
        raise
    except RuntimeError:  # nnU-Net's blosc2 writer says "Error while creating the NDArray" when full
        if shutil.disk_usage(root).free < 2**26:
            raise HeadzooError(f"no space left on {root} (HEADZOO_CACHE) while preparing the dataset") from None
        raise


def _prepare(config: RunConfig) -> PreparedDataset:
    if config.dataset_folder is not None:
        prepared = prepare_folder(config.dataset_folder)
        if config.classes not in (None, prepared.num_classes):
            raise HeadzooError(
                f"--classes {config.classes} disagrees with {config.dataset_folder}, "
                f"which has {prepared.num_classes} labels"
            )
        config.classes = prepared.num_classes
    else:
        config.classes = config.classes or TOY_CLASSES
        prepared = prepare_toy(config.preset, config.classes, config.seed, config.partial)
    config.patch = config.patch or prepared.patch_size(config.backbone)  # the plan is the truth
    check_patch(config.backbone, config.patch, prepared.architecture(config.backbone))
    shape = prepared.volume_shape()
    if any(p > s for p, s in zip(config.patch, shape)):
        raise HeadzooError(
            f"patch {'x'.join(map(str, config.patch))} is larger than the volumes ({'x'.join(map(str, shape))})"
        )
    return prepared


def dataset_fingerprint(config: RunConfig) -> str | None:
    """The dataset's identity in the results key before the run (a sweep's planning): a raw folder's content
    fingerprint; None for the toy, whose settings are key fields themselves."""
    return None if config.dataset_folder is None else folder_fingerprint(config.dataset_folder)


def environment(device: torch.device) -> dict:
    return {
        "device_name": device_name(device),
        "torch": torch.__version__,
        "headzoo": headzoo.__version__,
        "git_sha": git_sha(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "host": platform.node(),
        "environment": describe(device),
    }


def run(config: RunConfig, show_progress: bool = True) -> dict:
    """Train, measure and evaluate; the record's status is ok, oom or error (never raised). `config` is the
    request, left as it is: the record's `request` is its settings (the results key), its own settings are the
    resolved ones (classes, patch, run id)."""
    started = time.perf_counter()
    request = to_record(config)
    device = validate(config)
    timing = configure_cuda_timing(device)  # nnU-Net's cuDNN settings, before anything runs on the device
    config = dataclasses.replace(config, run_id=config.run_id or new_run_id())
    prepared = prepare(config)  # resolves the copy's classes and patch
    options = head_options(config.options, prepared.configuration(config.backbone), prepared.label_manager)
    record = {
        "schema_version": SCHEMA_VERSION,
        **to_record(config),
        "request": request,
        "dataset": prepared.name,
        "plan": str(prepared.plans_file),
        "configuration": configuration_name(config.backbone),
        "dataset_fingerprint": prepared.fingerprint,
        "options_resolved": options,
        **environment(device),
        **timing,
        "status": "ok",
        "error": None,
    }
    torch.manual_seed(config.seed)
    backbone, features = build_backbone_from_plan(prepared, config.backbone, config.seed)
    head = create_head(config.head, features, config.classes, **options)
    record["options_resolved"] = {**options, **head.resolved_options(device)}
    if prepared.partial and not head.accepts_annotated:
        raise HeadzooError(
            f"the {config.head} head cannot use partially labelled data (annotated classes per "
            "case); use a head that can, e.g. 'sigmoid', or drop --partial"
        )
    network = attach_head(backbone, head).to(device)
    try:
        batches = training_batches(prepared, config.patch, config.batch, config.seed)
        record.update(train_and_evaluate(config, network, device, batches, HeldOutSet.of(prepared), show_progress))
    except HeadzooError:
        raise  # bad input found late (e.g. labels outside [0, C)): no record
    except Exception as error:
        record["status"] = "oom" if is_out_of_memory(error) else "error"
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
    record["wall_time_s"] = time.perf_counter() - started
    return record
