"""Checks of image data before nnU-Net reads it for training or prediction, each problem one line naming the
dataset, case or file.

A raw ``--dataset`` folder: its layout (a readable dataset.json with nnU-Net's keys, matching images and labels
for training and test cases), its labels (one label per voxel, never regions; nnU-Net's consecutive 0, 1, 2, …
with the ignore label last), 3D images (nnU-Net plans no 3d_fullres configuration for 2D data), then every
training **and** test case: a gzip CRC pass that catches truncated ``.nii.gz`` files (which SimpleITK may
otherwise read as half zeros) and nnU-Net's own case checks (``verify_labels``, ``check_cases``: declared
labels, NaNs, image/label shape and spacing, channel count). What nnU-Net prints or raises about a case (a
reader's bare ``RuntimeError()`` after printing its reason, a 4D label file, a truncated ``.nii``) becomes
the one line. ``headzoo predict`` reads its input cases through the same checks before predicting.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from headzoo.errors import HeadzooError

# what nnU-Net's readers and checks raise about a file they cannot use (SimpleITK's errors are RuntimeErrors)
_CASE_ERRORS = (RuntimeError, ValueError, OSError, AssertionError, IndexError, EOFError)


def check_gzip(path: Path) -> None:
    """Decompress `path` to the end: a truncated or corrupt file fails gzip's length or CRC check."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise HeadzooError(f"{path} is truncated or corrupt ({error})") from None


def _check_case(where: str, check: Callable[[], object]) -> object:
    """Run one of nnU-Net's checks or reads of a case: a False result, or an error, is one line with what
    nnU-Net printed (its readers print the reason, then raise a bare RuntimeError)."""
    said = io.StringIO()
    failure = kind = ""
    try:  # stderr: the tracebacks nnU-Net prints of readers it tried (the reason is in what it raises)
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(io.StringIO()):
            result = check()
    except _CASE_ERRORS as error:  # a bare RuntimeError() adds nothing to what the reader printed
        result, kind = False, type(error).__name__
        failure = f"{kind}: {error}" if str(error) else ""
    if result is False:
        summary = " ".join(f"{said.getvalue()} {failure}".split())
        raise HeadzooError(f"{where}: {summary[:400] or kind or 'nnU-Net refused it'}")
    return result


def check_dataset_labels(folder: Path, dataset_json: dict) -> int:
    """The number of classes C (background included) of a dataset.json's labels, or one line saying why
    headzoo cannot train them: regions, or labels that are not nnU-Net's consecutive 0, 1, 2, …"""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    declared = dataset_json["labels"]
    where = f"{Path(folder).name}/dataset.json"
    if not isinstance(declared, dict):
        raise HeadzooError(f"{where}: 'labels' must map names to label values, got {declared!r}")
    if dataset_json.get("regions_class_order") is not None or any(
        isinstance(v, (list, tuple)) and len(v) > 1 for v in declared.values()
    ):
        raise HeadzooError(
            f"{where} declares region-based labels (regions_class_order): headzoo trains one "
            "label per voxel, regions are not supported"
        )
    if not all(
        isinstance(v, int) and not isinstance(v, bool) or isinstance(v, list) and len(v) == 1 and isinstance(v[0], int)
        for v in declared.values()
    ):
        raise HeadzooError(f"{where}: label values must be integers, got {declared}")
    try:
        labels = LabelManager(declared, regions_class_order=None)
    except (RuntimeError, AssertionError) as error:
        raise HeadzooError(f"{where}: {error}") from None
    values = labels.all_labels + ([labels.ignore_label] if labels.has_ignore_label else [])
    if np.any(np.diff(values) != 1):  # background 0 is LabelManager's own check
        raise HeadzooError(
            f"{where}: labels must be consecutive (0, 1, 2, ..., the ignore label last), as nnU-Net "
            f"requires; declared: {', '.join(map(str, values))}"
        )
    return len(labels.foreground_labels) + 1


def _cases(folder: Path, split: str, ending: str) -> list[tuple[str, list[Path], Path]]:
    cases = []
    for label in sorted((folder / f"labels{split}").glob(f"*{ending}")):
        key = label.name[: -len(ending)]
        cases.append((key, sorted((folder / f"images{split}").glob(f"{key}_[0-9][0-9][0-9][0-9]{ending}")), label))
    return cases


def _reader(dataset_json: dict, example: Path, where: str):
    """The reader nnU-Net chooses for the dataset (the first for its file ending that reads `example`); where
    none can, the first one's reason for `example`, in one line."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    try:
        return _check_case(
            where, lambda: determine_reader_writer_from_dataset_json(dataset_json, str(example), verbose=False)
        )
    except HeadzooError:
        first = determine_reader_writer_from_dataset_json(dataset_json, None, verbose=False)
        _check_case(where, lambda: first().read_images([str(example)]))
        raise


def _refuse_2d(where: str, shape: tuple[int, ...], what: str) -> None:
    """nnU-Net's readers give a 2D image the shape (c, 1, x, y), a dummy first axis of one slice."""
    if shape[1] == 1:
        raise HeadzooError(f"{where}: a 2D image (one slice, {'x'.join(map(str, shape[2:]))}): {what}")


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
            raise HeadzooError(
                f"{folder}: images{split}/ and labels{split}/ must hold matching cases "
                f"({len(images)} images, {len(labels)} labels)"
            )
    return dataset_json


def verify_raw_dataset(folder: Path, dataset_json: dict) -> None:
    """Raise a one-line HeadzooError for the dataset's labels, 2D images, or the first broken case of `folder`
    (training or test)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    check_dataset_labels(folder, dataset_json)
    labels = LabelManager(dataset_json["labels"], regions_class_order=None)
    expected = labels.all_labels + ([labels.ignore_label] if labels.has_ignore_label else [])
    ending, channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    reader = None
    for split in ("Tr", "Ts"):
        for key, images, label in _cases(folder, split, ending):
            where = f"{folder.name}/labels{split}/{key}"
            if len(images) != channels:
                raise HeadzooError(
                    f"{folder.name}/images{split}/{key}: {len(images)} image channels, dataset.json declares {channels}"
                )
            for path in (*images, label):
                if path.name.endswith(".gz"):
                    check_gzip(path)
            if reader is None:
                reader = _reader(dataset_json, images[0], where)
                segmentation, _ = _check_case(where, lambda: reader().read_seg(str(label)))
                _refuse_2d(where, segmentation.shape, "2D datasets are not supported (headzoo's backbones are 3D)")
            _check_case(
                where,
                lambda: (
                    verify_labels(str(label), reader, expected)
                    and check_cases([str(p) for p in images], str(label), channels, reader)
                ),
            )


def check_prediction_case(case: str, files: list[str], reader_class, three_d: bool) -> None:
    """An input case of ``headzoo predict`` read as nnU-Net's predictor will read it, before anything is
    written: the gzip CRC of ``.nii.gz`` files, nnU-Net's reader (its channels of one shape and spacing),
    and a 2D image refused for a 3D model (nnU-Net would predict it as one padded slice)."""
    for path in files:
        if path.endswith(".gz"):
            check_gzip(Path(path))
    data, _ = _check_case(f"input case '{case}'", lambda: reader_class().read_images(files))
    if three_d:
        _refuse_2d(f"input case '{case}'", data.shape, "the model is 3D")
