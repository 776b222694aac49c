"""Probe toy/training settings for the CPU accuracy protocol: train one head with headzoo's pieces
(toy → nnU-Net pipeline → backbone + head → ScheduleFree AdamW), evaluate held-out Dice at a few
steps (schedule-free averaged weights, outside the training clock), and time the loader apart from
the step. Appends one JSON line per run to --out. An experiment tool, not the runner.

    python benchmarks/protocol_probe.py --classes 100 --steps 400 --code-bits 16 --eval-at 200,400
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from headzoo import runner
from headzoo.backbone import SegmentationNetwork, build_backbone
from headzoo.inference import DiceCounter, segment
from headzoo.pipeline import count_test_cases, prepare_toy, test_cases, training_loader
from headzoo.registry import create_head
from headzoo.toy import PRESETS, ToyPreset


def evaluate(network, head, prepared, patch, classes, limit):
    counter = DiceCounter(classes)
    for index, (_, image, truth) in enumerate(test_cases(prepared)):
        if index == limit:
            break
        counter.update(segment(network, head, image, patch), truth)
    dice = counter.per_class()
    finite = np.sort(dice[np.isfinite(dice)])
    worst = finite[: max(1, len(finite) // 10)].mean() if len(finite) else float("nan")
    return counter.mean_foreground(), float(worst)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--head", default="dense")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=runner.LR)
    p.add_argument("--warmup-fraction", type=float, default=runner.WARMUP_FRACTION)
    p.add_argument("--weight-decay", type=float, default=runner.WEIGHT_DECAY)
    p.add_argument("--oversample", type=float, default=0.33)
    p.add_argument("--volume", type=int, default=48)
    p.add_argument("--box", type=int, default=12)
    p.add_argument("--objects", type=int, default=16)
    p.add_argument("--volumes", type=int, default=80)
    p.add_argument("--train", type=int, default=72)
    p.add_argument("--code-bits", type=int, default=0)
    p.add_argument("--preset", default=None, help="an existing preset instead of the geometry options")
    p.add_argument("--eval-at", default="", help="comma-separated steps to evaluate at (the last step always)")
    p.add_argument("--eval-cases", type=int, default=None, help="evaluate on the first N test cases only")
    p.add_argument("--option", action="append", default=[], help="head option KEY=VALUE")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="/tmp/probe.jsonl")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    if a.preset is None:
        preset = ToyPreset(a.volume, a.box, a.objects, a.volumes, a.train, a.code_bits)
        name = f"x{a.volume}b{a.box}o{a.objects}v{a.volumes}t{a.train}k{a.code_bits}"
        PRESETS[name] = preset
    else:
        name, preset = a.preset, PRESETS[a.preset]
    started = time.perf_counter()
    prepared = prepare_toy(name, a.classes, 0)
    prepare_s = time.perf_counter() - started
    patch = (a.patch,) * 3
    torch.manual_seed(a.seed)
    backbone, features = build_backbone("small", len(prepared.dataset_json["channel_names"]), a.seed)
    options = {"batch_dice": prepared.configuration("small").batch_dice}
    options.update({k: json.loads(v) for k, v in (o.split("=", 1) for o in a.option)})
    head = create_head(a.head, features, a.classes, **options)
    network = SegmentationNetwork(backbone, head)
    loader = training_loader(prepared, patch, a.batch, a.seed)
    loader.oversample_foreground_percent = a.oversample
    runner.LR, runner.WARMUP_FRACTION, runner.WEIGHT_DECAY = a.lr, a.warmup_fraction, a.weight_decay
    optimizer = runner.build_optimizer(network, a.steps)
    eval_at = sorted({int(s) for s in a.eval_at.split(",") if s} | {a.steps})
    curve, load_times, step_times, losses = [], [], [], []
    train_clock = 0.0
    for index in range(1, a.steps + 1):
        network.train()
        optimizer.train()
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        loss = head.loss(network(batch["data"]), batch["target"], None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        t2 = time.perf_counter()
        load_times.append(t1 - t0)
        step_times.append(t2 - t1)
        train_clock += t2 - t0
        if index % 25 == 0:
            print(f"step {index} train {train_clock:.0f}s load {np.median(load_times[-25:]):.3f} "
                  f"step {np.median(step_times[-25:]):.3f} loss {np.mean(losses[-25:]):.3f}", flush=True)
        if index in eval_at:
            network.eval()
            optimizer.eval()
            e0 = time.perf_counter()
            with torch.no_grad():
                dice, worst = evaluate(network, head, prepared, patch, a.classes, a.eval_cases)
            point = {"step": index, "train_s": round(train_clock, 1), "dice": round(dice, 4),
                     "worst10": round(worst, 4), "loss": round(float(np.mean(losses[-20:])), 4),
                     "eval_s": round(time.perf_counter() - e0, 1)}
            curve.append(point)
            print(json.dumps(point), flush=True)
    record = {"tag": a.tag, **{k: v for k, v in vars(a).items() if k not in ("out", "tag")}, "preset_name": name,
              "channels": len(prepared.dataset_json["channel_names"]), "prepare_s": round(prepare_s, 1),
              "train_s": round(train_clock, 1), "median_step_s": round(float(np.median(step_times)), 4),
              "median_load_s": round(float(np.median(load_times)), 4),
              "loader_share": round(sum(load_times) / train_clock, 3), "curve": curve,
              "dice": curve[-1]["dice"], "test_cases": count_test_cases(prepared)}
    print(json.dumps(record), flush=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
