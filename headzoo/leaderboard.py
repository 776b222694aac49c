"""Render a results file into markdown tables and plots: a view of the data, byte-identical for the same input."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from headzoo.backbone import BACKBONES
from headzoo.errors import HeadzooError
from headzoo.report import format_bytes, format_seconds, head_label
from headzoo.config import from_record, title as settings_title, to_argv
from headzoo.curves import curve_section
from headzoo.results import read_records

METRICS = [  # column, title (↑/↓: which way is better), formatter, log scale
    ("dice_mean", "Dice ↑", lambda v: f"{v:.3f}", False),
    ("dice_worst10_mean", "Dice of the worst 10% of classes ↑", lambda v: f"{v:.3f}", False),
    ("peak_memory_bytes", "Peak memory of a training step ↓", format_bytes, True),
    ("step_time_median_s", "Step time (median) ↓", format_seconds, True),
]


def _label(row) -> str:
    return head_label(row["head"], row["options"])


def _sweep_command(group: pd.DataFrame, records: list[dict]) -> str:
    """The one `headzoo sweep` command that reproduces a group of cells: its axes, then its shared settings."""
    rows = [records[i] for i in group["row"]]
    plain = sorted({r["head"] for r in rows if not r["options"]})
    variants = sorted({r["head"] + ":" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(r["options"].items()))
                       for r in rows if r["options"]})
    shared = to_argv(from_record(rows[0]), only_changed=True, sweep_only=True)
    return " ".join(["headzoo sweep", f"--heads {','.join(plain) or chr(34) * 2}",
                     *(f"--variant {v}" for v in variants),
                     f"--classes {','.join(str(c) for c in sorted({r['classes'] for r in rows}))}",
                     f"--seeds {','.join(str(c) for c in sorted({r['seed'] for r in rows}))}", *shared])


def _plot_name(column: str, device: str, settings: str) -> str:
    """Named by what the plot shows, so adding a group never renames another group's plot."""
    return f"{column}-{hashlib.sha1(f'{device} · {settings}'.encode()).hexdigest()[:8]}.png"


def _cell(rows: pd.DataFrame, column: str, formatter) -> str:
    """One cell over a head's seeds at one C: the value, or the mean and [min–max] over seeds; a status
    where no seed ran ok, and a count of the seeds that did not."""
    ok = rows[rows["status"] == "ok"]
    failed = rows[rows["status"] != "ok"]
    if ok.empty:
        return ", ".join(f"`{s}`" for s in sorted(set(failed["status"])))
    values = ok[column].dropna().astype(float) if column in ok else pd.Series(dtype=float)
    if values.empty:
        return "–"
    text = formatter(values.iloc[0]) if len(values) == 1 else \
        f"{formatter(values.mean())} [{formatter(values.min())}–{formatter(values.max())}]"
    return text + "".join(f" ({n} `{s}`)" for s, n in sorted(failed["status"].value_counts().items()))


def _plot(frame: pd.DataFrame, column: str, title: str, log: bool, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    for label, rows in sorted(frame.groupby("label"), key=lambda item: item[0]):
        ok = rows[rows["status"] == "ok"].groupby("classes")[column].mean().dropna()  # mean over seeds
        axis.plot(ok.index, ok.values, marker="o", label=label)
    axis.set_xscale("log")
    if log:
        axis.set_yscale("log")
    axis.set_xlabel("classes C")
    axis.set_ylabel({"dice_mean": "mean foreground Dice", "dice_worst10_mean": "Dice, worst 10% of classes",
                     "peak_memory_bytes": "bytes",
                     "step_time_median_s": "seconds"}[column])
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png", metadata={"Software": None})
    plt.close(figure)


def _with_patch(record: dict) -> dict:
    """A cell that failed before resolving its patch (e.g. a bad head option) ran with its backbone's default,
    the patch its group's other rows record."""
    if record.get("patch") is not None or record.get("backbone") not in BACKBONES:
        return record
    return {**record, "patch": [BACKBONES[record["backbone"]][1]] * 3}


def render(results: Path, out: Path) -> Path:
    """Write out/README.md and out/*.png from the results file; returns the README path."""
    records = [_with_patch(r) for r in read_records(results)]
    if not records:
        raise HeadzooError(f"{results} holds no results")
    frame = pd.DataFrame(records)
    out.mkdir(parents=True, exist_ok=True)
    for prefix in [column for column, *_ in METRICS] + ["curve"]:  # plots of groups that no longer exist
        for stale in out.glob(f"{prefix}[-_]*.png"):
            stale.unlink()
    frame["label"] = frame.apply(_label, axis=1)
    frame["settings"] = [settings_title(r) for r in records]
    frame["row"] = range(len(records))
    lines = ["# headzoo leaderboard", "",
             f"Generated by `headzoo leaderboard --results {results} --out {out}` from "
             f"[`{results.name}`]({os.path.relpath(results, out)}); ↑/↓ mark which way is better; "
             "`oom`/`error` are results.",
             "Peak memory: CUDA allocator peak, or on CPU the peak of live tensor bytes (torch MemTracker).", ""]
    if (out / "loss_profile.md").exists():
        lines += ["Loss-only profile (chunked vs direct, the paper's Table 4): [loss_profile.md](loss_profile.md).", ""]
    if (out / "inference_memory.md").exists():
        lines += ["Inference memory (nnU-Net's dense predictor vs the K-channel path): "
                  "[inference_memory.md](inference_memory.md).", ""]
    groups = sorted(frame.groupby(["device_name", "settings"]), key=lambda item: item[0])
    for (device, settings), group in groups:
        lines += [f"## {device} · {settings}", ""]
        classes = sorted(group["classes"].unique())
        seeds = sorted(group["seed"].unique())
        if len(seeds) > 1:
            lines += [f"Seeds {', '.join(map(str, seeds))}: a cell is the mean [min–max] over seeds; two heads differ "
                      "only where their ranges do not overlap.", ""]
        for column, title, formatter, log in METRICS:
            if column not in group or group[column].isna().all():
                continue
            lines += [f"### {title}", "", "| head | " + " | ".join(f"C={c}" for c in classes) + " |",
                      "|---|" + "---|" * len(classes)]
            for label, rows in sorted(group.groupby("label"), key=lambda item: item[0]):
                by_class = {c: _cell(cell, column, formatter) for c, cell in rows.groupby("classes")}
                lines.append(f"| {label} | " + " | ".join(by_class.get(c, "") for c in classes) + " |")
            image = _plot_name(column, device, settings)
            _plot(group, column, f"{title} — {device}", log, out / image)
            lines += ["", f"![{title}]({image})", ""]
        lines += curve_section(group, device, settings, out)
        machines = sorted({f"{r['host']} ({r['device_name']}, torch {r['torch']})" for _, r in group.iterrows()
                           if isinstance(r.get("host"), str)})
        lines += [f"Ran on {', '.join(machines)}. Reproduce:", "", "```bash", _sweep_command(group, records), "```", ""]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    return readme
