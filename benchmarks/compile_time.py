"""First-call latency: with an empty Numba cache (cold: compilation) and from the cache, and the
``fastbn.warmup()`` helper. Every measurement runs in a fresh Python process whose
NUMBA_CACHE_DIR is a temporary directory, so nothing else's cache is touched or reused.

    python -m benchmarks.compile_time            # prints JSON
"""
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
start = time.perf_counter()
import numpy as np
import fastbn
result = {"import_s": time.perf_counter() - start}
mode = sys.argv[1]
if mode == "warmup":
    start = time.perf_counter()
    fastbn.warmup()
    result["warmup_s"] = time.perf_counter() - start
    mode = "ops"                       # and then the first calls after warmup()
if mode == "ops":
    rng = np.random.default_rng(0)
    for label, shape, axis in (("NCHW parallel", (8, 16, 30, 30), 1),
                               ("NHWC parallel", (8, 30, 30, 16), -1),
                               ("NC serial", (60, 100), 1)):
        x = rng.standard_normal(shape).astype(np.float32)
        c = shape[axis]
        timings = {}
        start = time.perf_counter()
        out = fastbn.batch_norm_forward(x, axis=axis, running_mean=np.zeros(c, np.float32),
                                        running_var=np.ones(c, np.float32))
        timings["fwd-train"] = time.perf_counter() - start
        start = time.perf_counter()
        fastbn.batch_norm_forward(x, axis=axis, training=False, running_mean=out.mean,
                                  running_var=np.ones(c, np.float32))
        timings["eval"] = time.perf_counter() - start
        start = time.perf_counter()
        fastbn.batch_norm_backward(x, x, out.mean, out.invstd, axis=axis)
        timings["backward"] = time.perf_counter() - start
        start = time.perf_counter()
        fastbn.moments(x, axis=axis)
        timings["moments"] = time.perf_counter() - start
        result[label] = timings
print("RESULT " + json.dumps(result))
"""


def child(mode, cache_dir=None):
    """Run the measurement in a fresh process ("ops": first calls; "warmup": warmup(), then first
    calls); cache_dir None keeps the caller's Numba cache."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    env.pop("FASTBN_NO_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, capture_output=True,
                          text=True, check=True)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def measure():
    """{"first_call": {"cold": ..., "cached": ...}, "warmup": {"cold": ..., "cached": ...}}"""
    out = {}
    for mode in ("ops", "warmup"):
        with tempfile.TemporaryDirectory(prefix="fastbn-numba-cache-") as cache_dir:
            cold = child(mode, cache_dir)        # empty cache: compiles and writes the cache
            cached = child(mode, cache_dir)      # a new process loading from that cache
        out["first_call" if mode == "ops" else "warmup"] = {"cold": cold, "cached": cached}
    return out


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
