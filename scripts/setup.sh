#!/usr/bin/env bash
# Creates .venv and installs maskgrpo with its test dependencies (idempotent: skips when pyproject is unchanged).
# CPU machines and CI: torch 2.14.1 + torchvision 0.29.1 from PyPI (their compiled ops load, so open_clip works).
# GPU clusters: install the torch/torchvision build for your CUDA first, then `pip install -e .` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.maskgrpo-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
