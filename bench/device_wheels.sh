#!/usr/bin/env bash
# The wheels the GPU check needs on an offline GPU machine: one whose python (3.12 on the machines we
# were lent) already has a CUDA torch and the common scientific stack (numpy, scipy, scikit-image,
# tifffile, tqdm, pandas, psutil, absl-py, nvidia-ml-py) but none of this project's own dependencies.
#
#   bash bench/device_wheels.sh --python 3.12 --dest .whl
#
# On the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/.whl:$PWD          # .whl/topolosses: the Betti-matching module alone
# (bench/gpu_check.sh --device does exactly this). Only binary wheels for manylinux x86_64 are taken,
# --no-deps, at the versions pyproject.toml pins; from topolosses (86 MB) only its compiled
# Betti-matching module (< 1 MB) is kept, under .whl/topolosses/losses/betti_matching/src/.
set -euo pipefail
PYV=3.12
DEST=.whl
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PYV="$2"; shift 2 ;;
        --dest) DEST="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
TAG="cp${PYV/./}"
PACKAGES=(
    monai==1.6.1 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0 edt==3.1.2 connected-components-3d==4.1.1
    surface-distance==0.1 imagecodecs==2026.3.6 dynamic-network-architectures==0.4.4 batchgeneratorsv2==0.3.6
)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/vesuvius-device-wheels/$TAG"
mkdir -p "$DEST" "$CACHE"
download() {  # every manylinux tag pip must be told of, matched exactly
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$1" "$2" 2>&1 | grep -v "^WARNING: Location" || true
}
for p in "${PACKAGES[@]}"; do
    download "$DEST" "$p"
    name="${p%%==*}"
    ls "$DEST" | grep -qi "^${name//-/_}-\|^${name}-" || { echo "ERROR: no $TAG wheel of $p for manylinux x86_64" >&2; exit 1; }
done
# topolosses: only the compiled module (its wheel is 86 MB; its __init__ would import torchvision)
download "$CACHE" topolosses==0.2.0
wheel=$(ls "$CACHE"/topolosses-0.2.0-*"$TAG"*.whl 2>/dev/null | head -n 1)
[ -n "$wheel" ] || { echo "ERROR: no $TAG wheel of topolosses==0.2.0" >&2; exit 1; }
python3 - "$wheel" "$DEST" <<'EOF'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("topolosses/losses/betti_matching/src/betti_matching") and n.endswith(".so")]
    if not names:
        sys.exit(f"ERROR: {wheel} holds no compiled betti_matching module")
    for n in names:
        z.extract(n, dest)
print(f"kept {', '.join(names)} from {wheel.rsplit('/', 1)[-1]}")
EOF
du -sh "$DEST" | awk '{print "wheels in " $2 ": " $1}'
ls -1 "$DEST"
