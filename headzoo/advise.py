"""`headzoo advise`: which head for a user's C, memory budget, backbone, patch and batch.

Every registered head's training step is estimated (headzoo.estimate: headzoo's own code on fake tensors, a
tensor-level lower bound); the largest batch and patch that fit are scaled from that estimate (the parameters,
their gradients and optimizer state stay; the rest grows with batch × voxels); step time and Dice come from the
nearest measured rows of a results file, labelled with where they were measured.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from headzoo.backbone import downsampling, get_backbone
from headzoo.errors import HeadzooError
from headzoo.estimate import Peak, estimate_step, problem_from_settings
from headzoo.registry import list_heads

#: heads in the order advice prefers them when they fit and no measured Dice says otherwise: nnU-Net's own dense
#: head (the reference), then the exact softmax CE + Dice whose memory does not grow with C, then the per-class
#: sigmoid and the kNN embedding, which change the loss
PREFERENCE = ("dense", "chunked", "sigmoid", "knn")
PLOT_CLASSES = (10, 100, 1000, 10000)


@dataclass
class Advice:
    head: str
    fits: bool | None  # None: the head could not be estimated (error)
    peak_bytes: int | None
    largest_batch: int | None  # at the user's patch
    largest_patch: int | None  # cubic edge at the user's batch
    measured: dict | None  # the nearest measured row: step time, Dice and where it was measured
    error: str | None = None


def _settings(head: str, classes: int, backbone: str, patch: int, batch: int) -> dict:
    return {"head": head, "classes": classes, "backbone": backbone, "patch": (patch,) * 3, "batch": batch}


def fixed_bytes(peak: Peak) -> int:
    """The part of a step's peak that does not grow with batch or patch: parameters, gradients, optimizer state."""
    return sum(peak.categories[c] for c in ("parameters", "gradients", "optimizer state"))


def largest_batch(peak: Peak, batch: int, budget: int) -> int:
    per_sample = (peak.bytes - fixed_bytes(peak)) / batch
    return max(0, math.floor((budget - fixed_bytes(peak)) / per_sample)) if per_sample > 0 else batch


def largest_patch(peak: Peak, patch: int, factor: int, budget: int) -> int | None:
    """The largest cubic edge, a multiple of the backbone's downsampling (at least twice it), whose scaled peak fits."""
    per_voxel = (peak.bytes - fixed_bytes(peak)) / patch**3
    edge = None
    for candidate in range(2 * factor, 4097, factor):
        if fixed_bytes(peak) + per_voxel * candidate**3 > budget:
            break
        edge = candidate
    return edge


def nearest_measured(
    records: list[dict], head: str, classes: int, backbone: str, patch: int, batch: int
) -> dict | None:
    """The ok row of `head` (default options) closest to the user's settings: most of backbone, patch and batch the
    same first, then the nearest C on a log scale, then the newest."""
    rows = [
        r
        for r in records
        if r.get("head") == head
        and r.get("status") == "ok"
        and not r.get("options")
        and r.get("dice_mean") is not None
        and r.get("classes")
    ]
    if not rows:
        return None

    def distance(r):
        same = (r.get("backbone") == backbone) + (list(r.get("patch") or []) == [patch] * 3) + (r.get("batch") == batch)
        return -same, abs(math.log(r["classes"] / classes))

    closest = min(distance(r) for r in rows)
    row = max((r for r in rows if distance(r) == closest), key=lambda r: r.get("time", ""))
    where = (
        f"{row.get('device_name')}, C = {row['classes']}, {row.get('backbone')} "
        f"{'x'.join(map(str, row.get('patch') or []))}, batch {row.get('batch')}, {row.get('steps')} steps"
    )
    return {
        "step_time_median_s": row.get("step_time_median_s"),
        "dice_mean": row.get("dice_mean"),
        "where": where,
        "run_id": row.get("run_id"),
    }


def read_records(path: Path) -> list[dict]:
    """The results file's rows; none where there is no file yet."""
    from headzoo.results import read_records as read

    return read(path) if path.exists() else []


def advise(
    classes: int, budget: int, backbone: str, patch: int | None, batch: int, device_kind: str, results: Path
) -> tuple[list[Advice], str]:
    """Every registered head's advice, and the one-line recommendation with its reason."""
    architecture, default_patch = get_backbone(backbone)
    patch = patch or default_patch
    factor = downsampling(architecture)[0]
    records = read_records(results)
    advice = []
    for head in list_heads():
        measured = nearest_measured(records, head, classes, backbone, patch, batch)
        try:
            peak = estimate_step(
                problem_from_settings(_settings(head, classes, backbone, patch, batch), device_kind, None)
            )
        except HeadzooError as error:
            advice.append(Advice(head, None, None, None, None, measured, str(error)))
            continue
        advice.append(
            Advice(
                head,
                peak.bytes <= budget,
                peak.bytes,
                largest_batch(peak, batch, budget),
                largest_patch(peak, patch, factor, budget),
                measured,
            )
        )
    return advice, recommend(advice, budget, patch, batch)


def recommend(advice: list[Advice], budget: int, patch: int, batch: int) -> str:
    fitting = [a for a in advice if a.fits]
    if not fitting:
        best = max((a for a in advice if a.largest_patch), key=lambda a: a.largest_patch, default=None)
        if best is None:
            return "no head fits this budget at any patch: a smaller backbone or a larger GPU"
        return (
            f"no head fits at patch {patch}, batch {batch}: {best.head} fits at patch {best.largest_patch} "
            f"(the largest patch of any head)"
        )
    measured = [a for a in fitting if a.measured]
    if len(measured) >= 2:
        best = max(measured, key=lambda a: a.measured["dice_mean"])
        return (
            f"{best.head}: it fits ({_gib(best.peak_bytes)} of {_gib(budget)}) and has the best measured Dice "
            f"among the heads that fit ({best.measured['dice_mean']:.3f}, {best.measured['where']})"
        )
    best = min(fitting, key=lambda a: PREFERENCE.index(a.head) if a.head in PREFERENCE else len(PREFERENCE))
    reasons = {
        "dense": "nnU-Net's own head fits, so nothing needs to change",
        "chunked": "the exact softmax CE + Dice of the dense head, its memory independent of C",
        "sigmoid": "it fits where the softmax heads do not; per-class sigmoids change the loss",
        "knn": "the only head that fits; its loss sees k classes per voxel, not all C",
    }
    return f"{best.head}: {reasons.get(best.head, 'it fits')} ({_gib(best.peak_bytes)} of {_gib(budget)})"


def _gib(value: int) -> str:
    return f"{value / 2**30:.1f} GiB"


def as_json(advice: list[Advice]) -> list[dict]:
    return [dataclasses.asdict(a) for a in advice]


def plot(
    classes_axis: tuple[int, ...], backbone: str, patch: int, batch: int, device_kind: str, budget: int, out: Path
) -> Path:
    """Estimated step peak against C for every registered head at the user's patch, with the budget as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for head in list_heads():
        points = []
        for classes in classes_axis:
            try:
                peak = estimate_step(
                    problem_from_settings(_settings(head, classes, backbone, patch, batch), device_kind, None)
                )
            except HeadzooError:
                continue
            points.append((classes, peak.bytes / 2**30))
        if points:
            axes.plot(*zip(*points), marker="o", label=head)
    axes.axhline(budget / 2**30, color="black", linestyle="--", label=f"budget {_gib(budget)}")
    axes.set(
        xscale="log",
        yscale="log",
        xlabel="classes C",
        ylabel="estimated training-step peak (GiB)",
        title=f"{backbone}, patch {patch}³, batch {batch}, {device_kind} (tensor-level lower bound)",
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out
