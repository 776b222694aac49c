"""``headzoo predict``: ``nnUNetv2_predict`` for models trained with a headzoo trainer, aggregating only the
head's K output channels (``predictor``). Bad input is refused before anything is written: the checkpoint,
the input cases (names, then each read as nnU-Net will read it: validation.check_prediction_case)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from headzoo.errors import HeadzooError
from headzoo.paths import use_user_nnunet_folders
from headzoo.validation import check_prediction_case


def load_checkpoint(path: Path) -> dict:
    """An nnU-Net trainer's checkpoint (``network_weights``, ``init_args`` with the configuration), or one line:
    a missing, empty, truncated or foreign file."""
    if not path.is_file():
        raise HeadzooError(f"no checkpoint {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load's: EOFError (empty), RuntimeError (truncated zip), UnpicklingError (text)
        reason = str(error).splitlines()[0] if str(error) else ""
        raise HeadzooError(f"{path} is not a readable checkpoint ({type(error).__name__}: {reason[:200]})") from None
    init_args = checkpoint.get("init_args") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("network_weights"), dict)
        or not isinstance(init_args, dict)
        or not isinstance(init_args.get("configuration"), str)
    ):
        raise HeadzooError(
            f"{path} is not an nnU-Net trainer's checkpoint (no network_weights, or no init_args "
            "naming its configuration)"
        )
    return checkpoint


def input_cases(folder: Path, file_ending: str, channels: int) -> list[list[str]]:
    """nnU-Net's input layout, checked: every case has exactly the files CASE_0000 … CASE_{channels-1}."""
    if not folder.is_dir():
        raise HeadzooError(f"input folder {folder} does not exist")
    pattern = re.compile(rf"(.+)_(\d{{4}}){re.escape(file_ending)}$")
    cases: dict[str, dict[int, str]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(file_ending):
            continue
        match = pattern.match(path.name)
        if match is None:
            raise HeadzooError(f"{path.name}: input files must be named CASE_XXXX{file_ending} (XXXX: the channel)")
        cases.setdefault(match.group(1), {})[int(match.group(2))] = str(path)
    if not cases:
        raise HeadzooError(f"no images ending in {file_ending} in {folder}")
    for case, files in cases.items():
        if sorted(files) != list(range(channels)):
            found = ", ".join(f"_{c:04d}" for c in sorted(files))
            raise HeadzooError(
                f"case '{case}' has channel files {found}; the model takes {channels} channel(s) "
                f"(_0000 … _{channels - 1:04d})"
            )
    return [[files[c] for c in range(channels)] for files in cases.values()]


def ensure_writable_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise HeadzooError(f"cannot write to output folder {folder}: {error.strerror or error}") from None


def predict(
    input_folder: Path,
    output_folder: Path,
    dataset: str,
    configuration: str,
    folds: list[str],
    trainer: str,
    plans: str = "nnUNetPlans",
    checkpoint_name: str = "checkpoint_final.pth",
    device: str = "cuda",
    disable_tta: bool = False,
    step_size: float = 0.5,
    num_processes_preprocessing: int = 3,
) -> None:
    """Predict every case in ``input_folder`` into ``output_folder`` as nnU-Net's label files."""
    use_user_nnunet_folders()
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from headzoo.nnunet.network import build_head_network
    from headzoo.nnunet.predictor import HeadPredictor
    from headzoo.nnunet.train import check_device, dataset_name

    if not 0 < step_size <= 1:
        raise HeadzooError(f"-step_size must be in (0, 1], got {step_size}")
    torch_device = check_device(device)
    model_folder = Path(get_output_folder(dataset_name(dataset), trainer, plans, configuration))
    if not model_folder.is_dir():
        raise HeadzooError(f"no trained model {model_folder}")
    checkpoints = [load_checkpoint(model_folder / f"fold_{fold}" / checkpoint_name) for fold in folds]
    head = checkpoints[0]["init_args"].get("headzoo")
    if not isinstance(head, dict) or not isinstance(head.get("head"), str) or not isinstance(head.get("options"), dict):
        raise HeadzooError(f"{trainer} is not a headzoo trainer; predict with nnUNetv2_predict")
    if len(folds) > 1 and head["head"] != "dense":
        raise HeadzooError(
            f"an ensemble of folds averages C logits; the '{head['head']}' head's K channels "
            "differ per fold: predict one fold (-f N)"
        )

    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    plans_manager = PlansManager(json.loads((model_folder / "plans.json").read_text()))
    configuration_manager = plans_manager.get_configuration(checkpoints[0]["init_args"]["configuration"])
    if configuration_manager.previous_stage_name is not None:
        raise HeadzooError(f"{configuration} is a cascade stage; headzoo predict does not take a previous stage")
    channels = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    ending = dataset_json["file_ending"]
    cases = input_cases(input_folder, ending, channels)
    for files in cases:
        check_prediction_case(
            Path(files[0]).name[: -len(f"_0000{ending}")],
            files,
            plans_manager.image_reader_writer_class,
            len(configuration_manager.patch_size) == 3,
        )
    ensure_writable_folder(output_folder)

    num_classes = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = build_head_network(configuration_manager, channels, num_classes, head["head"], head["options"])
    parameters = [c["network_weights"] for c in checkpoints]
    network.load_state_dict(parameters[0])
    predictor = HeadPredictor(
        tile_step_size=step_size,
        use_gaussian=True,
        use_mirroring=not disable_tta,
        perform_everything_on_device=True,
        device=torch_device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network,
        plans_manager,
        configuration_manager,
        parameters,
        dataset_json,
        trainer,
        checkpoints[0].get("inference_allowed_mirroring_axes"),
    )
    predictor.predict_from_files(
        cases,
        str(output_folder),
        save_probabilities=False,
        overwrite=True,
        num_processes_preprocessing=num_processes_preprocessing,
        num_processes_segmentation_export=0,
    )
