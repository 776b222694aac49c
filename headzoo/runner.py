"""Train one head on the shared backbone and pipeline, measure it, and return one result record."""
from __future__ import annotations

import inspect
import platform
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import headzoo
from headzoo.backbone import SegmentationNetwork, check_patch, get_backbone
from headzoo.errors import HeadzooError
from headzoo.inference import DiceCounter, segment
from headzoo.measure import is_out_of_memory, measure_peak_memory, summarize_times, timed
from headzoo.pipeline import PreparedDataset, build_backbone_from_plan, configuration_name, count_test_cases, \
    prepare_folder, prepare_toy, test_cases, training_loader
from headzoo.progress import progress_bar
from headzoo.registry import create_head, get_head_class
from headzoo.results import SCHEMA_VERSION

# ScheduleFree AdamW as the paper (MLCommons self-tuning winner): lr, 1−β1, β2, weight decay, warm-up.
LR, BETA1, BETA2, WEIGHT_DECAY, WARMUP_FRACTION = 0.0025, 0.9, 0.995, 0.0812, 0.02


@dataclass
class RunConfig:
    head: str
    classes: int | None = 100
    steps: int = 60
    patch: tuple[int, ...] | None = None   # None: the backbone's default patch
    batch: int = 2
    backbone: str = "small"
    device: str = "auto"
    seed: int = 0
    preset: str = "small"
    dataset: Path | None = None           # an nnU-Net raw dataset folder instead of the toy
    partial: int = 1                      # toy training volumes from this many partially labelled sources
    memory_limit: int | None = None       # bytes; applied to the process by the CLI, recorded here
    warmup: int = 3
    options: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise HeadzooError(f"unknown device '{name}' (choose auto, cpu or cuda)")
    if name == "cuda" and not torch.cuda.is_available():
        raise HeadzooError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def validate(config: RunConfig) -> torch.device:
    """Everything that can be checked before any data is made; raises HeadzooError."""
    if config.classes is not None and config.classes < 2:
        raise HeadzooError(f"--classes must be at least 2 (background and one class), got {config.classes}")
    if config.steps <= config.warmup + 1:
        raise HeadzooError(f"--steps must exceed the {config.warmup} warm-up steps plus one memory step")
    if config.batch < 1:
        raise HeadzooError(f"--batch must be positive, got {config.batch}")
    get_head_class(config.head)
    get_backbone(config.backbone)
    return resolve_device(config.device)


def prepare(config: RunConfig) -> PreparedDataset:
    if config.dataset is not None:
        prepared = prepare_folder(config.dataset)
        if config.classes not in (None, prepared.num_classes):
            raise HeadzooError(f"--classes {config.classes} disagrees with {config.dataset}, "
                               f"which has {prepared.num_classes} labels")
        config.classes = prepared.num_classes
    else:
        prepared = prepare_toy(config.preset, config.classes, config.seed, config.partial)
    config.patch = config.patch or prepared.patch_size(config.backbone)  # the plan is the truth
    check_patch(config.backbone, config.patch, prepared.architecture(config.backbone))
    shape = prepared.volume_shape()
    if any(p > s for p, s in zip(config.patch, shape)):
        raise HeadzooError(f"patch {'x'.join(map(str, config.patch))} is larger than the volumes "
                           f"({'x'.join(map(str, shape))})")
    return prepared


def head_options(config: RunConfig, prepared: PreparedDataset) -> dict:
    """The user's options, plus nnU-Net's plan defaults for the loss options a head accepts."""
    parameters = inspect.signature(get_head_class(config.head).__init__).parameters
    defaults = {"batch_dice": prepared.configuration(config.backbone).batch_dice,
                "ignore_label": prepared.label_manager.ignore_label}
    return {**{k: v for k, v in defaults.items() if k in parameters}, **config.options}


def build_optimizer(network: SegmentationNetwork, steps: int):
    import schedulefree
    groups = network.head.param_groups(LR)
    if groups is None:
        params = [{"params": list(network.parameters())}]
    else:
        grouped = {id(p) for g in groups for p in g["params"]}
        params = [{"params": [p for p in network.parameters() if id(p) not in grouped]}, *groups]
    return schedulefree.AdamWScheduleFree(params, lr=LR, betas=(BETA1, BETA2), weight_decay=WEIGHT_DECAY,
                                          warmup_steps=max(1, round(WARMUP_FRACTION * steps)))


def environment(device: torch.device) -> dict:
    return {"device_name": device_name(device), "torch": torch.__version__, "headzoo": headzoo.__version__,
            "git_sha": git_sha(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "host": platform.node()}


def run(config: RunConfig, show_progress: bool = True) -> dict:
    """Train, measure and evaluate; the record's status is ok, oom or error (never raised)."""
    started = time.perf_counter()
    device = validate(config)
    prepared = prepare(config)
    options = head_options(config, prepared)
    record = {"schema_version": SCHEMA_VERSION, "head": config.head, "options": config.options,
              "classes": config.classes, "partial": config.partial, "backbone": config.backbone,
              "patch": list(config.patch), "batch": config.batch, "seed": config.seed, "steps": config.steps,
              "warmup": config.warmup, "memory_limit_bytes": config.memory_limit, "dataset": prepared.name,
              "plan": str(prepared.plans_file), "configuration": configuration_name(config.backbone),
              "options_resolved": options,
              **environment(device), "status": "ok", "error": None}
    torch.manual_seed(config.seed)
    backbone, features = build_backbone_from_plan(prepared, config.backbone, config.seed)
    head = create_head(config.head, features, config.classes, **options)
    if prepared.partial and not head.accepts_annotated:
        raise HeadzooError(f"the {config.head} head cannot use partially labelled data (annotated classes per "
                           "case); use a head that can, e.g. 'sigmoid', or drop --partial")
    network = SegmentationNetwork(backbone, head).to(device)
    try:
        record.update(_train_and_evaluate(config, prepared, network, device, show_progress))
    except HeadzooError:
        raise  # bad input found late (e.g. labels outside [0, C)): no record
    except Exception as error:
        record["status"] = "oom" if is_out_of_memory(error) else "error"
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
    record["wall_time_s"] = time.perf_counter() - started
    return record


def _train_and_evaluate(config: RunConfig, prepared: PreparedDataset, network: SegmentationNetwork,
                        device: torch.device, show_progress: bool) -> dict:
    head = network.head
    loader = training_loader(prepared, config.patch, config.batch, config.seed)
    optimizer = build_optimizer(network, config.steps)
    network.train()
    optimizer.train()
    losses: list[float] = []

    def step(batch: dict) -> None:
        image = batch["data"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        annotated = batch["annotated"].to(device) if batch["annotated"] is not None else None
        loss = head.loss(network(image), target, annotated)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    memory_step = config.warmup  # one step after warm-up is measured for memory, the rest timed
    times, peak = [], None
    train_started = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(f"train {config.head} C={config.classes}", total=config.steps,
                            visible=show_progress)
        for index in range(config.steps):
            batch = next(loader)  # data side, outside the measured step: the annotated-class mask too
            batch["annotated"] = prepared.annotated_mask(batch["keys"]) if prepared.partial else None
            if index == memory_step:
                peak = measure_peak_memory(lambda: step(batch), device, network, optimizer)
            elif index < config.warmup:
                step(batch)
            else:
                times.append(timed(lambda: step(batch), device))
            bar.update(task, advance=1, description=f"train {config.head} C={config.classes} "
                                                     f"loss {losses[-1]:.3f}")
    train_time = time.perf_counter() - train_started

    eval_started = time.perf_counter()
    network.eval()
    optimizer.eval()  # schedule-free: evaluate at the averaged weights
    counter = DiceCounter(config.classes)
    with progress_bar() as bar:
        task = bar.add_task("sliding-window evaluation", total=count_test_cases(prepared), visible=show_progress)
        for _, image, truth in test_cases(prepared):
            counter.update(segment(network, head, image, config.patch), truth)
            bar.advance(task)
    dice = counter.per_class()
    return {
        "dice_mean": counter.mean_foreground(),
        "dice_classes_present": int(np.isfinite(dice).sum()),
        "peak_memory_bytes": peak.bytes, "peak_memory_kind": peak.kind, "peak_rss_bytes": peak.rss_bytes,
        **summarize_times(times), "timed_steps": len(times),
        "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:])),
        "train_time_s": train_time, "eval_time_s": time.perf_counter() - eval_started,
    }
