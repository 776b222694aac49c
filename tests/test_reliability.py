"""Nothing wrong is recorded as `ok` (issue 11): one test per finding, in-process and quick."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import headzoo
from headzoo.config import RunConfig, to_record
from headzoo.errors import ContractViolation, HeadzooError
from headzoo.results import check_results_file, read_records, record_key, strict_json, upsert_record


def _key(**settings):
    return record_key({**to_record(RunConfig(head="dense", **settings)), "device_name": "cpu"})


def test_key_covers_dataset_memory_limit_and_training_settings():
    base = _key()
    assert (
        len(
            {
                base,
                _key(preset="tiny"),
                _key(memory_limit_bytes=2**30),
                _key(warmup=5),
                _key(grad_clip=None),
                _key(amp=False),
                _key(lr=0.01),
            }
        )
        == 7
    )
    assert record_key({"dataset_fingerprint": "a"}) != record_key({"dataset_fingerprint": "b"})


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory):
    from headzoo.toy import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "Dataset", 4, "tiny", 0)


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


def test_dataset_fingerprint_changes_when_a_file_changes(toy_folder, tmp_path):
    from headzoo.plan import folder_fingerprint

    copy = _copy(toy_folder, tmp_path)
    before = folder_fingerprint(copy)
    assert folder_fingerprint(copy) == before
    label = next((copy / "labelsTr").iterdir())
    time.sleep(0.01)
    label.write_bytes(label.read_bytes())
    assert folder_fingerprint(copy) != before


def test_truncated_image_is_refused_naming_the_file(toy_folder, tmp_path):
    from headzoo.validation import verify_raw_dataset

    copy = _copy(toy_folder, tmp_path)
    image = sorted((copy / "imagesTr").iterdir())[0]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(HeadzooError, match=f"{image.name} is truncated or corrupt"):
        verify_raw_dataset(copy, json.loads((copy / "dataset.json").read_text()))


def test_undeclared_label_in_a_test_case_is_refused_naming_the_case(toy_folder, tmp_path):
    import SimpleITK as sitk
    from headzoo.validation import verify_raw_dataset

    copy = _copy(toy_folder, tmp_path)
    label_file = sorted((copy / "labelsTs").iterdir())[0]
    image = sitk.ReadImage(str(label_file))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = 9
    written = sitk.GetImageFromArray(array)
    written.CopyInformation(image)
    sitk.WriteImage(written, str(label_file))
    with pytest.raises(HeadzooError, match=f"labelsTs/{label_file.name.split('.')[0]}: .*Unexpected labels"):
        verify_raw_dataset(copy, json.loads((copy / "dataset.json").read_text()))


class _Broken(headzoo.Head):
    """A head whose loss is NaN, or whose output has more channels than classes."""

    def __init__(self, channels, loss_value):
        super().__init__(2, 3)
        self.conv = torch.nn.Conv3d(2, channels, 1)
        self.loss_value = loss_value

    def forward(self, features):
        return self.conv(features)

    def loss(self, output, target, annotated=None):
        return output.mean() * 0 + self.loss_value


@pytest.mark.parametrize(
    "channels,loss_value,message",
    [(3, math.nan, "non-finite loss .* at step 0"), (4, 1.0, "output has 4 channels, more than its 3 classes")],
)
def test_run_time_contract_violations_stop_the_run(channels, loss_value, message):
    from headzoo.training import TrainStep, build_optimizer

    from networks import ConvThenHead

    network = ConvThenHead(torch.nn.Identity(), _Broken(channels, loss_value))
    optimizer = build_optimizer(network, 10, 1e-3)
    optimizer.train()  # as the training loop does: the loss is read back after the optimizer step
    step = TrainStep(RunConfig(head="broken"), network, optimizer, torch.device("cpu"))
    batch = {"data": torch.randn(1, 2, 4, 4, 4), "target": torch.zeros(1, 1, 4, 4, 4), "annotated": None}
    with pytest.raises(ContractViolation, match=message):
        step(batch)


def test_dice_refuses_predictions_and_test_labels_outside_the_classes():
    from headzoo.inference import DiceCounter

    counter = DiceCounter(3)
    with pytest.raises(ContractViolation, match="predicted label 3, outside"):
        counter.update(np.array([0, 3]), np.array([0, 1]), "case_1", "dense")
    with pytest.raises(HeadzooError, match="case_1 has label 5, outside"):
        counter.update(np.array([0, 1]), np.array([0, 5]), "case_1", "dense")


def test_dice_counts_a_class_painted_over_background_as_a_false_positive():
    from headzoo.inference import DiceCounter

    counter = DiceCounter(4, ignore_label=3)
    counter.update(np.array([1, 1, 2, 0, 2]), np.array([1, 1, 0, 0, 3]))
    dice = counter.per_class()
    assert dice[1] == 1.0 and dice[2] == 0.0 and math.isnan(dice[3])  # class 2 only predicted; 3 is ignored
    assert counter.mean_foreground() == 0.5 and counter.worst_mean(0.1) == 0.0


def test_records_are_strict_json():
    line = strict_json({"loss_first": math.nan, "curve": [{"dice_mean": math.inf}]})
    assert json.loads(line) == {"curve": [{"dice_mean": None}], "loss_first": None} and "NaN" not in line


def test_results_file_is_checked_before_training_and_written_through_links(tmp_path):
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text("{not json\n")
    with pytest.raises(HeadzooError, match="corrupt.jsonl:1 is not a JSON line"):
        check_results_file(corrupt)
    shared = tmp_path / "shared.jsonl"
    upsert_record(shared, {"head": "a", "status": "ok"})
    shared.chmod(0o664)
    link = tmp_path / "link.jsonl"
    link.symlink_to(shared)
    upsert_record(link, {"head": "b", "status": "ok"})
    assert link.is_symlink() and [r["head"] for r in read_records(shared)] == ["a", "b"]
    assert shared.stat().st_mode & 0o777 == 0o664
    shared.chmod(0o444)
    if os.geteuid() != 0:  # root writes anyway
        with pytest.raises(HeadzooError, match="not writable"):
            check_results_file(link)


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--seed", "-1"], "--seed must not be negative"),
        (["--memory-limit", "-5GiB"], "memory size must be positive"),
        (["--classes", "100000"], "more than the label maps hold"),
        (["--classes", "many"], "--classes: cannot read 'many'"),
        (["--eval-every", "0"], "--eval-every must be a positive number of steps, got 0"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, capsys, monkeypatch, arguments, message):
    from headzoo.cli import main

    monkeypatch.setattr(
        sys,
        "argv",
        ["headzoo", "run", "--head", "dense", "--preset", "tiny", *arguments, "--out", str(tmp_path / "r.jsonl")],
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in stderr and stderr.count("\n") == 1


@pytest.mark.slow  # several CLI subprocesses
def test_a_broken_cache_setting_leaves_help_heads_and_leaderboard_working(tmp_path):
    env = {**os.environ, "HEADZOO_CACHE": "/proc/headzoo-cannot-be-here"}
    command = [sys.executable, "-m", "headzoo"]
    assert subprocess.run([*command, "heads"], env=env, capture_output=True).returncode == 0
    run = subprocess.run(
        [*command, "run", "--head", "dense", "--out", str(tmp_path / "r.jsonl")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "HEADZOO_CACHE" in run.stderr


@pytest.mark.slow  # a sweep subprocess
def test_a_killed_sweep_takes_its_running_cell_with_it(tmp_path):
    marker = tmp_path / "child.pid"
    script = f"from headzoo.sweep import run_cell; run_cell(['sh', '-c', 'echo $$ > {marker}; exec sleep 60'])"
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120  # the parent imports torch first
    while not (marker.exists() and marker.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(marker.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as stat:
            if stat.read().split()[2] == "Z":  # a zombie waiting for init: it is dead
                return
        time.sleep(0.05)
    pytest.fail(f"the cell (pid {child}) outlived its sweep")


@pytest.mark.slow  # measures a process's RSS
def test_peak_rss_is_the_measured_steps_not_the_whole_processes():
    """Memory the process touched before the step (nnU-Net's planning takes GiBs) is not the step's peak RSS."""
    from headzoo.measure import measure_peak_memory, peak_rss_bytes, reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("no resettable peak RSS (/proc/self/clear_refs) here")
    touched = np.ones(512 * 2**20 // 8)  # 512 MiB, freed before the step
    del touched
    process_peak = peak_rss_bytes()
    peak = measure_peak_memory(lambda: torch.ones(1000).sum(), torch.device("cpu"))
    assert peak.rss_bytes is not None and process_peak is not None and peak.rss_bytes < process_peak - 256 * 2**20
