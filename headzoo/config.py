"""The one schema of a run (like nanoGPT's GPTConfig): every setting of ``headzoo run``, with its
command-line option, whether it is part of the results key, and how it reads in a leaderboard title.
The CLI options of ``run`` and ``sweep``, a sweep cell's argv, the record's settings, the results key
and the leaderboard's group titles and reproduce commands are all derived from this one dataclass:
adding an option is adding a field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headzoo.errors import HeadzooError

TOY_CLASSES = 100  # --classes when neither it nor --dataset is given
MEMORY_UNITS = {
    "tib": 2**40,
    "gib": 2**30,
    "mib": 2**20,
    "kib": 2**10,
    "tb": 10**12,
    "gb": 10**9,
    "mb": 10**6,
    "kb": 10**3,
    "b": 1,
    "": 1,
}


def parse_option(text: str, flag: str = "--option") -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON where it parses (numbers, true/false, null), else a string; `flag` is
    the option the text came from, for the message. Whether the head takes it is the head's to say
    (head.check_head_options)."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise HeadzooError(f"{flag} expects KEY=VALUE, got '{text}'")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), {"True": True, "False": False, "None": None}.get(value, value)


def parse_options(text: str, flag: str) -> dict:
    """'rank=16, chunk=10' → {'rank': 16, 'chunk': 10}: comma-separated items, each read by parse_option."""
    return dict(parse_option(item.strip(), flag) for item in text.split(",") if item.strip())


def parse_positive_number(text: str, flag: str) -> float:
    """A finite number above 0: '--lr inf', 'nan' or '-1' is refused, never recorded (as null) or run."""
    try:
        value = float(text)
    except ValueError:
        raise HeadzooError(f"{flag}: cannot read '{text}' as a number") from None
    if not math.isfinite(value) or value <= 0:
        raise HeadzooError(f"{flag} must be a finite number above 0, got '{text}'")
    return value


def parse_grad_clip(text: str) -> float | None:
    """'none' (no clipping) or the gradient norm to clip at, a finite number above 0."""
    return None if text.strip().lower() == "none" else parse_positive_number(text, "--grad-clip")


def parse_patch(text: str) -> tuple[int, ...]:
    """'32' or '32x32x48' → (32, 32, 32) or (32, 32, 48)."""
    try:
        edges = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise HeadzooError(f"--patch expects N or NxNxN, got '{text}'") from None
    edges = edges * 3 if len(edges) == 1 else edges
    if len(edges) != 3 or min(edges) < 1:
        raise HeadzooError(f"--patch expects N or NxNxN with positive edges, got '{text}'")
    return edges


def parse_bytes(text: str) -> int:
    """'16GiB', '512MiB', '2GB' or a plain number of bytes."""
    number = text.strip().rstrip("BbIiKkMmGgTt")
    unit = text.strip()[len(number) :].lower()
    try:
        value = int(float(number) * MEMORY_UNITS[unit])
    except (ValueError, KeyError):
        raise HeadzooError(f"cannot read '{text}' as a memory size (e.g. 16GiB)") from None
    if value <= 0:
        raise HeadzooError(f"a memory size must be positive, got '{text}'")
    return value


def bytes_text(value: int) -> str:
    """The shortest exact spelling of a byte count that parse_bytes reads back: 16GiB, 512MiB, 1000."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if value % MEMORY_UNITS[unit.lower()] == 0:
            return f"{value // MEMORY_UNITS[unit.lower()]}{unit}"
    return str(value)


def patch_text(patch) -> str:
    return "x".join(map(str, patch))


@dataclass(frozen=True)
class Setting:
    """How one RunConfig field appears on the command line, in the results key and in a title."""

    help: str
    flag: str  # the `headzoo run` option
    key: bool = True  # part of the results key: it changes what is measured
    sweep: bool = True  # `headzoo sweep` passes it to every cell (False: a sweep axis)
    parse: Callable[[str], Any] | None = None  # command-line text → value (None: typer reads the type)
    text: Callable[[Any], str] = str  # value → command-line text (a cell's argv, reproduce commands)
    title: Callable[[Any], str | None] | None = None  # words in a leaderboard group title (None: not shown)


def setting(help: str, flag: str, default: Any = dataclasses.MISSING, **details) -> Any:
    if isinstance(default, (dict, list)):
        return field(
            default_factory=lambda: type(default)(default), metadata={"setting": Setting(help, flag, **details)}
        )
    return field(default=default, metadata={"setting": Setting(help, flag, **details)})


@dataclass
class RunConfig:
    head: str = setting("a registered head (see `headzoo heads`)", "--head", sweep=False)
    options: dict = setting("head option KEY=VALUE (repeatable)", "--option", {}, sweep=False)
    classes: int | None = setting(
        "number of labels C, background included (default: the toy's 100, or the --dataset's)",
        "--classes",
        None,
        sweep=False,
        parse=int,
    )
    backbone: str = setting(
        "small (CPU), resenc-m, resenc-l, stu-s (CPU), stu-b, stu-l or stu-h (see `headzoo backbones`)",
        "--backbone",
        "small",
        title=lambda v: f"backbone {v}",
    )
    patch: tuple[int, ...] | None = setting(
        "N or NxNxN; default: the backbone's",
        "--patch",
        None,
        parse=parse_patch,
        text=patch_text,
        title=lambda v: f"patch {patch_text(v)}",
    )
    batch: int = setting("batch size", "--batch", 2, title=lambda v: f"batch {v}")
    steps: int = setting(
        "training steps (warm-up, 1 memory step, the rest timed)", "--steps", 60, title=lambda v: f"{v} steps"
    )
    seed: int = setting("seed of data, weights and sampling", "--seed", 0, sweep=False)  # seeds share a group
    partial: int = setting(
        "K > 1: partially labelled toy data from K sources (MultiTalent)",
        "--partial",
        1,
        title=lambda v: f"partial labels from {v} sources" if v and v > 1 else None,
    )
    memory_limit_bytes: int | None = setting(
        "memory budget, e.g. 16GiB (CPU: address space; CUDA: allocator)",
        "--memory-limit",
        None,
        parse=parse_bytes,
        text=bytes_text,
        title=lambda v: f"memory budget {_format_bytes(v)}" if v else None,
    )
    preset: str = setting(
        "toy preset when --dataset is not given",
        "--preset",
        "small",
        title=lambda v: None if v in (None, "small") else f"toy preset {v}",
    )
    dataset_folder: Path | None = setting(
        "an nnU-Net raw dataset folder instead of the toy",
        "--dataset",
        None,
        key=False,
        parse=Path,  # its content fingerprint is in the key
        title=lambda v: f"dataset {Path(v).name}" if v else None,
    )
    warmup: int = setting("warm-up steps before the memory step", "--warmup", 3)
    lr: float = setting(
        "learning rate of ScheduleFree AdamW (the paper's 0.0025)",
        "--lr",
        0.0025,
        parse=lambda t: parse_positive_number(t, "--lr"),
        title=lambda v: None if v == 0.0025 else f"lr {v:g}",
    )
    grad_clip: float | None = setting(
        "clip the gradient norm at this value, as nnU-Net (12); 'none': off",
        "--grad-clip",
        12.0,
        parse=parse_grad_clip,
        text=lambda v: "none" if v is None else f"{v:g}",
        title=lambda v: f"gradient clipping at {v:g}" if v else None,
    )
    amp: bool = setting(
        "autocast forward + loss on CUDA, as nnU-Net (no effect on CPU)",
        "--amp/--no-amp",
        True,
        title=lambda v: None if v else "no autocast",
    )
    eval_every: int | None = setting(
        "evaluate the held-out volumes every N steps: a learning curve", "--eval-every", None, key=False, parse=int
    )
    device: str = setting("auto, cpu or cuda", "--device", "auto", key=False)  # the key has the device's name
    run_id: str | None = setting(
        "this run's id (a sweep sets it; default: a new one)", "--run-id", None, key=False, sweep=False, parse=str
    )


def _format_bytes(value: int) -> str:
    from headzoo.report import format_bytes

    return format_bytes(value)


def run_settings() -> list[tuple[dataclasses.Field, Setting]]:
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(RunConfig)]


#: the results key: every setting that changes what is measured, the dataset's identity and the device
KEY_FIELDS = tuple(f.name for f, s in run_settings() if s.key) + ("dataset_fingerprint", "device_name")


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def to_record(config: RunConfig) -> dict:
    """The settings part of a result record (JSON values)."""

    def jsonable(value):
        if isinstance(value, tuple):
            return list(value)
        return str(value) if isinstance(value, Path) else value

    return {f.name: jsonable(getattr(config, f.name)) for f, _ in run_settings()}


def from_record(record: dict) -> RunConfig:
    """The RunConfig a record was made with (the inverse of to_record)."""
    values = {
        f.name: record.get(f.name, f.default)
        for f, _ in run_settings()
        if f.name in record or f.default is not dataclasses.MISSING
    }
    if values.get("patch") is not None:
        values["patch"] = tuple(values["patch"])
    if values.get("dataset_folder") is not None:
        values["dataset_folder"] = Path(values["dataset_folder"])
    return RunConfig(**values)


def to_argv(config: RunConfig, only_changed: bool = False, sweep_only: bool = False) -> list[str]:
    """Command-line arguments that make `config` again (`headzoo run`'s, or the shared part of a sweep's)."""
    default = RunConfig(head=config.head)
    argv = []
    for f, s in run_settings():
        value, unset = getattr(config, f.name), getattr(default, f.name)
        if (sweep_only and not s.sweep) or (value == unset and (only_changed or value is None) and f.name != "head"):
            continue
        if f.name == "options":
            argv += [a for k, v in sorted(value.items()) for a in ("--option", f"{k}={json.dumps(v)}")]
        elif isinstance(value, bool):
            on, off = s.flag.split("/")
            argv.append(on if value else off)
        else:
            argv += [s.flag, s.text(value)]
    return argv


def title(record: dict) -> str:
    """A leaderboard group's settings in words: 'backbone small, patch 32x32x32, batch 2, 60 steps, seed 0'."""
    config = from_record(record)
    words = (s.title(getattr(config, f.name)) for f, s in run_settings() if s.title is not None)
    return ", ".join(w for w in words if w)
