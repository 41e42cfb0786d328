#!/usr/bin/env bash
# The GPU check for the device tool: both pipeline benchmarks at the real patch size, < 8 minutes.
# Run from the repo root on a CUDA machine with the venv installed (make venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 240 "$PY" bench/data_pipeline.py --samples 10
timeout 240 "$PY" bench/train_step.py --patch 128 --batch 2 --steps 20
