"""nnU-Net trainers for every registered head: ``nnUNetTrainer_<head>`` and its short variants.

Each trainer is nnU-Net's ``nnUNetTrainer`` with four seams overridden and everything else kept
(plan, data loader and augmentation, SGD with polyLR, AMP, gradient clipping at 12, checkpoints,
logging, ``-device``, DDP through ``-num_gpus``):

- ``build_network_architecture``: the plan's network, its final seg conv replaced by the head;
- ``_build_loss``: the head's own loss (under DDP, ``-num_gpus`` > 1, a head that takes a ``ddp`` option is
  built with ``ddp=True``: its batch Dice statistics all-gathered, as nnU-Net builds its loss with ``ddp=True``);
- ``validation_step``: the pseudo Dice from ``head.predict``, counted per class (no C-channel one-hot);
- ``perform_actual_validation``: nnU-Net's validation, aggregating the head's K channels (``predictor``).

Deep supervision is off (see ``network``). Head options come from the environment variable
``HEADZOO_HEAD_OPTIONS`` (``"rank=16,chunk=10"``) when training starts and are saved in the checkpoint
(``init_args["headzoo"]``), from which ``headzoo predict`` and ``--c``/``--val`` rebuild the same head.
"""

from __future__ import annotations

import difflib
import inspect
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast

from headzoo.config import parse_options
from headzoo.errors import HeadzooError
from headzoo.inference import class_counts
from headzoo.backbone import head_of
from headzoo.nnunet.network import build_head_network, head_options
from headzoo.nnunet.predictor import validation_through_head
from headzoo.registry import get_head_class, list_heads

OPTIONS_VARIABLE = "HEADZOO_HEAD_OPTIONS"

# suffix → trainer settings; nnU-Net ships nnUNetTrainer_1epoch and _5epochs for its own trainer. `_smoke` is
# headzoo's: one epoch of 2 training and 1 validation iterations, for tests and CI on a CPU.
VARIANTS: dict[str, dict] = {
    "": {},
    "_1epoch": {"num_epochs": 1},
    "_5epochs": {"num_epochs": 5},
    "_smoke": {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1},
}


def options_from_environment() -> dict:
    """``HEADZOO_HEAD_OPTIONS="rank=16,chunk=10"`` → ``{"rank": 16, "chunk": 10}``, values read as ``--option`` reads them."""
    return parse_options(os.environ.get(OPTIONS_VARIABLE, ""), OPTIONS_VARIABLE)


def refuse_partial_labels(dataset_json: dict) -> None:
    """nnU-Net's training loop gives the loss no annotated-class mask: on a partially labelled dataset (``headzoo
    toy --partial K``) every class a case's source did not annotate would be trained as background."""
    sources = dataset_json.get("headzoo", {}).get("sources", 1)
    if sources > 1:
        raise HeadzooError(
            f"{dataset_json.get('name', 'this dataset')} is partially labelled ({sources} sources, each "
            "annotating its own classes): nnU-Net's training loop cannot pass the annotated classes to "
            "the head's loss; train it with `headzoo run --dataset FOLDER --head sigmoid`"
        )


def refuse_regions(label_manager) -> None:
    if label_manager.has_regions:
        raise HeadzooError("headzoo trainers need label-based training; region-based datasets are not supported")


class nnUNetTrainerHead(nnUNetTrainer):
    """Base of the generated trainers; ``head_name`` and ``variant`` are set per class."""

    head_name: str = ""
    variant: dict = {}

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        refuse_partial_labels(dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        for setting, value in self.variant.items():
            setattr(self, setting, value)
        self.enable_deep_supervision = False
        refuse_regions(self.label_manager)
        self.head_options = head_options(options_from_environment(), self.configuration_manager, self.label_manager)
        self._record_head()
        # nnU-Net builds the network through self.build_network_architecture; on an instance it must use this
        # trainer's options (restored from a checkpoint by load_checkpoint), not the environment's.
        self.build_network_architecture = self._build_network_with_own_options

    def _record_head(self) -> None:
        """Saved with every checkpoint (nnU-Net stores ``my_init_kwargs`` as ``init_args``): the head and its
        options as built, the plan's loss defaults included."""
        self.my_init_kwargs["headzoo"] = {"head": self.head_name, "options": self.head_options}

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager,
        configuration_manager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ):
        """Called on the class by nnU-Net's own predictor: options from ``HEADZOO_HEAD_OPTIONS``."""
        return build_head_network(
            configuration_manager, num_input_channels, num_output_channels, cls.head_name, options_from_environment()
        )

    def _build_network_with_own_options(
        self,
        plans_manager,
        configuration_manager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ):
        return build_head_network(
            configuration_manager,
            num_input_channels,
            num_output_channels,
            self.head_name,
            {**self.head_options, **self.distributed_options()},
        )

    def distributed_options(self) -> dict:
        """``ddp=True`` under DDP for a head that takes it (nnU-Net's ``_build_loss`` passes ``ddp=self.is_ddp``):
        a training setting, so not saved with the head's options (prediction runs in one process)."""
        takes_ddp = "ddp" in inspect.signature(get_head_class(self.head_name)).parameters
        return {"ddp": True} if self.is_ddp and takes_ddp else {}

    def _build_loss(self):
        return head_of(self.network).loss

    def set_deep_supervision_enabled(self, enabled: bool):
        super().set_deep_supervision_enabled(False)  # heads replace only the full-resolution seg layer

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            loss = self.loss(output, target)
        prediction = head_of(self.network).predict(output)
        tp, fp, fn = class_counts(
            prediction, target[:, 0].long(), self.label_manager.num_segmentation_heads, self.label_manager.ignore_label
        )
        # as nnU-Net: foreground classes only
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp[1:], "fp_hard": fp[1:], "fn_hard": fn[1:]}

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, str):  # nnU-Net's load_checkpoint takes only a file name, and loads it again
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
        saved = checkpoint["init_args"].get("headzoo", {})
        if saved.get("head", self.head_name) != self.head_name:
            raise HeadzooError(f"this checkpoint holds a '{saved['head']}' head, not '{self.head_name}'")
        if "options" in saved and saved["options"] != self.head_options:
            if self.was_initialized:
                raise HeadzooError(
                    f"the checkpoint's head options {saved['options']} differ from this trainer's {self.head_options}"
                )
            self.head_options = saved["options"]
        super().load_checkpoint(filename_or_checkpoint)
        self._record_head()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if save_probabilities:
            self.print_to_log_file(
                "headzoo: --npz is ignored; a head's K channels are not C probabilities, only label files are exported"
            )
        with validation_through_head(self.network, self.head_name, self.head_options):
            super().perform_actual_validation(False)


def trainer_name(head_name: str, suffix: str = "") -> str:
    return f"nnUNetTrainer_{head_name}{suffix}"


def make_trainer(head_name: str, suffix: str = "") -> type[nnUNetTrainerHead]:
    """The trainer class ``nnUNetTrainer_<head><suffix>``."""
    name = trainer_name(head_name, suffix)
    return type(
        name,
        (nnUNetTrainerHead,),
        {"head_name": head_name, "variant": VARIANTS[suffix], "__module__": __name__, "__qualname__": name},
    )


def trainers_for_registered_heads() -> dict[str, type[nnUNetTrainerHead]]:
    """Every trainer name → class, for every registered head (plug-ins included) and every variant."""
    return {trainer_name(head, suffix): make_trainer(head, suffix) for head in list_heads() for suffix in VARIANTS}


def resolve_trainer(name: str) -> type[nnUNetTrainerHead]:
    """A headzoo trainer by name, without nnU-Net's discovery (which imports every nnU-Net trainer module)."""
    trainers = trainers_for_registered_heads()
    if name not in trainers:
        close = difflib.get_close_matches(name, trainers, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise HeadzooError(
            f"unknown headzoo trainer '{name}'{hint} (nnUNetTrainer_<head>[_1epoch|_5epochs|_smoke]; "
            f"heads: {', '.join(list_heads())}); nnU-Net's own trainers run with nnUNetv2_train"
        )
    return trainers[name]
