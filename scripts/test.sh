#!/usr/bin/env bash
# The test suite: set up if needed, then every test (multi-process ones launch horovodrun / mpirun).
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k counterexample
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup.sh
setup_s=$((SECONDS - start))
export OMP_NUM_THREADS=1 TF_CPP_MIN_LOG_LEVEL=3
status=0
.venv/bin/python -m pytest tests -q -p no:cacheprovider --durations=10 "$@" || status=$?
echo "test suite: $((SECONDS - start)) s in all: set-up $setup_s s, tests $((SECONDS - start - setup_s)) s"
exit $status
