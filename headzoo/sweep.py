"""``headzoo sweep``: every head × class count, each cell in its own process, resumable.

Each cell is ``headzoo run`` in a child process, so its peak memory is its own and a crash cannot
take the sweep down. A cell that exits without writing its record (killed, segfault) is recorded by
the sweep as ``oom`` (killed by the kernel's OOM killer) or ``error``. Rows already ``ok`` in the
results file are ``skipped`` unless ``overwrite``; cells run locally one after another (measurements
must not share the machine), or on SLURM through submitit.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.live import Live
from rich.table import Table

from headzoo.errors import HeadzooError
from headzoo.report import format_bytes, format_seconds, head_label
from headzoo.results import SCHEMA_VERSION, read_records, record_key, upsert_record


@dataclass
class Cell:
    head: str
    options: dict
    classes: int
    status: str = "pending"
    record: dict | None = None
    message: str = ""

    @property
    def label(self) -> str:
        return head_label(self.head, self.options)


@dataclass
class SweepConfig:
    heads: list[tuple[str, dict]]
    classes: list[int]
    run_arguments: list[str]        # shared `headzoo run` arguments (patch, batch, steps, ...)
    key_fields: dict                # fields every row carries besides head/options/classes (key included)
    out: Path
    overwrite: bool = False
    executor: str = "local"
    cluster: str | None = None      # submitit: None = auto (SLURM where available), "local" for tests
    cells: list[Cell] = field(default_factory=list)


def run_cell(command: list[str]) -> tuple[int, str]:
    """Run one cell's `headzoo run` in its own process; (exit status, stderr)."""
    completed = subprocess.run(command, capture_output=True, text=True)
    return completed.returncode, completed.stderr


def cell_command(config: SweepConfig, cell: Cell) -> list[str]:
    options = [a for k, v in sorted(cell.options.items()) for a in ("--option", f"{k}={json.dumps(v)}")]
    return [sys.executable, "-m", "headzoo", "run", "--head", cell.head, "--classes", str(cell.classes),
            *config.run_arguments, *options, "--out", str(config.out), "--json"]


def _row_key(config: SweepConfig, cell: Cell, **overrides) -> str:
    return record_key({"head": cell.head, "options": cell.options, "classes": cell.classes, **config.key_fields,
                       **overrides})


def _finish(config: SweepConfig, cell: Cell, status_code: int, stderr: str) -> None:
    """Read the cell's record back, or record the crash that left none."""
    # the device name is the child's (under submitit another machine's): match the rest of the key
    key = _row_key(config, cell, device_name=None)
    record = next((r for r in reversed(read_records(config.out))
                   if record_key({**r, "device_name": None}) == key), None)
    if record is not None and status_code in (0, 1):
        cell.record, cell.status, cell.message = record, record["status"], record.get("error") or ""
        return
    message = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {status_code}"
    killed = status_code in (-signal.SIGKILL, 137)
    cell.status = "oom" if killed else "error"
    cell.message = "killed (out of memory)" if killed else message
    cell.record = {"schema_version": SCHEMA_VERSION, "head": cell.head, "options": cell.options,
                   "classes": cell.classes, **config.key_fields, "status": cell.status, "error": cell.message}
    upsert_record(config.out, cell.record)


def plan_cells(config: SweepConfig) -> None:
    done = {record_key(r) for r in read_records(config.out) if r.get("status") == "ok"}
    for head, options in config.heads:
        for classes in config.classes:
            cell = Cell(head, options, classes)
            if not config.overwrite and _row_key(config, cell) in done:
                cell.status = "skipped"
            config.cells.append(cell)


def render_table(config: SweepConfig) -> Table:
    table = Table(title=f"headzoo sweep → {config.out}")
    for column in ("head", "C", "status", "Dice ↑", "peak memory ↓", "step time ↓", "wall", "note"):
        table.add_column(column)
    colours = {"ok": "green", "oom": "yellow", "error": "red", "running": "cyan", "skipped": "dim"}
    for cell in config.cells:
        r = cell.record or {}
        dice = r.get("dice_mean")
        table.add_row(cell.label, str(cell.classes), f"[{colours.get(cell.status, 'white')}]{cell.status}[/]",
                      "–" if dice is None else f"{dice:.3f}", format_bytes(r.get("peak_memory_bytes")),
                      format_seconds(r.get("step_time_median_s")), format_seconds(r.get("wall_time_s")),
                      cell.message[:60])
    return table


def run_sweep(config: SweepConfig, console) -> list[Cell]:
    plan_cells(config)
    pending = [c for c in config.cells if c.status == "pending"]
    with Live(render_table(config), console=console, refresh_per_second=2) as live:
        if config.executor == "local":
            for cell in pending:
                cell.status = "running"
                live.update(render_table(config))
                _finish(config, cell, *run_cell(cell_command(config, cell)))
                live.update(render_table(config))
        elif config.executor == "submitit":
            _run_submitit(config, pending, live)
        else:
            raise HeadzooError(f"unknown executor '{config.executor}' (choose local or submitit)")
    return config.cells


def _run_submitit(config: SweepConfig, pending: list[Cell], live: Live) -> None:
    try:
        import submitit
    except ImportError as error:
        raise HeadzooError("--executor submitit needs submitit: pip install 'headzoo[slurm]'") from error
    executor = submitit.AutoExecutor(folder=config.out.parent / "submitit", cluster=config.cluster)
    executor.update_parameters(timeout_min=120)
    jobs = []
    for cell in pending:
        jobs.append((cell, executor.submit(run_cell, cell_command(config, cell))))
        cell.status = "running"
    live.update(render_table(config))
    for cell, job in jobs:
        _finish(config, cell, *job.result())
        live.update(render_table(config))
