"""`headzoo estimate`'s table: each estimate's peak, broken down by category, with the op at the peak."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from headzoo.estimate import CATEGORY_ORDER

ROWS = (
    ("training_step", "training step"),
    ("loss", "loss alone"),
    ("inference_patch", "inference, one patch"),
    ("inference_volume", "inference, whole volume"),
)


def gib(value: int) -> str:
    return f"{value / 2**30:.2f}"


def print_estimate(result: dict, console: Console) -> None:
    patch, volume = "x".join(map(str, result["patch"])), "x".join(map(str, result["volume"]))
    precision = "CUDA autocast (fp16), emulated" if result["device_kind"] == "cuda" and result["amp"] else "fp32"
    title = (
        f"{result['head']} {_options(result['options'])}, C = {result['classes']}, {result['backbone']}, "
        f"patch {patch}, batch {result['batch']}: {result['device_kind']}, {precision}"
    )
    labels = {
        "training_step": "training step",
        "loss": "loss alone",
        "inference_patch": "1 patch (batch 1)",
        "inference_volume": f"volume {volume}",
    }
    parts = [part for part, _ in ROWS if part in result]
    table = Table("GiB", *(labels[part] for part in parts), title=title)
    table.add_row("[bold]peak[/bold]", *(f"[bold]{gib(result[p]['bytes'])}[/bold]" for p in parts))
    table.add_row("peak (10⁹ B)", *(f"{result[p]['bytes'] / 1e9:.2f} GB" for p in parts))
    for category in CATEGORY_ORDER:
        table.add_row(category, *(gib(result[p]["categories"][category]) for p in parts))
    table.add_row("op at the peak", *(f"{result[p]['op']} ({result[p]['phase']})" for p in parts))
    console.print(table)
    console.print(
        "Categories: the bytes alive at the peak. A tensor-level lower bound: every tensor torch allocates, "
        "from headzoo's own code run on fake tensors. Not counted: the CUDA context, cuDNN/cuBLAS "
        "workspaces, the caching allocator's rounding and fragmentation, memory outside torch (a FAISS "
        "GPU index)."
    )


def _options(options: dict) -> str:
    shown = {k: v for k, v in options.items() if k not in ("batch_dice", "ignore_label") or v}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "(defaults)"


def print_advice(advice: list, recommendation: str, settings: str, budget: int, console: Console) -> None:
    """`headzoo advise`'s table: one row per registered head."""
    table = Table(
        "head",
        "fits",
        "est. peak GiB",
        "largest batch",
        "largest patch",
        "step s (measured)",
        "Dice (measured)",
        "measured on",
        title=f"{settings}, budget {budget / 2**30:.1f} GiB",
    )
    for a in advice:
        measured = a.measured or {}
        step = measured.get("step_time_median_s")
        dice = measured.get("dice_mean")
        where = measured.get("where", "not measured")
        if a.error:
            table.add_row(a.head, "[red]error[/red]", a.error, "", "", "", "", where)
            continue
        table.add_row(
            a.head,
            "[green]yes[/green]" if a.fits else "[red]no[/red]",
            gib(a.peak_bytes),
            str(a.largest_batch),
            f"{a.largest_patch}³" if a.largest_patch else "none",
            f"{step:.2f}" if step is not None else "—",
            f"{dice:.3f}" if dice is not None else "—",
            where,
        )
    console.print(table)
    console.print(f"[bold]Recommendation[/bold]: {recommendation}")
    console.print(
        "Peaks: one training step estimated from headzoo's own code on fake tensors (a tensor-level lower "
        "bound: no CUDA context, workspaces or allocator overhead). Largest batch/patch: scaled from it "
        "(parameters, gradients and optimizer state fixed; the rest grows with batch × voxels). Step time "
        "and Dice: the nearest measured row of the results file, where it was measured."
    )
