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

# Three lanes run side by side. The cpu lanes are mostly Numba compiling, one core each; the
# simulator lane is Python threads on the GIL. Lane 1 holds the kernel suites (they compile
# most of the kernels and share them); lane 2 every other test file (the list is computed, so
# a new test file cannot be left out); lane 3 the cuda backend under numba's simulator. They
# share one Numba cache (writes are atomic renames: a kernel compiled by both lanes at once is
# only compiled twice). Lanes 2 and 3 are shown after lane 1.
kernel_suites="tests/test_backends.py tests/test_fused.py tests/test_invariants.py
  tests/test_errors.py tests/test_contract.py tests/test_cpu_kernels.py tests/test_determinism.py
  tests/test_reference.py tests/test_stats.py tests/test_direct.py"
# lane 2 starts with test_cuda.py (its PTX test compiles for the GPU, no cpu kernel), so that
# lane 1 has compiled and cached the common cpu kernels by the time lane 2's tests call them
other_files="tests/test_cuda.py"
for f in tests/test_*.py; do
  [ "$f" = tests/test_cuda.py ] && continue
  case " $(echo $kernel_suites) " in *" $f "*) ;; *) other_files="$other_files $f" ;; esac
done
lane2_log="$(mktemp)"
lane3_log="$(mktemp)"
python -m pytest -q --durations=30 $other_files > "$lane2_log" 2>&1 &
lane2_pid=$!
FASTBN_TEST_BACKENDS=cuda NUMBA_ENABLE_CUDASIM=1 python -m pytest -q -m "not gpu" \
  --durations=10 tests/test_backends.py tests/test_errors.py tests/test_fused.py \
  tests/test_invariants.py tests/test_contract.py tests/test_cuda.py > "$lane3_log" 2>&1 &
lane3_pid=$!
echo "== lane 1: reference + cpu kernel suites =="
lane1_status=0
python -m pytest -q --durations=30 $kernel_suites || lane1_status=$?
lane2_status=0
wait "$lane2_pid" || lane2_status=$?
echo "== lane 2: api, trainer, MPI, torch adapter, pool, cli, benchmarks smoke (cpu) =="
cat "$lane2_log"
lane3_status=0
wait "$lane3_pid" || lane3_status=$?
echo "== lane 3: cuda backend under numba's simulator (NUMBA_ENABLE_CUDASIM=1) =="
cat "$lane3_log"
rm -f "$lane2_log" "$lane3_log"
echo "run_all: lane 1 exit $lane1_status, lane 2 exit $lane2_status, lane 3 exit $lane3_status"
[ "$lane1_status" -eq 0 ] && [ "$lane2_status" -eq 0 ] && [ "$lane3_status" -eq 0 ]
