#!/usr/bin/env bash
# Load every SAE of a finished run with SAELens (in a separate environment, .venv-saelens) and compare
# its reconstructions with this package's. Usage: bash scripts/check_saelens.sh [results/default]
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-results/default}
if [ ! -x .venv-saelens/bin/python ]; then
  python3 -m venv .venv-saelens
  .venv-saelens/bin/python -m pip install --quiet torch==2.13.0
  .venv-saelens/bin/python -m pip install --quiet sae-lens
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
.venv/bin/python scripts/check_saelens.py export "$run" "$out"
.venv-saelens/bin/python scripts/check_saelens.py compare "$run" "$out"
