"""The training loop of one run: nnU-Net's train step (autocast on CUDA, gradient clipping), ScheduleFree
AdamW with the chunked-basis paper's settings, one memory-measured and many timed steps, and held-out
Dice at the averaged weights every `eval_every` steps (a learning curve), outside the timed steps and
outside the training time. The batches and the held-out cases are given (``loaders.training_batches``,
``dataset.HeldOutSet.of`` for a run): the loop itself reads no dataset."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from headzoo.backbone import head_of
from headzoo.config import RunConfig
from headzoo.errors import ContractViolation
from headzoo.inference import DiceCounter, segment
from headzoo.measure import (
    GradientReceivers,
    is_out_of_memory,
    measure_peak_memory,
    optimizer_state_complete,
    summarize_times,
    timed,
)
from headzoo.dataset import HeldOutSet
from headzoo.progress import progress_bar
from headzoo.results import DICE_DEFINITION

# ScheduleFree AdamW with the paper's settings: β1 (the paper's 1−β1 = 0.1), β2, weight decay, warm-up
# (the learning rate is a run setting, RunConfig.lr).
BETA1, BETA2, WEIGHT_DECAY, WARMUP_FRACTION = 0.9, 0.995, 0.0812, 0.02
BETAS = (BETA1, BETA2)
# the memory step waits, as a warm-up step, until every parameter has optimizer state, for at most this many steps
# (a GradScaler skips the optimizer step while its scale, from 2^16, overflows the fp16 gradients; it halves each time)
MEMORY_STEP_WAIT = 20


def build_optimizer(network: nn.Module, steps: int, lr: float):
    import schedulefree

    """ScheduleFree AdamW over the network: the head's own groups (Head.configure_optimizer, given the shared
    settings), every other parameter with the shared settings."""
    groups = head_of(network).configure_optimizer(lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
    if groups is None:
        params = [{"params": list(network.parameters())}]
    else:
        grouped = {id(p) for g in groups for p in g["params"]}
        params = [{"params": [p for p in network.parameters() if id(p) not in grouped]}, *groups]
    return schedulefree.AdamWScheduleFree(
        params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, warmup_steps=max(1, round(WARMUP_FRACTION * steps))
    )


class TrainStep:
    """One step as nnUNetTrainer.train_step takes it: forward + loss under autocast (CUDA only), backward
    (through a GradScaler under autocast), gradient clipping, optimizer step; the run-time contract checks.

    The labels are checked on the host before the batch moves, and the loss is read back once, after the
    optimizer step (where nnU-Net's train_step reads it too): nothing in between waits for the device.
    `headzoo estimate` runs this class on fake tensors, replacing `autocast_region` and `record_loss`."""

    def __init__(self, config: RunConfig, network: nn.Module, optimizer, device: torch.device):
        self.config, self.network, self.optimizer, self.device = config, network, optimizer, device
        self.autocast = config.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast else None
        self.losses: list[float] = []

    def __call__(self, batch: dict) -> None:
        head, config = head_of(self.network), self.config
        head.check_labels(batch["target"])
        image = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"].to(self.device, non_blocking=True)
        annotated = batch["annotated"].to(self.device) if batch["annotated"] is not None else None
        with self.autocast_region():
            output = self.network(image)
            if output.shape[1] > head.num_classes:
                raise ContractViolation(
                    f"the {config.head} head's output has {output.shape[1]} channels, more "
                    f"than its {head.num_classes} classes"
                )
            loss = head.loss(output, target, annotated)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), config.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.record_loss(loss.detach())

    def autocast_region(self) -> contextlib.AbstractContextManager:
        """nnU-Net's autocast around forward and loss: on CUDA with --amp, else none."""
        return torch.autocast(self.device.type) if self.autocast else contextlib.nullcontext()

    def record_loss(self, loss: torch.Tensor) -> None:
        """The step's one read from the device. A non-finite loss stops the run (its update is already made:
        the run ends here, so no later step sees it)."""
        value = float(loss)
        if not np.isfinite(value):
            raise ContractViolation(f"non-finite loss ({value}) at step {len(self.losses)}")
        self.losses.append(value)


@contextlib.contextmanager
def averaged_weights(network: nn.Module, optimizer):
    """The network at ScheduleFree's averaged weights x, then back at the training weights y bit for bit.

    ScheduleFree's eval()/train() round trip interpolates y → x → y in floating point, which moves some
    weights by an ulp (494 of 100,000 parameters, up to 1.2e-7): evaluating every N steps would change
    the training. The weights are saved before and copied back after, so it does not."""
    saved = [p.detach().clone() for p in network.parameters()]
    network.eval()
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()  # ScheduleFree's own mode switch, then the exact training weights
        with torch.no_grad():
            for parameter, value in zip(network.parameters(), saved):
                parameter.copy_(value)
        network.train()


def evaluate(
    config: RunConfig, network: nn.Module, optimizer, held_out: HeldOutSet, show_progress: bool, label: str
) -> DiceCounter:
    """Held-out Dice, as nnU-Net evaluates, of sliding-window predictions at the schedule-free averaged weights,
    exported to each case's original geometry and compared with its raw reference label file."""
    counter = DiceCounter(config.classes, held_out.ignore_label)
    with averaged_weights(network, optimizer), torch.no_grad(), progress_bar() as bar:
        task = bar.add_task(label, total=len(held_out.cases), visible=show_progress)
        for case in held_out.cases:
            prediction = segment(
                network,
                head_of(network),
                case.image,
                config.patch,
                case.properties,
                held_out.plans_manager,
                held_out.configuration,
                held_out.dataset_json,
            )
            counter.update(prediction, case.reference, case.key, config.head)
            bar.advance(task)
    return counter


def train_and_evaluate(
    config: RunConfig,
    network: nn.Module,
    device: torch.device,
    batches: Iterator[dict],
    held_out: HeldOutSet,
    show_progress: bool,
) -> dict:
    """Train `network` for config.steps batches from `batches` (``data``, ``target``, ``annotated``: a (b, C)
    mask of the classes each case annotates, or None), measure one step's memory and time the others, and
    evaluate on `held_out` (every config.eval_every steps and at the end): the record's measured fields."""
    optimizer = build_optimizer(network, config.steps, config.lr)
    network.train()
    optimizer.train()
    step = TrainStep(config, network, optimizer, device)
    times, peak, curve = [], None, []
    data_time = eval_time = 0.0
    memory_deadline = min(config.warmup + MEMORY_STEP_WAIT, config.steps - 2)  # leaves a timed step (validate)
    evaluation_oom = None  # an evaluation that ran out of memory: no later one runs, training and its numbers go on
    receivers = GradientReceivers(network)  # until the memory step: which parameters need optimizer state
    started = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(f"train {config.head} C={config.classes}", total=config.steps, visible=show_progress)
        for index in range(config.steps):
            fetched = time.perf_counter()
            batch = next(batches)  # data side, outside the measured step: the annotated-class mask too
            data_time += time.perf_counter() - fetched
            if (
                peak is None
                and index >= config.warmup
                and (optimizer_state_complete(optimizer, receivers.received) or index == memory_deadline)
            ):
                state_complete = optimizer_state_complete(optimizer, receivers.received)
                receivers.close()
                peak = measure_peak_memory(lambda: step(batch), device, network, optimizer)  # the rest timed
                memory_step = index
                external_bytes = head_of(network).external_memory_bytes()
            elif peak is None:
                step(batch)
            else:
                times.append(timed(lambda: step(batch), device))
            bar.update(
                task, advance=1, description=f"train {config.head} C={config.classes} loss {step.losses[-1]:.3f}"
            )
            if (
                config.eval_every
                and (index + 1) % config.eval_every == 0
                and index + 1 < config.steps
                and evaluation_oom is None
            ):
                evaluated = time.perf_counter()
                trained = evaluated - started - eval_time
                counter, evaluation_oom = _evaluate_unless_oom(config, network, optimizer, held_out, False, "")
                eval_time += time.perf_counter() - evaluated
                if evaluation_oom is None:
                    curve.append(_curve_point(index + 1, trained, counter))
    train_time = time.perf_counter() - started - eval_time

    evaluated = time.perf_counter()
    if evaluation_oom is None:
        counter, evaluation_oom = _evaluate_unless_oom(
            config, network, optimizer, held_out, show_progress, "sliding-window evaluation"
        )
    if config.eval_every and evaluation_oom is None:
        curve.append(_curve_point(config.steps, train_time, counter))
    dice = {"dice_mean": None, "dice_worst10_mean": None, "dice_pooled_mean": None, "dice_classes_present": None}
    if evaluation_oom is None:
        dice = {
            "dice_mean": counter.mean_foreground(),
            "dice_worst10_mean": counter.worst_mean(0.1),
            "dice_pooled_mean": counter.pooled_mean(),
            "dice_classes_present": counter.classes_scored(),
        }
    else:  # the record's status: training ran and was measured, evaluation did not fit
        dice.update(
            status="oom",
            oom_phase="evaluation",
            error=f"{type(evaluation_oom).__name__}: {(str(evaluation_oom).splitlines() or [''])[0]}"[:500],
        )
    return {
        **dice,
        "dice_definition": DICE_DEFINITION,
        "peak_memory_bytes": peak.bytes,
        "peak_memory_kind": peak.kind,
        "peak_rss_bytes": peak.rss_bytes,
        "external_memory_bytes": external_bytes,
        "memory_step": memory_step,
        "memory_step_optimizer_state_complete": state_complete,
        **summarize_times(times),
        "timed_steps": len(times),
        "loss_first": step.losses[0],
        "loss_last": float(np.mean(step.losses[-10:])),
        "train_time_s": train_time,
        "data_time_s": data_time,
        "data_share": data_time / train_time,
        "eval_time_s": time.perf_counter() - evaluated,
        "curve": curve or None,
    }


def _evaluate_unless_oom(
    config: RunConfig, network: nn.Module, optimizer, held_out: HeldOutSet, show_progress: bool, label: str
) -> tuple[DiceCounter | None, BaseException | None]:
    """`evaluate`, or the out-of-memory error it raised (sliding windows over C channels can need more than a
    training step: dense at C = 1000, 192³ holds a C × volume fp32 buffer)."""
    try:
        return evaluate(config, network, optimizer, held_out, show_progress, label), None
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        return None, error


def _curve_point(steps: int, train_seconds: float, counter: DiceCounter) -> dict:
    return {
        "step": steps,
        "train_time_s": round(train_seconds, 3),
        "dice_mean": counter.mean_foreground(),
        "dice_worst10_mean": counter.worst_mean(0.1),
    }
