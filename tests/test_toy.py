import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk

from headzoo.errors import HeadzooError
from headzoo.toy import (
    CODE_BRIGHT,
    CODE_DIM,
    COVERAGE_LIMIT,
    PRESETS,
    class_codes,
    lexicode,
    make_shape,
    volume_classes,
    write_toy_dataset,
)


def missing_in_training(preset: str, num_classes: int) -> set[int]:
    p = PRESETS[preset]
    return set(range(1, num_classes)) - {c for g in range(p.train) for c in volume_classes(g, num_classes, p.objects)}


@pytest.mark.parametrize("preset", ["small", "protocol", "protocol1000", "paper"])
@pytest.mark.parametrize("num_classes", [2, 10, 100, 200, 1000])
def test_every_class_occurs_in_training(preset, num_classes):
    assert not missing_in_training(preset, num_classes)


@pytest.mark.parametrize("preset", ["small", "protocol", pytest.param("protocol1000", marks=pytest.mark.slow)])
def test_cpu_presets_train_every_class_of_every_count_up_to_1000(preset):
    assert [c for c in range(2, 1001) if missing_in_training(preset, c)] == []


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


def min_hamming_distance(codes: np.ndarray) -> int:
    """Independent of toy.py: pairwise distances of the bool code words."""
    distances = (codes[:, None, :] != codes[None, :, :]).sum(-1)
    return int(distances[~np.eye(len(codes), dtype=bool)].min())


@pytest.mark.parametrize("bits, distance, size", [(7, 3, 16), (8, 4, 16), (16, 4, 2048), (15, 3, 2048)])
def test_lexicodes_are_the_hamming_codes(bits, distance, size):
    # Lexicodes of these lengths and distances are the (extended) Hamming codes, of known size.
    code = lexicode(bits, distance, 10**6)
    assert len(code) == size
    assert min_hamming_distance((code[:, None] >> np.arange(bits)) & 1 == 1) == distance


@pytest.mark.parametrize("shapes, bits, distance", [(99, 16, 6), (199, 16, 5), (999, 16, 4), (99, 12, 4), (999, 12, 2)])
def test_class_codes_are_distinct_non_zero_and_far_apart(shapes, bits, distance):
    codes = class_codes(shapes, bits, np.random.default_rng(0))
    assert codes.shape == (shapes, bits) and codes.any(axis=1).all()
    assert min_hamming_distance(codes) == distance
    assert (np.abs(codes.mean(axis=0) - 0.5) < 0.2).all()  # every channel carries information


def test_class_codes_refuse_more_classes_than_words():
    with pytest.raises(HeadzooError, match="only 15 non-zero words"):
        class_codes(16, 4, np.random.default_rng(0))


@pytest.mark.slow  # writes a toy dataset
def test_code_channels_show_each_objects_class_code(tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "coded", dataclasses.replace(PRESETS["tiny"], code_bits=5))
    folder = write_toy_dataset(tmp_path / "c", 12, "coded", seed=2)
    dataset = json.loads((folder / "dataset.json").read_text())
    assert len(dataset["channel_names"]) == 5
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr/toy_0001.nii.gz")))
    channels = np.stack(
        [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"imagesTr/toy_0001_{k:04d}.nii.gz"))) for k in range(5)]
    )
    assert not (folder / "imagesTr/toy_0001_0005.nii.gz").exists()
    assert np.abs(channels[:, label == 0].mean(axis=1)).max() < 5  # background: noise around 0 everywhere
    codes = {}
    for c in np.unique(label)[1:]:
        means = channels[:, label == c].mean(axis=1)
        assert ((np.abs(means - CODE_BRIGHT) < 10) | (np.abs(means - CODE_DIM) < 10)).all()
        codes[c] = tuple(means > (CODE_BRIGHT + CODE_DIM) / 2)
    assert len(set(codes.values())) == len(codes) and not any(not any(code) for code in codes.values())
    # 11 shapes in 5 bits: the even-weight code (distance 2; a distance-3 code has only 4 words)
    assert min_hamming_distance(np.array(list(codes.values()))) >= 2


@pytest.mark.parametrize("shapes", [100, 200, 1000])
def test_paper_preset_is_the_papers_toy_n_at_classes_n_plus_one(shapes):
    # `--classes` counts labels, background included: Toy N (N shape classes, §2.4) is --classes N + 1,
    # and then every shape occurs equally often in training: 900 volumes × 100 objects / N.
    p = PRESETS["paper"]
    counts = np.bincount([c for g in range(p.train) for c in volume_classes(g, shapes + 1, p.objects)])
    assert counts[0] == 0 and (counts[1:] == p.train * p.objects // shapes).all()
