"""Everything a run request can be checked for before any data exists, in the modules a refusal needs only:
`headzoo run` and the sweep's planner call `validate` first, so a bad setting or head option is one line
within the time it takes to import torch, before the runner (nnU-Net, pandas, the loaders) is imported."""

from __future__ import annotations

import torch

from headzoo.backbone import check_patch, get_backbone
from headzoo.config import RunConfig
from headzoo.device import resolve_device
from headzoo.errors import HeadzooError
from headzoo.registry import get_head_class, validate_head_options

MAX_CLASSES = 2**15  # nnU-Net's preprocessor stores label maps as int16: labels 0..32767


def validate(config: RunConfig) -> torch.device:
    """Everything that can be checked before any data is made; raises HeadzooError."""
    if config.classes is not None and config.classes < 2:
        raise HeadzooError(f"--classes must be at least 2 (background and one class), got {config.classes}")
    if config.classes is not None and config.classes > MAX_CLASSES:
        raise HeadzooError(f"--classes {config.classes} is more than the label maps hold (at most {MAX_CLASSES})")
    for name in ("seed", "warmup"):
        if getattr(config, name) < 0:
            raise HeadzooError(f"--{name} must not be negative, got {getattr(config, name)}")
    if config.partial < 1:
        raise HeadzooError(f"--partial must be at least 1, got {config.partial}")
    if config.steps <= config.warmup + 1:
        raise HeadzooError(f"--steps must exceed the {config.warmup} warm-up steps plus one memory step")
    if config.batch < 1:
        raise HeadzooError(f"--batch must be positive, got {config.batch}")
    if config.eval_every is not None and config.eval_every < 1:  # the record takes none: refuse before training
        raise HeadzooError(
            f"--eval-every must be a positive number of steps, got {config.eval_every} "
            "(leave it out for no learning curve)"
        )
    get_head_class(config.head)
    get_backbone(config.backbone)
    if config.patch is not None:  # early, against the table; _prepare checks it against the plan
        check_patch(config.backbone, config.patch)
    validate_head_options(config)  # the head built on the meta device: bad options fail before any data
    return resolve_device(config.device)
