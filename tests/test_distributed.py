"""fastbn.distributed: synchronized batch norm over MPI.

The MPI checks run the scripts in tests/mpi/ under ``mpiexec -n 2`` and ``-n 3`` (oversubscribed
on small machines: they are kept tiny). Each launch has a timeout, so a hang fails the test
instead of blocking the suite. Skipped, with the reason, when mpi4py or mpiexec is missing
(``pip install "fastbn[mpi]"`` provides both).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given

import fastbn
from _cases import bn_cases, tolerance
from _mpi import MPIEXEC, TIMEOUT_S, launch, needs_mpi
from fastbn import distributed
from fastbn.distributed import shard_bounds

HERE = Path(__file__).parent
MPI_SCRIPTS = HERE / "mpi"


def run_mpi(ranks, script, *args, abort_on_exception=True, env=None):
    """Launch ``mpiexec -n ranks python [-m mpi4py] script args``; returns (returncode, output).

    ``-m mpi4py`` aborts the job on an uncaught exception in a test script (so a broken check
    cannot leave ranks waiting); the failure tests run without it, to show that fastbn itself
    does not leave ranks waiting.
    """
    python = [sys.executable, "-m", "mpi4py"] if abort_on_exception else [sys.executable]
    return launch([MPIEXEC, "-n", str(ranks), *python, str(MPI_SCRIPTS / script), *args],
                  env=env)


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_matches_single_process_on_the_concatenated_batch(ranks):
    """Forward (y, mean, invstd, running stats) and backward (dx, dgamma, dbeta) against
    single-process fastbn, NCHW / NHWC / (N, C), float32 / float64, cpu and reference backends,
    skewed shards with a zero-row and a one-row rank; statistics equal bit for bit on every
    rank; eval without communication; allreduce_moments; allreduce_sum_; shard."""
    returncode, output = run_mpi(ranks, "check_sync.py")
    assert returncode == 0, output[-6000:]
    assert f"check_sync: {ranks} ranks, 0 failures" in output


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_bad_input_on_one_rank_raises_on_every_rank(ranks):
    """Bad input on some ranks, and disagreements (channels, dtype, eps, shapes) across ranks:
    every rank raises an error naming the failing rank, state stays untouched, and the
    communicator keeps working."""
    returncode, output = run_mpi(ranks, "check_failures.py", "caught")
    assert returncode == 0, output[-6000:]
    assert f"check_failures caught: {ranks} ranks, 0 failures" in output


@needs_mpi
@pytest.mark.mpi
def test_uncaught_error_ends_every_rank():
    returncode, output = run_mpi(2, "check_failures.py", "uncaught", abort_on_exception=False)
    assert returncode != 0
    message = ("DistributedError: batch_norm_forward failed on rank 1 of 2: ValueError: gamma: "
               "expected shape (4,)")
    assert output.count(message) == 2, output[-6000:]    # one per rank
    assert "not reached" not in output


@needs_mpi
@pytest.mark.mpi
def test_unexpected_error_after_the_exchange_aborts_the_job():
    returncode, output = run_mpi(3, "check_failures.py", "abort", abort_on_exception=False)
    assert returncode != 0
    assert ("fastbn.distributed.batch_norm_forward: unexpected RuntimeError on rank 1 of 3: "
            "injected failure after the exchange") in output, output[-6000:]
    assert "aborting the MPI job" in output
    assert "not reached" not in output


@needs_mpi
@pytest.mark.mpi
@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                    reason='numba-cuda is not installed (pip install "fastbn[cuda]")')
def test_cuda_backend_under_the_simulator():
    """CUDA device arrays (statistics staged through the host) and NumPy arrays with
    backend="cuda", under numba's simulator (NUMBA_ENABLE_CUDASIM=1, set before Python starts)."""
    returncode, output = run_mpi(2, "check_cuda.py", env={"NUMBA_ENABLE_CUDASIM": "1"})
    assert returncode == 0, output[-6000:]
    assert "check_cuda: 2 ranks, 0 failures" in output


def _gpu_available():
    code = "from numba import cuda; print(cuda.is_available())"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=120, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.stdout.strip() == "True"


@needs_mpi
@pytest.mark.mpi
@pytest.mark.gpu
def test_cuda_backend_on_a_gpu():
    if importlib.util.find_spec("numba_cuda") is None or not _gpu_available():
        pytest.skip("no CUDA GPU (or numba-cuda missing)")
    returncode, output = run_mpi(2, "check_cuda.py", env={"NUMBA_ENABLE_CUDASIM": "0"})
    assert returncode == 0, output[-6000:]
    assert "check_cuda: 2 ranks, 0 failures" in output


@needs_mpi
@pytest.mark.mpi
def test_benchmark_smoke(tmp_path):
    """benchmarks/bench_mpi.py validates before it times; a tiny run checks it still works."""
    out = tmp_path / "mpi.json"
    result = subprocess.run([sys.executable, str(HERE.parent / "benchmarks" / "bench_mpi.py"),
                             "--smoke", "--ranks", "1", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine"]["cores"] and [s["ranks"] for s in results["mlp_step"]] == [1, 2]


# ----------------------------------------------------------------------------------------------
# in process, one rank (MPI.COMM_SELF): the local halves of every operation, over every layout,
# dtype and backend of the shared property cases, against the single-process reference

@pytest.fixture(scope="module")
def comm_self():
    pytest.importorskip("mpi4py", reason='mpi4py is not installed (pip install "fastbn[mpi]")')
    from mpi4py import MPI
    return MPI.COMM_SELF


@given(case=bn_cases())
def test_one_rank_matches_the_reference(backend, comm_self, case):
    x, gamma, beta, axis, dy = case
    channels = x.shape[axis]
    rm_ref, rv_ref = np.linspace(-1, 1, channels), np.linspace(0.5, 2, channels)
    rm, rv = rm_ref.copy(), rv_ref.copy()
    ref = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm_ref,
                                    running_var=rv_ref, momentum=0.3, backend="reference")
    got = distributed.batch_norm_forward(x, gamma, beta, comm=comm_self, axis=axis,
                                         running_mean=rm, running_var=rv, momentum=0.3,
                                         backend=backend)
    sdtype = fastbn.stats_dtype(x.dtype)
    assert got.y.dtype == x.dtype and got.y.shape == x.shape
    assert got.mean.dtype == sdtype and got.invstd.dtype == sdtype
    for value, want, dtype in ((got.y, ref.y, x.dtype), (got.mean, ref.mean, sdtype),
                               (got.invstd, ref.invstd, sdtype)):
        np.testing.assert_allclose(value.astype(np.float64), want.astype(np.float64),
                                   **tolerance(dtype, want))
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-9, atol=1e-9 * np.abs(rm_ref).max())
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-9)

    ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, gamma, axis=axis,
                                           backend="reference")
    grads = distributed.batch_norm_backward(dy, x, ref.mean, ref.invstd, gamma, comm=comm_self,
                                            axis=axis, backend=backend)
    assert grads.dx.dtype == x.dtype and grads.dgamma.dtype == sdtype
    for value, want, dtype in ((grads.dx, ref_grads.dx, x.dtype),
                               (grads.dgamma, ref_grads.dgamma, sdtype),
                               (grads.dbeta, ref_grads.dbeta, sdtype)):
        np.testing.assert_allclose(value.astype(np.float64), want.astype(np.float64),
                                   **tolerance(dtype, want))


def test_one_rank_bad_input_raises_and_changes_nothing(comm_self):
    x = np.random.default_rng(0).standard_normal((6, 3))
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(distributed.DistributedError, match="rank 0 of 1: ValueError: gamma") \
            as info:
        distributed.batch_norm_forward(x, np.ones(4), None, comm=comm_self, running_mean=rm,
                                       running_var=rv)
    assert isinstance(info.value.__cause__, ValueError) and info.value.failures.keys() == {0}
    assert (rm == 0).all() and (rv == 1).all()
    with pytest.raises(ValueError, match="more than 1 value per channel over all ranks"):
        distributed.batch_norm_forward(x[:1], comm=comm_self, running_mean=rm, running_var=rv)
    assert (rm == 0).all() and (rv == 1).all()
    with pytest.raises(TypeError, match="comm: expected an mpi4py communicator"):
        distributed.batch_norm_forward(x, comm="world")


def _run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def test_importing_fastbn_does_not_import_mpi4py():
    result = _run_python("import sys, fastbn, fastbn.distributed\n"
                         "assert 'mpi4py' not in sys.modules, 'mpi4py imported'\n"
                         "print('clean')")
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr


def test_missing_mpi4py_says_how_to_install():
    # sys.modules[name] = None makes "import name" raise ImportError, as if not installed
    result = _run_python(
        "import sys; sys.modules['mpi4py'] = None\n"
        "import numpy as np\n"
        "from fastbn import distributed\n"
        "x = np.arange(12.0).reshape(4, 3)\n"
        "y = distributed.batch_norm_forward(x, training=False, running_mean=np.zeros(3),\n"
        "                                   running_var=np.ones(3)).y   # eval: no MPI needed\n"
        "try:\n"
        "    distributed.batch_norm_forward(x)\n"
        "except ImportError as exc:\n"
        "    print('ImportError:', exc)\n")
    assert result.returncode == 0, result.stderr
    assert 'pip install "fastbn[mpi]"' in result.stdout


@pytest.mark.parametrize("batch", [0, 1, 2, 7, 60, 61])
@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_shard_bounds_tile_the_batch(batch, size):
    bounds = [shard_bounds(batch, rank, size) for rank in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == batch
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    lengths = [stop - start for start, stop in bounds]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)
