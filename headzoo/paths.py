"""Where headzoo keeps its data, and the nnU-Net folders it points nnU-Net at.

nnU-Net reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` once, when
``nnunetv2.paths`` is first imported, so :func:`configure_nnunet_environment` runs on
``import headzoo`` before anything imports nnU-Net. The nnU-Net commands (``headzoo nnunet-train``,
``headzoo predict``) work in the user's own nnU-Net folders instead: :func:`use_user_nnunet_folders`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from headzoo.errors import HeadzooError


def cache_root() -> Path:
    """``$HEADZOO_CACHE``, else ``~/.cache/headzoo``."""
    return Path(os.environ.get("HEADZOO_CACHE", Path.home() / ".cache" / "headzoo")).expanduser()


NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# set (and inherited by worker processes) once a command works in the user's nnU-Net folders
USER_FOLDERS_MARKER = "HEADZOO_NNUNET_USER_FOLDERS"
_user_folders = {variable: os.environ.get(variable) for variable in NNUNET_FOLDERS}
_user_augmentation_workers = os.environ.get("nnUNet_n_proc_DA")


def configure_nnunet_environment() -> None:
    """Point nnU-Net at the cache. Never fails: a cache that cannot be made is reported, in one line, by
    require_cache() when something needs it (so `--help`, `heads` and `leaderboard` still work)."""
    root = cache_root()
    keep_user_folders = os.environ.get(USER_FOLDERS_MARKER) == "1"
    for variable in NNUNET_FOLDERS:
        if keep_user_folders and os.environ.get(variable):
            continue
        path = root / variable
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(path)
    # nnU-Net's data augmentation runs in this process: deterministic, no worker pool.
    if not keep_user_folders:
        os.environ.setdefault("nnUNet_n_proc_DA", "0")


def use_user_nnunet_folders() -> None:
    """Point nnU-Net back at the user's ``nnUNet_raw``/``_preprocessed``/``_results`` where they are set
    (headzoo's cache where not) and at nnU-Net's own augmentation worker count, for this process and the
    workers it starts. nnU-Net ≥ 2.8 reads these lazily."""
    os.environ[USER_FOLDERS_MARKER] = "1"
    if _user_augmentation_workers is None:
        os.environ.pop("nnUNet_n_proc_DA", None)
    for variable, value in _user_folders.items():
        if value:
            os.environ[variable] = value


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
