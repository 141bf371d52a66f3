"""Bitwise determinism across processes (issue 13.1): a process that compiles the cpu kernels
and a process that loads them from Numba's cache give the same bits, serial and parallel alike
(two subprocesses sharing a fresh ``NUMBA_CACHE_DIR``). The problems are test_determinism's."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fastbn
from test_determinism import CASES, IDS, _assert_same_bits

_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from numba.core.dispatcher import Dispatcher
    sys.path[:0] = [sys.argv[3], sys.argv[2]]      # the package copy, then the tests
    import fastbn
    from fastbn import _config
    from fastbn.backends import cpu
    import test_determinism as t
    import test_cache_processes as c
    assert fastbn.__file__.startswith(sys.argv[3]), fastbn.__file__

    results = {}
    for config, threshold in (("parallel", 0), ("serial", 1 << 62)):
        _config.CPU_PARALLEL_MIN_SIZE = threshold
        for dtype in ("float32", "float64"):
            for (shape, axis), label in zip(c.SUBPROCESS_CASES, c.SUBPROCESS_IDS):
                problem = t._problem(shape, axis, dtype)
                for name, a in t._core_outputs(*problem, axis).items():
                    results[f"{config} {dtype} {label} {name}"] = np.ascontiguousarray(a)
    np.savez(sys.argv[1], **results)

    def dispatchers():
        for value in vars(cpu).values():
            for item in (value if isinstance(value, tuple) else (value,)):
                if isinstance(item, Dispatcher):
                    yield item
    print(json.dumps({"hits": sum(sum(d._cache_hits.values()) for d in dispatchers()),
                      "misses": sum(sum(d._cache_misses.values()) for d in dispatchers())}))
""")
# the splits with the most merges, channels-last rows, and one channels-last channel (one long run)
SUBPROCESS_CASES = [CASES[0], CASES[1], CASES[5], CASES[6], ((40000, 1), 1)]
SUBPROCESS_IDS = [IDS[0], IDS[1], IDS[5], IDS[6], "one-run"]


@pytest.mark.slow
def test_compiling_and_cache_loading_processes_give_the_same_bits(tmp_path):
    """Issue 13.1: the first process compiles every kernel into an empty NUMBA_CACHE_DIR, the
    second loads them from it; y, dx, dgamma, dbeta, mean, invstd (and the rest) must have the
    same bits in both, serial and parallel alike. Both run a copy of the package, so that the
    cache cannot be invalidated by an edit of the checkout while they run."""
    source = tmp_path / "src"
    shutil.copytree(Path(fastbn.__file__).parent, source / "fastbn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), PYTHONUNBUFFERED="1")
    env.pop("FASTBN_NO_CACHE", None)
    env.pop("NUMBA_DISABLE_JIT", None)
    runs = []
    for run in ("compile", "load"):
        saved = tmp_path / f"{run}.npz"
        done = subprocess.run([sys.executable, "-c", _CHILD, str(saved),
                               str(Path(__file__).parent), str(source)], capture_output=True,
                              text=True, env=env, timeout=1200)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        counts = json.loads(done.stdout.strip().splitlines()[-1])
        with np.load(saved) as data:
            runs.append((counts, {name: data[name] for name in data.files}))
    (compiled_counts, compiled), (loaded_counts, loaded) = runs
    assert compiled_counts["misses"] > 0 and compiled_counts["hits"] == 0, compiled_counts
    assert loaded_counts["hits"] > 0, loaded_counts     # the second process did use the cache
    assert set(loaded) == set(compiled)
    _assert_same_bits(loaded, compiled, "cache-loading process vs compiling process")
    serial = {k.replace("serial ", "", 1): v for k, v in compiled.items() if k.startswith("serial")}
    parallel = {k.replace("parallel ", "", 1): v for k, v in loaded.items()
                if k.startswith("parallel")}
    _assert_same_bits(parallel, serial, "cached parallel kernels vs compiled serial kernels")
