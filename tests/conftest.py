"""Test set-up: a private headzoo cache, and the dummy plug-in distribution installed (into a
folder on sys.path) before collection, so the conformance suite sees it like any registered head."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# a fresh cache per test session (set HEADZOO_CACHE to reuse one across sessions)
os.environ.setdefault("HEADZOO_CACHE", tempfile.mkdtemp(prefix="headzoo-test-cache-"))
os.environ["nnUNet_n_proc_DA"] = "0"
# without CUDA, Triton kernels run in Triton's CPU interpreter, which must be chosen before anything
# imports triton (tests/test_chunked_triton.py); nothing else in the suite uses triton
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

PLUGIN_SOURCE = Path(__file__).parent / "plugin_dist"
PLUGIN_TARGET = Path(os.environ["HEADZOO_CACHE"]) / "plugin-site"


def _install_plugin() -> None:
    if not (PLUGIN_TARGET / "headzoo_dummy_head.py").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                str(PLUGIN_TARGET),
                str(PLUGIN_SOURCE),
            ],
            check=True,
        )
    sys.path.insert(0, str(PLUGIN_TARGET))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN_TARGET), os.environ.get("PYTHONPATH")]))


_install_plugin()
