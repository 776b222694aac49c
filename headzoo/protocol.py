"""The accuracy protocol: settings where Dice means something on 2 CPU cores, and the learning rate each head
earned on the same grid (README "The accuracy protocol"; runs in leaderboard/accuracy_experiments.md).

Every head gets the same tuning budget: one 400-step run per learning rate of ``LR_GRID`` at C = 100, seed 0,
on the protocol toy; the rate with the best held-out Dice (nnU-Net's) becomes the head's protocol rate.
"""

from __future__ import annotations

import dataclasses

from headzoo.config import RunConfig, from_record, to_argv
from headzoo.report import head_label

# the toy with a 16-bit class code and 32 objects per volume, 400 steps, a curve every 100 steps
ACCURACY_PROTOCOL = {"preset": "protocol", "steps": 400, "eval_every": 100}
LR_GRID = (0.005, 0.01, 0.02, 0.05)
TUNING = {"classes": 100, "seed": 0}  # where the grid ran
DEFAULT_LR = 0.05  # a head without a grid of its own (a plug-in): the rate most built-in heads earned (3 of 5)
#: head label (head_label: the head and its options) → its best rate on LR_GRID (leaderboard "Learning-rate budget")
PROTOCOL_LR = {"dense": 0.05, "chunked": 0.02, "knn": 0.05, "sigmoid": 0.05, "sigmoid rank=32": 0.02}


#: Dice at C = 1000 within a CPU budget: the protocol with more, smaller objects (~18 training instances per class),
#: the same per-head learning rates, 1900 steps (about an hour of one-thread training for the chunked head)
LARGE_C = {"preset": "protocol1000", "classes": 1000, "steps": 1900, "eval_every": 300}
LARGE_C_GROUP = ("preset", "classes")  # the C = 1000 group: any step count (equal steps, equal seconds)


def protocol_lr(head: str, options: dict | None = None) -> float:
    return PROTOCOL_LR.get(head_label(head, options), DEFAULT_LR)


def protocol_settings(head: str, options: dict | None = None) -> dict:
    return {**ACCURACY_PROTOCOL, "lr": protocol_lr(head, options)}


def accuracy_settings(head: str, options: dict | None, classes: int) -> dict:
    """The settings that give `head` a meaningful Dice at `classes`: the protocol's, on LARGE_C's toy at C = 1000."""
    settings = protocol_settings(head, options)
    return {**settings, **LARGE_C} if classes == LARGE_C["classes"] else settings


def is_protocol_run(record: dict) -> bool:
    """A toy run with the protocol's settings at its head's protocol learning rate, everything else default."""
    config = from_record(record)
    default = RunConfig(head=config.head)
    others = ("backbone", "batch", "partial", "memory_limit_bytes", "warmup", "grad_clip", "amp", "dataset_folder")
    return all(getattr(config, k) == v for k, v in protocol_settings(config.head, config.options).items()) and all(
        getattr(config, k) == getattr(default, k) for k in others
    )


def is_large_c_run(record: dict) -> bool:
    """A run of the C = 1000 group: LARGE_C's toy and class count at any number of steps (and curve interval),
    everything else as a protocol run (its head's rate)."""
    config = from_record(record)
    return all(getattr(config, k) == LARGE_C[k] for k in LARGE_C_GROUP) and is_protocol_run(
        {**record, **ACCURACY_PROTOCOL}
    )


def is_tuning_run(record: dict) -> bool:
    """A run of the learning-rate grid: the protocol at one of LR_GRID's rates, at the tuning class count and seed."""
    config = from_record(record)
    return (
        config.lr in LR_GRID
        and all(getattr(config, k) == v for k, v in TUNING.items())
        and is_protocol_run({**record, "lr": protocol_lr(config.head, config.options)})
    )


def accuracy_note(record: dict) -> str | None:
    """For a toy run outside the accuracy protocol: what its Dice means, and the command that gives one."""
    config = from_record(record)
    if config.dataset_folder is not None or is_protocol_run(record) or is_large_c_run(record):
        return None
    settings = accuracy_settings(config.head, config.options, config.classes)
    protocol = dataclasses.replace(config, **settings, patch=None, run_id=None)
    return (
        f"This run measures cost (peak memory, step time): Dice after {config.steps} steps on the "
        f"'{config.preset}' toy is not a quality measure. For Dice, run the accuracy protocol:\n"
        f"  headzoo run {' '.join(to_argv(protocol, only_changed=True))}"
    )
