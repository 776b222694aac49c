"""``headzoo sweep``: every head × class count × seed, each cell in its own process, resumable.

Each cell is ``headzoo run`` in a child process with its own run id, so its peak memory is its own,
a crash cannot take the sweep down, and its result is the record carrying that run id — never an
older row with the same key. A cell that exits without writing its record (killed, segfault, an
exception before the record existed) is recorded by the sweep as ``oom`` (killed by the kernel's OOM
killer) or ``error`` with its last line of stderr. Rows already ``ok`` in the results file are
``skipped`` unless ``overwrite``; cells run locally one after another (measurements must not share
the machine), or on SLURM through submitit. A child dies with the sweep (no orphan competes with a rerun).
"""

from __future__ import annotations

import ctypes
import dataclasses
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.live import Live
from rich.table import Table

from headzoo.config import RunConfig, new_run_id, to_argv, to_record
from headzoo.errors import OUT_OF_MEMORY_EXIT, HeadzooError
from headzoo.report import format_bytes, format_seconds, head_label
from headzoo.results import SCHEMA_VERSION, read_records, record_key, upsert_record


@dataclass
class Cell:
    config: RunConfig
    identity: dict = field(default_factory=dict)  # settings + dataset fingerprint + device name (None: unknown)
    status: str = "pending"
    record: dict | None = None
    message: str = ""

    @property
    def label(self) -> str:
        return head_label(self.config.head, self.config.options)


@dataclass
class SweepConfig:
    cells: list[Cell]
    out: Path
    overwrite: bool = False
    executor: str = "local"
    cluster: str | None = None  # submitit: None = auto (SLURM where available), "local" for tests


def plan_grid(settings: dict, heads: list[tuple[str, dict]], classes: list[int], seeds: list[int]) -> list[Cell]:
    """One validated cell per head (with options) × class count × seed; bad input fails here, before any cell."""
    from headzoo.preflight import validate

    if not heads:
        raise HeadzooError("--heads and --variant name no head")
    base = RunConfig(head=heads[0][0], **settings)
    cells = []
    for head, options in heads:
        for c in classes:
            for seed in seeds:
                config = dataclasses.replace(base, head=head, options=options, classes=c, seed=seed)
                validate(config)  # settings and head options: impossible cells fail while planning
                cells.append(Cell(config))
    return cells


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGKILL when the sweep process dies (Linux prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def run_cell(command: list[str]) -> tuple[int, str]:
    """Run one cell's `headzoo run` in its own process; (exit status, stderr)."""
    completed = subprocess.run(
        command, capture_output=True, text=True, preexec_fn=_die_with_parent if sys.platform == "linux" else None
    )
    return completed.returncode, completed.stderr


def cell_command(out: Path, cell: Cell) -> list[str]:
    return [sys.executable, "-m", "headzoo", "run", *to_argv(cell.config), "--out", str(out), "--json"]


def _device_name(config: SweepConfig, cell: Cell) -> str | None:
    """The device the cell will run on, where the sweep can know it (locally); None under submitit."""
    if config.executor != "local":
        return None
    from headzoo.device import resolve_device
    from headzoo.runner import device_name

    return device_name(resolve_device(cell.config.device))


def plan_cells(config: SweepConfig) -> None:
    from headzoo.runner import dataset_fingerprint

    done = [r for r in read_records(config.out) if r.get("status") == "ok" and r.get("device_name") is not None]
    for cell in config.cells:
        device = _device_name(config, cell)
        cell.identity = {
            **to_record(cell.config),
            "dataset_fingerprint": dataset_fingerprint(cell.config),
            "device_name": device,
        }
        key = record_key(cell.identity)
        if not config.overwrite and any(record_key(r, ignore_device=device is None) == key for r in done):
            cell.status = "skipped"
        else:
            cell.config.run_id = cell.identity["run_id"] = new_run_id()


def _finish(config: SweepConfig, cell: Cell, status_code: int, stderr: str) -> None:
    """The cell's own record (by run id), or a row for the crash that left none."""
    record = next((r for r in read_records(config.out) if r.get("run_id") == cell.config.run_id), None)
    if record is not None and status_code in (0, 1):
        cell.record, cell.status, cell.message = record, record["status"], record.get("error") or ""
        return
    message = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {status_code}"
    killed = status_code in (-signal.SIGKILL, 137)
    cell.status = "oom" if killed or status_code == OUT_OF_MEMORY_EXIT else "error"
    cell.message = "killed (out of memory)" if killed else message
    cell.record = {
        "schema_version": SCHEMA_VERSION,
        **cell.identity,
        "request": to_record(cell.config),
        "status": cell.status,
        "error": cell.message,
    }
    upsert_record(config.out, cell.record)


def render_table(config: SweepConfig) -> Table:
    table = Table(title=f"headzoo sweep → {config.out}")
    for column in ("head", "C", "seed", "status", "Dice ↑", "peak memory ↓", "step time ↓", "wall", "note"):
        table.add_column(column)
    colours = {"ok": "green", "oom": "yellow", "error": "red", "running": "cyan", "skipped": "dim"}
    for cell in config.cells:
        r = cell.record or {}
        dice = r.get("dice_mean")
        table.add_row(
            cell.label,
            str(cell.config.classes),
            str(cell.config.seed),
            f"[{colours.get(cell.status, 'white')}]{cell.status}[/]",
            "–" if dice is None else f"{dice:.3f}",
            format_bytes(r.get("peak_memory_bytes")),
            format_seconds(r.get("step_time_median_s")),
            format_seconds(r.get("wall_time_s")),
            cell.message[:60],
        )
    return table


def run_sweep(config: SweepConfig, console) -> list[Cell]:
    plan_cells(config)
    pending = [c for c in config.cells if c.status == "pending"]
    with Live(render_table(config), console=console, refresh_per_second=2) as live:
        if config.executor == "local":
            for cell in pending:
                cell.status = "running"
                live.update(render_table(config))
                _finish(config, cell, *run_cell(cell_command(config.out, cell)))
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
        jobs.append((cell, executor.submit(run_cell, cell_command(config.out, cell))))
        cell.status = "running"
    live.update(render_table(config))
    for cell, job in jobs:
        _finish(config, cell, *job.result())
        live.update(render_table(config))
