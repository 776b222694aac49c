"""Held-out Dice is nnU-Net's: per case and class, exported to the original geometry, checked against
``nnunetv2.evaluation.evaluate_predictions.compute_metrics_on_folder`` on the same files; evaluating does not
change the training."""

import numpy as np
import pytest
import torch

from headzoo.inference import DiceCounter


def _nnunet_dice(reference_folder, prediction_folder, labels, ignore_label=None):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return compute_metrics_on_folder(
        str(reference_folder),
        str(prediction_folder),
        None,
        SimpleITKIO(),
        ".nii.gz",
        labels,
        ignore_label,
        num_processes=1,
    )


def _write(folder, name, seg):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    folder.mkdir(exist_ok=True)
    properties = {
        "sitk_stuff": {
            "spacing": (1.0, 1.0, 1.0),
            "origin": (0.0, 0.0, 0.0),
            "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        }
    }
    SimpleITKIO().write_seg(seg, str(folder / f"{name}.nii.gz"), properties)


@pytest.mark.slow  # nnU-Net preprocessing and export
def test_dice_equals_nnunet_compute_metrics_on_folder(tmp_path):
    """Specks of classes a case lacks, an ignore label, a class only some cases have: nnU-Net's numbers."""
    rng = np.random.default_rng(0)
    classes, ignore = 6, 6
    counter = DiceCounter(classes, ignore)
    for case in range(4):
        reference = np.zeros((12, 12, 12), np.int64)
        for label in rng.choice(np.arange(1, classes), size=3, replace=False):  # each case has 3 of the 5 classes
            corner = rng.integers(0, 8, 3)
            reference[tuple(slice(c, c + 4) for c in corner)] = label
        prediction = reference.copy()
        prediction[rng.random(reference.shape) < 0.05] = rng.integers(0, classes, 1)[0]  # errors and specks
        prediction[case, case, case] = (case % (classes - 1)) + 1  # a one-voxel speck
        reference[rng.random(reference.shape) < 0.02] = ignore
        _write(tmp_path / "ref", f"case{case}", reference)
        _write(tmp_path / "pred", f"case{case}", prediction)
        counter.update(prediction, reference, f"case{case}")
    expected = _nnunet_dice(tmp_path / "ref", tmp_path / "pred", list(range(1, classes)), ignore)
    per_class = [expected["mean"][label]["Dice"] for label in range(1, classes)]
    np.testing.assert_allclose(counter.per_class()[1:], per_class, rtol=0, atol=1e-9)
    assert np.all(np.isfinite(per_class)) and counter.pooled_mean() > counter.mean_foreground()
    assert abs(counter.mean_foreground() - expected["foreground_mean"]["Dice"]) < 1e-9
    worst = min(per_class)  # 10% of 5 classes: the single worst
    assert counter.worst_mean(0.1) == pytest.approx(worst, abs=1e-12)


@pytest.mark.slow  # nnU-Net's evaluation over saved files
def test_a_class_no_case_scores_is_left_out_where_nnunet_gives_nan(tmp_path):
    reference = np.zeros((6, 6, 6), np.int64)
    reference[:3] = 1
    _write(tmp_path / "ref", "a", reference)
    _write(tmp_path / "pred", "a", reference)
    counter = DiceCounter(3)
    counter.update(reference, reference)
    expected = _nnunet_dice(tmp_path / "ref", tmp_path / "pred", [1, 2])
    assert np.isnan(expected["foreground_mean"]["Dice"]) and np.isnan(counter.per_class()[2])
    assert counter.mean_foreground() == expected["mean"][1]["Dice"] == 1.0


def test_pooled_and_per_case_dice_differ_by_the_false_positives_pooling_hides():
    """Class 2 found perfectly in case a, a 1-voxel speck of it in case b (which lacks it)."""
    a = np.zeros((4, 4, 4), np.int64)
    a[:2] = 2
    b = np.zeros((4, 4, 4), np.int64)
    b[2:] = 1
    speck = b.copy()
    speck[0, 0, 0] = 2
    counter = DiceCounter(3)
    counter.update(a, a, "a")
    counter.update(speck, b, "b")
    assert counter.per_case()[1, 2] == 0.0 and np.isnan(counter.per_case()[0, 1])
    assert counter.per_class()[2] == 0.5  # mean of 1 and 0: nnU-Net's
    assert counter.pooled_per_class()[2] == pytest.approx(2 * 32 / (2 * 32 + 1))  # the speck nearly vanishes


def test_evaluating_the_averaged_weights_leaves_the_training_weights_bit_for_bit():
    import schedulefree
    from headzoo.training import averaged_weights

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Linear(100, 500), torch.nn.ReLU(), torch.nn.Linear(500, 100))
    optimizer = schedulefree.AdamWScheduleFree(network.parameters(), lr=0.02, warmup_steps=2)
    optimizer.train()
    for _ in range(20):
        network(torch.randn(8, 100)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    before = [p.detach().clone() for p in network.parameters()]
    with averaged_weights(network, optimizer):
        averaged = [p.detach().clone() for p in network.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(averaged, before))  # evaluation saw other weights
    assert all(torch.equal(p, b) for p, b in zip(network.parameters(), before))
    assert all(g["train_mode"] for g in optimizer.param_groups) and network.training
    optimizer.eval()  # ScheduleFree's own round trip is what moved weights by an ulp
    optimizer.train()
    assert any(not torch.equal(p, b) for p, b in zip(network.parameters(), before))


def _zero_the_background_at_the_border(folder, width=3):
    import SimpleITK as sitk

    for image_file in sorted(folder.glob("images*/*_0000.nii.gz")):
        label_file = folder / image_file.parent.name.replace("images", "labels") / (image_file.name[:-12] + ".nii.gz")
        image = sitk.ReadImage(str(image_file))
        data, labels = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))
        border = np.ones(data.shape, bool)
        border[(slice(width, -width),) * 3] = False
        data[border & (labels == 0)] = 0
        zeroed = sitk.GetImageFromArray(data)
        zeroed.CopyInformation(image)
        sitk.WriteImage(zeroed, str(image_file), True)


@pytest.mark.slow
def test_held_out_dice_on_a_zero_bordered_dataset_equals_nnunets(tmp_path):
    """An image whose zero background touches the border (as in MRI): nnU-Net crops to the non-zero box and
    marks the background outside the body -1 in its preprocessed labels. Evaluation exports to the original
    geometry and reads the raw labels, so the Dice is nnU-Net's own on the predictions saved here."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from headzoo.backbone import attach_head
    from headzoo.inference import segment
    from headzoo.dataset import DATA_CONFIGURATION, build_backbone_from_plan, test_cases
    from headzoo.plan import prepare_folder
    from headzoo.registry import create_head
    from headzoo.toy import write_toy_dataset

    folder = write_toy_dataset(tmp_path / "Dataset", 4, "tiny", 0)
    _zero_the_background_at_the_border(folder)
    prepared = prepare_folder(folder)
    cases = list(test_cases(prepared))
    box = cases[0].properties["bbox_used_for_cropping"]
    assert any(high - low < edge for (low, high), edge in zip(box, cases[0].reference.shape))  # really cropped
    backbone, features = build_backbone_from_plan(prepared, "small", 0)
    head = create_head("dense", features, 4, batch_dice=False, ignore_label=None)
    network = attach_head(backbone, head).eval()
    counter = DiceCounter(4)
    configuration = prepared.plans_manager.get_configuration(DATA_CONFIGURATION)
    (tmp_path / "pred").mkdir()
    for case in cases:
        prediction = segment(
            network,
            head,
            case.image,
            (16, 16, 16),
            case.properties,
            prepared.plans_manager,
            configuration,
            prepared.dataset_json,
        )
        assert prediction.shape == case.reference.shape
        counter.update(prediction, case.reference, case.key)
        SimpleITKIO().write_seg(prediction, str(tmp_path / "pred" / f"{case.key}.nii.gz"), case.properties)
    expected = _nnunet_dice(folder / "labelsTs", tmp_path / "pred", [1, 2, 3])
    np.testing.assert_allclose(
        counter.per_class()[1:], [expected["mean"][c]["Dice"] for c in (1, 2, 3)], rtol=0, atol=1e-9
    )
