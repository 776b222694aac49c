"""The one run schema: every RunConfig field is a `headzoo run` option, and argv ↔ config round-trips."""
import dataclasses
from pathlib import Path

import typer
from typer.testing import CliRunner

from headzoo.cli import with_run_settings
from headzoo.config import KEY_FIELDS, RunConfig, from_record, run_settings, to_argv, to_record
from headzoo.protocol import accuracy_note, protocol_settings


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
    config = RunConfig(head="chunked", options={"rank": 8, "kernel": "torch"}, classes=300, backbone="resenc-m",
                       patch=(64, 64, 32), batch=3, steps=90, seed=4, partial=2, memory_limit_bytes=3 * 2**30,
                       preset="tiny", dataset_folder=Path("/data/x"), warmup=5, lr=0.01, grad_clip=None, amp=False,
                       eval_every=10, device="cpu", run_id="abc")
    assert {f.name for f in dataclasses.fields(config)} == {f.name for f, _ in run_settings()}
    assert all(getattr(config, f.name) != f.default for f in dataclasses.fields(config)
               if f.default is not dataclasses.MISSING), "the test must move every setting off its default"
    assert _parse(to_argv(config)) == config
    assert from_record(to_record(config)) == config


def test_the_key_is_every_setting_that_changes_a_result():
    assert set(KEY_FIELDS) == {f.name for f, s in run_settings() if s.key} | {"dataset_fingerprint", "device_name"}
    assert {"dataset_folder", "device", "run_id", "eval_every"}.isdisjoint(KEY_FIELDS)


def test_a_short_toy_run_points_at_the_accuracy_protocol():
    note = accuracy_note(to_record(RunConfig(head="chunked", classes=1000)))
    assert "measures cost" in note and "headzoo run --head chunked --classes 1000 --steps 400 --preset protocol" in note
    assert accuracy_note(to_record(RunConfig(head="dense", **protocol_settings("dense")))) is None
