"""Checks of a raw nnU-Net dataset folder before any preprocessing or training, with nnU-Net's own case
checks (``verify_labels``, ``check_cases``: declared labels, NaNs, image/label shape and spacing, channel
count), run on the training **and** the test cases, after a gzip CRC pass that catches truncated
``.nii.gz`` files (which SimpleITK may otherwise read as half zeros). Each problem is one line naming the case."""
from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from pathlib import Path

from headzoo.errors import HeadzooError


def check_gzip(path: Path) -> None:
    """Decompress `path` to the end: a truncated or corrupt file fails gzip's length or CRC check."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 24):
                pass
    except (EOFError, OSError, zlib.error) as error:
        raise HeadzooError(f"{path} is truncated or corrupt ({error})") from None


def _cases(folder: Path, split: str, ending: str) -> list[tuple[str, list[Path], Path]]:
    cases = []
    for label in sorted((folder / f"labels{split}").glob(f"*{ending}")):
        key = label.name[: -len(ending)]
        cases.append((key, sorted((folder / f"images{split}").glob(f"{key}_[0-9][0-9][0-9][0-9]{ending}")), label))
    return cases


def verify_raw_dataset(folder: Path, dataset_json: dict) -> None:
    """Raise a one-line HeadzooError for the first broken case of `folder` (training or test)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases, verify_labels
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    labels = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    expected = labels.all_labels + ([labels.ignore_label] if labels.has_ignore_label else [])
    ending, channels = dataset_json["file_ending"], len(dataset_json["channel_names"])
    reader = None
    for split in ("Tr", "Ts"):
        for key, images, label in _cases(folder, split, ending):
            if len(images) != channels:
                raise HeadzooError(f"{folder.name}/images{split}/{key}: {len(images)} image channels, "
                                   f"dataset.json declares {channels}")
            for path in (*images, label):
                if path.name.endswith(".gz"):
                    check_gzip(path)
            reader = reader or determine_reader_writer_from_dataset_json(dataset_json, str(images[0]), verbose=False)
            said = io.StringIO()
            with contextlib.redirect_stdout(said):
                ok = verify_labels(str(label), reader, expected) and \
                    check_cases([str(p) for p in images], str(label), channels, reader)
            if not ok:
                summary = " ".join(said.getvalue().split())
                raise HeadzooError(f"{folder.name}/labels{split}/{key}: {summary[:400]}")
