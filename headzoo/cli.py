"""The ``headzoo`` command line (typer + rich)."""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from headzoo.errors import HeadzooError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Segmentation heads for thousands of classes, side by side on one nnU-Net backbone.")
console = Console()


def parse_option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON where it parses (numbers, true/false, null), else a string."""
    if "=" not in text:
        raise HeadzooError(f"--option expects KEY=VALUE, got '{text}'")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except ValueError:
        return key, {"True": True, "False": False, "None": None}.get(value, value)


def parse_patch(text: Optional[str]) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        edges = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise HeadzooError(f"--patch expects N or NxNxN, got '{text}'") from None
    edges = edges * 3 if len(edges) == 1 else edges
    if len(edges) != 3 or min(edges) < 1:
        raise HeadzooError(f"--patch expects N or NxNxN with positive edges, got '{text}'")
    return edges


def parse_bytes(text: Optional[str]) -> int | None:
    """'16GiB', '512MiB', '2GB' or a plain number of bytes."""
    if text is None:
        return None
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1, "": 1}
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number):].lower()
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise HeadzooError(f"cannot read '{text}' as a memory size (e.g. 16GiB)") from None


@app.command()
def heads() -> None:
    """List the registered heads: name, distribution, description (or why a plug-in is broken)."""
    from headzoo.registry import describe, discover
    table = Table("head", "distribution", "description")
    for name, entry in sorted(discover().items()):
        try:
            table.add_row(name, entry.distribution, describe(entry.load()))
        except HeadzooError as error:
            table.add_row(name, entry.distribution, f"[red]broken[/red]: {error}")
    console.print(table)


@app.command()
def backbones(measure: bool = typer.Option(False, help="time a forward+backward step and its peak memory"),
              only: Optional[str] = typer.Option(None, help="comma-separated backbones (default: all)"),
              patch: Optional[str] = typer.Option(None, help="N or NxNxN for --measure; default: the "
                                                  "smallest each backbone accepts, at least 32"),
              batch: int = typer.Option(2, help="batch for --measure"),
              device: str = typer.Option("auto", help="auto, cpu or cuda")) -> None:
    """List the backbones: parameters without head, default patch, stages (and --measure: step cost)."""
    from headzoo.backbone import check_patch
    from headzoo.backbone_report import PAPER_CLASSES, backbone_names, measure_step, smallest_patch, summarize
    from headzoo.runner import resolve_device
    names = backbone_names(only)
    edges = parse_patch(patch)
    for name in names if measure and edges else []:
        check_patch(name, edges)
    table = Table("backbone", "class", "params (no head)", "paper count", "patch", "stages")
    if measure:
        for column in ("measured", "fwd+bwd s", "peak MiB"):
            table.add_column(column)
    target = resolve_device(device) if measure else None
    for name in names:
        s = summarize(name)
        row = [name, s.network_class, f"{s.parameters / 1e6:.2f} M", f"{s.parameters_paper / 1e6:.2f} M",
               f"{s.default_patch}³", f"{s.stages}, ↓{'x'.join(map(str, s.downsampling)) if len(set(s.downsampling)) > 1 else s.downsampling[0]}"]
        if measure:
            step = measure_step(name, edges or smallest_patch(name), batch, target)
            row += [f"{'x'.join(map(str, step.patch))}, batch {step.batch}",
                    "oom" if step.seconds is None else f"{step.seconds:.2f}",
                    "oom" if step.peak is None else f"{step.peak.bytes / 2**20:.0f}"]
        table.add_row(*row)
    console.print(table)
    console.print(f"paper count: the whole network with a {PAPER_CLASSES}-class 1×1×1 conv at every decoder "
                  "stage, as STU-Net's Table 2 counts it; params (no head): without any of those convs; "
                  "patch: the default; stages, ↓: total downsampling")
    if measure:
        console.print(f"measured on {target}: the backbone alone (no head, no optimizer), median of 3 steps "
                      "after one warm-up; peak memory as `headzoo run` measures it")


@app.command()
def toy(classes: int = typer.Option(..., help="number of labels C, background included"),
        preset: str = typer.Option("small", help="small (CPU minutes), paper (§2.4: 192³, 1000 volumes) or tiny"),
        out: Path = typer.Option(..., help="folder to create, in nnU-Net raw format"),
        seed: int = typer.Option(0),
        partial: int = typer.Option(1, help="K > 1: training volumes from K sources, each labelling its own classes")
        ) -> None:
    """Write the toy dataset of the chunked-basis-head paper (§2.4) in nnU-Net raw format."""
    from headzoo.toy import write_toy_dataset
    write_toy_dataset(out, classes, preset, seed, partial)
    console.print(f"wrote {out}")


@app.command()
def run(head: str = typer.Option(..., help="a registered head (see `headzoo heads`)"),
        classes: Optional[int] = typer.Option(100, help="number of labels C, background included"),
        steps: int = typer.Option(60, help="training steps (3 warm-up, 1 memory, the rest timed)"),
        patch: Optional[str] = typer.Option(None, help="N or NxNxN; default: the backbone's"),
        batch: int = typer.Option(2),
        backbone: str = typer.Option("small", help="small (CPU), resenc-m, resenc-l, stu-s (CPU), stu-b, stu-l or stu-h"),
        device: str = typer.Option("auto", help="auto, cpu or cuda"),
        seed: int = typer.Option(0),
        preset: str = typer.Option("small", help="toy preset when --dataset is not given"),
        dataset: Optional[Path] = typer.Option(None, help="an nnU-Net raw dataset folder instead of the toy"),
        partial: int = typer.Option(1, help="K > 1: partially labelled toy data from K sources (MultiTalent)"),
        memory_limit: Optional[str] = typer.Option(None, help="memory budget for this run, e.g. 16GiB"),
        out: Path = typer.Option(Path("results.jsonl"), help="results file (JSON lines)"),
        as_json: bool = typer.Option(False, "--json", help="print the record as JSON"),
        option: list[str] = typer.Option([], help="head option KEY=VALUE (repeatable)")) -> None:
    """Train one head, evaluate it, print Dice / peak memory / step time and record the run."""
    from headzoo.budget import apply_memory_limit
    from headzoo.report import print_record
    from headzoo.results import ensure_writable, upsert_record
    from headzoo.runner import RunConfig, run as run_head
    config = RunConfig(head=head, classes=classes, steps=steps, patch=parse_patch(patch), batch=batch,
                       backbone=backbone, device=device, seed=seed, preset=preset, dataset=dataset, partial=partial,
                       memory_limit=parse_bytes(memory_limit), options=dict(parse_option(o) for o in option))
    ensure_writable(out)
    apply_memory_limit(config.memory_limit, device)
    record = run_head(config, show_progress=not as_json)
    upsert_record(out, record)
    if as_json:
        print(json.dumps(record, sort_keys=True))
    else:
        print_record(record, console)
    if record["status"] != "ok":
        raise typer.Exit(1)


def parse_variant(text: str) -> tuple[str, dict]:
    """'sigmoid:rank=32,chunk=60' → ('sigmoid', {'rank': 32, 'chunk': 60})."""
    head, _, options = text.partition(":")
    return head, dict(parse_option(o) for o in options.split(",") if o)


@app.command()
def sweep(heads: str = typer.Option("dense,chunked,sigmoid,knn", help="comma-separated heads (default options)"),
          variant: list[str] = typer.Option([], help="a head with options, e.g. sigmoid:rank=32 (repeatable)"),
          classes: str = typer.Option("10,100,200,500,1000", help="comma-separated class counts"),
          steps: int = typer.Option(60), patch: Optional[str] = typer.Option(None), batch: int = typer.Option(2),
          backbone: str = typer.Option("small"), device: str = typer.Option("auto"), seed: int = typer.Option(0),
          preset: str = typer.Option("small"), partial: int = typer.Option(1),
          memory_limit: Optional[str] = typer.Option(None, help="budget per cell, e.g. 16GiB"),
          out: Path = typer.Option(Path("results.jsonl")),
          overwrite: bool = typer.Option(False, help="rerun cells that are already ok"),
          executor: str = typer.Option("local", help="local (one cell at a time) or submitit (SLURM)"),
          cluster: Optional[str] = typer.Option(None, help="submitit cluster: auto (default), slurm or local")) -> None:
    """Run every head × class count, each cell in its own process; resumes where it stopped."""
    from headzoo.backbone import check_patch, get_backbone
    from headzoo.registry import get_head_class
    from headzoo.results import ensure_writable
    from headzoo.runner import device_name, resolve_device
    from headzoo.sweep import SweepConfig, run_sweep
    ensure_writable(out)
    head_list = [(h, {}) for h in heads.split(",") if h] + [parse_variant(v) for v in variant]
    for head, _ in head_list:
        get_head_class(head)
    try:
        class_list = [int(c) for c in classes.split(",")]
    except ValueError:
        raise HeadzooError(f"--classes expects comma-separated integers, got '{classes}'") from None
    edges = parse_patch(patch) or (get_backbone(backbone)[1],) * 3
    check_patch(backbone, edges)
    limit_bytes = parse_bytes(memory_limit)
    arguments = ["--steps", str(steps), "--patch", "x".join(map(str, edges)), "--batch", str(batch),
                 "--backbone", backbone, "--device", device, "--seed", str(seed), "--preset", preset,
                 "--partial", str(partial), *(["--memory-limit", memory_limit] if memory_limit else [])]
    key_fields = {"backbone": backbone, "patch": list(edges), "batch": batch, "steps": steps, "seed": seed,
                  "partial": partial, "memory_limit_bytes": limit_bytes,
                  "device_name": device_name(resolve_device(device))}
    cells = run_sweep(SweepConfig(head_list, class_list, arguments, key_fields, out, overwrite, executor, cluster),
                      console)
    counts = {s: sum(c.status == s for c in cells) for s in ("ok", "oom", "error", "skipped")}
    console.print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()))


@app.command()
def leaderboard(results: Path = typer.Option(Path("results.jsonl"), help="results file (JSON lines)"),
                out: Path = typer.Option(Path("leaderboard"), help="folder for README.md and plots")) -> None:
    """Render a results file as markdown tables (per device and settings) and plots."""
    from headzoo.leaderboard import render
    console.print(f"wrote {render(results, out)}")


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit status 2 (HEADZOO_DEBUG=1 for the traceback)."""
    try:
        app()
    except HeadzooError as error:
        if os.environ.get("HEADZOO_DEBUG") == "1":
            traceback.print_exc()
        print(f"headzoo: error: {error}", file=sys.stderr)
        sys.exit(2)
