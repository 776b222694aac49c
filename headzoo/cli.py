"""The ``headzoo`` command line (typer + rich)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from headzoo.errors import OUT_OF_MEMORY_EXIT, HeadzooError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Segmentation heads for thousands of classes, side by side on one nnU-Net backbone.",
)
console = Console()


def with_run_settings(sweep: bool = False):
    """Give a command one option per RunConfig setting (config.py) and pass them as `settings`, parsed.

    For `sweep`, only the settings it passes to every cell; its axes (heads, classes, seeds) are its own."""
    from headzoo.config import parse_option, run_settings

    chosen = [(f, s) for f, s in run_settings() if s.sweep or not sweep]

    def decorate(command):
        def option(f, s) -> inspect.Parameter:
            if f.name == "options":
                default, annotation = typer.Option([], s.flag, help=s.help), list[str]
            elif f.default is dataclasses.MISSING:
                default, annotation = typer.Option(..., s.flag, help=s.help), str
            elif s.parse is not None:
                default, annotation = typer.Option(None, s.flag, help=s.help), Optional[str]
            else:
                default, annotation = typer.Option(f.default, *s.flag.split(" "), help=s.help), type(f.default)
            return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

        @functools.wraps(command)
        def wrapper(**arguments):
            settings = {}
            for f, s in chosen:
                value = arguments.pop(f.name)
                if f.name == "options":
                    value = dict(parse_option(o) for o in value)
                elif s.parse is not None:
                    if value is None:
                        continue  # not given: the RunConfig default
                    try:
                        value = s.parse(value)
                    except HeadzooError:
                        raise
                    except ValueError:
                        raise HeadzooError(f"{s.flag}: cannot read '{value}'") from None
                settings[f.name] = value
            return command(settings=settings, **arguments)

        own = [p for name, p in inspect.signature(command).parameters.items() if name != "settings"]
        wrapper.__signature__ = inspect.Signature([*own, *(option(f, s) for f, s in chosen)])
        return wrapper

    return decorate


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
def backbones(
    measure: bool = typer.Option(False, help="time a forward+backward step and its peak memory"),
    only: Optional[str] = typer.Option(None, help="comma-separated backbones (default: all)"),
    patch: Optional[str] = typer.Option(
        None, help="N or NxNxN for --measure; default: the smallest each backbone accepts, at least 32"
    ),
    batch: int = typer.Option(2, help="batch for --measure"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
) -> None:
    """List the backbones: parameters without head, default patch, stages (and --measure: step cost)."""
    from headzoo.backbone import check_patch
    from headzoo.backbone_report import PAPER_CLASSES, backbone_names, measure_step, smallest_patch, summarize
    from headzoo.config import parse_patch
    from headzoo.device import resolve_device

    names = backbone_names(only)
    edges = parse_patch(patch) if patch else None
    for name in names if measure and edges else []:
        check_patch(name, edges)
    table = Table("backbone", "class", "params (no head)", "paper count", "patch", "stages")
    if measure:
        for column in ("measured", "fwd+bwd s", "peak MiB"):
            table.add_column(column)
    target = resolve_device(device) if measure else None
    for name in names:
        s = summarize(name)
        shrink = s.downsampling[0] if len(set(s.downsampling)) == 1 else "x".join(map(str, s.downsampling))
        row = [
            name,
            s.network_class,
            f"{s.parameters / 1e6:.2f} M",
            f"{s.parameters_paper / 1e6:.2f} M",
            f"{s.default_patch}³",
            f"{s.stages}, ↓{shrink}",
        ]
        if measure:
            step = measure_step(name, edges or smallest_patch(name), batch, target)
            row += [
                f"{'x'.join(map(str, step.patch))}, batch {step.batch}",
                "oom" if step.seconds is None else f"{step.seconds:.2f}",
                "oom" if step.peak is None else f"{step.peak.bytes / 2**20:.0f}",
            ]
        table.add_row(*row)
    console.print(table)
    console.print(
        f"paper count: the whole network with a {PAPER_CLASSES}-class 1×1×1 conv at every decoder "
        "stage, as STU-Net's Table 2 counts it; params (no head): without any of those convs; "
        "patch: the default; stages, ↓: total downsampling"
    )
    if measure:
        console.print(
            f"measured on {target}: the backbone alone (no head, no optimizer), median of 3 steps "
            "after one warm-up; peak memory as `headzoo run` measures it"
        )


@app.command()
def toy(
    classes: int = typer.Option(..., help="number of labels C, background included"),
    preset: str = typer.Option("small", help="small (cost runs), protocol (accuracy on a CPU), paper (§2.4) or tiny"),
    out: Path = typer.Option(..., help="folder to create, in nnU-Net raw format"),
    seed: int = typer.Option(0),
    partial: int = typer.Option(1, help="K > 1: training volumes from K sources, each labelling its own classes"),
) -> None:
    """Write the toy dataset of the chunked-basis-head paper (§2.4) in nnU-Net raw format."""
    from headzoo.toy import write_toy_dataset

    write_toy_dataset(out, classes, preset, seed, partial)
    console.print(f"wrote {out}")


@app.command()
@with_run_settings()
def run(
    settings: dict,
    out: Path = typer.Option(Path("results.jsonl"), help="results file (JSON lines)"),
    as_json: bool = typer.Option(False, "--json", help="print the record as JSON"),
) -> None:
    """Train one head, evaluate it, print Dice / peak memory / step time and record the run."""
    from headzoo.config import RunConfig
    from headzoo.preflight import validate

    config = RunConfig(**settings)
    validate(config)  # settings and head options (on the meta device), before the runner is even imported
    from headzoo.budget import apply_memory_limit
    from headzoo.protocol import accuracy_note
    from headzoo.report import print_record
    from headzoo.results import check_results_file, upsert_record
    from headzoo.runner import run as run_head

    check_results_file(out)
    apply_memory_limit(config.memory_limit_bytes, config.device)
    record = run_head(config, show_progress=not as_json)
    upsert_record(out, record)
    if as_json:
        print(json.dumps(record, sort_keys=True))
    else:
        print_record(record, console, accuracy_note(record))
    if record["status"] != "ok":
        raise typer.Exit(1)


def parse_variant(text: str) -> tuple[str, dict]:
    """'sigmoid:rank=32,chunk=60' → ('sigmoid', {'rank': 32, 'chunk': 60})."""
    from headzoo.config import parse_options

    head, _, options = text.partition(":")
    return head, parse_options(options, f"--variant {text}")


def parse_integers(text: str, option: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise HeadzooError(f"{option} expects comma-separated integers, got '{text}'") from None


@app.command()
@with_run_settings(sweep=True)
def sweep(
    settings: dict,
    heads: str = typer.Option("dense,chunked,sigmoid,knn", help="comma-separated heads (default options)"),
    variant: list[str] = typer.Option([], help="a head with options, e.g. sigmoid:rank=32 (repeatable)"),
    classes: str = typer.Option("10,100,200,500,1000", help="comma-separated class counts"),
    seeds: str = typer.Option("0", help="comma-separated seeds"),
    out: Path = typer.Option(Path("results.jsonl")),
    overwrite: bool = typer.Option(False, help="rerun cells that are already ok"),
    executor: str = typer.Option("local", help="local (one cell at a time) or submitit (SLURM)"),
    cluster: Optional[str] = typer.Option(None, help="submitit cluster: auto (default), slurm or local"),
) -> None:
    """Run every head × class count × seed, each cell in its own process; resumes where it stopped."""
    from headzoo.results import check_results_file
    from headzoo.sweep import SweepConfig, plan_grid, run_sweep

    check_results_file(out)
    head_list = [(h, {}) for h in heads.split(",") if h] + [parse_variant(v) for v in variant]
    cells = plan_grid(settings, head_list, parse_integers(classes, "--classes"), parse_integers(seeds, "--seeds"))
    cells = run_sweep(SweepConfig(cells, out, overwrite, executor, cluster), console)
    counts = {s: sum(c.status == s for c in cells) for s in ("ok", "oom", "error", "skipped")}
    console.print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()))


@app.command()
def leaderboard(
    results: Path = typer.Option(Path("results.jsonl"), help="results file (JSON lines)"),
    out: Path = typer.Option(Path("leaderboard"), help="folder for README.md and plots"),
) -> None:
    """Render a results file as markdown tables (per device and settings) and plots."""
    from headzoo.leaderboard import render

    console.print(f"wrote {render(results, out)}")


@app.command()
@with_run_settings()
def estimate(
    settings: dict,
    device_kind: str = typer.Option(
        "cuda", "--device-kind", help="cuda (--amp: CUDA's autocast, emulated) or cpu (fp32)"
    ),
    volume: Optional[str] = typer.Option(
        None,
        help="whole volume for the inference estimate, N or NxNxN "
        "(default: 244x234x287, a TotalSegmentator CT at 1.5 mm)",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the estimate as one JSON object"),
) -> None:
    """Peak memory of a training step, the loss and sliding-window inference at any scale, without a GPU."""
    from headzoo.config import parse_patch
    from headzoo.estimate import estimate as run_estimate, problem_from_settings
    from headzoo.estimate_report import print_estimate

    problem = problem_from_settings(settings, device_kind, parse_patch(volume) if volume else None)
    result = run_estimate(problem)
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        print_estimate(result, console)


@app.command()
def advise(
    classes: int = typer.Option(..., help="number of labels C, background included"),
    memory: str = typer.Option(..., help="the GPU's memory, e.g. 24GiB"),
    backbone: str = typer.Option("resenc-l", help="see `headzoo backbones`"),
    patch: Optional[int] = typer.Option(None, help="cubic patch edge (default: the backbone's)"),
    batch: int = typer.Option(2),
    device_kind: str = typer.Option("cuda", "--device-kind", help="cuda (autocast emulated) or cpu"),
    results: Path = typer.Option(Path("leaderboard/results.jsonl"), help="measured rows (step time, Dice)"),
    as_json: bool = typer.Option(False, "--json", help="print the table as JSON"),
    plot: Optional[Path] = typer.Option(
        None,
        help="also draw estimated memory against C (10 to 10,000) for "
        "every head, with the budget as a line, into this PNG",
    ),
) -> None:
    """Which head fits a C and a GPU: every head's estimated peak, largest batch and patch, measured Dice."""
    from headzoo.advise import PLOT_CLASSES, advise as run_advise, as_json as advice_json, plot as draw
    from headzoo.config import parse_bytes
    from headzoo.estimate_report import print_advice

    budget = parse_bytes(memory)
    advice, recommendation = run_advise(classes, budget, backbone, patch, batch, device_kind, results)
    if as_json:
        print(json.dumps({"advice": advice_json(advice), "recommendation": recommendation, "budget_bytes": budget}))
    else:
        edge = patch or advice_patch(backbone)
        print_advice(
            advice,
            recommendation,
            f"C = {classes}, {backbone}, patch {edge}³, batch {batch}, {device_kind}",
            budget,
            console,
        )
    if plot is not None:
        written = draw(PLOT_CLASSES, backbone, patch or advice_patch(backbone), batch, device_kind, budget, plot)
        if not as_json:
            console.print(f"wrote {written}")


def advice_patch(backbone: str) -> int:
    from headzoo.backbone import get_backbone

    return get_backbone(backbone)[1]


@app.command("nnunet-dir")
def nnunet_dir() -> None:
    """Print the folder of nnU-Net trainers for every registered head: export nnUNet_extTrainer=$(headzoo nnunet-dir)."""
    from headzoo.nnunet.train import EXT_TRAINER_FOLDER

    print(EXT_TRAINER_FOLDER)


@app.command("nnunet-train")
def nnunet_train(
    dataset: str = typer.Argument(..., help="dataset name or id"),
    configuration: str = typer.Argument(..., help="e.g. 3d_fullres"),
    fold: str = typer.Argument(..., help="0-4 or all"),
    trainer: str = typer.Option(..., "-tr", help="nnUNetTrainer_<head>[_1epoch|_5epochs|_smoke]"),
    plans: str = typer.Option("nnUNetPlans", "-p"),
    device: str = typer.Option("cuda", "-device", help="cuda, cpu or mps"),
    num_gpus: int = typer.Option(1, "-num_gpus", help="DDP over N GPUs"),
    continue_training: bool = typer.Option(False, "--c", help="continue from the latest checkpoint"),
    validation_only: bool = typer.Option(False, "--val", help="only run the final validation"),
    disable_checkpointing: bool = typer.Option(False, "--disable_checkpointing"),
) -> None:
    """nnUNetv2_train with a headzoo trainer, resolved directly (works where nnU-Net's discovery cannot import)."""
    from headzoo.nnunet.train import nnunet_train as train

    train(
        dataset,
        configuration,
        fold,
        trainer,
        plans,
        device,
        num_gpus,
        continue_training,
        validation_only,
        disable_checkpointing,
    )


@app.command("predict")
def predict(
    input_folder: Path = typer.Option(..., "-i", help="images named CASE_XXXX.<file ending>"),
    output_folder: Path = typer.Option(..., "-o"),
    dataset: str = typer.Option(..., "-d", help="dataset name or id"),
    configuration: str = typer.Option(..., "-c"),
    folds: list[str] = typer.Option(["0", "1", "2", "3", "4"], "-f", help="a fold (repeat -f for several)"),
    trainer: str = typer.Option(..., "-tr"),
    plans: str = typer.Option("nnUNetPlans", "-p"),
    checkpoint: str = typer.Option("checkpoint_final.pth", "-chk"),
    device: str = typer.Option("cuda", "-device", help="cuda, cpu or mps"),
    disable_tta: bool = typer.Option(False, "--disable_tta", help="no mirroring"),
    step_size: float = typer.Option(0.5, "-step_size"),
    preprocessing_workers: int = typer.Option(3, "-npp", help="0: preprocess in this process"),
) -> None:
    """nnUNetv2_predict for headzoo trainers: aggregates only the head's K channels, writes nnU-Net's label files."""
    from headzoo.nnunet.predict import predict as run_prediction

    run_prediction(
        input_folder,
        output_folder,
        dataset,
        configuration,
        folds,
        trainer,
        plans,
        checkpoint,
        device,
        disable_tta,
        step_size,
        preprocessing_workers,
    )


def main() -> None:
    """Entry point: bad input becomes one line on stderr and exit status 2 (HEADZOO_DEBUG=1 for the traceback);
    running out of memory outside the training step, exit status 3."""
    try:
        app()
    except HeadzooError as error:
        if os.environ.get("HEADZOO_DEBUG") == "1":
            traceback.print_exc()
        print(f"headzoo: error: {error}", file=sys.stderr)
        sys.exit(2)
    except MemoryError:  # e.g. --memory-limit below what importing torch and nnU-Net takes
        print(
            "headzoo: error: out of memory before training (is --memory-limit below the import footprint?)",
            file=sys.stderr,
        )
        sys.exit(OUT_OF_MEMORY_EXIT)
