#!/usr/bin/env bash
# Create .venv and install the workflow with its test tools at the exact versions and sha256 hashes
# of requirements/cpu.lock (written by scripts/lock.py). Where no NVIDIA GPU is visible that is the
# whole CPU install, torch's CPU build included (an unpinned torch would pull a multi-GB CUDA build).
# Where `nvidia-smi -L` works, torch is the CUDA build of the locked version from the package index
# and every other package comes from the lock. The project itself is then installed editable from
# this checkout, without dependencies and without build isolation (setuptools is in the lock).
# Safe to rerun: pip skips what is installed at the locked version and replaces what differs.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
lock=requirements/cpu.lock
[ -f "$lock" ] || { echo "setup.sh: $lock is missing; write it with: python3 scripts/lock.py" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch=$(sed -n 's/^torch==\([^ +]*\).*/\1/p' "$lock")
  [ -n "$torch" ] || { echo "setup.sh: no torch line in $lock" >&2; exit 1; }
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  grep -v '^torch==' "$lock" >"$tmp/locked.txt"
  sed 's/ --hash=.*//' "$tmp/locked.txt" >"$tmp/constraints.txt"  # torch's own dependencies at the locked versions
  # The CUDA build: the locked version without its +cpu label (excluded, as a find-links may hold it).
  "${pip[@]}" install -c "$tmp/constraints.txt" "torch==$torch,!=$torch+cpu"
  "${pip[@]}" install --require-hashes --no-deps -r "$tmp/locked.txt"
else
  "${pip[@]}" install --require-hashes --no-deps -r "$lock"
fi
"${pip[@]}" install --no-deps --no-build-isolation -e .
echo "setup done: $(.venv/bin/python -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^(torch|transformer-lens|snakemake) " | tr -s " " | paste -sd ",")"
