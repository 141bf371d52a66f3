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
# The two lanes run side by side: lane 1 is mostly Numba compiling on one core, lane 2 the
# simulator on the GIL, so the second core is otherwise idle. Lane 2's output is shown after.
lane2_log="$(mktemp)"
FASTBN_TEST_BACKENDS=cuda NUMBA_ENABLE_CUDASIM=1 python -m pytest -q -m "not gpu" \
  --durations=10 tests/test_backends.py tests/test_errors.py tests/test_fused.py \
  tests/test_invariants.py tests/test_contract.py tests/test_cuda.py > "$lane2_log" 2>&1 &
lane2_pid=$!
echo "== lane 1: reference + cpu (and mpi, trainer) =="
lane1_status=0
python -m pytest -q --durations=25 || lane1_status=$?
lane2_status=0
wait "$lane2_pid" || lane2_status=$?
echo "== lane 2: cuda backend under numba's simulator (NUMBA_ENABLE_CUDASIM=1) =="
cat "$lane2_log"
rm -f "$lane2_log"
echo "run_all: lane 1 exit $lane1_status, lane 2 exit $lane2_status"
[ "$lane1_status" -eq 0 ] && [ "$lane2_status" -eq 0 ]
