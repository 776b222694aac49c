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


def _mean_curve(curves: list[list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean training seconds and mean Dice over the seeds' curves (at the steps all of them have)."""
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in curves)))
    points = [[next(p for p in c if p["step"] == s) for c in curves] for s in steps]
    return (np.array(steps), np.array([np.mean([p["train_time_s"] for p in ps]) for ps in points]),
            np.array([np.mean([p["dice_mean"] or 0.0 for p in ps]) for ps in points]))


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
            steps, seconds, dice = _mean_curve(curves)
            by_time.plot(seconds, dice, marker=".", label=f"{label} ({len(curves)} seeds)")
            by_step.plot(steps, dice, marker=".", label=label)
    by_time.set_xlabel("training seconds")
    by_step.set_xlabel("steps")
    by_time.set_ylabel("held-out mean Dice (mean over seeds)")
    for axis in (by_time, by_step):
        axis.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    figure.suptitle(f"Learning curves, C={classes} — {device}")
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})
    plt.close(figure)


def curve_section(group: pd.DataFrame, device: str, settings: str, out: Path) -> list[str]:
    """Markdown (and PNGs under `out`) for the learning curves of one leaderboard group; [] if it has none."""
    if not any(_curves(group)):
        return []
    classes = sorted(c for c in group["classes"].unique() if _curves(group[group["classes"] == c]))
    lines = ["### Learning curves", ""]
    for c in classes:
        image = f"curve-C{c}-{hashlib.sha1(f'{device} · {settings}'.encode()).hexdigest()[:8]}.png"
        _plot(group, c, out / image, device)
        lines += [f"![Learning curves C={c}]({image})", ""]
    best = {c: max(np.mean([(curve[-1]["dice_mean"] or 0.0) for curve in _curves(rows)])
                   for _, rows in group[group["classes"] == c].groupby("label") if _curves(rows)) for c in classes}
    unlearnt = [c for c in classes if best[c] < LEARNT]
    classes = [c for c in classes if best[c] >= LEARNT]
    lines += [f"### Training time to reach Dice D ↓ (D = {REACH_FRACTION:.0%} of the best head's final mean Dice "
              "at that C; mean over the seeds that reach it)", ""]
    if unlearnt:
        lines += ["No time to reach at " + ", ".join(f"C={c} (best final mean Dice {best[c]:.3f})" for c in unlearnt)
                  + f": below {LEARNT} no head has learnt the classes.", ""]
    if not classes:
        return lines
    targets = {c: REACH_FRACTION * best[c] for c in classes}
    lines += ["| head | " + " | ".join(f"C={c} (D={targets[c]:.3f})" for c in classes) + " |",
              "|---|" + "---|" * len(classes)]
    for label, rows in sorted(group.groupby("label"), key=lambda item: item[0]):
        cells = []
        for c in classes:
            curves = _curves(rows[rows["classes"] == c])
            reached = [t for t in (time_to_reach(curve, targets[c]) for curve in curves) if t is not None]
            cells.append("" if not curves else f"not reached (0/{len(curves)})" if not reached else
                         format_seconds(float(np.mean(reached))) + ("" if len(reached) == len(curves)
                                                                   else f" ({len(reached)}/{len(curves)})"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]
