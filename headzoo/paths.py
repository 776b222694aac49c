"""Where headzoo keeps its data, and the nnU-Net folders it points nnU-Net at.

nnU-Net reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` once, when
``nnunetv2.paths`` is first imported, so :func:`configure_nnunet_environment` runs on
``import headzoo`` before anything imports nnU-Net.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from headzoo.errors import HeadzooError


def cache_root() -> Path:
    """``$HEADZOO_CACHE``, else ``~/.cache/headzoo``."""
    return Path(os.environ.get("HEADZOO_CACHE", Path.home() / ".cache" / "headzoo")).expanduser()


def configure_nnunet_environment() -> None:
    """Point nnU-Net at the cache. Never fails: a cache that cannot be made is reported, in one line, by
    require_cache() when something needs it (so `--help`, `heads` and `leaderboard` still work)."""
    root = cache_root()
    for variable, folder in (("nnUNet_raw", "nnUNet_raw"),
                             ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                             ("nnUNet_results", "nnUNet_results")):
        path = root / folder
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(path)
    # nnU-Net's data augmentation runs in this process: deterministic, no worker pool.
    os.environ.setdefault("nnUNet_n_proc_DA", "0")


def require_cache() -> Path:
    """The cache root, or a one-line error saying why it cannot be used."""
    root = cache_root()
    try:
        for folder in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "locks"):
            (root / folder).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HeadzooError(f"HEADZOO_CACHE {root} cannot be used: {error.strerror or error}") from None
    if not os.access(root, os.W_OK):
        raise HeadzooError(f"HEADZOO_CACHE {root} is not writable")
    return root


def nnunet_raw() -> Path:
    return Path(os.environ["nnUNet_raw"])


def nnunet_preprocessed() -> Path:
    return Path(os.environ["nnUNet_preprocessed"])
