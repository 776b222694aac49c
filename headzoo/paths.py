"""Where headzoo keeps its data, and the nnU-Net folders it points nnU-Net at.

nnU-Net reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` once, when
``nnunetv2.paths`` is first imported, so :func:`configure_nnunet_environment` runs on
``import headzoo`` before anything imports nnU-Net.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$HEADZOO_CACHE``, else ``~/.cache/headzoo``."""
    return Path(os.environ.get("HEADZOO_CACHE", Path.home() / ".cache" / "headzoo")).expanduser()


def configure_nnunet_environment() -> None:
    root = cache_root()
    for variable, folder in (("nnUNet_raw", "nnUNet_raw"),
                             ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                             ("nnUNet_results", "nnUNet_results")):
        path = root / folder
        path.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(path)
    # nnU-Net's data augmentation runs in this process: deterministic, no worker pool.
    os.environ.setdefault("nnUNet_n_proc_DA", "0")


def nnunet_raw() -> Path:
    return Path(os.environ["nnUNet_raw"])


def nnunet_preprocessed() -> Path:
    return Path(os.environ["nnUNet_preprocessed"])
