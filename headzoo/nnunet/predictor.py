"""nnU-Net's predictor with the head's K output channels in place of C logits.

nnU-Net averages a (C, *shape) logit volume over sliding windows and mirrorings, resamples all C
channels to the original spacing and only then takes the argmax. Here the same code averages and
resamples the head's K output channels (Gaussian and mirror averaging and linear resampling commute
with a linear head such as the chunked one), and the head predicts once, at the end. Memory of the
aggregation and the resampling is O(K), whatever C is.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from torch import nn

from headzoo.errors import HeadzooError
from headzoo.head import Head
from headzoo.backbone import head_of
from headzoo.registry import create_head


class _OutputChannels:
    """Stands in for the predictor's LabelManager while nnU-Net sizes its aggregation buffer."""

    def __init__(self, channels: int):
        self.num_segmentation_heads = channels


class HeadPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` whose sliding-window buffer holds the head's K channels, exported via ``head.predict``."""

    head_channels: int | None = None

    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        if self.head_channels is None:  # one forward of the first window tells K
            window = data[slicers[0]][None].to(self.device)
            self.head_channels = int(self.network(window).shape[1])
        label_manager, self.label_manager = self.label_manager, _OutputChannels(self.head_channels)
        try:  # nnU-Net's own loop: fp16 buffer, Gaussian weights, mirroring, the inf check
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        finally:
            self.label_manager = label_manager

    def _internal_get_data_iterator_from_lists_of_filenames(
        self, input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated, num_processes: int
    ):
        """nnU-Net's background preprocessing workers, or with ``num_processes == 0`` preprocessing in this
        process (as ``predict_from_files_sequential``)."""
        if num_processes > 0:
            return super()._internal_get_data_iterator_from_lists_of_filenames(
                input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated, num_processes
            )
        return self._preprocess_here(input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated)

    def _preprocess_here(self, input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated):
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose_preprocessing)
        for files, segmentation, ofile in zip(
            input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated
        ):
            data, _, properties = preprocessor.run_case(
                files, segmentation, self.plans_manager, self.configuration_manager, self.dataset_json
            )
            yield {"data": torch.from_numpy(data), "data_properties": properties, "ofile": ofile}

    def predict_from_data_iterator(
        self, data_iterator, save_probabilities: bool = False, num_processes_segmentation_export: int = 0
    ):
        """Predict and export each preprocessed case in this process, one label file at a time."""
        head = head_of(self.network)
        for preprocessed in data_iterator:
            data = preprocessed["data"]
            if isinstance(data, str):
                path, data = data, torch.from_numpy(np.load(data))
                os.remove(path)
            expected = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)
            if data.shape[0] != expected:
                raise HeadzooError(
                    f"{os.path.basename(preprocessed['ofile'])}: the model takes {expected} input "
                    f"channel(s), the image has {data.shape[0]}"
                )
            output = self.predict_logits_from_preprocessed_data(data).cpu()
            export_head_prediction(
                output,
                preprocessed["data_properties"],
                self.configuration_manager,
                self.plans_manager,
                self.dataset_json,
                preprocessed["ofile"],
                head,
            )
            print(f"wrote {preprocessed['ofile'] + self.dataset_json['file_ending']}")
        compute_gaussian.cache_clear()


PREDICT_VOXELS = 2**21  # voxels per head.predict call at export: its working memory stays bounded


class _HeadLabels:
    """What nnU-Net's export asks of a LabelManager, with ``head.predict`` in place of the argmax over C logits.

    The head predicts slab by slab along the first axis (heads predict each voxel from its own K values), so
    its working memory (a float32 copy, per-chunk logits) does not grow with the volume either."""

    def __init__(self, label_manager, head: Head):
        self.foreground_labels = label_manager.foreground_labels
        self.head = head

    @torch.no_grad()
    def convert_logits_to_segmentation(self, output) -> np.ndarray:
        output = torch.as_tensor(output)
        device = next(self.head.parameters(), torch.empty(0)).device
        labels = torch.empty(output.shape[1:], dtype=torch.long)
        rows = max(1, PREDICT_VOXELS // math.prod(output.shape[2:]))
        for start in range(0, output.shape[1], rows):
            slab = output[None, :, start : start + rows].to(device, torch.float32)
            labels[start : start + rows] = self.head.predict(slab)[0].cpu()
        return labels.numpy()


def segmentation_in_original_geometry(
    output: torch.Tensor | np.ndarray,
    properties: dict,
    configuration_manager,
    plans_manager,
    dataset_json: dict,
    head: Head,
    threads: int | None = None,
) -> np.ndarray:
    """nnU-Net's export of a (K, *preprocessed shape) output: resampled to the original spacing, the head's
    prediction put back into the uncropped volume (background outside the crop), axes transposed back; the
    array nnU-Net's reader returns for the written label file. `threads`: torch threads while resampling
    (nnU-Net's default otherwise)."""
    label_manager = plans_manager.get_label_manager(dataset_json)
    extra = {} if threads is None else {"num_threads_torch": threads}
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        output, plans_manager, configuration_manager, _HeadLabels(label_manager, head), properties, **extra
    )


def export_head_prediction(
    output: torch.Tensor | np.ndarray,
    properties: dict,
    configuration_manager,
    plans_manager,
    dataset_json: dict,
    output_file_truncated: str,
    head: Head,
) -> None:
    """Resample the K channels to the original geometry (nnU-Net's code), let the head predict, write the label
    file nnU-Net would write, atomically: under a hidden temporary name first, then renamed."""
    segmentation = segmentation_in_original_geometry(
        output, properties, configuration_manager, plans_manager, dataset_json, head
    )
    ending = dataset_json["file_ending"]
    folder, name = os.path.split(output_file_truncated)
    final = output_file_truncated + ending
    partial = os.path.join(folder, f".partial-{name}{ending}")
    try:
        plans_manager.image_reader_writer_class().write_seg(segmentation, partial, properties)
        os.replace(partial, final)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@dataclass
class HeadExport:
    """``export_prediction_from_logits`` for nnU-Net's validation export pool (picklable: the head as name,
    sizes, options and weights, rebuilt in the worker)."""

    head_name: str
    in_channels: int
    num_classes: int
    options: dict
    state_dict: dict

    @classmethod
    def of(cls, head: Head, head_name: str, options: dict) -> "HeadExport":
        state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
        return cls(head_name, head.in_channels, head.num_classes, options, state)

    def __call__(
        self,
        output,
        properties: dict,
        configuration_manager,
        plans_manager,
        dataset_json,
        output_file_truncated: str,
        save_probabilities: bool = False,
    ) -> None:
        head = create_head(self.head_name, self.in_channels, self.num_classes, **self.options)
        head.load_state_dict(self.state_dict)
        export_head_prediction(
            output, properties, configuration_manager, plans_manager, dataset_json, output_file_truncated, head.eval()
        )


@contextlib.contextmanager
def validation_through_head(network: nn.Module, head_name: str, options: dict):
    """During ``nnUNetTrainer.perform_actual_validation``: its predictor aggregates K channels and its export
    pool exports through the head (nnU-Net's validation code itself is unchanged)."""
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as trainer_module

    saved = trainer_module.nnUNetPredictor, trainer_module.export_prediction_from_logits
    trainer_module.nnUNetPredictor = HeadPredictor
    trainer_module.export_prediction_from_logits = HeadExport.of(head_of(network), head_name, options)
    try:
        yield
    finally:
        trainer_module.nnUNetPredictor, trainer_module.export_prediction_from_logits = saved
