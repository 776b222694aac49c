"""headzoo.measure.measured (the one measurement of every benchmark) against byte counts worked out by hand,
and the benchmarks' committed records: each table in leaderboard/ is what its records render to, and a
records file that is not one is a one-line error."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from headzoo.errors import HeadzooError
from headzoo.measure import measure_peak_memory, measured, reset_peak_rss

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20  # 1 MiB of float32: 2**18 elements, a multiple of every allocator rounding


def benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_peak_counts_the_tensors_alive_at_once():
    """x (tracked, 1 MiB) alive throughout; y = x·2 and z = y + 1 alive together: the peak is 3 MiB. Without x
    tracked, 2 MiB: what exists before the block counts only when passed."""
    x = torch.ones(MIB // 4)
    for tracked, expected in (((x,), 3 * MIB), ((), 2 * MIB)):
        with measured(torch.device("cpu"), *tracked) as measurement:
            y = x * 2
            z = y + 1
        del y, z
        assert (measurement.peak_bytes, measurement.peak_kind) == (expected, "cpu_live_tensors")
        assert measurement.seconds >= 0


def test_a_freed_temporary_still_sets_the_peak():
    """(x + 1) is freed after its sum, then 0.5 MiB is allocated: the peak is x, x + 1 and the sum (a 4-byte float)."""
    x = torch.ones(MIB // 4)
    with measured(torch.device("cpu"), x) as measurement:
        (x + 1).sum()
        kept = torch.zeros(MIB // 8)
    assert measurement.peak_bytes == 2 * MIB + 4 and kept.numel() == MIB // 8


def test_a_module_called_again_needs_repeated_modules():
    """Sliding-window prediction calls the network once per window: torch's MemTracker refuses that at the top
    level; `repeated_modules` keeps the total peak (the weight, tracked, and one 1 MiB output at a time)."""
    layer = torch.nn.Linear(256, 256, bias=False)  # 256 KiB of weight
    inputs = torch.ones(1024, 256)

    def windows():
        with torch.no_grad():
            for _ in range(3):
                layer(inputs)

    with pytest.raises(NotImplementedError, match="multiple iterative calls"):
        with measured(torch.device("cpu"), layer):
            windows()
    with measured(torch.device("cpu"), layer, repeated_modules=True) as measurement:
        windows()
    assert measurement.peak_bytes == 256 * 256 * 4 + 1024 * 256 * 4


def test_time_only_and_a_raising_block_still_timed():
    with measured(torch.device("cpu"), memory=False) as measurement:
        torch.ones(10).sum()
    assert measurement.peak_bytes is None and measurement.seconds >= 0
    with pytest.raises(RuntimeError, match="refused"):
        with measured(torch.device("cpu")) as refused:
            raise RuntimeError("refused")
    assert refused.seconds >= 0 and refused.peak_bytes is None


def test_rss_growth_includes_numpy_buffers():
    """256 MiB of numpy (no torch tensor) touched inside the block: the resident set grows by about that (the
    allocator may reuse a few pages the process already held: 204 KiB short of 256 MiB in one full-suite run)."""
    if not reset_peak_rss():
        pytest.skip("no resettable peak RSS (/proc/self/clear_refs) here")
    with measured(torch.device("cpu")) as measurement:
        buffer = np.ones(256 * MIB // 8)
        del buffer
    assert measurement.peak_bytes == 0 and measurement.rss_growth_bytes >= 0.9 * 256 * MIB


def test_measure_peak_memory_is_measured():
    x = torch.ones(MIB // 4)
    peak = measure_peak_memory(lambda: x * 2, torch.device("cpu"), x)
    assert (peak.bytes, peak.kind) == (2 * MIB, "cpu_live_tensors")


def test_loss_profile_memory_row_counts_the_direct_logits():
    """The direct loss at C = 50, 8³, batch 2 materialises the fp32 logits (b×C×S); its peak with the inputs
    holds them and the inputs, and the estimate on fake tensors counts the same bytes (headzoo estimate)."""
    loss_profile = benchmark("loss_profile")
    classes, patch, cpu = 50, 8, torch.device("cpu")
    fn = loss_profile.loss_function("direct", None)
    row = loss_profile.memory_row(fn, loss_profile.make_inputs(classes, patch, cpu), cpu)
    logits = loss_profile.BATCH * classes * patch**3 * 4
    inputs = (
        loss_profile.BATCH * loss_profile.RANK * patch**3 * 4
        + loss_profile.RANK * classes * 4
        + loss_profile.BATCH * patch**3 * 8
    )
    assert row["forward_peak_bytes"] >= logits + inputs
    assert row == loss_profile.estimated_memory_row(fn, classes, patch)


def test_loss_profile_merge_keeps_measured_rows_and_renders_the_committed_table(tmp_path):
    loss_profile = benchmark("loss_profile")
    committed = ROOT / "leaderboard" / "loss_profile.jsonl"
    rows = loss_profile.read_records(committed)
    assert (
        loss_profile.render(loss_profile.read_table(committed))
        == (ROOT / "leaderboard" / "loss_profile.md").read_text()
    )
    out = tmp_path / "profile.jsonl"
    measured_row = next(r for r in rows if r["status"] == "ok" and r["patch"] == 128)
    loss_profile.write([measured_row], out)
    estimate = {k: measured_row[k] for k in (*loss_profile.KEY, "batch", "rank", "torch")}
    loss_profile.write([{**estimate, "status": "estimate", "forward_peak_bytes": 1, "total_peak_bytes": 2}], out)
    assert loss_profile.read_records(out) == [measured_row]  # an estimate never replaces a measured row
    rerun = {**measured_row, "total_s": 1.0}
    loss_profile.write([rerun], out)
    assert loss_profile.read_records(out) == [rerun]  # a measured rerun does
    assert json.loads(out.read_text())["chunk"] == 10 and out.with_suffix(".md").exists()


def test_inference_memory_table_is_its_records():
    inference_memory = benchmark("inference_memory")
    records = inference_memory.read_records(ROOT / "leaderboard" / "inference_memory.jsonl")
    assert inference_memory.render(records) == (ROOT / "leaderboard" / "inference_memory.md").read_text()
    assert all(r["external_memory_bytes"] == 0 for r in records if r["status"] == "ok")  # CPU: no FAISS GPU index


def test_knn_backends_records_and_a_small_run(tmp_path):
    knn_backends = benchmark("knn_backends")
    committed = knn_backends.read_records(ROOT / "leaderboard" / "knn_backends.jsonl")
    assert knn_backends.render(committed) == (ROOT / "leaderboard" / "knn_backends.md").read_text()
    made = {"device_name": "cpu", "torch": torch.__version__, "command": "test"}
    rows = knn_backends.measure([10], 64, 1, torch.device("cpu"), made)
    assert [(r["k"], r["backend"]) for r in rows] == [(8, "faiss"), (8, "torch"), (1, "faiss"), (1, "torch")]
    assert all(r["median_ms"] > 0 and r["external_memory_bytes"] == 0 for r in rows)
    knn_backends.write(rows, tmp_path / "knn")
    knn_backends.write(rows[:1], tmp_path / "knn")  # a rerun replaces its row
    assert len(knn_backends.read_records(tmp_path / "knn.jsonl")) == 4
    assert "| 10 | predict: k = 1 |" in (tmp_path / "knn.md").read_text()


@pytest.mark.parametrize(
    "name,out", [("knn_backends", "bad"), ("inference_memory", "bad"), ("loss_profile", "bad.jsonl")]
)
def test_a_records_file_that_is_not_one_is_a_one_line_error(tmp_path, name, out):
    (tmp_path / "bad.jsonl").write_text('{"classes": 5}\n')
    loaded = benchmark(name)
    with pytest.raises(HeadzooError, match=r"bad.jsonl:1 is not a"):
        loaded.read_records(tmp_path / "bad.jsonl")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--out", str(tmp_path / out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0, result.stderr[-2000:]
    assert "bad.jsonl:1 is not a" in result.stderr
