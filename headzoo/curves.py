"""Learning curves on the leaderboard: held-out Dice against training time and steps for each class
count (mean over seeds), and the training time each head needs to reach a common Dice."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from headzoo.report import format_seconds

REACH_FRACTION = 0.9  # "time to reach Dice D": D is this fraction of the best head's final mean Dice at C
LEARNT = 0.1  # below this best final Dice no head has learnt the classes, and D would time noise


def _curves(rows: pd.DataFrame) -> list[list[dict]]:
    return [r["curve"] for _, r in rows.iterrows() if r["status"] == "ok" and isinstance(r.get("curve"), list)]


def _seed_curves(curves: list[list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean training seconds and (seeds, steps) Dice of the seeds' curves, at the steps all of them have."""
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in curves)))
    points = [[next(p for p in c if p["step"] == s) for c in curves] for s in steps]
    return (
        np.array(steps),
        np.array([np.mean([p["train_time_s"] for p in ps]) for ps in points]),
        np.array([[p["dice_mean"] or 0.0 for p in ps] for ps in points]).T,
    )


def time_to_reach(curve: list[dict], dice: float) -> float | None:
    """Training seconds at the first evaluation whose Dice is at least `dice` (None: never)."""
    return next((p["train_time_s"] for p in curve if (p["dice_mean"] or 0.0) >= dice), None)


def _plot(group: pd.DataFrame, classes: int, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_time, by_step) = plt.subplots(1, 2, figsize=(10, 4), dpi=100, sharey=True)
    for label, rows in sorted(group[group["classes"] == classes].groupby("label"), key=lambda item: item[0]):
        curves = _curves(rows)
        if curves:
            steps, seconds, dice = _seed_curves(curves)
            seeds = f"{len(curves)} seeds: mean, band min–max" if len(curves) > 1 else "1 seed"
            for axis, x in ((by_time, seconds), (by_step, steps)):
                (line,) = axis.plot(x, dice.mean(axis=0), marker=".", label=f"{label} ({seeds})")
                if len(curves) > 1:
                    axis.fill_between(x, dice.min(axis=0), dice.max(axis=0), color=line.get_color(), alpha=0.2)
    by_time.set_xlabel("training seconds")
    by_step.set_xlabel("steps")
    by_time.set_ylabel("held-out mean Dice")
    by_time.set_ylim(0, 1)  # Dice's whole range: a curve at 3e-5 is drawn flat at zero, not zoomed into a slope
    for axis in (by_time, by_step):
        axis.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    figure.suptitle(f"Learning curves, C={classes} — {device}")
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})
    plt.close(figure)


def _curve_classes(group: pd.DataFrame) -> list[int]:
    return sorted(c for c in group["classes"].unique() if _curves(group[group["classes"] == c]))


def curve_images(group: pd.DataFrame, device: str, settings: str, out: Path) -> list[str]:
    """Markdown image lines (and PNGs under `out`), one plot per C with curves: a line per label."""
    lines = []
    for c in _curve_classes(group):
        image = f"curve-C{c}-{hashlib.sha1(f'{device} · {settings}'.encode()).hexdigest()[:8]}.png"
        _plot(group, c, out / image, device)
        lines += [f"![Learning curves C={c}]({image})", ""]
    return lines


def curve_section(group: pd.DataFrame, device: str, settings: str, out: Path) -> list[str]:
    """Markdown (and PNGs under `out`) for the learning curves of one leaderboard group; [] if it has none."""
    if not any(_curves(group)):
        return []
    return [
        "#### Learning curves",
        "",
        *curve_images(group, device, settings, out),
        *reach_table(group, _curve_classes(group)),
    ]


def reach_targets(group: pd.DataFrame, classes: list[int]) -> tuple[dict[int, float], dict[int, float]]:
    """D per class count (REACH_FRACTION of the best head's final mean Dice there), and the best final mean Dice
    where no head learnt the classes (below LEARNT: D would time noise)."""
    finals = {
        c: [
            np.mean([(curve[-1]["dice_mean"] or 0.0) for curve in _curves(rows)])
            for _, rows in group[group["classes"] == c].groupby("label")
            if _curves(rows)
        ]
        for c in classes
    }
    best = {c: max(values) for c, values in finals.items() if values}  # counts without curves have no D
    return {c: REACH_FRACTION * b for c, b in best.items() if b >= LEARNT}, {
        c: b for c, b in best.items() if b < LEARNT
    }


def reach_cell(rows: pd.DataFrame, target: float) -> str:
    """Mean training seconds to reach `target` over the seeds that reach it ('' without curves)."""
    curves = _curves(rows)
    reached = [t for t in (time_to_reach(curve, target) for curve in curves) if t is not None]
    return (
        ""
        if not curves
        else f"not reached (0/{len(curves)})"
        if not reached
        else format_seconds(float(np.mean(reached)))
        + ("" if len(reached) == len(curves) else f" ({len(reached)}/{len(curves)})")
    )


def reach_table(group: pd.DataFrame, classes: list[int]) -> list[str]:
    targets, unlearnt = reach_targets(group, classes)
    lines = [
        f"#### Training time to reach Dice D ↓ (D = {REACH_FRACTION:.0%} of the best head's final mean Dice "
        "at that C; mean over the seeds that reach it)",
        "",
    ]
    if unlearnt:
        lines += [
            "No time to reach at "
            + ", ".join(f"C={c} (best final mean Dice {best:.3f})" for c, best in unlearnt.items())
            + f": below {LEARNT} no head has learnt the classes.",
            "",
        ]
    if not targets:
        return lines
    lines += [
        "| head | " + " | ".join(f"C={c} (D={t:.3f})" for c, t in targets.items()) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for label, rows in sorted(group.groupby("label"), key=lambda item: item[0]):
        lines.append(
            f"| {label} | " + " | ".join(reach_cell(rows[rows["classes"] == c], t) for c, t in targets.items()) + " |"
        )
    return lines + [""]
