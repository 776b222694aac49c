"""Heads inside nnU-Net's own training and prediction, as an nnU-Net user runs them: toy data →
nnU-Net planning and preprocessing → `headzoo nnunet-train` → `headzoo predict`; the dense head
against nnU-Net's own predictor; bad input to `headzoo predict`."""

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from headzoo.config import parse_options
from headzoo.errors import HeadzooError
from headzoo.nnunet.train import EXT_TRAINER_FOLDER
from headzoo.registry import create_head, list_heads
from headzoo.nnunet.trainer import options_from_environment
from headzoo.toy import write_toy_dataset

DATASET_ID, CLASSES = 987, 5
DATASET = f"Dataset{DATASET_ID}_HeadzooToy"


def test_nnunet_discovery_finds_every_head_trainer_in_the_ext_folder():
    """nnUNetv2_train's own lookup (recursive_find_python_class on nnUNet_extTrainer), plug-in included."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    folder = str(EXT_TRAINER_FOLDER)
    for name in ("nnUNetTrainer_chunked", "nnUNetTrainer_knn_1epoch", "nnUNetTrainer_dummy_5epochs"):
        found = recursive_find_python_class(
            folder, name, None, base_folder=folder, cleanup_imports_from_base_folder=True
        )
        assert found is not None and found.__name__ == name and issubclass(found, nnUNetTrainer)
    assert recursive_find_python_class(folder, "nnUNetTrainer_nohead", None, base_folder=folder) is None


def test_head_options_from_the_environment_parse_as_json_values(monkeypatch):
    monkeypatch.setenv("HEADZOO_HEAD_OPTIONS", "rank=16, chunk=10,backend=faiss,flag=true")
    assert options_from_environment() == {"rank": 16, "chunk": 10, "backend": "faiss", "flag": True}
    monkeypatch.setenv("HEADZOO_HEAD_OPTIONS", "rank=16,chunk")
    with pytest.raises(HeadzooError, match="^HEADZOO_HEAD_OPTIONS expects KEY=VALUE, got 'chunk'$"):
        options_from_environment()
    monkeypatch.delenv("HEADZOO_HEAD_OPTIONS")
    assert options_from_environment() == {}


def test_the_trainers_network_is_the_runs_with_the_head_in_the_seg_layer():
    """Both come from backbone.build_network + attach_head: the run's weights load into the trainer's network under
    nnU-Net's module names (the head at the full-resolution seg layer, no lower-resolution seg convs, which DDP would
    wait on) and give the run's output to the bit."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    from headzoo.backbone import attach_head, build_network, get_backbone, head_of
    from headzoo.nnunet.network import build_head_network

    architecture = get_backbone("small")[0]
    backbone, features = build_network(architecture, 1, seed=0)
    run = attach_head(backbone, create_head("chunked", features, CLASSES, rank=3)).eval()
    trainer = build_head_network(
        ConfigurationManager({"architecture": architecture}), 1, CLASSES, "chunked", {"rank": 3}
    ).eval()
    assert trainer.load_state_dict(run.state_dict(), strict=True)
    last = len(architecture["arch_kwargs"]["features_per_stage"]) - 2  # one seg layer per decoder stage
    seg = {k for k in run.state_dict() if k.startswith("decoder.seg_layers.")}
    assert seg == {f"decoder.seg_layers.{last}.{k}" for k in head_of(run).state_dict()} and seg
    assert isinstance(head_of(trainer), type(head_of(run))) and features == 16
    image = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trainer(image), run(image))


@pytest.mark.parametrize("head_name", list_heads())
def test_export_predicts_slab_by_slab_as_on_the_whole_volume(head_name, monkeypatch):
    """Export calls head.predict on slabs of the first axis; every registered head gives the whole volume's labels."""
    from types import SimpleNamespace

    import headzoo.nnunet.predictor as predictor

    torch.manual_seed(0)
    head = create_head(head_name, 8, 6).eval()
    with torch.no_grad():
        output = head(torch.randn(1, 8, 7, 5, 6))[0]
    monkeypatch.setattr(predictor, "PREDICT_VOXELS", 2 * 5 * 6)  # slabs of 2 rows, the last one of 1
    labels = predictor._HeadLabels(SimpleNamespace(foreground_labels=[1, 2, 3, 4, 5]), head)
    np.testing.assert_array_equal(
        labels.convert_logits_to_segmentation(output.half().numpy()),
        head.predict(output.half().float()[None])[0].numpy(),
    )


def headzoo(*args, env):
    return subprocess.run([sys.executable, "-m", "headzoo", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    """A planned and preprocessed tiny toy in fresh nnU-Net folders, and the environment of a user working there."""
    root = tmp_path_factory.mktemp("nnunet")
    folders = {v: root / v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    with pytest.MonkeyPatch.context() as patch:
        for variable, folder in folders.items():
            folder.mkdir()
            patch.setenv(variable, str(folder))
        patch.setenv("nnUNet_n_proc_DA", "1")  # nnU-Net's planner sets torch's thread count from it
        write_toy_dataset(folders["nnUNet_raw"] / DATASET, CLASSES, "tiny", seed=0)
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints,
            plan_experiments,
            preprocess,
        )

        extract_fingerprints([DATASET_ID], num_processes=1, verbose=False, show_progress_bar=False)
        plan_experiments([DATASET_ID])
        preprocess([DATASET_ID], configurations=("3d_fullres",), num_processes=(1,), show_progress_bar=False)
        env = {**os.environ, "nnUNet_def_n_proc": "1", "nnUNet_n_proc_DA": "0"}
    return {"env": env, "raw": folders["nnUNet_raw"] / DATASET, "results": folders["nnUNet_results"] / DATASET}


TRAINED: dict[str, str] = {}


def trained(nnunet, head: str, options: str = "") -> str:
    """`headzoo nnunet-train` with the short test variant, once per head; the trainer's name."""
    trainer = f"nnUNetTrainer_{head}_smoke"
    if trainer not in TRAINED:
        env = {**nnunet["env"], "HEADZOO_HEAD_OPTIONS": options}
        result = headzoo("nnunet-train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu", env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        TRAINED[trainer] = trainer
    return trainer


def predict(nnunet, trainer, out, *extra):
    return headzoo(
        "predict",
        "-i",
        str(nnunet["raw"] / "imagesTs"),
        "-o",
        str(out),
        "-d",
        str(DATASET_ID),
        "-c",
        "3d_fullres",
        "-f",
        "0",
        "-tr",
        trainer,
        "-device",
        "cpu",
        "-npp",
        "0",
        *extra,
        env=nnunet["env"],
    )


def read_labels(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.mark.slow
@pytest.mark.parametrize("head,options", [("chunked", "rank=3,chunk=2"), ("dummy", "")])
def test_train_validate_and_predict_through_nnunet(nnunet, tmp_path, head, options):
    trainer = trained(nnunet, head, options)
    fold = nnunet["results"] / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    expected = parse_options(options, "HEADZOO_HEAD_OPTIONS")
    assert checkpoint["init_args"]["headzoo"]["head"] == head
    assert expected.items() <= checkpoint["init_args"]["headzoo"]["options"].items()
    # nnU-Net's validation at the end of training went through the head: label files and a summary
    assert (fold / "validation" / "summary.json").is_file()
    assert len(list((fold / "validation").glob("*.nii.gz"))) == 2

    result = predict(nnunet, trainer, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    images = sorted(p.name.replace("_0000.nii.gz", ".nii.gz") for p in (nnunet["raw"] / "imagesTs").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == images
    for name in images:
        labels = read_labels(tmp_path / "out" / name)
        reference = sitk.ReadImage(str(nnunet["raw"] / "imagesTs" / name.replace(".nii.gz", "_0000.nii.gz")))
        assert labels.shape == sitk.GetArrayFromImage(reference).shape
        assert labels.min() >= 0 and labels.max() < CLASSES


@pytest.mark.slow
def test_dense_predict_matches_nnunet_predictor(nnunet, tmp_path, monkeypatch):
    """The same checkpoint through `headzoo predict` (K = C channels, head.predict) and through nnUNetPredictor
    (C logits, nnU-Net's export), as nnUNetv2_predict runs it: identical label maps, with and without mirroring."""
    from headzoo.nnunet.trainer import resolve_trainer
    import nnunetv2.inference.predict_from_raw_data as nnunet_predict

    trainer = trained(nnunet, "dense")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, nnunet["env"][variable])
    # nnU-Net's discovery imports every trainer it ships (Primus → torchvision, which cannot load here)
    monkeypatch.setattr(nnunet_predict, "recursive_find_trainer_class_by_name", resolve_trainer)
    for tta in (True, False):
        ours, theirs = tmp_path / f"ours{tta}", tmp_path / f"theirs{tta}"
        theirs.mkdir()  # as nnUNetv2_predict does before predicting
        result = predict(nnunet, trainer, ours, *([] if tta else ["--disable_tta"]))
        assert result.returncode == 0, result.stderr[-3000:]
        predictor = nnunet_predict.nnUNetPredictor(
            tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, device=torch.device("cpu"), allow_tqdm=False
        )
        predictor.initialize_from_trained_model_folder(
            str(nnunet["results"] / f"{trainer}__nnUNetPlans__3d_fullres"), (0,), "checkpoint_final.pth"
        )
        predictor.predict_from_files_sequential(str(nnunet["raw"] / "imagesTs"), str(theirs))
        names = sorted(p.name for p in theirs.glob("*.nii.gz"))
        assert names and names == sorted(p.name for p in ours.glob("*.nii.gz"))
        for name in names:
            a, b = sitk.ReadImage(str(ours / name)), sitk.ReadImage(str(theirs / name))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
            assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
            assert a.GetDirection() == b.GetDirection() and a.GetPixelID() == b.GetPixelID()


def bad_inputs(nnunet, tmp_path):
    images = nnunet["raw"] / "imagesTs"
    two_channels = tmp_path / "two_channels"
    two_channels.mkdir()
    for path in images.iterdir():
        for channel in ("0000", "0001"):
            (two_channels / path.name.replace("0000", channel)).write_bytes(path.read_bytes())
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    return [
        (["-chk", "checkpoint_missing.pth"], "no checkpoint"),
        (["-d", "986"], "no nnU-Net dataset '986'"),
        (["-i", str(two_channels)], "the model takes 1 channel(s)"),
        (["-o", str(blocker / "out")], "cannot write to output folder"),
    ]


@pytest.mark.slow
def test_bad_input_to_predict_is_one_line_and_writes_nothing(nnunet, tmp_path):
    trainer = trained(nnunet, "chunked", "rank=3,chunk=2")
    for extra, message in bad_inputs(nnunet, tmp_path):
        out = tmp_path / "out"
        arguments = {
            "-i": str(nnunet["raw"] / "imagesTs"),
            "-o": str(out),
            "-d": str(DATASET_ID),
            "-c": "3d_fullres",
            "-f": "0",
            "-tr": trainer,
            "-device": "cpu",
            "-npp": "0",
            **dict(zip(extra[::2], extra[1::2])),
        }
        result = headzoo("predict", *[x for pair in arguments.items() for x in pair], env=nnunet["env"])
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
        assert not out.exists() or not list(out.rglob("*.nii.gz")), list(out.rglob("*"))


@pytest.mark.slow
def test_validation_only_rebuilds_the_head_from_the_checkpoint(nnunet):
    """`--val` without HEADZOO_HEAD_OPTIONS: the head is rebuilt with the options saved in the checkpoint
    (rank 3; the default would be rank 5 and the weights would not load)."""
    trainer = trained(nnunet, "chunked", "rank=3,chunk=2")
    summary = nnunet["results"] / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0" / "validation" / "summary.json"
    summary.unlink()
    env = {k: v for k, v in nnunet["env"].items() if k != "HEADZOO_HEAD_OPTIONS"}
    result = headzoo(
        "nnunet-train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu", "--val", env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert summary.is_file()
