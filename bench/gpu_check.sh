#!/usr/bin/env bash
# The GPU check: the figures of docs/PERFORMANCE.md's GPU section, in at most ~5 minutes on an H200.
#
#   bash bench/gpu_check.sh --out DIR                # with this repository's .venv (make venv)
#   bash bench/gpu_check.sh --device --out DIR       # on an offline GPU machine: its own python3 with a CUDA
#                                                    # torch, our other packages from .whl (bench/device_wheels.sh)
#   PY=python WHEELS=.whl-rehearsal bash bench/gpu_check.sh --device --out DIR   # (make gpu-rehearsal, on a CPU)
#
# Each part runs under its own `timeout` and appends its table to DIR/gpu_check.md (and its JSON line to
# DIR/<part>.json) as soon as it finishes, so a run cut short keeps what it measured. Parts, most important
# first: env (GPU, driver, torch); trainer (train.json's step vs the bare network, phases, data wait, NVML
# utilisation, peak memory, steps 5-20 under sync-debug "error"); nnunet (samples/s vs nnU-Net's network, loss
# and CPU augmentation; DynUNet vs ResEnc M); parts (per-term loss time, bench/train_step.py); metric
# (320^3 sheets, 1 and 8 worker processes); autotune (largest batch at 128^3). Synthetic volumes and run
# folders go to $WORK (default /tmp/gpu_check_work).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=gpu_check_out
DEVICE=0
PARTS="env trainer nnunet parts metric autotune"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --device) DEVICE=1; shift ;;
        --parts) PARTS="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/gpu_check.md"
if [ "$DEVICE" = 1 ]; then
    PY=${PY:-python3}
    WHEELS=${WHEELS:-.whl}
    SITE=${SITE:-/tmp/vesuvius_site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
        || { echo "ERROR: installing the wheels of $WHEELS failed" >&2; exit 1; }
    export PYTHONPATH="$SITE:$PWD/$WHEELS:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    PY=${PY:-.venv/bin/python}
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
WORK=${WORK:-/tmp/gpu_check_work}  # data and run folders (large), apart from the report folder
DATA="$WORK/data"
if [ "$CUDA" = 1 ]; then PATCH=128; STEPS=80; NSTEPS=30; SHEET=320; SMALL=()
else PATCH=32; STEPS=12; NSTEPS=4; SHEET=96; SMALL=(--patch_size "[32,32,32]" --filters "[8,16,32,64]"); fi

append() {  # append() TITLE LOGFILE RC SECONDS: the part's printed table (not its log lines) to the report
    {
        echo "## $1 (exit $3, ${4} s)"
        echo '```'
        grep -v -E "^[0-9]{4}-[0-9]{2}-[0-9]{2} |^\{|it/s\]|^\s*$|Warning|warn\(" "$2" | tail -n 40
        echo '```'
    } >> "$REPORT"
    grep -E '^\{' "$2" | tail -n 1 > "$OUT/${5}.json" || true
}

part() {  # part NAME SECONDS TITLE COMMAND...
    local name=$1 limit=$2 title=$3; shift 3
    case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name (at most $limit s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    [ $rc = 124 ] && echo "(cut at $limit s)" >> "$OUT/$name.log"
    append "$title" "$OUT/$name.log" $rc $((SECONDS - t0)) "$name"
    tail -n 25 "$OUT/$name.log"
}

echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)" > "$REPORT"
part env 30 "machine" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; nproc; \
    \"$PY\" -c 'import sys, torch, monai; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"monai\", monai.__version__); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no CUDA\")'; \
    \"$PY\" -c 'import custom_components.metrics.betti_matching as b; print(\"betti_matching:\", b.find_extension().rsplit(\"/\", 1)[-1])'"
"$PY" -c "import sys; sys.path.insert(0, 'bench'); from gpu_trainer import make_data; make_data('$DATA', $PATCH + 64)" \
    > "$OUT/data.log" 2>&1 || { echo "ERROR: synthetic data failed:"; tail -n 20 "$OUT/data.log"; }
part trainer 100 "train.json trainer vs bare network" "$PY" bench/gpu_trainer.py --patch $PATCH --batch 2 --steps $STEPS --data "$DATA"
part nnunet 160 "ours vs nnU-Net, DynUNet vs ResEnc M" "$PY" bench/gpu_vs_nnunet.py --patch $PATCH --batch 2 --steps $NSTEPS --data "$DATA"
part parts 70 "step parts with a sync around each (bench/train_step.py)" "$PY" bench/train_step.py --patch $PATCH --batch 2 --steps 5
part metric 110 "competition metric, sheets pair, 1 and 8 workers" "$PY" bench/metric.py --sheet_sizes $SHEET --synthetic_sizes --fast_only 8 1
part autotune 150 "autotune at the default patch" "$PY" -m custom_components.training.autotune --config_file bundle/configs/train.json \
    --dataset_dir "$DATA" --output_dir "$WORK/tune_run" --max_minutes "${TUNE_MINUTES:-2.2}" --out "$WORK/tune.json" "${SMALL[@]}"
echo "report: $REPORT"
