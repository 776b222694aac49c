"""Nothing wrong is recorded as `ok`, round two (issue 22): one test per failure path, named `test_rowN_...`
after the issue's table. Bad input is one line and exit status 2 (or a HeadzooError where the test calls the
checking function itself), and never reaches data preparation: `runner.prepare` is replaced by a trap."""

import json
import math
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

import headzoo
import test_nnunet
from headzoo.config import RunConfig, parse_option, to_record
from headzoo.errors import HeadzooError
from headzoo.results import SCHEMA_VERSION, check_results_file, read_records, upsert_record

from test_nnunet import nnunet  # noqa: F401  (the fixture: a planned and preprocessed tiny toy)

RUN = ["run", "--preset", "tiny", "--steps", "6", "--patch", "16"]


@pytest.fixture
def no_data(monkeypatch):
    """Any data preparation fails the test: bad settings must be refused before it."""
    import headzoo.runner

    def trap(config):
        raise AssertionError(f"data was prepared for {config}")

    monkeypatch.setattr(headzoo.runner, "prepare", trap)


def main(arguments, capsys, monkeypatch):
    """`headzoo ARGUMENTS` through the CLI's main() in this process: (exit status, stderr)."""
    from headzoo.cli import main as cli_main

    monkeypatch.setattr(sys, "argv", ["headzoo", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        cli_main()
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line(code, stderr, message):
    assert code == 2 and stderr.count("\n") == 1 and message in stderr, (code, stderr)


def record(**values):
    """A results row as `headzoo run` writes it (the settings, an ok status and measurements)."""
    return {
        **to_record(RunConfig(head="dense", classes=5, seed=0, patch=(16, 16, 16))),
        "schema_version": SCHEMA_VERSION,
        "device_name": "cpu (test)",
        "status": "ok",
        "error": None,
        "dice_mean": 0.5,
        "dice_classes_present": 4,
        "peak_memory_bytes": 2**20,
        "step_time_median_s": 0.1,
        "run_id": "r0",
        "dice_definition": "nnunet",
        **values,
    }


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- the results file (rows 1, 4, 10, 11, 12, 13, 17) and the leaderboard folder (row 3) ---------------------


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_row1_an_out_that_is_a_device_is_refused_and_never_replaced(tmp_path):
    with pytest.raises(HeadzooError, match="/dev/null is not a regular file"):
        check_results_file(Path("/dev/null"))
    link = tmp_path / "results.jsonl"
    link.symlink_to("/dev/null")
    with pytest.raises(HeadzooError, match="not a regular file"):
        upsert_record(link, record())
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_row17_an_out_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "results.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(HeadzooError, match="is not a regular file"):
        check_results_file(fifo)
    with pytest.raises(HeadzooError, match="is not a regular file"):
        read_records(fifo)  # `headzoo leaderboard --results FIFO`


@pytest.mark.slow  # renders the plots
def test_row3_leaderboard_touches_nothing_it_did_not_write(tmp_path):
    from headzoo.leaderboard import render

    results = write_rows(tmp_path / "results.jsonl", [record(), record(classes=10)])
    user = tmp_path / "mine"
    user.mkdir()
    (user / "README.md").write_text("# my notes\n")
    (user / "dice_mean-0000abcd.png").write_bytes(b"my plot")
    with pytest.raises(HeadzooError, match="holds a README.md that is not a headzoo leaderboard"):
        render(results, user)
    assert (user / "README.md").read_text() == "# my notes\n" and (user / "dice_mean-0000abcd.png").exists()
    board = tmp_path / "board"
    render(results, board)
    plots = sorted(p.name for p in board.glob("*.png"))
    (board / "dice_mean-0000abcd.png").write_bytes(b"my plot")  # a user's file beside a leaderboard
    write_rows(results, [record(batch=3), record(batch=3, classes=10)])  # another group: the old plots are stale
    readme = render(results, board).read_text()
    assert plots and not any(name in readme or (board / name).exists() for name in plots)
    assert (board / "dice_mean-0000abcd.png").read_bytes() == b"my plot"


def test_row13_leaderboard_out_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    results = write_rows(tmp_path / "results.jsonl", [record()])
    afile = tmp_path / "board"
    afile.write_text("")
    code, stderr = main(["leaderboard", "--results", str(results), "--out", str(afile)], capsys, monkeypatch)
    assert_one_line(code, stderr, "is a file; give a folder")


def test_row4_a_bad_line_written_during_a_run_keeps_the_runs_record(tmp_path, capsys, monkeypatch, no_data):
    import headzoo.runner

    out = write_rows(tmp_path / "results.jsonl", [record(seed=1)])
    finished = record(run_id="finished-run")

    def run_while_someone_breaks_the_file(config, show_progress=True):
        with out.open("a") as handle:
            handle.write("{half a line\n")
        return finished

    monkeypatch.setattr(headzoo.runner, "run", run_while_someone_breaks_the_file)
    code, stderr = main([*RUN, "--head", "dense", "--classes", "5", "--out", str(out)], capsys, monkeypatch)
    assert_one_line(code, stderr, "results.jsonl:2 is not a JSON line")
    kept = tmp_path / "results.jsonl.unrecorded-finished-run.json"
    assert f"record is kept in {kept}" in stderr
    assert json.loads(kept.read_text())["run_id"] == "finished-run"


def test_row10_stale_temporary_files_are_removed_under_the_lock(tmp_path):
    out = tmp_path / "results.jsonl"
    upsert_record(out, record(seed=0))
    killed = [tmp_path / ".results.jsonl.k3x_9a0q", tmp_path / ".results.jsonl.tmp-ab12cd34"]  # old and new names
    for path in killed:
        path.write_bytes(b"x" * 5_000_000)
    unrelated = tmp_path / ".results.jsonl.notes"
    unrelated.write_text("mine")
    upsert_record(out, record(seed=1))
    assert not any(p.exists() for p in killed) and unrelated.exists()
    assert (tmp_path / ".results.jsonl.lock").exists() and len(read_records(out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".results.jsonl.lock",
        ".results.jsonl.notes",
        "results.jsonl",
    ]


BAD_ROWS = [  # (row, what the one line says); rows 11 and 13 of the issue
    ({k: v for k, v in record().items() if k != "status"}, "lacks status"),
    (record(dice_mean=None), "an ok run that scored 4 classes has no dice_mean"),
    (record(dice_mean=7.5), "dice_mean must be a number in [0, 1]"),
    (record(peak_memory_bytes=-5), "peak_memory_bytes must be an integer of at least 0"),
    (record(schema_version=99), f"schema_version must be an integer from 1 to {SCHEMA_VERSION}"),
    (record(schema_version="2"), "schema_version must be an integer"),
    (record(patch="16"), "patch must be a list of 3 positive integers"),
    (record(classes="five"), "classes must be an integer of at least 2"),
    (record(dice_mean="0.9"), "dice_mean must be a number in [0, 1]"),
    (record(options=["rank", 3]), "options must be an object"),
    ({}, "lacks head, status"),
    (record(curve=[{"step": 10, "dice_mean": 0.5}]), "curve must be null or a list of points"),
    (record(curve={"step": 10}), "curve must be null or a list of points"),
    (record(seed=-1), "seed must be an integer of at least 0"),
    (record(status="fine"), "status must be ok, oom or error"),
    (5, "is not a JSON object: 5"),
    (None, "is not a JSON object: null"),
    ([1, 2], "is not a JSON object"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_rows_11_12_13_a_bad_row_is_one_line_naming_file_and_line(tmp_path, capsys, monkeypatch, no_data, row, message):
    results = write_rows(tmp_path / "results.jsonl", [record(seed=3), row])
    code, stderr = main(
        ["leaderboard", "--results", str(results), "--out", str(tmp_path / "board")], capsys, monkeypatch
    )
    assert_one_line(code, stderr, "results.jsonl:2")
    assert message in stderr
    code, stderr = main([*RUN, "--head", "dense", "--out", str(results)], capsys, monkeypatch)  # before training
    assert_one_line(code, stderr, message)


def test_row11_identical_keys_are_refused_not_shown_as_a_seed_range(tmp_path):
    results = write_rows(tmp_path / "results.jsonl", [record(dice_mean=0.2), record(dice_mean=0.9, run_id="r1")])
    with pytest.raises(HeadzooError, match="results.jsonl:2 repeats the results key of line 1"):
        read_records(results)


def test_row11_a_crash_row_without_a_device_is_shown(tmp_path):
    from headzoo.leaderboard import render

    crash = {**record(classes=7), "device_name": None, "status": "oom", "dice_mean": None}
    results = write_rows(tmp_path / "results.jsonl", [record(), crash])
    readme = render(results, tmp_path / "board").read_text()
    assert "## device unknown" in readme and "`oom`" in readme


def test_row12_a_non_utf8_file_and_a_symlink_loop_are_one_line(tmp_path, capsys, monkeypatch, no_data):
    results = tmp_path / "results.jsonl"
    results.write_bytes(json.dumps(record()).encode() + b"\n\xff\xfe{}\n")
    code, stderr = main(["leaderboard", "--results", str(results), "--out", str(tmp_path / "b")], capsys, monkeypatch)
    assert_one_line(code, stderr, "results.jsonl:2 is not UTF-8 text")
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    code, stderr = main([*RUN, "--head", "dense", "--out", str(loop)], capsys, monkeypatch)
    assert_one_line(code, stderr, "Too many levels of symbolic links")


def test_the_repositorys_leaderboard_results_still_read():
    results = Path(__file__).parent.parent / "leaderboard" / "results.jsonl"
    from headzoo.results import LEADERBOARD_REQUIRED

    assert len(read_records(results, LEADERBOARD_REQUIRED)) == len(results.read_text().splitlines())


# --- settings and head options (rows 5, 8, 14, 18, 21) ------------------------------------------------------

SETTINGS = [  # rows 5 and 8: each refused before any data, in one line
    (["--head", "knn", "--option", "tau=Infinity"], "tau=inf is not a finite number"),
    (["--head", "chunked", "--option", "chunk=Infinity"], "chunk=inf is not a finite number"),
    (["--head", "knn", "--option", "margin=NaN"], "margin=nan is not a finite number"),
    (["--head", "dense", "--lr", "inf"], "--lr must be a finite number above 0"),
    (["--head", "dense", "--lr", "-1"], "--lr must be a finite number above 0"),
    (["--head", "dense", "--grad-clip", "nan"], "--grad-clip must be a finite number above 0"),
    (["--head", "dense", "--grad-clip", "-1"], "--grad-clip must be a finite number above 0"),
    (["--head", "knn", "--option", "embedding_beta1=2"], "embedding_beta1 must be in [0, 1)"),
    (["--head", "knn", "--option", "embedding_beta1=-5"], "embedding_beta1 must be in [0, 1)"),
    (["--head", "dense", "--option", "do_bg=no"], "do_bg must be true or false, got 'no'"),
    (["--head", "sigmoid", "--option", "chunk=1.5"], "chunk must be an integer, got 1.5"),
    (["--head", "knn", "--option", "k=100"], "k must be in [1, 4]"),
    # row 14
    (["--head", "dense", "--option", "in_channels=3"], "in_channels is set by the run"),
    (["--head", "dense", "--option", "num_classes=3"], "num_classes is set by the run"),
    (["--head", "dense", "--option", "name=x"], "no option 'name'"),
    (["--head", "chunked", "--option", "rank=1.5"], "rank must be an integer or null, got 1.5"),
    (["--head", "knn", "--option", "d=1.5"], "d must be an integer or null, got 1.5"),
    # row 18
    (["--head", "chunked", "--classes", "7", "--option", "rank=0"], "rank must be in [1, 7]"),
]


@pytest.mark.parametrize("arguments,message", SETTINGS, ids=[m for _, m in SETTINGS])
def test_rows_5_8_14_18_bad_settings_are_refused_before_any_data(
    tmp_path, capsys, monkeypatch, no_data, arguments, message
):
    classes = [] if "--classes" in arguments else ["--classes", "5"]
    code, stderr = main([*RUN, *classes, *arguments, "--out", str(tmp_path / "r.jsonl")], capsys, monkeypatch)
    assert_one_line(code, stderr, message)
    assert not (tmp_path / "r.jsonl").exists()


def test_row8_the_knn_defaults_fit_few_classes_and_the_record_says_what_ran():
    head = headzoo.create_head("knn", 4, 5)
    assert (head.k, head.d) == (4, 5)  # min(7, C−1) and min(12, C): never a silent clamp of a given k
    assert headzoo.create_head("knn", 4, 20, k=3).k == 3


@pytest.mark.parametrize("option", ["in_channels", "num_classes", "name"])
def test_row14_options_named_like_create_heads_arguments_are_one_line(option, monkeypatch):
    from headzoo.nnunet.trainer import options_from_environment

    monkeypatch.setenv("HEADZOO_HEAD_OPTIONS", f"{option}=3")
    with pytest.raises(HeadzooError, match=f"head 'dense' rejected its options .*'{option}'"):
        headzoo.create_head("dense", 8, 5, **options_from_environment())  # as build_head_network calls it


def test_row18_a_sweep_refuses_bad_variants_while_planning(no_data):
    from headzoo.cli import parse_variant
    from headzoo.sweep import plan_grid

    settings = {"preset": "tiny", "steps": 6, "patch": (16, 16, 16)}
    with pytest.raises(HeadzooError, match="rank must be an integer or null, got '3:chunk=2'"):
        plan_grid(settings, [("dense", {}), parse_variant("sigmoid:rank=3:chunk=2")], [5], [0])
    with pytest.raises(HeadzooError, match="rank must be in"):
        plan_grid(settings, [("chunked", {"rank": 0})], [7], [0])
    with pytest.raises(HeadzooError, match="--variant sigmoid:=3 expects KEY=VALUE"):
        parse_variant("sigmoid:=3")


def test_row21_a_variant_without_a_value_names_variant_not_option(tmp_path, capsys, monkeypatch):
    code, stderr = main(
        ["sweep", "--heads", "", "--variant", "sigmoid:rank", "--classes", "5", "--out", str(tmp_path / "r.jsonl")],
        capsys,
        monkeypatch,
    )
    assert_one_line(code, stderr, "--variant sigmoid:rank expects KEY=VALUE, got 'rank'")
    assert "--option" not in stderr


def test_parse_option_keeps_its_json_values():
    assert parse_option("rank=16") == ("rank", 16) and parse_option("kernel=torch") == ("kernel", "torch")
    with pytest.raises(HeadzooError, match="--option expects KEY=VALUE, got '=3'"):
        parse_option("=3")


# --- the sigmoid head's ignore label (row 9) -----------------------------------------------------------------


def _multitalent_loss_without_ignored_voxels(logits, target, ignore_label):
    """Eq. (2) in float64 over each sample's kept voxels only (every class annotated): Σ_c Σ_b BCE mean over the
    sample's kept voxels − Σ_c 2·Σ_b Σ_kept p·y / Σ_b Σ_kept (p + y)."""
    b, foreground = logits.shape[:2]
    total = 0.0
    for c in range(foreground):
        intersect = denominator = 0.0
        for i in range(b):
            keep = target[i] != ignore_label
            z = logits[i, c][keep].double()
            y = (target[i][keep] == c + 1).double()
            total += F.binary_cross_entropy_with_logits(z, y).item()
            p = torch.sigmoid(z)
            intersect += (p * y).sum().item()
            denominator += (p + y).sum().item()
        total -= 2 * intersect / max(denominator, 1e-7)
    return total


@pytest.mark.parametrize("options", [{}, {"rank": 3, "chunk": 2}])
def test_row9_sigmoid_leaves_ignore_label_voxels_out_of_its_loss(options):
    torch.manual_seed(0)
    classes, ignore = 6, 6
    head = headzoo.create_head("sigmoid", 4, classes, ignore_label=ignore, **options).double()
    features = torch.randn(2, 4, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, classes, (2, 1, 4, 5, 3))
    target[0, 0, :2] = ignore  # different counts of ignored voxels per sample
    target[1, 0, :, :1] = ignore
    output = head(features)
    loss = head.loss(output, target)
    logits = head.logits(output, slice(1, classes)).flatten(2)
    expected = _multitalent_loss_without_ignored_voxels(logits.detach(), target.flatten(1), ignore)
    assert math.isclose(loss.item(), expected, rel_tol=1e-10)
    output.retain_grad()
    loss.backward()
    ignored = (target == ignore).expand_as(output)
    assert output.grad[ignored].abs().max() == 0 and output.grad[~ignored].abs().max() > 0


# --- the --dataset folder (rows 6, 15, 19, 20) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    from headzoo.toy import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "Dataset", 4, "tiny", 0)


def _copy(folder, tmp_path, name="copy"):
    return Path(shutil.copytree(folder, tmp_path / name))


def _edit_json(folder, **changes):
    dataset_json = {**json.loads((folder / "dataset.json").read_text()), **changes}
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return dataset_json


def _verify(folder):
    from headzoo.validation import verify_raw_dataset

    verify_raw_dataset(folder, json.loads((folder / "dataset.json").read_text()))


def test_row6_region_labels_are_refused(toy_folder, tmp_path, capsys, monkeypatch, no_data):
    copy = _copy(toy_folder, tmp_path)
    labels = json.loads((copy / "dataset.json").read_text())["labels"]
    _edit_json(copy, labels={**labels, "whole": [1, 2, 3]}, regions_class_order=[1, 2, 3, 4])
    with pytest.raises(HeadzooError, match="declares region-based labels"):
        _verify(copy)
    code, stderr = main(
        [*RUN, "--head", "dense", "--dataset", str(copy), "--out", str(tmp_path / "r.jsonl")], capsys, monkeypatch
    )
    assert_one_line(code, stderr, "regions are not supported")


def test_row19_labels_that_are_not_consecutive_are_refused_up_front(toy_folder, tmp_path):
    copy = _copy(toy_folder, tmp_path)
    _edit_json(copy, labels={"background": 0, "a": 1, "b": 5})
    with pytest.raises(HeadzooError, match=r"copy/dataset.json: labels must be consecutive .*declared: 0, 1, 5"):
        _verify(copy)


def _rewrite_images(folder, split, change, channel="0000"):
    for path in sorted((folder / f"images{split}").glob("*_0000.nii.gz")):
        image = sitk.ReadImage(str(path))
        changed = change(image)
        sitk.WriteImage(changed, str(path).replace("_0000.nii.gz", f"_{channel}.nii.gz"))


def test_row15_channels_of_different_spacing_are_one_line_naming_the_case(toy_folder, tmp_path):
    copy = _copy(toy_folder, tmp_path)
    _edit_json(copy, channel_names={"0": "a", "1": "b"})

    def coarser(image):
        image = sitk.Image(image)
        image.SetSpacing([2.0, 2.0, 2.0])
        return image

    for split in ("Tr", "Ts"):
        _rewrite_images(copy, split, coarser, channel="0001")
    with pytest.raises(
        HeadzooError,
        match=r"copy/labelsTr/toy_0000: ERROR! Not all input images have the same "
        r"spacing!.*toy_0000_0001.nii.gz",
    ):
        _verify(copy)


def test_row15_a_4d_label_file_is_one_line_naming_the_case(toy_folder, tmp_path):
    copy = _copy(toy_folder, tmp_path)
    label = sorted((copy / "labelsTr").iterdir())[1]
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(label)))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([array, array])), str(label))
    with pytest.raises(HeadzooError, match="copy/labelsTr/toy_0001: ") as error:
        _verify(copy)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("which", [0, 3])  # the first case (nnU-Net's reader choice reads it) and a later one
def test_row15_a_truncated_uncompressed_nii_is_one_line_naming_the_case(toy_folder, tmp_path, which):
    copy = _copy(toy_folder, tmp_path)
    _edit_json(copy, file_ending=".nii")
    for path in list(copy.rglob("*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path)[:-3])
        path.unlink()
    image = sorted((copy / "imagesTr").iterdir())[which]
    image.write_bytes(image.read_bytes()[: image.stat().st_size * 2 // 3])
    case = image.name[: -len("_0000.nii")]
    with pytest.raises(HeadzooError, match=f"copy/labelsTr/{case}: OSError: Expected .* bytes, got .* bytes"):
        _verify(copy)


def test_row20_a_2d_dataset_is_refused_in_words(tmp_path):
    folder = tmp_path / "Dataset2D"
    for split, count in (("Tr", 2), ("Ts", 1)):
        (folder / f"images{split}").mkdir(parents=True)
        (folder / f"labels{split}").mkdir()
        for case in range(count):
            image = sitk.GetImageFromArray(np.random.default_rng(case).random((32, 32)).astype(np.float32))
            label = sitk.GetImageFromArray((np.arange(32 * 32).reshape(32, 32) % 2).astype(np.uint8))
            sitk.WriteImage(image, str(folder / f"images{split}" / f"case{case}_0000.nii.gz"))
            sitk.WriteImage(label, str(folder / f"labels{split}" / f"case{case}.nii.gz"))
    (folder / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"background": 0, "a": 1},
                "channel_names": {"0": "x"},
                "file_ending": ".nii.gz",
                "numTraining": 2,
            }
        )
    )
    with pytest.raises(HeadzooError, match="Dataset2D/labelsTr/case0: a 2D image .*2D datasets are not supported"):
        _verify(folder)


# --- nnU-Net training and prediction (rows 2, 7, 16, 21) -------------------------------------------------------


def test_row7_nnunet_training_refuses_a_partially_labelled_dataset():
    from headzoo.nnunet.trainer import make_trainer

    trainer = make_trainer("sigmoid", "_smoke")
    with pytest.raises(HeadzooError, match="is partially labelled .2 sources"):
        trainer({}, "3d_fullres", 0, {"name": "HeadzooToy", "headzoo": {"sources": 2}}, torch.device("cpu"))


def _nifti(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return str(path)


def test_row2_a_truncated_prediction_input_is_refused_naming_the_file(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from headzoo.validation import check_prediction_case

    path = _nifti(tmp_path / "case_0000.nii.gz", np.random.default_rng(0).random((24, 24, 24)).astype(np.float32))
    check_prediction_case("case", [path], SimpleITKIO, three_d=True)
    Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size * 2 // 3])
    with pytest.raises(HeadzooError, match="case_0000.nii.gz is truncated or corrupt"):
        check_prediction_case("case", [path], SimpleITKIO, three_d=True)


def test_row21_a_2d_image_for_a_3d_model_is_refused(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from headzoo.validation import check_prediction_case

    path = _nifti(tmp_path / "flat_0000.nii.gz", np.zeros((32, 32), np.float32))
    with pytest.raises(HeadzooError, match="input case 'flat': a 2D image .* the model is 3D"):
        check_prediction_case("flat", [path], SimpleITKIO, three_d=True)
    check_prediction_case("flat", [path], SimpleITKIO, three_d=False)  # a 2D model takes it


def _checkpoint_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"network_weights": {"w": torch.zeros(200_000)}, "init_args": {"configuration": "3d_fullres"}}, good)
    files = {"truncated": good.read_bytes()[: good.stat().st_size // 2], "empty": b"", "text": b"not a checkpoint\n"}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pth"
        paths[name].write_bytes(content)
    for name, content in (("list", [1, 2]), ("no init_args", {"network_weights": {}})):
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.pth"
        torch.save(content, paths[name])
    return good, paths


def test_row16_a_broken_checkpoint_is_one_line(tmp_path):
    from headzoo.nnunet.predict import load_checkpoint

    good, broken = _checkpoint_files(tmp_path)
    assert load_checkpoint(good)["init_args"]["configuration"] == "3d_fullres"
    for name, path in broken.items():
        with pytest.raises(HeadzooError, match=f"{path} is not (a readable|an nnU-Net trainer's) checkpoint"):
            load_checkpoint(path)


def test_row16_devices_folds_and_unpreprocessed_configurations_are_one_line(tmp_path):
    from headzoo.nnunet.train import check_device, check_preprocessed

    if not torch.backends.mps.is_available():
        with pytest.raises(HeadzooError, match="no MPS device"):
            check_device("mps")
    folder = tmp_path / "Dataset987_Toy"
    (folder / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    architecture = {"network_class_name": "x", "arch_kwargs": {}, "_kw_requires_import": []}
    (folder / "nnUNetPlans.json").write_text(
        json.dumps(
            {
                "configurations": {
                    name: {"data_identifier": f"nnUNetPlans_{name}", "architecture": architecture}
                    for name in ("2d", "3d_fullres")
                }
            }
        )
    )
    check_preprocessed(folder, "987", "3d_fullres", "nnUNetPlans", "0")
    with pytest.raises(HeadzooError, match="fold must be 0-4 .* or all, got 'abc'"):
        check_preprocessed(folder, "987", "3d_fullres", "nnUNetPlans", "abc")
    with pytest.raises(
        HeadzooError,
        match="configuration '2d' of Dataset987_Toy is not preprocessed .*nnUNetv2_preprocess -d 987 -c 2d",
    ):
        check_preprocessed(folder, "987", "2d", "nnUNetPlans", "all")
    with pytest.raises(HeadzooError, match="has no configuration '3d_fulres' .did you mean '3d_fullres'"):
        check_preprocessed(folder, "987", "3d_fulres", "nnUNetPlans", "1")


@pytest.mark.slow
def test_rows_2_16_21_predict_and_nnunet_train_end_to_end(nnunet, tmp_path):
    """Through `headzoo predict` and `headzoo nnunet-train` on a tiny toy trained here (tests/test_nnunet.py's
    fixture): each bad input one line, exit status 2, nothing written."""
    trainer = "nnUNetTrainer_dense_smoke"
    trained = test_nnunet.headzoo(
        "nnunet-train",
        str(test_nnunet.DATASET_ID),
        "3d_fullres",
        "0",
        "-tr",
        trainer,
        "-device",
        "cpu",
        env=nnunet["env"],
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    truncated, flat = tmp_path / "truncated", tmp_path / "flat"
    shutil.copytree(nnunet["raw"] / "imagesTs", truncated)
    victim = sorted(truncated.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size * 2 // 3])
    flat.mkdir()
    _nifti(flat / "flat_0000.nii.gz", np.zeros((32, 32), np.float32))
    fold = nnunet["results"] / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    _, broken = _checkpoint_files(tmp_path)
    for path in broken.values():
        shutil.copy(path, fold / path.name)
    cases = [
        (["-i", str(truncated)], f"{victim.name} is truncated or corrupt"),
        (["-i", str(flat)], "a 2D image (one slice, 32x32): the model is 3D"),
        (["-device", "mps"], "no MPS device"),
        *((["-chk", path.name], "checkpoint") for path in broken.values()),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        result = test_nnunet.predict(nnunet, trainer, out, *extra)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr[-2000:])
        assert result.stderr.strip().count("\n") == 0 and not out.exists(), result.stderr
    for arguments, message in ((["3d_fullres", "abc"], "fold must be"), (["2d", "0"], "is not preprocessed")):
        result = test_nnunet.headzoo(
            "nnunet-train", str(test_nnunet.DATASET_ID), *arguments, "-tr", trainer, "-device", "cpu", env=nnunet["env"]
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().count("\n") == 0, result.stderr
