"""Human-readable views of one result record."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table


def format_bytes(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024


def head_label(head: str, options: dict | None) -> str:
    """'sigmoid rank=32': a head with the options it was run with."""
    return " ".join([head, *(f"{k}={v}" for k, v in sorted((options or {}).items()))])


def format_seconds(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def print_record(record: dict, console: Console, note: str | None = None) -> None:
    """The record as a table; `note` (e.g. protocol.accuracy_note) under it where the run did not fail."""
    table = Table(
        title=f"{record['head']} · C={record['classes']} · {record['backbone']} · patch "
        f"{'x'.join(map(str, record['patch']))} · batch {record['batch']} · {record['device_name']}"
    )
    for column in ("status", "Dice ↑", "peak memory ↓", "peak RSS", "step time median ↓", "p20 / p80", "wall"):
        table.add_column(column)
    dice = record.get("dice_mean")
    table.add_row(
        record["status"],
        "–" if dice is None else f"{dice:.3f}",
        format_bytes(record.get("peak_memory_bytes")),
        format_bytes(record.get("peak_rss_bytes")),
        format_seconds(record.get("step_time_median_s")),
        f"{format_seconds(record.get('step_time_p20_s'))} / {format_seconds(record.get('step_time_p80_s'))}",
        format_seconds(record.get("wall_time_s")),
    )
    console.print(table)
    if record.get("error"):
        console.print(f"[red]{record['error']}[/red]")
    elif note:
        console.print(f"[yellow]{note}[/yellow]")
