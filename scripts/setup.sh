#!/usr/bin/env bash
# Create .venv and install the workflow with its test tools. Where no NVIDIA GPU is visible, PyTorch
# is pinned to the CPU build torch==2.13.0 first (an unpinned torch would pull a multi-GB CUDA build).
# Safe to rerun: it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet torch
  else
    .venv/bin/python -m pip install --quiet torch==2.13.0
  fi
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
echo "setup done: $(.venv/bin/python -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^(torch|transformer-lens|snakemake) " | tr -s " " | paste -sd ",")"
