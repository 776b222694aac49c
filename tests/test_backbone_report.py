"""`headzoo backbones` and `headzoo run --backbone stu-s`, as a user runs them."""

import json
import os
import subprocess
import sys

import pytest
import torch

from headzoo.backbone_report import measure_step, summarize

HEADZOO = [sys.executable, "-m", "headzoo"]


def _headzoo(*args):
    return subprocess.run([*HEADZOO, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow  # a CLI subprocess building every backbone
def test_backbones_lists_stunet_with_the_papers_counts():
    result = _headzoo("backbones")
    assert result.returncode == 0, result.stderr
    for name, count in [("stu-s", "14.60 M"), ("stu-b", "58.26 M"), ("stu-l", "440.30 M"), ("stu-h", "1457.33 M")]:
        line = next(line for line in result.stdout.splitlines() if f" {name} " in line)
        assert count in line, line


@pytest.mark.slow  # a CLI subprocess
def test_unknown_backbone_is_one_line():
    result = _headzoo("backbones", "--only", "stu-xl")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "headzoo: error: unknown backbone 'stu-xl' (choose from small, resenc-m, resenc-l, stu-s, stu-b, stu-l, stu-h)"
    ]


@pytest.mark.slow  # a backbone step
def test_measured_step_and_parameters_without_head():
    summary = summarize("small")
    # ResidualEncoderUNet's decoder has 3 seg convs of 105×16/32/64 + 105 biases; the rest is the backbone
    assert summary.parameters_paper - summary.parameters == 105 * (16 + 32 + 64) + 3 * 105
    step = measure_step("small", (32, 32, 32), 1, torch.device("cpu"), repeats=1)
    assert step.seconds > 0 and step.peak.bytes > 32**3 * 16 * 4  # at least the full-resolution features


@pytest.mark.slow
def test_run_with_stu_s_takes_patch_and_network_from_the_plan(tmp_path):
    out = tmp_path / "results.jsonl"
    result = _headzoo(
        "run",
        "--preset",
        "tiny",
        "--backbone",
        "stu-s",
        "--head",
        "chunked",
        "--classes",
        "5",
        "--steps",
        "6",
        "--out",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["backbone"] == "stu-s" and record["patch"] == [32, 32, 32]
    assert record["configuration"] == "headzoo_stu-s"
    plan = json.loads(open(record["plan"]).read())
    assert plan["configurations"]["headzoo_stu-s"]["architecture"]["network_class_name"] == "headzoo.stunet.STUNet"
