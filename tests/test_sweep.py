"""`headzoo sweep`: isolated cells, resume without duplicates, oom under a budget, error capture."""

import json
import os
import subprocess
import sys

import pytest

SWEEP = [sys.executable, "-m", "headzoo", "sweep", "--preset", "tiny", "--steps", "6"]


def sweep(*args):
    return subprocess.run([*SWEEP, *args], capture_output=True, text=True, env=os.environ.copy())


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_resume_skips_ok_cells_and_never_duplicates(tmp_path):
    out = tmp_path / "results.jsonl"
    first = sweep("--heads", "dummy,dense", "--classes", "3,4", "--patch", "16", "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert sorted((r["head"], r["classes"], r["status"]) for r in rows(out)) == [
        ("dense", 3, "ok"),
        ("dense", 4, "ok"),
        ("dummy", 3, "ok"),
        ("dummy", 4, "ok"),
    ]
    times = {(r["head"], r["classes"]): r["time"] for r in rows(out)}
    second = sweep("--heads", "dummy,dense", "--classes", "3,4,5", "--patch", "16", "--out", str(out))
    assert "2 ok, 0 oom, 0 error, 4 skipped" in second.stdout
    assert len(rows(out)) == 6
    assert all(times[(r["head"], r["classes"])] == r["time"] for r in rows(out) if r["classes"] != 5)
    third = sweep("--heads", "dummy", "--classes", "3", "--patch", "16", "--out", str(out), "--overwrite")
    assert "1 ok, 0 oom, 0 error, 0 skipped" in third.stdout and len(rows(out)) == 6


@pytest.mark.slow  # a sweep subprocess
def test_an_invalid_variant_is_refused_while_planning(tmp_path):
    out = tmp_path / "results.jsonl"
    result = sweep(
        "--heads", "dummy", "--variant", "chunked:chunk=0", "--classes", "3", "--patch", "16", "--out", str(out)
    )
    assert result.returncode == 2 and result.stderr == "headzoo: error: chunk must be positive, got 0\n"
    assert not out.exists()


@pytest.mark.slow
def test_errors_are_captured_with_their_message(tmp_path):
    out = tmp_path / "results.jsonl"
    result = subprocess.run(
        [*SWEEP, "--heads", "dummy,dense", "--classes", "3", "--patch", "16", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HEADZOO_DUMMY_HEAD_FAILS": "1"},
    )
    assert result.returncode == 0, result.stderr
    by_head = {r["head"]: r for r in rows(out)}
    assert by_head["dense"]["status"] == "ok"
    assert by_head["dummy"]["status"] == "error"
    assert by_head["dummy"]["error"] == "RuntimeError: the dummy head failed on purpose (HEADZOO_DUMMY_HEAD_FAILS)"


@pytest.mark.slow
def test_memory_wall_is_oom_under_a_budget_while_chunked_runs(tmp_path):
    out = tmp_path / "results.jsonl"
    result = sweep(
        "--heads",
        "dense,chunked",
        "--classes",
        "1000",
        "--patch",
        "32",
        "--batch",
        "4",
        "--memory-limit",
        "3GiB",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    status = {r["head"]: r["status"] for r in rows(out)}
    assert status == {"dense": "oom", "chunked": "ok"}, rows(out)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["submitit"])
def test_submitit_local_executor(tmp_path, executor):
    pytest.importorskip("submitit")
    out = tmp_path / "results.jsonl"
    result = sweep(
        "--heads",
        "dummy",
        "--classes",
        "3",
        "--patch",
        "16",
        "--out",
        str(out),
        "--executor",
        executor,
        "--cluster",
        "local",
    )
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in rows(out)] == ["ok"]


def _one_cell(out, executor="local"):
    from headzoo.sweep import SweepConfig, plan_grid

    cells = plan_grid({"preset": "tiny", "steps": 6, "patch": (16, 16, 16)}, [("dummy", {})], [3], [0])
    return SweepConfig(cells, out, executor=executor)


def test_a_cell_that_dies_before_its_record_is_an_error_not_an_older_row(tmp_path):
    """Bug (b): a cell exiting 1 without a record used to be matched to an older row with its key."""
    from headzoo.results import read_records, upsert_record
    from headzoo.sweep import _finish, plan_cells

    out = tmp_path / "results.jsonl"
    config = _one_cell(out)
    plan_cells(config)
    cell = config.cells[0]
    older = {**cell.identity, "run_id": "an-older-run", "status": "ok", "error": None, "dice_mean": 0.5}
    config.overwrite = True
    upsert_record(out, older)
    plan_cells(config)  # rerun with --overwrite: a new run id for the cell
    _finish(config, cell, 1, "Traceback (most recent call last):\nRuntimeError: prepare failed")
    assert cell.status == "error" and cell.message == "RuntimeError: prepare failed"
    [row] = read_records(out)
    assert row["status"] == "error" and row["run_id"] == cell.config.run_id != "an-older-run"


def test_submitit_resume_matches_rows_from_the_worker_machine(tmp_path):
    """Bug (a): under submitit the row carries the worker's device name, not the submitting machine's."""
    from headzoo.results import read_records, upsert_record
    from headzoo.sweep import _finish, plan_cells

    out = tmp_path / "results.jsonl"
    config = _one_cell(out, executor="submitit")
    plan_cells(config)
    cell = config.cells[0]
    assert cell.status == "pending" and cell.identity["device_name"] is None
    _finish(config, cell, -9, "")  # the job was killed: a crash row whose device is unknown
    assert [r["status"] for r in read_records(out)] == ["oom"]
    worker_row = {**cell.identity, "device_name": "NVIDIA H100 80GB HBM3", "status": "ok", "error": None}
    upsert_record(out, worker_row)  # the retried cell succeeds on a worker: it replaces the crash row
    assert [(r["status"], r["device_name"]) for r in read_records(out)] == [("ok", "NVIDIA H100 80GB HBM3")]
    resumed = _one_cell(out, executor="submitit")
    plan_cells(resumed)
    assert resumed.cells[0].status == "skipped"
    local = _one_cell(out)  # locally the device is known, and it is not the worker's
    plan_cells(local)
    assert local.cells[0].status == "pending"


def test_a_sweep_without_patch_skips_its_finished_cell_and_its_crash_row_is_replaced(tmp_path):
    """Issue 21: the run resolves the patch the sweep left unset (None); the cell is still the same cell."""
    from headzoo.config import to_record
    from headzoo.results import read_records, upsert_record
    from headzoo.sweep import SweepConfig, _finish, plan_cells, plan_grid

    out = tmp_path / "results.jsonl"

    def planned():
        config = SweepConfig(plan_grid({"preset": "tiny", "steps": 6}, [("dummy", {})], [3], [0]), out)
        plan_cells(config)
        return config

    config = planned()
    [cell] = config.cells
    assert cell.config.patch is None and cell.status == "pending"
    _finish(config, cell, 1, "RuntimeError: prepare failed")  # a crash row, patch null
    [crash] = read_records(out)
    assert crash["status"] == "error" and crash["request"]["patch"] is None
    # the cell's own run, as runner.run records it: the resolved patch, the request beside it
    success = {
        **cell.identity,
        "patch": [16, 16, 16],
        "request": to_record(cell.config),
        "status": "ok",
        "error": None,
        "dice_mean": 0.5,
    }
    upsert_record(out, success)
    [row] = read_records(out)
    assert (row["status"], row["patch"], row["run_id"]) == ("ok", [16, 16, 16], cell.config.run_id)
    assert [c.status for c in planned().cells] == ["skipped"]
