"""Shared by the tests that launch ``mpiexec``: where it is, why MPI tests are skipped, and a
launcher with a timeout, so that a rank waiting forever fails the test instead of hanging the
suite.

Every rank of a launch compiles the kernels it needs when Numba's cache is cold (minutes on a
small machine, several ranks at once). So that the timeout measures a hang and not a cold cache,
the first launch of a session first warms the cache in one process (``fastbn.warmup()``, with
its own generous limit), and each launch then gets TIMEOUT_S."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 300          # per launch, once the cache is warm
WARMUP_TIMEOUT_S = 1500  # fastbn.warmup() on an empty cache compiles every kernel (~4 min here)
_warm = False


def _find_mpiexec():
    # the mpiexec of the running environment first (the pip mpich wheel puts it there)
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    return shutil.which("mpiexec")


MPIEXEC = _find_mpiexec()
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
MPI_SKIP_REASON = None
if not HAVE_MPI4PY:
    MPI_SKIP_REASON = 'mpi4py is not installed (pip install "fastbn[mpi]")'
elif MPIEXEC is None:
    MPI_SKIP_REASON = ('no mpiexec next to the Python interpreter or on PATH '
                       '(pip install "fastbn[mpi]")')
needs_mpi = pytest.mark.skipif(MPI_SKIP_REASON is not None, reason=MPI_SKIP_REASON or "")
needs_mpi4py = pytest.mark.skipif(not HAVE_MPI4PY,
                                  reason='mpi4py is not installed (pip install "fastbn[mpi]")')


def warm_numba_cache(env):
    """Compile (or load) every cpu kernel once, in one process, before ranks need them."""
    global _warm
    if _warm:
        return
    code = "import fastbn; fastbn.warmup(); print('warm')"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=WARMUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"warming Numba's cache (fastbn.warmup()) took over {WARMUP_TIMEOUT_S} s")
    if done.returncode != 0:
        pytest.fail(f"warming Numba's cache failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    _warm = True


def launch(cmd, *, env=None, timeout=TIMEOUT_S):
    """Run ``cmd`` (stderr into stdout) in its own process group; returns (returncode,
    output). Past ``timeout`` the whole group is killed and the test fails with the output.
    The first call of a session warms Numba's cache first (not counted in ``timeout``)."""
    # one thread per rank: the ranks already oversubscribe small machines
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               **(env or {}))
    warm_numba_cache(env)
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s (a rank is waiting "
                    f"forever?); output:\n{output[-4000:]}")
    return proc.returncode, output
