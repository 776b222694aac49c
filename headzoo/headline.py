"""The leaderboard's first screen: the accuracy protocol's heads × C in one table per class count, and the
learning-rate budget every head had (protocol.LR_GRID at C = 100, seed 0)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from headzoo.curves import curve_images, reach_cell, reach_targets
from headzoo.protocol import (
    ACCURACY_PROTOCOL,
    LARGE_C,
    LR_GRID,
    PROTOCOL_LR,
    TUNING,
    is_large_c_run,
    is_protocol_run,
    is_tuning_run,
    protocol_lr,
)
from headzoo.report import format_bytes, format_seconds
from headzoo.results import DICE_DEFINITION

OLD_DICE = "†"  # a cell with rows whose dice_mean is the pooled Dice (schema < 3)


def _dice(value: float) -> str:
    return f"{value:.3f}"


def seed_cell(rows: pd.DataFrame, column: str, formatter) -> str:
    """Mean [min–max] over the ok seeds ('–' where none has the value), with a count of failed seeds."""
    ok = rows[rows["status"] == "ok"]
    values = ok[column].dropna().astype(float) if column in ok else pd.Series(dtype=float)
    failed = rows[rows["status"] != "ok"]["status"].value_counts()
    if values.empty:
        return ", ".join(f"`{s}`" for s in sorted(failed.index)) or "–"
    low, high = formatter(values.min()), formatter(values.max())
    text = low if low == high else f"{formatter(values.mean())} [{low}–{high}]"  # seeds that agree: one value
    if column.startswith("dice") and "dice_definition" in ok and (ok["dice_definition"] == "pooled").any():
        text += OLD_DICE
    return text + "".join(f" ({n} `{s}`)" for s, n in sorted(failed.items()))


def headline_section(frame: pd.DataFrame, records: list[dict], out: Path) -> list[str]:
    """Markdown for the accuracy protocol's runs and the C = 1000 group; [] where the results hold none."""
    # nnU-Net's Dice only: a mean over seeds never mixes it with the pooled Dice of older rows ("All runs" has those)
    nnunet_dice = [records[i].get("dice_definition") == DICE_DEFINITION for i in frame["row"]]
    protocol = frame[[is_protocol_run(records[i]) and ok for i, ok in zip(frame["row"], nnunet_dice)]]
    large = frame[[is_large_c_run(records[i]) and ok for i, ok in zip(frame["row"], nnunet_dice)]]
    lines = _tables(protocol, "")
    if not lines:
        return []
    settings = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in ACCURACY_PROTOCOL.items())
    lines = [
        "## Headline: the accuracy protocol",
        "",
        f"Toy {settings}, backbone small, patch 32³, batch 2, each head at its own learning rate (below). "
        "Dice is nnU-Net's (per test case and class, then the mean over classes); a cell over seeds is the "
        "mean [min–max], and two heads differ only where their ranges do not overlap. Time to reach: "
        "training seconds until the held-out Dice first reaches 90% of the best head's final Dice. "
        'Rows from before schema 3 (pooled Dice) are left out here; they are under "All runs".',
        "",
        *lines,
    ]
    if not large.empty:
        large = large.assign(label=[f"{label} · {steps} steps" for label, steps in zip(large["label"], large["steps"])])
        lines += [
            f"The C = 1000 group: toy preset {LARGE_C['preset']} (more, smaller objects: about 18 training "
            f"instances per class), the same learning rates; the protocol's budget is {LARGE_C['steps']} steps "
            "(about an hour of one-thread training for chunked); a row per head and step count (equal steps, and "
            "about equal training seconds where a head's step is faster or slower). Time to reach: over every run "
            "of the group.",
            "",
            *_tables(large, f" · preset {LARGE_C['preset']}"),
        ]
        for device, runs in sorted(large.groupby("device_name"), key=lambda item: item[0]):
            lines += curve_images(runs, device, f"headline · preset {LARGE_C['preset']}", out)
    return lines + tuning_section(frame, records)


def _tables(runs: pd.DataFrame, suffix: str) -> list[str]:
    """One table per (device, C): heads with Dice, worst 10%, pooled Dice, peak memory, step time, time to reach."""
    lines = []
    for (device, classes), group in sorted(runs.groupby(["device_name", "classes"]), key=lambda item: item[0]):
        targets, unlearnt = reach_targets(group, [classes])
        target = targets.get(classes)
        lines += [
            f"### C = {classes} · {device}{suffix}",
            "",
            "| head | lr | seeds | Dice ↑ | worst 10% ↑ | pooled Dice | peak memory ↓ | step time ↓ | "
            + (f"time to Dice {target:.3f} ↓ |" if target else "time to reach ↓ |"),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, rows in sorted(group.groupby("label"), key=lambda item: (item[1]["steps"].iloc[0], item[0])):
            reach = reach_cell(rows, target) if target else "no head learnt them" if unlearnt else "–"
            lines.append(
                " | ".join(
                    [
                        f"| {label}",
                        f"{rows['lr'].iloc[0]:g}",
                        str(rows["seed"].nunique()),
                        seed_cell(rows, "dice_mean", _dice),
                        seed_cell(rows, "dice_worst10_mean", _dice),
                        seed_cell(rows, "dice_pooled_mean", _dice),
                        seed_cell(rows, "peak_memory_bytes", format_bytes),
                        seed_cell(rows, "step_time_median_s", format_seconds),
                        reach,
                    ]
                )
                + " |"
            )
        lines.append("")
    return lines


def tuning_section(frame: pd.DataFrame, records: list[dict]) -> list[str]:
    """The same learning-rate grid for every head: final Dice per rate, the chosen (protocol) rate in bold. Only
    heads that earned their rate on the grid (protocol.PROTOCOL_LR); a variant run at one rate is an experiment."""
    tuning = frame[
        [is_tuning_run(records[i]) and label in PROTOCOL_LR for i, label in zip(frame["row"], frame["label"])]
    ]
    if tuning.empty:
        return []
    lines = [
        "### Learning-rate budget",
        "",
        f"Every head had the same budget: one {ACCURACY_PROTOCOL['steps']}-step run per learning rate at "
        f"C = {TUNING['classes']}, seed {TUNING['seed']}; its best rate (bold) is its protocol rate above.",
        "",
        "| head | " + " | ".join(f"lr {lr:g}" for lr in LR_GRID) + " |",
        "|---|" + "---|" * len(LR_GRID),
    ]
    for label, rows in sorted(tuning.groupby("label"), key=lambda item: item[0]):
        chosen = protocol_lr(rows["head"].iloc[0], rows["options"].iloc[0])
        cells = []
        for lr in LR_GRID:
            cell = seed_cell(rows[rows["lr"] == lr], "dice_mean", _dice) if (rows["lr"] == lr).any() else "not run"
            cells.append(f"**{cell}**" if lr == chosen else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]
