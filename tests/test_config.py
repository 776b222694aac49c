"""The one run schema: every RunConfig field is a `headzoo run` option, and argv ↔ config round-trips."""

import dataclasses
from pathlib import Path

import typer
from typer.testing import CliRunner

from headzoo.cli import with_run_settings
from headzoo.config import RunConfig, from_record, run_settings, to_argv, to_record
from headzoo.protocol import LARGE_C, accuracy_note, protocol_settings


def _parse(argv: list[str]) -> RunConfig:
    app, seen = typer.Typer(), {}

    @app.command()
    @with_run_settings()
    def run(settings: dict) -> None:
        seen.update(settings)

    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    return RunConfig(**seen)


def test_every_setting_round_trips_through_the_command_line():
    config = RunConfig(
        head="chunked",
        options={"rank": 8, "kernel": "torch"},
        classes=300,
        backbone="resenc-m",
        patch=(64, 64, 32),
        batch=3,
        steps=90,
        seed=4,
        partial=2,
        memory_limit_bytes=3 * 2**30,
        preset="tiny",
        dataset_folder=Path("/data/x"),
        warmup=5,
        lr=0.01,
        grad_clip=None,
        amp=False,
        eval_every=10,
        device="cpu",
        run_id="abc",
    )
    assert {f.name for f in dataclasses.fields(config)} == {f.name for f, _ in run_settings()}
    assert all(
        getattr(config, f.name) != f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING
    ), "the test must move every setting off its default"
    assert _parse(to_argv(config)) == config
    assert from_record(to_record(config)) == config


def test_the_key_is_every_setting_that_changes_a_result():
    """Each setting that changes what is measured changes a record's key; evaluating, the device asked for,
    the run id and the folder's path (its content fingerprint is keyed) do not."""
    from headzoo.results import record_key

    record = {
        **to_record(RunConfig(head="dense", classes=10, patch=(32, 32, 32))),
        "dataset_fingerprint": "abc",
        "device_name": "cpu (test)",
    }
    changes = {
        "head": "chunked",
        "options": {"rank": 4},
        "classes": 11,
        "backbone": "resenc-m",
        "patch": [16, 16, 16],
        "batch": 3,
        "steps": 61,
        "seed": 1,
        "partial": 2,
        "memory_limit_bytes": 2**30,
        "preset": "tiny",
        "warmup": 4,
        "lr": 0.01,
        "grad_clip": None,
        "amp": False,
        "dataset_fingerprint": "def",
        "device_name": "NVIDIA H200",
    }
    same = {"eval_every": 10, "device": "cuda", "run_id": "another-run", "dataset_folder": "/data/Dataset001_X"}
    assert set(changes) | set(same) == set(record)  # a new setting must be placed on one side
    for name, value in changes.items():
        assert record_key({**record, name: value}) != record_key(record), name
    for name, value in same.items():
        assert record_key({**record, name: value}) == record_key(record), name
    # a record with a request is keyed by it: the patch the run resolved is not the key's
    requested = {**record, "request": {**to_record(RunConfig(head="dense", classes=10)), "patch": None}}
    assert record_key({**requested, "patch": [16, 16, 16]}) == record_key(requested) != record_key(record)


def test_a_short_toy_run_points_at_the_accuracy_protocol():
    note = accuracy_note(to_record(RunConfig(head="chunked", classes=100)))
    assert "measures cost" in note and note.endswith(
        "headzoo run --head chunked --classes 100 --steps 400 --preset protocol --lr 0.02 --eval-every 100"
    )
    assert accuracy_note(to_record(RunConfig(head="dense", **protocol_settings("dense")))) is None


def test_at_c_1000_the_note_points_at_the_large_c_toy():
    note = accuracy_note(to_record(RunConfig(head="chunked", classes=1000)))
    assert note.endswith(
        "run --head chunked --classes 1000 --steps 1900 --preset protocol1000 --lr 0.02 --eval-every 300"
    )
    large = RunConfig(head="chunked", **{**protocol_settings("chunked"), **LARGE_C})
    assert accuracy_note(to_record(large)) is None
    equal_steps = dataclasses.replace(large, steps=500, eval_every=250)  # the group's shorter runs: no note either
    assert accuracy_note(to_record(equal_steps)) is None
