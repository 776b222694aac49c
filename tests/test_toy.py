import json

import numpy as np
import pytest
import SimpleITK as sitk

from headzoo.errors import HeadzooError
from headzoo.toy import COVERAGE_LIMIT, PRESETS, make_shape, volume_classes, write_toy_dataset


@pytest.mark.parametrize("preset", ["small", "paper"])
@pytest.mark.parametrize("num_classes", [2, 10, 100, 200, 1000])
def test_every_class_occurs_in_training(preset, num_classes):
    p = PRESETS[preset]
    seen = {c for g in range(p.train) for c in volume_classes(g, num_classes, p.objects)}
    assert seen == set(range(1, num_classes))


def test_volume_classes_follow_the_arithmetic_progression():
    assert volume_classes(3, 101, 4) == [4, 29, 54, 79]  # 1 + (3 + k·25) mod 100


def test_shapes_respect_coverage_limit():
    rng = np.random.default_rng(0)
    for _ in range(20):
        shape = make_shape(12, rng)
        assert 8 <= shape.sum() and shape.mean() <= COVERAGE_LIMIT


def test_dataset_is_deterministic_and_in_nnunet_format(tmp_path):
    a = write_toy_dataset(tmp_path / "a", 7, "tiny", seed=3)
    b = write_toy_dataset(tmp_path / "b", 7, "tiny", seed=3)
    dataset = json.loads((a / "dataset.json").read_text())
    assert dataset["numTraining"] == PRESETS["tiny"].train and len(dataset["labels"]) == 7
    assert len(list((a / "imagesTr").iterdir())) == PRESETS["tiny"].train
    assert len(list((a / "labelsTs").iterdir())) == PRESETS["tiny"].volumes - PRESETS["tiny"].train
    for name in ("imagesTr/toy_0002_0000.nii.gz", "labelsTr/toy_0002.nii.gz"):
        x = sitk.GetArrayFromImage(sitk.ReadImage(str(a / name)))
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(b / name)))
        np.testing.assert_array_equal(x, y)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(a / "labelsTr/toy_0002.nii.gz")))
    assert set(np.unique(labels)) == {0, *volume_classes(2, 7, PRESETS["tiny"].objects)}


def test_existing_output_is_refused(tmp_path):
    with pytest.raises(HeadzooError, match="already exists"):
        write_toy_dataset(tmp_path, 5, "tiny")


def test_partial_labels_split_classes_across_sources(tmp_path):
    folder = write_toy_dataset(tmp_path / "p", 9, "tiny", seed=1, sources=3)
    info = json.loads((folder / "dataset.json").read_text())["headzoo"]
    owned = [c for classes in info["source_classes"] for c in classes]
    assert sorted(owned) == list(range(1, 9))  # disjoint, and every class annotated by some source
    for key, source in info["case_sources"].items():
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{key}.nii.gz")))
        assert set(np.unique(labels)) <= {0, *info["source_classes"][source]}
