"""The one device check of `headzoo run` (``--device``) and of nnU-Net's own training and prediction (``-device``)."""

from __future__ import annotations

import torch

from headzoo.errors import HeadzooError

RUN_DEVICES = ("auto", "cpu", "cuda")
NNUNET_DEVICES = ("cpu", "cuda", "mps")  # nnUNetv2_train's and nnUNetv2_predict's -device


def resolve_device(name: str, flag: str = "--device", choices: tuple[str, ...] = RUN_DEVICES) -> torch.device:
    """The torch device `name` names (auto: CUDA where torch sees one), or one line: an unknown name, or a
    device torch cannot see; `flag` is the option the name came from."""
    if name not in choices:
        raise HeadzooError(f"unknown device '{name}' for {flag} (choose {', '.join(choices[:-1])} or {choices[-1]})")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if name in available and not available[name]():
        raise HeadzooError(f"{flag} {name} asked for, but torch sees no {name.upper()} device; use {flag} cpu")
    return torch.device(name)
