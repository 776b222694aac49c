#!/usr/bin/env bash
# Set up headzoo in .venv. Keeps a torch you already have (e.g. a CUDA build); otherwise installs
# torch 2.13.0 (on a CPU-only machine with the local CPU wheel: no CUDA download). torchvision is
# pinned to the release that matches torch, so nnU-Net's dependencies cannot drag in a newer torch.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv   # keep the user's own torch
else
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install --quiet "torch==2.13.0"
.venv/bin/python -W ignore - > .venv/constraints.txt <<'PY'
import torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
print(f"torch=={torch.__version__.split('+')[0]}")
print(f"torchvision==0.{minor + 15}.*")  # torch 2.13 ↔ torchvision 0.28
PY
.venv/bin/pip install --quiet -c .venv/constraints.txt -e ".[test]"
echo "headzoo is set up: .venv/bin/headzoo --help"
