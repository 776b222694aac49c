"""`headzoo run` end to end (plug-in included) and its handling of bad input, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

RUN = [sys.executable, "-m", "headzoo", "run", "--preset", "tiny", "--patch", "16", "--steps", "6"]


def headzoo(*args, cwd=None):
    return subprocess.run([*args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy())


def main_in_process(arguments, capsys, monkeypatch):
    """`headzoo run ...` through the CLI's main() in this process: (exit status, stderr)."""
    from headzoo.cli import main

    monkeypatch.setattr(sys, "argv", ["headzoo", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("head", ["dummy", "dense", "chunked"])
def test_run_trains_evaluates_and_records(tmp_path, head):
    out = tmp_path / "results.jsonl"
    result = headzoo(*RUN, "--head", head, "--classes", "5", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["head"] == head and 0 <= record["dice_mean"] <= 1
    assert record["peak_memory_bytes"] > 0 and record["step_time_median_s"] > 0
    assert record["timed_steps"] == 6 - 3 - 1
    assert [json.loads(line) for line in out.read_text().splitlines()] == [record]
    assert all(record[k] for k in ("device_name", "torch", "headzoo", "git_sha", "time"))


@pytest.mark.slow
def test_rerun_replaces_its_own_row(tmp_path):
    out = tmp_path / "results.jsonl"
    for _ in range(2):
        assert headzoo(*RUN, "--head", "dummy", "--classes", "3", "--out", str(out)).returncode == 0
    assert len(out.read_text().splitlines()) == 1


BAD_INPUT = [
    (["--head", "dense", "--classes", "1"], "--classes must be at least 2"),
    (["--head", "dense", "--classes", "5", "--device", "tpu"], "unknown device 'tpu'"),
    pytest.param(
        ["--head", "dense", "--classes", "5", "--patch", "64"], "larger than the volumes", marks=pytest.mark.slow
    ),  # prepares the toy in-process
    (["--head", "dense", "--classes", "5", "--patch", "20"], "must be divisible by 8"),
    (["--head", "densse", "--classes", "5"], "did you mean 'dense'"),
    (["--head", "chunked", "--classes", "5", "--option", "rank=9"], "rank must be in"),
    (["--head", "dense", "--classes", "5", "--option", "colour=red"], "rejected its options"),
]


@pytest.mark.parametrize("arguments,message", BAD_INPUT)
def test_bad_input_is_one_line_and_leaves_no_record(tmp_path, capsys, monkeypatch, arguments, message):
    out = tmp_path / "results.jsonl"
    status, stderr = main_in_process([*RUN[3:], *arguments, "--out", str(out)], capsys, monkeypatch)
    assert status == 2
    assert message in stderr
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    assert not out.exists()


@pytest.mark.slow  # CLI subprocesses
def test_bad_input_in_a_subprocess_exits_2_with_one_line(tmp_path):
    result = headzoo(*RUN, "--head", "densse", "--classes", "5", "--out", str(tmp_path / "r.jsonl"))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "did you mean" in result.stderr


HEAVY = ("headzoo.runner", "nnunetv2", "pandas", "torch.distributed._tools.mem_tracker")
REPORT_HEAVY = f"import atexit, sys; atexit.register(lambda: print([m for m in {HEAVY!r} if m in sys.modules]))"


def test_a_bad_head_option_is_refused_before_the_runner_is_imported(tmp_path):
    """The refusal imports torch and the heads, not nnU-Net, pandas or the MemTracker (seconds each), and
    makes no data: `headzoo run --option rank=9 --head chunked --classes 5` fails fast on an empty cache."""
    argv = ["headzoo", "run", "--option", "rank=9", "--head", "chunked", "--classes", "5"]
    code = f"{REPORT_HEAVY}; sys.argv = {argv!r}; from headzoo.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HEADZOO_CACHE": str(tmp_path)}
    )
    assert result.returncode == 2 and result.stderr == "headzoo: error: rank must be in [1, 5] (at most C), got 9\n"
    assert result.stdout == "[]\n", f"imported before the refusal: {result.stdout}"
    assert not any(path.is_file() for path in tmp_path.rglob("*"))


def test_unwritable_out_is_refused(tmp_path, capsys, monkeypatch):
    status, stderr = main_in_process(
        [*RUN[3:], "--head", "dense", "--classes", "5", "--out", str(tmp_path / "missing" / "r.jsonl")],
        capsys,
        monkeypatch,
    )
    assert status == 2 and "does not exist" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("corrupt", ["no_json", "foreign_json", "no_labels"])
def test_corrupt_or_foreign_dataset_folder(tmp_path, capsys, monkeypatch, corrupt):
    folder = tmp_path / "dataset"
    folder.mkdir()
    if corrupt == "foreign_json":
        (folder / "dataset.json").write_text(json.dumps({"name": "not nnU-Net"}))
    elif corrupt == "no_labels":
        (folder / "dataset.json").write_text(
            json.dumps(
                {
                    "labels": {"background": 0, "a": 1},
                    "numTraining": 1,
                    "channel_names": {"0": "x"},
                    "file_ending": ".nii.gz",
                }
            )
        )
    out = tmp_path / "results.jsonl"
    status, stderr = main_in_process(
        [*RUN[3:], "--head", "dense", "--classes", "2", "--dataset", str(folder), "--out", str(out)],
        capsys,
        monkeypatch,
    )
    assert status == 2 and "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0 and str(folder) in stderr
    assert not out.exists()


@pytest.mark.slow
def test_toy_command_writes_a_dataset_that_run_accepts(tmp_path):
    folder = tmp_path / "toy"
    assert (
        headzoo(
            sys.executable, "-m", "headzoo", "toy", "--classes", "4", "--preset", "tiny", "--out", str(folder)
        ).returncode
        == 0
    )
    result = headzoo(
        *RUN,
        "--head",
        "dense",
        "--dataset",
        str(folder),
        "--classes",
        "4",
        "--out",
        str(tmp_path / "r.jsonl"),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    from headzoo.plan import folder_fingerprint

    record = json.loads(result.stdout)
    assert record["classes"] == 4 and record["dataset_fingerprint"] == folder_fingerprint(folder)


@pytest.mark.slow
def test_partial_labels_run_with_sigmoid_and_are_refused_by_dense(tmp_path):
    out = tmp_path / "results.jsonl"
    result = headzoo(*RUN, "--head", "sigmoid", "--classes", "7", "--partial", "2", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["partial"] == 2
    refused = headzoo(*RUN, "--head", "dense", "--classes", "7", "--partial", "2", "--out", str(tmp_path / "x.jsonl"))
    assert refused.returncode != 0 and "cannot use partially labelled data" in refused.stderr
    assert not (tmp_path / "x.jsonl").exists()
