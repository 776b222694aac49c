"""Reproduce the chunked-basis-head paper's Table 4: loss-only time and peak memory, chunked vs direct.

The direct loss (materialised logits Eᵀ·B + nnU-Net's DC_and_CE_loss) is measured in the same run,
and on CUDA with triton installed the fused Triton loss (heads/chunked_triton.py, loss `triton`) too
(that column is untested on a GPU so far: written on a CPU-only machine).
Times: median of --repeats after --warmup (forward, backward, total). Memory: peak live tensor bytes
on CPU (torch's MemTracker), the allocator peak on CUDA; inputs B and E included; both measured by
headzoo.measure.measured. Records: leaderboard/loss_profile.jsonl (strict JSON lines, written atomically
through headzoo.results; a row per section/loss/C/chunk/patch/device, a rerun replaces its rows), rendered to
loss_profile.md. Rows that cannot fit
the machine (and rows of --estimate-patches) are not run: their memory is estimated, the same loss code on fake
tensors counted by the same MemTracker (headzoo estimate; equal to the measured peak wherever both exist), and
marked as an estimate, without times.

    python benchmarks/loss_profile.py                       # the 32³ rows (CPU minutes)
    python benchmarks/loss_profile.py --section patch --patches 128 --repeats 3 --warmup 1
    python benchmarks/loss_profile.py --section patch --patches 128 192 --estimate-patches 192
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import headzoo  # noqa: F401  (nnU-Net environment)
from headzoo.errors import HeadzooError
from headzoo.heads.chunked import chunked_dc_and_ce_loss
from headzoo.heads.dense import build_nnunet_loss
from headzoo.measure import measured
from headzoo.results import json_lines, merge_records, write_text_atomically

OUT = Path(__file__).resolve().parent.parent / "leaderboard"
BATCH, RANK = 2, 32
DIRECT_COPIES = 6  # logits-sized float tensors the direct loss holds at its peak (measured: ~5.6 at 32³)
#: a row's key: a rerun replaces the row with the same values of these
KEY = ("section", "loss", "classes", "chunk", "patch", "device_name")


def sections(args) -> list[tuple[str, int, int | None, int]]:
    """(section, classes, chunk (None = direct or triton), patch edge)."""
    rows = []
    if args.section in ("all", "chunk"):
        rows += [("chunk size (C=1000, 32³)", 1000, chunk, 32) for chunk in (15, 30, 60, 120, 1000)]
        rows += [("chunk size (C=1000, 32³)", 1000, None, 32)]
    if args.section in ("all", "classes"):
        for classes in (100, 200, 500, 1000):
            rows += [("classes (chunk 30, 32³)", classes, 30, 32), ("classes (chunk 30, 32³)", classes, None, 32)]
    if args.section in ("all", "patch"):
        for patch in args.patches:
            rows += [("patch (C=1000, chunk 10)", 1000, 10, patch), ("patch (C=1000, chunk 10)", 1000, None, patch)]
    return rows


def make_inputs(classes: int, patch: int, device: torch.device):
    generator = torch.Generator(device=device).manual_seed(0)
    basis = torch.randn(BATCH, RANK, patch, patch, patch, device=device, generator=generator).requires_grad_()
    operator = (torch.randn(RANK, classes, device=device, generator=generator) / RANK**0.5).requires_grad_()
    target = torch.randint(0, classes, (BATCH, 1, patch, patch, patch), device=device, generator=generator)
    return basis, operator, target


def loss_function(loss: str, chunk: int | None):
    if loss == "direct":
        direct = build_nnunet_loss(batch_dice=True)
        return lambda basis, operator, target: direct(torch.einsum("br...,rc->bc...", basis, operator), target)
    if loss == "triton":
        from headzoo.heads.chunked_triton import triton_chunked_dc_and_ce_loss

        return triton_chunked_dc_and_ce_loss
    return lambda basis, operator, target: chunked_dc_and_ce_loss(basis, operator, target, chunk)


def triton_imports() -> bool:
    try:
        import headzoo.heads.chunked_triton  # noqa: F401
    except ImportError:
        return False
    return True


def time_row(fn, inputs, device, warmup: int, repeats: int) -> dict:
    forward, backward = [], []
    for i in range(warmup + repeats):
        inputs[0].grad = inputs[1].grad = None
        with measured(device, memory=False) as forward_time:
            loss = fn(*inputs)
        with measured(device, memory=False) as backward_time:
            loss.backward()
        if i >= warmup:
            forward.append(forward_time.seconds)
            backward.append(backward_time.seconds)
    total = np.add(forward, backward)
    return {
        "forward_s": float(np.median(forward)),
        "backward_s": float(np.median(backward)),
        "total_s": float(np.median(total)),
        "total_p20_s": float(np.percentile(total, 20)),
        "total_p80_s": float(np.percentile(total, 80)),
        "repeats": repeats,
        "warmup": warmup,
    }


def memory_row(fn, inputs, device) -> dict:
    def peak(with_backward: bool) -> int:
        inputs[0].grad = inputs[1].grad = None
        with measured(device, *inputs) as measurement:
            loss = fn(*inputs)
            if with_backward:
                loss.backward()
        return measurement.peak_bytes

    return {"forward_peak_bytes": peak(False), "total_peak_bytes": peak(True)}


def estimated_memory_row(fn, classes: int, patch: int) -> dict:
    """memory_row on fake CPU tensors: the same loss code and MemTracker, no allocation (headzoo estimate)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return memory_row(fn, make_inputs(classes, patch, torch.device("cpu")), torch.device("cpu"))


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", choices=["all", "chunk", "classes", "patch"], default="all")
    parser.add_argument("--patches", type=int, nargs="+", default=[32, 128, 192])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT / "loss_profile.jsonl",
        help="the records (JSON lines); the table goes beside it as .md",
    )
    parser.add_argument(
        "--estimate-patches",
        type=int,
        nargs="*",
        default=[],
        help="patch edges whose rows are estimated (fake tensors), not run",
    )
    args = parser.parse_args()
    read_records(args.out)  # a file this cannot merge into fails now, not after the runs
    device = torch.device(args.device)
    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    )

    jobs = [
        (section, "direct" if chunk is None else "chunked", classes, chunk, patch)
        for section, classes, chunk, patch in sections(args)
    ]
    if device.type == "cuda" and triton_imports():  # the fused loss beside each direct row
        jobs += [
            (section, "triton", classes, None, patch) for section, loss, classes, _, patch in jobs if loss == "direct"
        ]
    rows = []
    for section, loss, classes, chunk, patch in jobs:
        row = {
            "section": section,
            "loss": loss,
            "classes": classes,
            "chunk": chunk,
            "patch": patch,
            "batch": BATCH,
            "rank": RANK,
            "device_name": device_name,
            "torch": torch.__version__,
            "status": "ok",
        }
        logits_bytes = BATCH * classes * patch**3 * 4
        too_big = loss == "direct" and DIRECT_COPIES * logits_bytes > available_bytes(device)
        if loss != "triton" and (too_big or patch in args.estimate_patches):
            row.update(estimated_memory_row(loss_function(loss, chunk), classes, patch))
            row["status"] = "estimate"
        else:
            try:
                inputs = make_inputs(classes, patch, device)
                fn = loss_function(loss, chunk)
                row.update(time_row(fn, inputs, device, args.warmup, args.repeats))
                row.update(memory_row(fn, inputs, device))
            except torch.OutOfMemoryError:
                row["status"] = "oom"
            finally:
                inputs = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        print(
            {
                k: row.get(k)
                for k in ("section", "loss", "classes", "chunk", "patch", "total_s", "total_peak_bytes", "status")
            },
            flush=True,
        )
    write(rows, args.out)


def read_records(path: Path) -> list[dict]:
    """The rows of a loss-profile file (none where it does not exist); a line that is not a row is one line."""
    rows = []
    for number, row in json_lines(path):
        if not isinstance(row, dict) or any(k not in row for k in (*KEY, "status")):
            raise HeadzooError(
                f"{path}:{number} is not a loss-profile row (an object with {', '.join(KEY)} and status)"
            )
        rows.append(row)
    return rows


def read_table(path: Path) -> pd.DataFrame:
    """The rows as a table; a field a row lacks (an estimate's times) is NaN, as is a direct row's chunk."""
    return pd.DataFrame(read_records(path))


def write(new: list[dict], out: Path) -> None:
    """Merge into the records file (a new row replaces the old row with its key; an estimate never replaces a
    measured row), then render the markdown beside it."""

    def key(row: dict) -> tuple:
        return tuple(row.get(k) for k in KEY)

    measured_keys = {key(r) for r in read_records(out) if r["status"] == "ok"}
    new = [r for r in new if not (r["status"] == "estimate" and key(r) in measured_keys)]
    merged = merge_records(out, new, KEY, read_records)
    write_text_atomically(out.with_suffix(".md"), render(pd.DataFrame(merged)))


def render(table: pd.DataFrame) -> str:
    lines = [
        "# Loss profile (chunked-basis-head paper, Table 4)",
        "",
        "Loss only (B → loss → ∂B, ∂E), batch 2, R 32; times are medians after warm-up; memory is the peak",
        "of live tensors including the inputs (CPU: torch MemTracker; CUDA: allocator peak). `×direct` is the",
        "chunked value over the direct loss's (materialised logits + nnU-Net's DC_and_CE_loss) in the same run.",
        "Generated by `benchmarks/loss_profile.py`; a row missing from a device's table was not run there",
        "(on the 2-core CPU, 192³ takes several minutes per chunked iteration). Rows marked *estimate* were not",
        "run: their memory is the same loss code on fake tensors under the same MemTracker (`headzoo estimate`,",
        "equal to the measured peak wherever both exist; a tensor-level lower bound on a GPU), without times.",
        "",
    ]
    for device_name, by_device in table.groupby("device_name", sort=True):
        lines += [f"## {device_name}", ""]
        for section, rows in by_device.groupby("section", sort=False):
            lines += [
                f"### {section}",
                "",
                "| loss | C | chunk | patch | total s | fwd s | bwd s | fwd peak MiB | total peak MiB | "
                "time ×direct | memory ×direct | runs |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for _, r in rows.iterrows():
                direct = rows[(rows.loss == "direct") & (rows.classes == r.classes) & (rows.patch == r.patch)]
                if r.status == "estimate":
                    ratio_m = ""
                    if r.loss != "direct" and len(direct) and direct.iloc[0].status in ("ok", "estimate"):
                        ratio_m = f"{r.total_peak_bytes / direct.iloc[0].total_peak_bytes:.3f}"
                    lines.append(
                        f"| {r.loss} | {r.classes} | {fmt_chunk(r)} | {r.patch}³ | *estimate* | | | "
                        f"{r.forward_peak_bytes / 2**20:.1f} | {r.total_peak_bytes / 2**20:.1f} | | "
                        f"{ratio_m} | |"
                    )
                    continue
                if r.status != "ok":
                    lines.append(f"| {r.loss} | {r.classes} | {fmt_chunk(r)} | {r.patch}³ | {r.status} | | | | | | | |")
                    continue
                ratio_t = ratio_m = ""
                if r.loss != "direct" and len(direct) and direct.iloc[0].status == "ok":
                    ratio_t = f"{r.total_s / direct.iloc[0].total_s:.2f}"
                if r.loss != "direct" and len(direct) and direct.iloc[0].status in ("ok", "estimate"):
                    ratio_m = f"{r.total_peak_bytes / direct.iloc[0].total_peak_bytes:.3f}"
                lines.append(
                    f"| {r.loss} | {r.classes} | {fmt_chunk(r)} | {r.patch}³ | {r.total_s:.3f} | "
                    f"{r.forward_s:.3f} | {r.backward_s:.3f} | {r.forward_peak_bytes / 2**20:.1f} | "
                    f"{r.total_peak_bytes / 2**20:.1f} | {ratio_t} | {ratio_m} | "
                    f"{int(r.repeats)}+{int(r.warmup)} |"
                )
            lines.append("")
    return "\n".join(lines)


def fmt_chunk(r) -> str:
    return "–" if r.loss != "chunked" or pd.isna(r.chunk) else str(int(r.chunk))


if __name__ == "__main__":
    try:
        main()
    except HeadzooError as error:
        raise SystemExit(f"error: {error}") from None
