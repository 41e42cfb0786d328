#!/usr/bin/env bash
# Every benchmark with its CPU defaults, one after the other (`make bench`); each prints its own table.
# The quality study (bench/quality.py, ~50 min) and the GPU check (bench/gpu_check.sh) run on their own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
for b in data_pipeline train_step losses metric inference; do
    echo "== bench/$b.py"
    "$PY" "bench/$b.py"
done
