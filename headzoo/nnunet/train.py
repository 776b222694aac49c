"""``headzoo nnunet-train``: nnU-Net's own ``run_training`` (same output folders, checkpoints, logs, validation,
DDP), with the headzoo trainer class resolved directly instead of by nnU-Net's discovery, which imports every
trainer module nnU-Net ships (Primus → timm → torchvision) and so fails where torchvision cannot load."""

from __future__ import annotations

import contextlib
import difflib
import json
import multiprocessing
from pathlib import Path

import torch

from headzoo.device import NNUNET_DEVICES, resolve_device
from headzoo.errors import HeadzooError
from headzoo.paths import use_user_nnunet_folders

EXT_TRAINER_FOLDER = Path(__file__).parent / "ext_trainers"


def _find_headzoo_trainer(trainer_name: str):
    from headzoo.nnunet.trainer import resolve_trainer

    return resolve_trainer(trainer_name)


@contextlib.contextmanager
def trainers_resolved_directly():
    """nnU-Net's run_training (and each DDP worker it spawns) looks headzoo trainers up by name, directly."""
    import nnunetv2.run.run_training as run_module

    saved = run_module.recursive_find_trainer_class_by_name, run_module.run_ddp
    run_module.recursive_find_trainer_class_by_name = _find_headzoo_trainer
    run_module.run_ddp = run_ddp_resolved_directly
    try:
        yield
    finally:
        run_module.recursive_find_trainer_class_by_name, run_module.run_ddp = saved


def run_ddp_resolved_directly(rank: int, *args) -> None:
    """nnU-Net's ``run_ddp`` in a spawned DDP worker, which imports this module instead of inheriting the patch."""
    import nnunetv2.run.run_training as run_module

    original = run_module.run_ddp
    with trainers_resolved_directly():
        original(rank, *args)


def dataset_name(dataset: str) -> str:
    """``DatasetXXX_Name`` for an id or a name, as nnU-Net resolves it (in its raw, preprocessed and results folders)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset if dataset.startswith("Dataset") else int(dataset))
    except (RuntimeError, ValueError):
        raise HeadzooError(f"no nnU-Net dataset '{dataset}' in nnUNet_raw/nnUNet_preprocessed/nnUNet_results") from None


def check_device(device: str) -> torch.device:
    """nnUNetv2_train's and nnUNetv2_predict's ``-device`` (cpu, cuda or mps), checked as ``headzoo run`` checks its own."""
    return resolve_device(device, "-device", NNUNET_DEVICES)


def check_preprocessed(folder: Path, dataset: str, configuration: str, plans: str, fold: str) -> None:
    """One line unless `fold` is nnU-Net's (an integer, or all) and nnU-Net's preprocessed `folder` holds
    `plans` with `configuration`, preprocessed."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if fold != "all" and not fold.isdigit():
        raise HeadzooError(f"fold must be 0-4 (another integer with your own splits_final.json) or all, got '{fold}'")
    plans_file = folder / f"{plans}.json"
    if not plans_file.is_file():
        raise HeadzooError(
            f"{folder.name} has no {plans}.json in {folder.parent}; run nnUNetv2_plan_and_preprocess -d {dataset} first"
        )
    try:
        manager = PlansManager(json.loads(plans_file.read_text()))
        names = list(manager.available_configurations)
        if configuration not in names:
            close = difflib.get_close_matches(configuration, names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise HeadzooError(
                f"{plans_file.name} has no configuration '{configuration}' ({hint}it has: {', '.join(names)})"
            )
        data = folder / manager.get_configuration(configuration).data_identifier
    except HeadzooError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise HeadzooError(f"{plans_file} is not an nnU-Net plans file ({type(error).__name__}: {error})") from None
    if not data.is_dir():
        raise HeadzooError(
            f"configuration '{configuration}' of {folder.name} is not preprocessed ({data} is "
            f"missing): run nnUNetv2_preprocess -d {dataset} -c {configuration} -plans_name {plans}"
        )


def nnunet_train(
    dataset: str,
    configuration: str,
    fold: str,
    trainer: str,
    plans: str = "nnUNetPlans",
    device: str = "cuda",
    num_gpus: int = 1,
    continue_training: bool = False,
    only_run_validation: bool = False,
    disable_checkpointing: bool = False,
) -> None:
    """Exactly what ``nnUNetv2_train`` does after parsing its arguments, with ``-tr`` resolved directly."""
    use_user_nnunet_folders()
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.run_training import run_training

    _find_headzoo_trainer(trainer)
    check_preprocessed(Path(nnUNet_preprocessed) / dataset_name(dataset), dataset, configuration, plans, fold)
    torch_device = check_device(device)
    if device == "cpu":  # as nnUNetv2_train
        torch.set_num_threads(multiprocessing.cpu_count())
    elif device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    with trainers_resolved_directly():
        run_training(
            dataset,
            configuration,
            fold,
            trainer,
            plans,
            None,
            num_gpus,
            False,
            continue_training,
            only_run_validation,
            disable_checkpointing,
            False,
            device=torch_device,
        )
