#!/usr/bin/env bash
# The GPU check in one command (README, "GPU check"):
#
#   bash scripts/gpu_check.sh fetch     # once, on a machine with pip and the network: the wheels that the GPU
#                                       # image lacks (DeepSpeed and its pydantic/hjson needs; omegaconf and
#                                       # Pillow for the product's step on the local backend) into .whl/
#   bash scripts/gpu_check.sh [ARGS]    # on the GPU machine: installs .whl/*.whl into /tmp/site when present and
#                                       # runs `python -m benchmarks.gpu_check ARGS` within GPU_CHECK_TIMEOUT s
#
# With this workplace's device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=480);
# the log and gpu_check.json land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "fetch" ]; then
  PY=${PYTHON:-.venv/bin/python}
  ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  mkdir -p .whl
  # DeepSpeed is published as a source distribution only: build its pure-Python wheel (no ops compiled).
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w .whl "deepspeed==$(ver deepspeed)"
  # DeepSpeed's needs that the GPU image (Python 3.12, x86-64) does not hold, at the versions tested here.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic_core)" "annotated-types==$(ver annotated_types)" \
    "typing-inspection==$(ver typing_inspection)" "hjson==$(ver hjson)" \
    "omegaconf==$(ver omegaconf)" "antlr4-python3-runtime==$(ver antlr4-python3-runtime)" "pillow==$(ver pillow)" \
    "peft==$(ver peft)" "accelerate==$(ver accelerate)"    # LoRA: `bash scripts/gpu_check.sh --lora-rank 64`
  ls -l .whl
  exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
out=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout "${GPU_CHECK_TIMEOUT:-420}" python3 -m benchmarks.gpu_check --json "$out/gpu_check.json" "$@" 2>&1 \
  | tee "$out/gpu_check.log"
