#!/usr/bin/env bash
# Sets up (if needed) and runs every test lane. Usage: bash tests/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
pip install -q -e ".[test,cuda,paper,mpi]"
echo "== lane 1: reference + cpu (and mpi, trainer) =="
python -m pytest -q
echo "== lane 2: cuda backend under numba's simulator (NUMBA_ENABLE_CUDASIM=1) =="
FASTBN_TEST_BACKENDS=cuda NUMBA_ENABLE_CUDASIM=1 python -m pytest -q -m "not gpu" tests/test_backends.py tests/test_errors.py tests/test_cuda.py
