#!/usr/bin/env bash
# Sets up (if needed) and runs every test lane. Usage: bash tests/run_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -d .venv ] || python3 -m venv .venv
  . .venv/bin/activate
fi
# PyTorch is the test oracle and the fastbn.torch dependency: its tests must run, never skip.
# torch==2.13.0 is the CPU build (a plain "torch" could pull a multi-GB CUDA build).
pip install -q "torch==2.13.0"
pip install -q -e ".[test,cuda,paper,mpi,torch]"
python -c "import torch" || { echo "run_all: PyTorch is not importable; its tests cannot run" >&2; exit 1; }
echo "== lane 1: reference + cpu (and mpi, trainer) =="
python -m pytest -q
echo "== lane 2: cuda backend under numba's simulator (NUMBA_ENABLE_CUDASIM=1) =="
FASTBN_TEST_BACKENDS=cuda NUMBA_ENABLE_CUDASIM=1 python -m pytest -q -m "not gpu" tests/test_backends.py tests/test_errors.py tests/test_fused.py tests/test_invariants.py tests/test_contract.py tests/test_cuda.py
