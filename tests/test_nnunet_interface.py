"""The parts of nnU-Net's code headzoo overrides, swaps or calls by position, as parameter names (facts read from
nnunetv2 2.8.1, the version pyproject.toml allows): a new nnU-Net that renames, reorders or drops one fails here,
before a trainer silently stops calling an override or a positional call passes the wrong argument."""

import inspect

import pytest

# nnUNetTrainer's methods that headzoo.nnunet.trainer.nnUNetTrainerHead overrides
TRAINER_METHODS = {
    "__init__": ("self", "plans", "configuration", "fold", "dataset_json", "device"),
    "build_network_architecture": (
        "plans_manager",
        "configuration_manager",
        "num_input_channels",
        "num_output_channels",
        "enable_deep_supervision",
    ),  # a staticmethod in nnU-Net
    "_build_loss": ("self",),
    "set_deep_supervision_enabled": ("self", "enabled"),
    "validation_step": ("self", "batch"),
    "load_checkpoint": ("self", "filename_or_checkpoint"),
    "perform_actual_validation": ("self", "save_probabilities"),
}
# nnUNetPredictor's methods that headzoo.nnunet.predictor.HeadPredictor overrides
PREDICTOR_METHODS = {
    "_internal_predict_sliding_window_return_logits": ("self", "data", "slicers", "do_on_device"),
    "_internal_get_data_iterator_from_lists_of_filenames": (
        "self",
        "input_list_of_lists",
        "seg_from_prev_stage_files",
        "output_filenames_truncated",
        "num_processes",
    ),
    "predict_from_data_iterator": ("self", "data_iterator", "save_probabilities", "num_processes_segmentation_export"),
    "manual_initialization": (
        "self",
        "network",
        "plans_manager",
        "configuration_manager",
        "parameters",
        "dataset_json",
        "trainer_name",
        "inference_allowed_mirroring_axes",
    ),  # predict: positional
}
# module globals headzoo swaps while nnU-Net runs (headzoo.nnunet.train, headzoo.nnunet.predictor), and the
# functions it calls by position
MODULE_GLOBALS = {
    ("nnunetv2.run.run_training", "recursive_find_trainer_class_by_name"): ("trainer_name",),
    ("nnunetv2.run.run_training", "run_ddp"): (
        "rank",
        "dataset_name_or_id",
        "configuration",
        "fold",
        "tr",
        "p",
        "disable_checkpointing",
        "c",
        "val",
        "pretrained_weights",
        "npz",
        "val_with_best",
        "world_size",
    ),
    ("nnunetv2.run.run_training", "run_training"): (
        "dataset_name_or_id",
        "configuration",
        "fold",
        "trainer_class_name",
        "plans_identifier",
        "pretrained_weights",
        "num_gpus",
        "export_validation_probabilities",
        "continue_training",
        "only_run_validation",
        "disable_checkpointing",
        "val_with_best",
        "device",
    ),
    ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "nnUNetPredictor"): (
        "tile_step_size",
        "use_gaussian",
        "use_mirroring",
        "perform_everything_on_device",
        "device",
        "verbose",
        "verbose_preprocessing",
        "allow_tqdm",
    ),
    ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "export_prediction_from_logits"): (
        "predicted_array_or_file",
        "properties_dict",
        "configuration_manager",
        "plans_manager",
        "dataset_json_dict_or_file",
        "output_file_truncated",
        "save_probabilities",
        "num_threads_torch",
    ),
}


def _names(function) -> tuple[str, ...]:
    return tuple(inspect.signature(function).parameters)


@pytest.mark.parametrize("method", TRAINER_METHODS)
def test_trainer_methods_headzoo_overrides_keep_their_parameters(method):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from headzoo.nnunet.trainer import nnUNetTrainerHead

    assert method in vars(nnUNetTrainerHead)  # the fact list covers what headzoo overrides
    assert _names(getattr(nnUNetTrainer, method)) == TRAINER_METHODS[method]


def test_the_fact_lists_name_every_override():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from headzoo.nnunet.predictor import HeadPredictor
    from headzoo.nnunet.trainer import nnUNetTrainerHead

    for mine, theirs, facts in (
        (nnUNetTrainerHead, nnUNetTrainer, TRAINER_METHODS),
        (HeadPredictor, nnUNetPredictor, PREDICTOR_METHODS),
    ):
        overridden = {
            name
            for name, value in vars(mine).items()
            if hasattr(theirs, name)
            and callable(value)
            or isinstance(value, (classmethod, staticmethod))
            and hasattr(theirs, name)
        }
        assert overridden <= set(facts), f"{mine.__name__} overrides {sorted(overridden - set(facts))}: add the facts"


@pytest.mark.parametrize("method", PREDICTOR_METHODS)
def test_predictor_methods_headzoo_overrides_or_calls_keep_their_parameters(method):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    assert _names(getattr(nnUNetPredictor, method)) == PREDICTOR_METHODS[method]


@pytest.mark.parametrize("module,name", MODULE_GLOBALS)
def test_module_globals_headzoo_swaps_keep_their_parameters(module, name):
    import importlib

    assert _names(getattr(importlib.import_module(module), name)) == MODULE_GLOBALS[module, name]


def test_headzoo_stand_ins_take_what_nnunet_passes():
    """The stand-ins take nnU-Net's positional arguments: the validation export's first seven, the predictor's
    constructor and the trainer's build_network_architecture all of them."""
    from headzoo.nnunet.predictor import HeadExport, HeadPredictor
    from headzoo.nnunet.trainer import nnUNetTrainerHead

    export = MODULE_GLOBALS["nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "export_prediction_from_logits"]
    assert len(_names(HeadExport.__call__)) - 1 == len(export[:7])  # nnU-Net's validation passes seven, by position
    assert _names(HeadPredictor) == MODULE_GLOBALS["nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "nnUNetPredictor"]
    assert _names(nnUNetTrainerHead.build_network_architecture) == TRAINER_METHODS["build_network_architecture"]
    assert _names(nnUNetTrainerHead.__init__) == TRAINER_METHODS["__init__"]


def test_pyproject_bounds_nnunet_below_the_next_minor():
    """The facts above are 2.8's: pyproject.toml allows no other minor version, and the installed one is 2.8."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    nnunet = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "nnunetv2")
    assert Version(version("nnunetv2")) in nnunet.specifier
    assert not nnunet.specifier.contains("2.9.0") and not nnunet.specifier.contains("2.7.9")
