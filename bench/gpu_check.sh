#!/usr/bin/env bash
# The GPU check for the device tool: both pipeline benchmarks at the real patch size and an autotune run
# of the default train.json, < 8 minutes. Run from the repo root on a CUDA machine with the venv
# installed (make venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TMP=${TMP_DIR:-/tmp/gpu_check}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 200 "$PY" bench/data_pipeline.py --samples 10
timeout 200 "$PY" bench/train_step.py --patch 128 --batch 2 --steps 20
"$PY" -m custom_components.data.synthetic --out "$TMP/data" --volumes 4 --shape 192 192 192 --seed 0
"$PY" -m custom_components.data.datalist --data_root "$TMP/data" --out "$TMP/datalist.json" --val_fraction 0.25 --seed 0
timeout 150 "$PY" -m custom_components.training.autotune --config_file bundle/configs/train.json \
    --dataset_dir "$TMP/data" --datalist "$TMP/datalist.json" --output_dir "$TMP/run" --max_minutes 2 --out "$TMP/tune.json"
