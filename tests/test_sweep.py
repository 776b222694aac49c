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


def test_resume_skips_ok_cells_and_never_duplicates(tmp_path):
    out = tmp_path / "results.jsonl"
    first = sweep("--heads", "dummy,dense", "--classes", "3,4", "--patch", "16", "--out", str(out))
    assert first.returncode == 0, first.stderr
    assert sorted((r["head"], r["classes"], r["status"]) for r in rows(out)) == [
        ("dense", 3, "ok"), ("dense", 4, "ok"), ("dummy", 3, "ok"), ("dummy", 4, "ok")]
    times = {(r["head"], r["classes"]): r["time"] for r in rows(out)}
    second = sweep("--heads", "dummy,dense", "--classes", "3,4,5", "--patch", "16", "--out", str(out))
    assert "2 ok, 0 oom, 0 error, 4 skipped" in second.stdout
    assert len(rows(out)) == 6
    assert all(times[(r["head"], r["classes"])] == r["time"] for r in rows(out) if r["classes"] != 5)
    third = sweep("--heads", "dummy", "--classes", "3", "--patch", "16", "--out", str(out), "--overwrite")
    assert "1 ok, 0 oom, 0 error, 0 skipped" in third.stdout and len(rows(out)) == 6


def test_errors_are_captured_with_their_message(tmp_path):
    out = tmp_path / "results.jsonl"
    result = sweep("--heads", "dummy", "--variant", "chunked:chunk=0", "--classes", "3", "--patch", "16",
                   "--out", str(out))
    assert result.returncode == 0, result.stderr
    by_head = {r["head"]: r for r in rows(out)}
    assert by_head["dummy"]["status"] == "ok"
    assert by_head["chunked"]["status"] == "error" and "chunk must be positive" in by_head["chunked"]["error"]


def test_memory_wall_is_oom_under_a_budget_while_chunked_runs(tmp_path):
    out = tmp_path / "results.jsonl"
    result = sweep("--heads", "dense,chunked", "--classes", "1000", "--patch", "32", "--batch", "4",
                   "--memory-limit", "3GiB", "--out", str(out))
    assert result.returncode == 0, result.stderr
    status = {r["head"]: r["status"] for r in rows(out)}
    assert status == {"dense": "oom", "chunked": "ok"}, rows(out)


@pytest.mark.parametrize("executor", ["submitit"])
def test_submitit_local_executor(tmp_path, executor):
    pytest.importorskip("submitit")
    out = tmp_path / "results.jsonl"
    result = sweep("--heads", "dummy", "--classes", "3", "--patch", "16", "--out", str(out),
                   "--executor", executor, "--cluster", "local")
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in rows(out)] == ["ok"]
