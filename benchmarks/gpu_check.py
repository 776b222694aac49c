"""The first run on a GPU: one command that exercises every CUDA path of headzoo and records its numbers.

    python benchmarks/gpu_check.py                                  # every check (planned for ≤ 8 min on an H100/H200)
    python benchmarks/gpu_check.py --only loss-profile,run-chunked  # some of them (names below), e.g. to rerun

One line per check: ``ok``, ``failed`` and why, or ``skipped`` and why; the exit status is 1 when a check
failed. Without CUDA it says so in one line and exits 0. The checks, in order:

- ``cuda``: the device, CUDA/cuDNN/driver and library versions, nnU-Net's cuDNN setting (benchmark on).
- ``triton-tests``: tests/test_chunked_triton.py with the kernels compiled for this GPU (no interpreter).
- ``triton-vs-torch``: the fused loss against the torch chunked loss and a float64 one on CUDA (2×64³,
  C = 1000, R = 32): loss and gradient errors, and their times.
- ``amp-step-*``: three training steps of every head (and chunked ``kernel=triton``, knn's torch search)
  as ``headzoo run`` takes them on CUDA: autocast, GradScaler, clipping; losses and weights finite.
- ``faiss-gpu``: FAISS's GPU search against the torch search (2×128³ queries, C = 1000, k = 8): the same
  neighbours, their times, and the memory FAISS holds outside torch.
- ``loss-profile``: benchmarks/loss_profile.py on CUDA, the chunked-basis paper's Table 4 (32³/128³/192³,
  C = 100…1000, chunk 10…1000) with the direct, chunked and fused losses side by side.
- ``nnunet-smoke``: ``nnUNetTrainer_chunked_smoke -device cuda`` on a tiny toy in fresh nnU-Net folders.
- ``run-*``: a short ``headzoo run`` per head at C = 1000 on CUDA into leaderboard/results.jsonl.
- ``estimate-*``: each run's CUDA peak against ``headzoo estimate``'s tensor-level bound (where it exists).

Every check's record (device name, versions, git sha, numbers) is appended to leaderboard/gpu_check.jsonl
and rendered to leaderboard/gpu_check.md; the loss profile and the runs write their own files, and the
leaderboard is regenerated from leaderboard/results.jsonl at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LEADERBOARD = REPO / "leaderboard"
CLASSES, RUN_STEPS, RUN_WARMUP = 1000, 12, 3
TABLE4_CLASSES = 1000  # loss_profile.py's C in its chunk and patch sections
FUSED_BATCH, FUSED_RANK, FUSED_EDGE = 2, 32, 64  # triton-vs-torch's problem: 2×64³ voxels, R = 32
#: benchmarks/loss_profile.py's Table 4 (every section, the paper's three patch sizes), 5 timed runs after 2
PROFILE_ARGUMENTS = ["--section", "all", "--patches", "32", "128", "192", "--repeats", "5", "--warmup", "2"]
#: the heads' runs and AMP steps beyond each registered head's defaults: the GPU-only paths
GPU_VARIANTS = (("chunked", {"kernel": "triton"}), ("knn", {"knn_backend": "torch"}))
#: the fused loss against the float64 one: relative errors of the loss, and of the gradients (max over max)
LOSS_TOLERANCE, GRADIENT_TOLERANCE = 1e-5, 1e-4


class Skipped(Exception):
    """A check that does not apply here (e.g. FAISS without GPU support); its message says why."""


@dataclass
class Check:
    name: str
    run: Callable[[Context], dict]


@dataclass
class Result:
    name: str
    status: str  # ok, failed or skipped
    seconds: float
    numbers: dict = field(default_factory=dict)
    why: str | None = None


@dataclass
class Context:
    device: torch.device
    out: Path  # where results go (leaderboard/)
    runs: dict = field(default_factory=dict)  # run-* records by label, for estimate-*


def variant_label(head: str, options: dict) -> str:
    return "-".join([head, *(f"{k}={v}" for k, v in sorted(options.items()))])


def head_variants() -> list[tuple[str, dict]]:
    from headzoo.registry import list_heads

    return [(head, {}) for head in list_heads()] + [v for v in GPU_VARIANTS if v[0] in list_heads()]


def plan(only: list[str] | None = None) -> list[Check]:
    """The checks in running order; `only`: names (or name prefixes ending in '*') to keep."""
    variants = head_variants()
    checks = [
        Check("cuda", check_cuda),
        Check("triton-tests", check_triton_tests),
        Check("triton-vs-torch", check_triton_vs_torch),
    ]
    checks += [Check(f"amp-step-{variant_label(*v)}", lambda c, v=v: check_amp_step(c, *v)) for v in variants]
    checks += [
        Check("faiss-gpu", check_faiss_gpu),
        Check("loss-profile", check_loss_profile),
        Check("nnunet-smoke", check_nnunet_smoke),
    ]
    checks += [Check(f"run-{variant_label(*v)}", lambda c, v=v: check_run(c, *v)) for v in variants]
    checks += [Check(f"estimate-{variant_label(*v)}", lambda c, v=v: check_estimate(c, *v)) for v in variants]
    if only is None:
        return checks
    unknown = [n for n in only if not any(_selected(c.name, [n]) for c in checks)]
    if unknown:
        from headzoo.errors import HeadzooError

        raise HeadzooError(f"no check named {', '.join(unknown)} (checks: {', '.join(c.name for c in checks)})")
    return [c for c in checks if _selected(c.name, only)]


def _selected(name: str, only: list[str]) -> bool:
    return any(name == n or (n.endswith("*") and name.startswith(n[:-1])) for n in only)


def run_checks(checks: list[Check], context: Context, report: Callable[[Result], None]) -> list[Result]:
    """Each check in turn; a failure is a result, not the end of the run."""
    results = []
    for check in checks:
        started = time.perf_counter()
        try:
            result = Result(check.name, "ok", 0.0, check.run(context) or {})
        except Skipped as reason:
            result = Result(check.name, "skipped", 0.0, why=str(reason))
        except Exception as error:  # noqa: BLE001 — every failure becomes its check's line
            first = (str(error).strip().splitlines() or [""])[0]
            result = Result(check.name, "failed", 0.0, why=f"{type(error).__name__}: {first}"[:300])
        result.seconds = time.perf_counter() - started
        if context.device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(result)
        report(result)
    return results


def report_line(result: Result) -> str:
    """`ok      name  (12.3 s)  key=value ...` or `failed  name  (1.0 s)  why`."""
    details = (
        result.why
        if result.status != "ok"
        else "  ".join(f"{k}={_short(v)}" for k, v in result.numbers.items() if not isinstance(v, (dict, list)))
    )
    return f"{result.status:<8}{result.name}  ({result.seconds:.1f} s)  {details}".rstrip()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def exit_code(results: list[Result]) -> int:
    return 1 if any(r.status == "failed" for r in results) else 0


def append_record(path: Path, result: Result, environment: dict) -> None:
    """One strict-JSON line per check (a NaN or infinity as null): the environment and the check's result."""
    from headzoo.results import strict_json

    record = {
        **environment,
        "check": result.name,
        "status": result.status,
        "seconds": round(result.seconds, 3),
        "why": result.why,
        "numbers": result.numbers,
    }
    with path.open("a") as handle:
        handle.write(strict_json(record, default=str) + "\n")


def render(path: Path) -> str:
    """leaderboard/gpu_check.md: per device, the latest record of every check."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [
        "# GPU check",
        "",
        "Generated by `benchmarks/gpu_check.py` from `gpu_check.jsonl`: per device, the latest result of each check.",
        "",
    ]
    for device in sorted({r["device_name"] for r in records}):
        latest = {r["check"]: r for r in records if r["device_name"] == device}
        lines += [
            f"## {device}",
            "",
            "| check | status | s | numbers or why | when | git |",
            "|---|---|---|---|---|---|",
        ]
        for record in latest.values():
            details = record["why"] or ", ".join(
                f"{k} {_short(v)}" for k, v in record["numbers"].items() if not isinstance(v, (dict, list))
            )
            lines.append(
                f"| {record['check']} | {record['status']} | {record['seconds']:.1f} | "
                f"{details.replace('|', '/')} | {record['time']} | {record['git_sha']} |"
            )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- the checks (CUDA)


def check_cuda(context: Context) -> dict:
    from headzoo.environment import describe
    from headzoo.measure import configure_cuda_timing

    described = describe(context.device)
    versions = described.pop("versions")
    return {
        **configure_cuda_timing(context.device),
        **described,
        **{k: v for k, v in versions.items() if k in ("torch", "triton", "faiss-cpu", "faiss-gpu")},
    }


def check_triton_tests(context: Context) -> dict:
    _require_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled for this GPU
    result = _python(["-m", "pytest", "-q", "-m", "not slow", "tests/test_chunked_triton.py"], 420, env)
    return {"pytest": result.stdout.strip().splitlines()[-1]}


def _require_triton():
    try:
        from headzoo.heads import chunked_triton
    except ImportError as error:
        raise Skipped(f"triton is not installed ({error}): pip install -e '.[triton]'") from None
    return chunked_triton


def _python(args: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """A child Python process from the repository root; its last useful line is the failure's why."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        raise RuntimeError("; ".join(failures[:3]) or (lines[-1] if lines else f"exit {result.returncode}"))
    return result


def _timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median seconds of `fn` after one warm-up call, synchronised."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def check_triton_vs_torch(context: Context) -> dict:
    from headzoo.heads.chunked import chunked_dc_and_ce_loss

    kernels = _require_triton()
    generator = torch.Generator(device=context.device).manual_seed(0)
    spatial = (FUSED_EDGE,) * 3
    basis = torch.randn(FUSED_BATCH, FUSED_RANK, *spatial, device=context.device, generator=generator)
    operator = torch.randn(FUSED_RANK, CLASSES, device=context.device, generator=generator) / FUSED_RANK**0.5
    target = torch.randint(0, CLASSES, (FUSED_BATCH, 1, *spatial), device=context.device, generator=generator)
    losses = {
        "float64": lambda x, e: chunked_dc_and_ce_loss(x, e, target, 30),
        "torch": lambda x, e: chunked_dc_and_ce_loss(x, e, target, 30),
        "triton": lambda x, e: kernels.triton_chunked_dc_and_ce_loss(x, e, target),
    }
    results, numbers = {}, {}
    for name, loss_fn in losses.items():
        dtype = torch.float64 if name == "float64" else torch.float32
        x, e = basis.to(dtype).requires_grad_(), operator.to(dtype).requires_grad_()
        loss = loss_fn(x, e)
        results[name] = (loss.detach().double(), *(g.double() for g in torch.autograd.grad(loss, (x, e))))
        if name != "float64":
            numbers[f"{name}_s"] = _timed(lambda: torch.autograd.grad(loss_fn(x, e), (x, e)))
    for name in ("torch", "triton"):
        loss, grad_x, grad_e = (got - want for got, want in zip(results[name], results["float64"]))
        numbers[f"{name}_loss_error"] = float(loss.abs() / results["float64"][0].abs())
        numbers[f"{name}_grad_error"] = max(
            float(d.abs().max() / w.abs().max()) for d, w in zip((grad_x, grad_e), results["float64"][1:])
        )
    numbers["triton_over_torch_time"] = numbers["triton_s"] / numbers["torch_s"]
    if numbers["triton_loss_error"] > LOSS_TOLERANCE or numbers["triton_grad_error"] > GRADIENT_TOLERANCE:
        raise RuntimeError(
            f"fused loss off the float64 one: loss {numbers['triton_loss_error']:.2e}, gradients "
            f"{numbers['triton_grad_error']:.2e} (tolerances {LOSS_TOLERANCE}, {GRADIENT_TOLERANCE})"
        )
    return numbers


def check_amp_step(context: Context, head: str, options: dict) -> dict:
    """Three steps through headzoo's TrainStep on CUDA (autocast, GradScaler, clipping at 12), the small backbone at
    32³ with the head attached as `headzoo run` attaches it."""
    from headzoo.backbone import attach_head, build_backbone, head_of
    from headzoo.config import RunConfig
    from headzoo.measure import optimizer_state_complete
    from headzoo.registry import create_head
    from headzoo.training import TrainStep, build_optimizer

    torch.manual_seed(0)
    backbone, features = build_backbone("small", 1, seed=0)
    network = attach_head(backbone, create_head(head, features, CLASSES, **options)).to(context.device)
    config = RunConfig(head=head, options=options, classes=CLASSES, patch=(32, 32, 32), steps=10, grad_clip=12.0)
    optimizer = build_optimizer(network, config.steps, config.lr)
    network.train()
    optimizer.train()
    step = TrainStep(config, network, optimizer, context.device)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        step(
            {
                "data": torch.randn(2, 1, 32, 32, 32, generator=generator),
                "annotated": None,
                "target": torch.randint(0, CLASSES, (2, 1, 32, 32, 32), generator=generator),
            }
        )
    bad = [name for name, p in network.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"non-finite weights after 3 AMP steps: {', '.join(bad[:3])}")
    return {
        "losses": step.losses,
        "loss_last": step.losses[-1],
        "grad_scale": step.scaler.get_scale() if step.scaler else None,
        "optimizer_state_complete": optimizer_state_complete(optimizer),
        "external_memory_bytes": head_of(network).external_memory_bytes(),
    }


def check_faiss_gpu(context: Context) -> dict:
    import torch.nn.functional as F

    from headzoo.heads import knn

    try:
        faiss = knn._faiss()
    except Exception as error:  # noqa: BLE001
        raise Skipped(str(error)) from None
    if not hasattr(faiss, "StandardGpuResources"):
        raise Skipped("this FAISS has no GPU support (faiss-cpu): knn's auto backend searches with torch on the GPU")
    generator = torch.Generator(device=context.device).manual_seed(0)
    classes = F.normalize(torch.randn(CLASSES, 12, device=context.device, generator=generator), dim=1)
    queries = F.normalize(torch.randn(2 * 128**3, 12, device=context.device, generator=generator), dim=1)
    found, numbers = {}, {}
    for backend in ("faiss", "torch"):
        index = knn.ClassIndex(backend)
        index.update(classes, key=0)
        found[backend] = index.search(queries, 8)
        numbers[f"{backend}_s"] = _timed(lambda: index.search(queries, 8))
        numbers[f"{backend}_gpu_memory_bytes"] = index.gpu_memory_bytes()
    distances = {b: (queries[:, None] - classes[i]).norm(dim=2) for b, i in found.items()}
    numbers["same_neighbours"] = float((found["faiss"] == found["torch"]).all(1).float().mean())
    numbers["max_distance_difference"] = float((distances["faiss"] - distances["torch"]).abs().max())
    if numbers["max_distance_difference"] > 1e-4:
        raise RuntimeError(
            f"FAISS and torch find neighbours at different distances (up to {numbers['max_distance_difference']:.2e})"
        )
    return numbers


def check_loss_profile(context: Context) -> dict:
    import pandas as pd

    out = context.out / "loss_profile.jsonl"
    _python(["benchmarks/loss_profile.py", *PROFILE_ARGUMENTS, "--device", context.device.type, "--out", str(out)], 300)
    rows = pd.read_json(out, lines=True)
    rows = rows[rows.device_name == torch.cuda.get_device_name(context.device)]
    numbers = {"rows": len(rows), "not_ok": int((rows.status != "ok").sum())}
    for loss, chunk, patch in (("triton", None, 128), ("chunked", 10, 128), ("triton", None, 32), ("chunked", 30, 32)):
        pick = rows[
            (rows.loss == loss)
            & (rows.classes == TABLE4_CLASSES)
            & (rows.patch == patch)
            & (rows.chunk.isna() if chunk is None else rows.chunk == chunk)
        ]
        direct = rows[(rows.loss == "direct") & (rows.classes == TABLE4_CLASSES) & (rows.patch == patch)]
        name = f"{loss}{chunk or ''}_{patch}"
        if len(pick) and pick.iloc[0].status == "ok":
            numbers[f"{name}_s"] = float(pick.iloc[0].total_s)
            if len(direct) and direct.iloc[0].status == "ok":  # the goal at 128³: fused ≤ 0.5× direct
                numbers[f"{name}_over_direct"] = float(pick.iloc[0].total_s / direct.iloc[0].total_s)
    return numbers


NNUNET_DATASET_ID = 987


def check_nnunet_smoke(context: Context) -> dict:
    from headzoo.toy import write_toy_dataset

    with tempfile.TemporaryDirectory(prefix="headzoo-gpu-check-") as root:
        env = {**os.environ, "nnUNet_def_n_proc": "4", "nnUNet_n_proc_DA": "1"}  # the planner's torch threads
        for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env[variable] = str(Path(root) / variable)
            Path(env[variable]).mkdir()
        dataset = f"Dataset{NNUNET_DATASET_ID}_HeadzooToy"
        write_toy_dataset(Path(env["nnUNet_raw"]) / dataset, 5, "tiny", seed=0)
        _python(
            [
                "-c",
                "from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, "
                "plan_experiments, preprocess; "
                f"extract_fingerprints([{NNUNET_DATASET_ID}], num_processes=4, show_progress_bar=False); "
                f"plan_experiments([{NNUNET_DATASET_ID}]); "
                f"preprocess([{NNUNET_DATASET_ID}], configurations=('3d_fullres',), num_processes=(4,), "
                "show_progress_bar=False)",
            ],
            240,
            env,
        )
        trainer, env["nnUNet_n_proc_DA"] = "nnUNetTrainer_chunked_smoke", "0"  # augmentation in the trainer's process
        _python(
            [
                "-m",
                "headzoo",
                "nnunet-train",
                str(NNUNET_DATASET_ID),
                "3d_fullres",
                "0",
                "-tr",
                trainer,
                "-device",
                context.device.type,
            ],
            300,
            env,
        )
        summary = next(Path(env["nnUNet_results"]).rglob("validation/summary.json"))
        return {"trainer": trainer, "validation_dice": json.loads(summary.read_text())["foreground_mean"]["Dice"]}


def check_run(context: Context, head: str, options: dict) -> dict:
    """`headzoo run` at C = 1000 on CUDA, its record upserted into leaderboard/results.jsonl."""
    arguments = [
        "-m",
        "headzoo",
        "run",
        "--head",
        head,
        "--classes",
        str(CLASSES),
        "--steps",
        str(RUN_STEPS),
        "--warmup",
        str(RUN_WARMUP),
        "--device",
        context.device.type,
        "--json",
        "--out",
        str(context.out / "results.jsonl"),
    ]
    for key, value in options.items():
        arguments += ["--option", f"{key}={value}"]
    result = subprocess.run([sys.executable, *arguments], cwd=REPO, capture_output=True, text=True, timeout=400)
    lines = result.stdout.strip().splitlines()
    try:
        record = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError((result.stderr.strip().splitlines() or ["no record"])[-1]) from None
    context.runs[variant_label(head, options)] = record
    if record["status"] == "error":
        raise RuntimeError(record["error"])
    keys = (
        "status",
        "oom_phase",
        "peak_memory_bytes",
        "external_memory_bytes",
        "memory_step",
        "memory_step_optimizer_state_complete",
        "step_time_median_s",
        "dice_mean",
        "options_resolved",
    )
    return {k: record.get(k) for k in keys}


def check_estimate(context: Context, head: str, options: dict) -> dict:
    try:
        from headzoo.estimate import estimate_step, problem_from_settings
    except ImportError as error:
        raise Skipped(f"headzoo.estimate is not there ({error})") from None
    record = context.runs.get(variant_label(head, options))
    if record is None or record.get("peak_memory_bytes") is None:
        raise Skipped(f"no CUDA peak from run-{variant_label(head, options)}")
    settings = {
        "head": head,
        "options": options,
        "classes": record["classes"],
        "patch": tuple(record["patch"]),
        "batch": record["batch"],
        "backbone": record["backbone"],
        "steps": RUN_STEPS,
    }
    from headzoo.errors import HeadzooError

    try:
        estimated = estimate_step(problem_from_settings(settings, "cuda", None)).bytes
    except HeadzooError as error:  # e.g. a path fake tensors cannot run (Triton kernels)
        raise Skipped(f"headzoo estimate: {error}") from None
    return {
        "cuda_peak_bytes": record["peak_memory_bytes"],
        "estimate_bytes": estimated,
        "cuda_over_estimate": record["peak_memory_bytes"] / estimated,
    }


# ---------------------------------------------------------------- the command


def environment(device: torch.device) -> dict:
    from headzoo.runner import git_sha

    return {
        "device_name": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated check names; NAME* keeps every check starting with NAME")
    parser.add_argument("--out", type=Path, default=LEADERBOARD, help="folder for the records (default leaderboard/)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}): nothing to check; the CPU paths are tested by pytest")
        return 0
    from headzoo.errors import HeadzooError

    try:
        checks = plan(args.only.split(",") if args.only else None)
    except HeadzooError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    from headzoo.measure import configure_cuda_timing

    configure_cuda_timing(device)  # nnU-Net's cuDNN setting for every check in this process
    args.out.mkdir(parents=True, exist_ok=True)
    records, env = args.out / "gpu_check.jsonl", environment(device)

    def report(result: Result) -> None:
        print(report_line(result), flush=True)
        append_record(records, result, env)

    results = run_checks(checks, Context(device, args.out), report)
    (args.out / "gpu_check.md").write_text(render(records))
    if any(r.name.startswith("run-") for r in results):
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "headzoo",
                    "leaderboard",
                    "--results",
                    str(args.out / "results.jsonl"),
                    "--out",
                    str(args.out),
                ],
                cwd=REPO,
                timeout=300,
            )
    failed = [r.name for r in results if r.status == "failed"]
    print(
        f"{len(results) - len(failed)} of {len(results)} checks ok or skipped"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
