"""Cold start: the first calls in a fresh process, with an empty Numba cache and from the cache.

For each (layout, dtype) a new Python process with an empty ``NUMBA_CACHE_DIR`` times
``import fastbn`` and then the first fwd-train, backward and eval (and moments) on a tensor of
that layout: every kernel those calls need is compiled and written to the cache. A second
process with the same cache directory repeats it: the kernels load from the cache. The same for
``fastbn.warmup()``, followed by the first calls after it. Nothing outside the temporary cache
directories is read or written.

    python -m benchmarks.cold_start                      # prints JSON
    python -m benchmarks.cold_start --layouts NCHW --dtypes float32 --no-warmup
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

LAYOUTS = {            # shape (a medium tensor of each layout), axis
    "NCHW": ((8, 16, 30, 30), 1),
    "NHWC": ((8, 30, 30, 16), -1),
    "NC": ((256, 512), 1),
}
DTYPES = ("float16", "float32", "float64")
FIRST_CALLS = ("fwd-train", "backward", "eval")      # the goal's sum; moments is extra

_CHILD = r"""
import json, sys, time
start = time.perf_counter()
import numpy as np
numpy_s = time.perf_counter() - start
import fastbn
result = {"import_numpy_s": numpy_s, "import_s": time.perf_counter() - start}
mode, layouts, dtype = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
if mode == "warmup":
    begin = time.perf_counter()
    fastbn.warmup()
    result["warmup_s"] = time.perf_counter() - begin
for layout, (shape, axis) in layouts.items():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    stats = np.float64 if dtype == "float64" else np.float32
    gamma, beta = np.ones(c, stats), np.zeros(c, stats)
    running_mean, running_var = np.zeros(c, stats), np.ones(c, stats)
    timings = {}
    begin = time.perf_counter()
    out = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=running_mean,
                                    running_var=running_var)
    timings["fwd-train"] = time.perf_counter() - begin
    begin = time.perf_counter()
    fastbn.batch_norm_backward(dy, x, out.mean, out.invstd, gamma, axis=axis)
    timings["backward"] = time.perf_counter() - begin
    begin = time.perf_counter()
    fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=False,
                              running_mean=running_mean, running_var=running_var)
    timings["eval"] = time.perf_counter() - begin
    begin = time.perf_counter()
    fastbn.moments(x, axis=axis)
    timings["moments"] = time.perf_counter() - begin
    result[layout] = timings
print("RESULT " + json.dumps(result))
"""


def child(mode, layouts, dtype, cache_dir, timeout=None):
    """One fresh process: mode "ops" (first calls) or "warmup" (warmup(), then first calls),
    with NUMBA_CACHE_DIR=cache_dir (None: the caller's cache, as the smoke test runs it). Adds
    the process's wall time. Past ``timeout`` seconds the process is stopped and the result says
    so ({"timed_out_s": timeout})."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    env.pop("FASTBN_NO_CACHE", None)
    shapes = {name: LAYOUTS[name] for name in layouts}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, mode, json.dumps(shapes), dtype],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timed_out_s": timeout, "process_wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child ({mode}, {layouts}, {dtype}) failed:\n"
                           f"{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result["process_wall_s"] = wall
    return result


def first_calls_s(result, layout):
    """import fastbn + the first fwd-train, backward and eval (the issue's goal)."""
    return result["import_s"] + sum(result[layout][op] for op in FIRST_CALLS)


def measure(layouts=tuple(LAYOUTS), dtypes=DTYPES, warmup=True, log=print,
            warmup_timeout=480):
    """{"per_layout_dtype": [{layout, dtype, cold, cached}], "warmup": {cold, cached}}; each
    cold run gets its own empty cache, so nothing one combination compiled serves another."""
    out = {"per_layout_dtype": [], "shapes": {k: LAYOUTS[k] for k in layouts}}
    for layout in layouts:
        for dtype in dtypes:
            with tempfile.TemporaryDirectory(prefix="fastbn-numba-cache-") as cache_dir:
                cold = child("ops", [layout], dtype, cache_dir)
                cached = child("ops", [layout], dtype, cache_dir)
            entry = {"layout": layout, "dtype": dtype, "cold": cold, "cached": cached,
                     "cold_first_calls_s": first_calls_s(cold, layout),
                     "cached_first_calls_s": first_calls_s(cached, layout)}
            out["per_layout_dtype"].append(entry)
            log(f"cold start {layout} {dtype}: empty cache {entry['cold_first_calls_s']:.3f} s, "
                f"from the cache {entry['cached_first_calls_s']:.3f} s "
                f"(process {cold['process_wall_s']:.2f} / {cached['process_wall_s']:.2f} s)")
    if warmup:
        with tempfile.TemporaryDirectory(prefix="fastbn-numba-cache-") as cache_dir:
            cold = child("warmup", list(layouts), "float32", cache_dir, warmup_timeout)
            if "timed_out_s" in cold:
                out["warmup"] = {"cold": cold, "cached": None}
                log(f"fastbn.warmup(): stopped after {warmup_timeout} s with an empty cache")
                return out
            cached = child("warmup", list(layouts), "float32", cache_dir, warmup_timeout)
        out["warmup"] = {"cold": cold, "cached": cached}
        log(f"fastbn.warmup(): empty cache {cold['warmup_s']:.2f} s, "
            f"from the cache {cached['warmup_s']:.2f} s")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    from .bench_cpu import machine
    result = {"machine": machine(),
              **measure(args.layouts, args.dtypes, not args.no_warmup,
                        log=lambda s: print(s, file=sys.stderr))}
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
