#!/usr/bin/env bash
# The test suite. Fails on any failed test and on "no tests collected" (pytest exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-2}"
python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "ERROR: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
