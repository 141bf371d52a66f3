"""CPU benchmark: fastbn against PyTorch (same thread count), the NumPy reference and a plain copy.

    python -m benchmarks.bench_cpu --out benchmarks/results/cpu.json     # full run, updates docs
    python -m benchmarks.bench_cpu --smoke --out /tmp/smoke.json --no-docs
    python -m benchmarks.bench_cpu --render benchmarks/results/cpu.json  # tables from a JSON only
    python -m benchmarks.bench_cpu --sections small,fused --no-docs      # some sections only

Sections (``--sections``, default all): ``large`` (the ResNet-50 and MLP tensors, at the default
thread count), ``scaling`` (a case per regime at 1 and N threads), ``small`` (small and medium
tensors at 1 and 2 threads, with the per-call overhead table), ``fused`` (batch norm + residual +
relu, fused against composed), ``trainer`` (the paper network's training step with and without
BN), ``cold`` (first calls in fresh processes, empty and warm Numba cache, ``fastbn.warmup()``)
and ``tasks`` (how many parallel tasks the cpu plan gives each benchmark shape).

Method (docs/benchmarks.md): every implementation is warmed up (compiled) and validated against
the NumPy float64 reference on the case before it is timed; then the implementations are timed
in interleaved rounds (each round runs each once, so load from other processes hits all of them
alike; each sample after a short pause and an untimed call, see ``measure``) and each figure is
the median over the rounds. Every ratio compares timings from the same
rounds. fastbn and PyTorch are each timed as the default call (fresh outputs) and with
preallocated outputs. The full run rewrites the generated blocks (``<!-- bench:cpu... -->``
markers) of docs/benchmarks.md and the ``bench:cpu`` block of README.md.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import registry
from .cases import (FULL_CASES, FUSED_CASES, FUSED_OPERATIONS, OPERATIONS, SCALING_CASES,
                    SMALL_CASES, SMOKE_CASES, SMOKE_FUSED_CASES, TENSORS_MOVED, Problem)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
FIGURE_NAME = "img/cpu_thread_scaling.png"      # next to docs/benchmarks.md

TARGETS = {"fwd-train": 1.2, "eval": 1.1, "backward": 1.6}   # x copy floor, at most
TORCH_GOAL = 1.5            # default call, x PyTorch's default call, at least (issue 10 goal 1)
FRESH_GOAL = 1.15           # fresh outputs / out=, at most, on large tensors (goal 2)
OVERHEAD_GOAL_US = {"fwd-train": 4.0, "eval": 2.5, "backward": 4.0}     # (60, 100), goal 3
COLD_GOAL_S, CACHED_GOAL_S, WARMUP_GOAL_S = 1.5, 0.25, 60.0               # goal 4
SECTIONS = ("large", "scaling", "small", "fused", "trainer", "cold", "tasks")
# blocks of docs/benchmarks.md: the first three must exist; the others are written when present
REQUIRED_MARKERS = ("bench:cpu", "bench:cpu-threads", "bench:cpu-compile")
OPTIONAL_MARKERS = ("bench:cpu-small", "bench:cpu-overhead", "bench:cpu-fused",
                    "bench:cpu-trainer", "bench:cpu-tasks")


# ----------------------------------------------------------------------------------------------
# the machine

def _lscpu():
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    wanted = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
              "L1d cache", "L2 cache", "L3 cache", "CPU max MHz")
    return {k: fields[k] for k in wanted if k in fields}


def machine():
    import numba
    info = {
        "cpu": _lscpu(),
        "os_cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": None,
        "llvm_cpu": None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import llvmlite.binding as ll
        info["llvm_cpu"] = ll.get_host_cpu_name()
    except Exception:                                      # pragma: no cover
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip()
        info["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "fastbn"],
                                                cwd=ROOT, capture_output=True,
                                                text=True).stdout.strip())
    except OSError:                                        # pragma: no cover
        pass
    return info


def _threading_layer():
    import numba
    try:
        return numba.threading_layer()
    except ValueError:          # no parallel kernel has run yet
        return None


# ----------------------------------------------------------------------------------------------
# timing

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _foreign_cpu_ticks():
    """CPU time (clock ticks, all CPUs) used by other processes so far, where /proc/stat exists:
    busy time of the machine minus this process's own."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(values) - values[3] - values[4]          # all but idle and iowait
    own = os.times()
    return busy - (own.user + own.system) * _TICKS_PER_S


MAX_DISCARDED = None          # rounds thrown away per measurement, at most (None: 6 x rounds)


def measure(callables, rounds, slow=(), slow_rounds=3, min_sample_s=2e-3, max_foreign=0.1,
            settle_s=0.02):
    """Interleaved rounds: each round times every callable once (a callable shorter than
    min_sample_s is repeated inside its sample), so load from elsewhere hits all of them alike.
    Each callable's sample starts after a pause of ``settle_s`` and one untimed call:
    PyTorch's and Numba's OpenMP threads keep spinning on the cores for a while after a
    parallel call, and whatever was timed next paid for it (two identical fastbn.moments calls,
    one timed after the numba copy and one after the other, differed 2.2x at 2 threads); the
    untimed call then brings the callable's own threads and data back from the pause.

    On a shared machine a round during which other processes used more than ``max_foreign``
    of the machine's CPU time is discarded and run again after a pause (at most ``6 * rounds``
    extra rounds; the count is reported). Returns {name: {"median_s", "min_s", "n", ...}}."""
    repeats = {}
    for name, fn in callables.items():
        fn()
        start = time.perf_counter()
        fn()
        once = max(time.perf_counter() - start, 1e-9)
        repeats[name] = max(1, min(1000, math.ceil(min_sample_s / once)))
    samples = {name: [] for name in callables}
    ncpu = os.cpu_count() or 1
    kept = discarded = 0
    while kept < rounds:
        foreign_before, wall_before = _foreign_cpu_ticks(), time.perf_counter()
        this_round = {}
        for name, fn in callables.items():
            if name in slow and kept >= slow_rounds:
                continue
            n = repeats[name]
            time.sleep(settle_s)
            fn()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            this_round[name] = (time.perf_counter() - start) / n
        foreign_after = _foreign_cpu_ticks()
        most = 6 * rounds if MAX_DISCARDED is None else MAX_DISCARDED
        if foreign_before is not None and discarded < most:
            capacity = (time.perf_counter() - wall_before) * _TICKS_PER_S * ncpu
            if foreign_after - foreign_before > 1 + max_foreign * capacity:
                discarded += 1
                time.sleep(0.5)         # let the other job's burst pass
                continue
        kept += 1
        for name, t in this_round.items():
            samples[name].append(t)
    return {name: {"median_s": float(np.median(s)), "min_s": float(np.min(s)), "n": len(s),
                   "repeats": repeats[name], "discarded_rounds": discarded}
            for name, s in samples.items()}


def _snapshot(outputs):
    return tuple(None if o is None else np.array(o, copy=True) for o in outputs)


def run_case(case, impls, rounds, ops=OPERATIONS, slow_rounds=3, section="large"):
    """Validate then time every implementation on every operation of one case (an
    implementation takes part in the operations it offers; ``reference`` must offer each)."""
    problem = Problem.make(case)
    prepared = {name: impl.prepare(problem, ops) for name, impl in impls.items()}
    rows = []
    for op in ops:
        offered = {name: of[op] for name, of in prepared.items() if op in of}
        if "reference" not in offered:
            print(f"{case.label} {op}: the reference does not offer it; skipped", flush=True)
            continue
        reference = _snapshot(offered["reference"]())
        errors, valid = {}, {}
        for name, fn in offered.items():
            err = registry.validate(name, op, fn(), reference, problem)
            errors[name] = err
            if err <= 1.0:
                valid[name] = fn
        load_before = os.getloadavg()[0]
        timings = measure(valid, rounds, slow=[n for n in valid if impls[n].slow],
                          slow_rounds=slow_rounds)
        row = {"section": section, "case": case.name, "shape": list(case.shape),
               "layout": case.layout, "dtype": case.dtype, "label": case.label, "op": op,
               "bytes": case.bytes_moved(op), "copy_bytes": 2 * case.nbytes,
               "threads": registry.num_threads(),
               "load_avg_1min": [load_before, os.getloadavg()[0]],
               "timings": timings,
               "validation_error": {k: (None if not math.isfinite(v) else v)
                                    for k, v in errors.items()},
               "invalid": sorted(n for n in offered if n not in valid)}
        row.update(_ratios(row))
        rows.append(row)
        print(_row_text(row), flush=True)
    return rows


def _ratio(a, b):
    return a / b if a and b else None


def _ratios(row):
    t = {name: v["median_s"] for name, v in row["timings"].items()}
    floor = [t[n] for n in registry.COPY_FLOOR if n in t]
    copy = min(floor) if floor else None
    fresh, out = t.get("fastbn"), t.get("fastbn-out")
    kernel = out or fresh
    return {
        "copy_floor_s": copy,
        # the kernel (out= call) against the floor: what the x-copy targets are about
        "x_copy": _ratio(kernel, copy),
        "x_copy_fresh": _ratio(fresh, copy),
        # against the op's own bytes at the copy's bandwidth (a copy moves 2 tensors)
        "x_floor": _ratio(kernel, copy and copy * TENSORS_MOVED[row["op"]] / 2),
        "fresh_over_out": _ratio(fresh, out),
        "x_torch": _ratio(t.get("torch"), fresh),
        "x_torch_out": _ratio(t.get("torch-out"), out),
        "torch_x_copy": _ratio(t.get("torch-out") or t.get("torch"), copy),
        "x_reference": _ratio(t.get("reference"), fresh),
        "x_composed": _ratio(t.get("fastbn-composed"), fresh),
        "gbps": row["bytes"] / fresh / 1e9 if fresh else None,
        "gbps_out": row["bytes"] / out / 1e9 if out else None,
    }


def _row_text(row):
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    t = row["timings"]
    fresh = t.get("fastbn", {}).get("median_s")
    out = t.get("fastbn-out", {}).get("median_s")
    return (f"{row['threads']}t {row['label']:30s} {row['op']:13s} fastbn "
            f"{f(fresh and fresh * 1e3, '8.3f')} ms (out= {f(out and out * 1e3, '8.3f')})  "
            f"x copy {f(row['x_copy'], '5.2f')}  x torch {f(row['x_torch'], '5.2f')} "
            f"(out= {f(row['x_torch_out'], '5.2f')})"
            + (f"  x composed {f(row['x_composed'], '5.2f')}" if row["x_composed"] else "")
            + f"  (load {row['load_avg_1min'][0]:.1f})"
            + (f"  INVALID {row['invalid']}" if row["invalid"] else ""))


def run_at_threads(cases, impls, rounds, thread_counts, ops=OPERATIONS, section="scaling",
                   slow_rounds=1):
    """Every case at each thread count (numba and PyTorch alike)."""
    saved = registry.num_threads()
    rows = []
    try:
        for threads in thread_counts:
            registry.set_num_threads(threads)
            for case in cases:
                rows += run_case(case, impls, rounds, ops=ops, slow_rounds=slow_rounds,
                                 section=section)
    finally:
        registry.set_num_threads(saved)
    return rows


def run_scaling(cases, impls, rounds, thread_counts):
    """fastbn, PyTorch and the copy floor at each thread count."""
    return run_at_threads(cases, impls, rounds, thread_counts)


# ----------------------------------------------------------------------------------------------
# the paper network's training step, and the cpu plan's task counts

def run_trainer(thread_counts, steps, repeats):
    from . import bench_trainer
    rows = []
    for threads in thread_counts:
        for r in bench_trainer.run(threads, steps, repeats):
            rows.append({"threads": threads, **r})
            print(f"trainer {threads}t {r['network']:10s} fastbn {r['fastbn_ms_per_step']:.3f} "
                  f"ms/step, torch {r['torch_ms_per_step']:.3f} ms/step", flush=True)
    return rows


# the contract's names of the benchmark operations
CONTRACT_OPS = {"fwd-train": "forward_train", "eval": "forward_eval", "backward": "backward",
                "moments": "moments"}
MANY_CORES = 64               # goal 5: a large tensor offers this many tasks
LARGE_ELEMENTS = 1 << 20


def canonical_shape(case):
    """The (outer, C, inner) view fastbn's kernels see for a case."""
    n, c, *spatial = case.shape
    inner = math.prod(spatial)
    if case.layout in ("NHWC", "NHWC-view"):
        return (n * inner, c, 1)
    return (n, c, inner)


def task_counts(cases):
    """({label: {op: tasks}}, None) from the cpu backend's own plan
    (``fastbn.backends.cpu.plan_tasks``), or (None, why not)."""
    from fastbn.backends import cpu
    plan_tasks = getattr(cpu, "plan_tasks", None)
    if plan_tasks is None:
        return None, "fastbn.backends.cpu has no plan_tasks(shape3, itemsize, op); no task counts"
    table = {}
    for case in cases:
        shape3 = canonical_shape(case)
        itemsize = np.dtype(case.dtype).itemsize
        table[case.label] = {"shape3": list(shape3), "elements": case.size,
                             **{op: int(plan_tasks(shape3, itemsize, CONTRACT_OPS[op]))
                                for op in OPERATIONS}}
    return table, None


# ----------------------------------------------------------------------------------------------
# tables

def _fmt(v, fmt, suffix=""):
    return "–" if v is None else format(v, fmt) + suffix


def _mark_above(v, limit):
    return "" if v is None or limit is None or v <= limit else " ⚠"


def _mark_below(v, limit):
    return "" if v is None or limit is None or v >= limit else " ⚠"


def _time(t, unit):
    if t is None:
        return "–"
    return f"{t * 1e6:.1f} µs" if unit == "us" else f"{t * 1e3:.3f} ms"


def _t(row, name):
    return row["timings"].get(name, {}).get("median_s")


def full_table(rows):
    lines = ["| case | operation | fastbn | fastbn out= | fresh ÷ out= | × copy floor (out=) "
             "| PyTorch × copy | × PyTorch | × PyTorch (both out=) | × NumPy ref |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['op']} | {_time(_t(r, 'fastbn'), 'ms')} | "
            f"{_time(_t(r, 'fastbn-out'), 'ms')} | "
            f"{_fmt(r['fresh_over_out'], '.2f')}{_mark_above(r['fresh_over_out'], FRESH_GOAL)} | "
            f"{_fmt(r['x_copy'], '.2f')}{_mark_above(r['x_copy'], TARGETS.get(r['op']))} | "
            f"{_fmt(r['torch_x_copy'], '.2f')} | "
            f"{_fmt(r['x_torch'], '.2f', 'x')}{_mark_below(r['x_torch'], TORCH_GOAL)} | "
            f"{_fmt(r['x_torch_out'], '.2f', 'x')} | {_fmt(r['x_reference'], '.1f', 'x')} |")
    return "\n".join(lines)


def summary_table(rows):
    """One line per case: × PyTorch (default calls) per operation, × copy floor, fresh ÷ out=."""
    by_case = {}
    for r in rows:
        by_case.setdefault(r["label"], {})[r["op"]] = r
    copy_ops = ("fwd-train", "eval", "backward")
    head = ("| case | " + " | ".join(f"{op} × torch" for op in OPERATIONS) + " | "
            + " | ".join(f"{op} × copy" for op in copy_ops) + " | fresh ÷ out= fwd / bwd |")
    lines = [head, "|---|" + "---:|" * (len(OPERATIONS) + len(copy_ops) + 1)]
    for label, ops in by_case.items():
        cells = []
        for op in OPERATIONS:
            r = ops.get(op)
            v = r and r["x_torch"]
            cells.append(_fmt(v, ".1f", "x") + _mark_below(v, TORCH_GOAL))
        for op in copy_ops:
            r = ops.get(op)
            v = r and r["x_copy"]
            cells.append(_fmt(v, ".2f") + _mark_above(v, TARGETS.get(op)))
        fresh = [ops.get(op) and ops[op]["fresh_over_out"] for op in ("fwd-train", "backward")]
        cells.append(" / ".join(_fmt(v, ".2f") + _mark_above(v, FRESH_GOAL) for v in fresh))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def small_table(rows):
    lines = ["| case | threads | operation | fastbn | fastbn out= | PyTorch | PyTorch out= "
             "| × PyTorch | × PyTorch (both out=) | × NumPy ref | × copy floor (out=) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['threads']} | {r['op']} | {_time(_t(r, 'fastbn'), 'us')} | "
            f"{_time(_t(r, 'fastbn-out'), 'us')} | {_time(_t(r, 'torch'), 'us')} | "
            f"{_time(_t(r, 'torch-out'), 'us')} | "
            f"{_fmt(r['x_torch'], '.2f', 'x')}{_mark_below(r['x_torch'], TORCH_GOAL)} | "
            f"{_fmt(r['x_torch_out'], '.2f', 'x')} | {_fmt(r['x_reference'], '.1f', 'x')} | "
            f"{_fmt(r['x_copy'], '.1f')} |")
    return "\n".join(lines)


def small_summary(rows, dtype="float32"):
    """README: × PyTorch (default calls) per operation and thread count, one dtype."""
    by = {}
    for r in rows:
        if r["dtype"] == dtype:
            by.setdefault((r["label"], r["threads"]), {})[r["op"]] = r
    lines = ["| case | threads | " + " | ".join(f"{op} × torch" for op in OPERATIONS) + " |",
             "|---|---:|" + "---:|" * len(OPERATIONS)]
    for (label, threads), ops in by.items():
        cells = []
        for op in OPERATIONS:
            v = ops.get(op) and ops[op]["x_torch"]
            cells.append(_fmt(v, ".2f", "x") + _mark_below(v, TORCH_GOAL))
        lines.append(f"| {label} | {threads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead_table(rows, label="60×100 NC float32", threads=1):
    picked = [r for r in rows if r["label"] == label and r["threads"] == threads]
    if not picked:
        return "(no per-call overhead data)"
    lines = [f"Per call on {label.replace(' NC', ', NC,')}, {threads} thread (µs, median):", "",
             "| operation | fastbn | fastbn out= | PyTorch | PyTorch out= | goal (fastbn) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in picked:
        goal = OVERHEAD_GOAL_US.get(r["op"])
        fresh = _t(r, "fastbn")
        verdict = "–" if goal is None else (
            f"≤ {goal} µs: " + ("met" if fresh is not None and fresh * 1e6 <= goal
                                else "**missed**"))
        lines.append(f"| {r['op']} | {_time(fresh, 'us')} | {_time(_t(r, 'fastbn-out'), 'us')} | "
                     f"{_time(_t(r, 'torch'), 'us')} | {_time(_t(r, 'torch-out'), 'us')} | "
                     f"{verdict} |")
    return "\n".join(lines)


def fused_table(rows):
    lines = ["| case | operation | fastbn fused | fused out= | fastbn composed | PyTorch composed "
             "| × composed | × PyTorch | × floor (out=) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['op']} | {_time(_t(r, 'fastbn'), 'ms')} | "
            f"{_time(_t(r, 'fastbn-out'), 'ms')} | {_time(_t(r, 'fastbn-composed'), 'ms')} | "
            f"{_time(_t(r, 'torch'), 'ms')} | {_fmt(r['x_composed'], '.2f', 'x')} | "
            f"{_fmt(r['x_torch'], '.2f', 'x')} | {_fmt(r['x_floor'], '.2f')} |")
    return "\n".join(lines)


def trainer_table(rows):
    if not rows:
        return "(no trainer data)"
    lines = ["| threads | network | fastbn ms/step | PyTorch ms/step | × PyTorch |",
             "|---:|---|---:|---:|---:|"]
    by = {}
    for r in rows:
        by.setdefault(r["threads"], {})[r["network"]] = r
        lines.append(f"| {r['threads']} | {r['network']} | {r['fastbn_ms_per_step']:.3f} | "
                     f"{r['torch_ms_per_step']:.3f} | {r['ratio']:.2f}x |")
    notes = []
    for threads, nets in by.items():
        if "with BN" in nets and "without BN" in nets:
            ours = nets["with BN"]["fastbn_ms_per_step"] / nets["without BN"]["fastbn_ms_per_step"]
            theirs = nets["with BN"]["torch_ms_per_step"] / nets["without BN"]["torch_ms_per_step"]
            notes.append(f"* {threads} thread{'s' if threads > 1 else ''}: the step with BN "
                         f"takes {ours:.2f}× the step without BN in fastbn (goal ≤ 1.2: "
                         f"{'met' if ours <= 1.2 else '**missed**'}), {theirs:.2f}× in PyTorch.")
    return "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "")


def cold_table(cold):
    if not cold:
        return "(no cold-start data)"
    lines = ["| layout | dtype | empty cache: import | fwd-train | backward | eval "
             f"| sum (goal ≤ {COLD_GOAL_S} s) | from the cache: import | fwd-train | backward "
             f"| eval | sum (goal ≤ {CACHED_GOAL_S} s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in cold["per_layout_dtype"]:
        layout = e["layout"]
        cells = []
        for run, total, goal in ((e["cold"], e["cold_first_calls_s"], COLD_GOAL_S),
                                 (e["cached"], e["cached_first_calls_s"], CACHED_GOAL_S)):
            cells += [f"{run['import_s']:.3f} s"] + [f"{run[layout][op]:.3f} s"
                                                     for op in ("fwd-train", "backward", "eval")]
            cells.append(f"**{total:.2f} s**{_mark_above(total, goal)}")
        lines.append(f"| {layout} | {e['dtype']} | " + " | ".join(cells) + " |")
    wu = cold.get("warmup")
    if wu and wu.get("cached") is None:
        lines += ["", f"`fastbn.warmup()` with an empty cache: stopped unfinished after "
                      f"{wu['cold']['timed_out_s']} s ⚠ (goal ≤ {WARMUP_GOAL_S:.0f} s)."]
    elif wu:
        after = max(wu["cached"][layout][op] for layout in cold["shapes"] for op in OPERATIONS)
        lines += ["", "| `fastbn.warmup()` | empty cache "
                  f"(goal ≤ {WARMUP_GOAL_S:.0f} s) | from the cache | slowest first call after "
                  "it (from the cache) |", "|---|---:|---:|---:|",
                  f"| all layouts, float16/32/64 | {wu['cold']['warmup_s']:.1f} s"
                  f"{_mark_above(wu['cold']['warmup_s'], WARMUP_GOAL_S)} | "
                  f"{wu['cached']['warmup_s']:.2f} s | {after * 1e3:.2f} ms |"]
    shapes = ", ".join(f"{k} {'×'.join(map(str, v[0]))}" for k, v in cold["shapes"].items())
    return ("Each row: a fresh process with `NUMBA_CACHE_DIR` a new empty directory (so the "
            "calls compile), then a second process on that cache. import = `import numpy, "
            "fastbn`; the sums count it and the first fwd-train, backward and eval (tensors: "
            f"{shapes}; the first call also imports Numba and starts its threads).\n\n"
            + "\n".join(lines))


def cold_summary(cold):
    """Lines for the README block."""
    if not cold:
        return ""
    entries = cold["per_layout_dtype"]
    worst_cold = max(entries, key=lambda e: e["cold_first_calls_s"])
    worst_cached = max(entries, key=lambda e: e["cached_first_calls_s"])
    text = (f"First calls in a fresh process (`import fastbn` + first fwd-train + backward + "
            f"eval of one layout and dtype): with an empty Numba cache "
            f"{min(e['cold_first_calls_s'] for e in entries):.2f}–"
            f"{worst_cold['cold_first_calls_s']:.2f} s (worst {worst_cold['layout']} "
            f"{worst_cold['dtype']}; goal ≤ {COLD_GOAL_S} s), from the cache "
            f"{min(e['cached_first_calls_s'] for e in entries):.3f}–"
            f"{worst_cached['cached_first_calls_s']:.3f} s (goal ≤ {CACHED_GOAL_S} s).")
    wu = cold.get("warmup")
    if wu and wu.get("cached") is None:
        text += (f" `fastbn.warmup()` with an empty cache did not finish within "
                 f"{wu['cold']['timed_out_s']} s (goal ≤ {WARMUP_GOAL_S:.0f} s).")
    elif wu:
        text += (f" `fastbn.warmup()`: {wu['cold']['warmup_s']:.1f} s with an empty cache "
                 f"(goal ≤ {WARMUP_GOAL_S:.0f} s), {wu['cached']['warmup_s']:.2f} s from it.")
    return text


def tasks_table(tasks):
    if not tasks:
        return "(no task-count data)"
    table, why = tasks.get("table"), tasks.get("note")
    if table is None:
        return f"({why})"
    lines = [f"Tasks per call from the cpu plan (`fastbn.backends.cpu.plan_tasks`); the plan "
             f"depends on the shape only, never on the thread count. ⚠ = a tensor of at least "
             f"{LARGE_ELEMENTS:,} elements that offers fewer than {MANY_CORES} tasks (goal 5).",
             "", "| case | (outer, C, inner) | " + " | ".join(OPERATIONS) + " |",
             "|---|---|" + "---:|" * len(OPERATIONS)]
    for label, counts in table.items():
        large = counts.get("elements", 0) >= LARGE_ELEMENTS
        cells = [str(counts[op]) + (" ⚠" if large and counts[op] < MANY_CORES else "")
                 if op in counts else "–" for op in OPERATIONS]
        shape3 = "×".join(map(str, counts.get("shape3", ()))) or "?"
        lines.append(f"| {label} | {shape3} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(m):
    cpu = m.get("cpu", {})
    return (f"{cpu.get('Model name', '?')} ({cpu.get('CPU(s)', '?')} CPUs, L2 {cpu.get('L2 cache', '?')}, "
            f"L3 {cpu.get('L3 cache', '?')}), {m['numba_threads']} numba threads "
            f"({m.get('numba_threading_layer')}), numba {m['numba']}, numpy {m['numpy']}, "
            f"torch {m.get('torch')}, Python {m['python']}, commit "
            f"{(m.get('git_commit') or '?')[:7]}{' (fastbn/ modified)' if m.get('git_dirty') else ''}, "
            f"{m['date']}")


CONVENTIONS = (
    "fastbn = the default call (fresh outputs, no `out=`); fastbn out= = the same call into "
    "preallocated outputs. PyTorch likewise: `torch.native_batch_norm`, "
    "`aten::native_batch_norm_backward` and `torch.var_mean` (fresh outputs), and their `.out` "
    "overloads. × PyTorch = PyTorch's time / fastbn's, default call against default call "
    f"(goal ≥ {TORCH_GOAL}x; ⚠ = missed); × NumPy ref likewise. × copy floor = fastbn out= time / "
    "time of a plain parallel copy of the same tensor into a preallocated array (the faster "
    "of NumPy `copyto` and a numba `prange` copy): 1.00 = at the memory floor, lower is better "
    "(targets: fwd-train ≤ 1.2, eval ≤ 1.1, backward ≤ 1.6; ⚠ = missed). fresh ÷ out= = the "
    f"default call's time / the out= call's (goal ≤ {FRESH_GOAL} on large tensors; ⚠ = over). "
    "Times are medians of interleaved rounds; every ratio compares timings from the same rounds.")


def scaling_table(rows):
    by = {}
    for r in rows:
        by.setdefault((r["label"], r["op"]), {})[r["threads"]] = r
    counts = sorted({r["threads"] for r in rows})
    if len(counts) < 2:
        return "(no thread-scaling data)"
    lo, hi = counts[0], counts[-1]
    lines = [f"| case | operation | fastbn {lo}→{hi} threads | PyTorch {lo}→{hi} | copy floor "
             f"{lo}→{hi} | fastbn × copy at {lo} / {hi} | × PyTorch at {lo} / {hi} |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (label, op), t in by.items():
        if lo not in t or hi not in t:
            continue

        def speedup(name):
            return _ratio(_t(t[lo], name), _t(t[hi], name))
        copy_up = _ratio(t[lo]["copy_floor_s"], t[hi]["copy_floor_s"])
        lines.append(f"| {label} | {op} | {_fmt(speedup('fastbn'), '.2f', 'x')} | "
                     f"{_fmt(speedup('torch'), '.2f', 'x')} | {_fmt(copy_up, '.2f', 'x')} | "
                     f"{_fmt(t[lo]['x_copy'], '.2f')} / {_fmt(t[hi]['x_copy'], '.2f')} | "
                     f"{_fmt(t[lo]['x_torch'], '.2f', 'x')}{_mark_below(t[lo]['x_torch'], TORCH_GOAL)}"
                     f" / {_fmt(t[hi]['x_torch'], '.2f', 'x')}"
                     f"{_mark_below(t[hi]['x_torch'], TORCH_GOAL)} |")
    return "\n".join(lines)


def scaling_figure(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by = {}
    for r in rows:
        by.setdefault((r["label"], r["op"]), {})[r["threads"]] = r
    counts = sorted({r["threads"] for r in rows})
    keys = [k for k, t in by.items() if all(c in t for c in counts)]
    if len(counts) < 2 or not keys:
        return False
    names = [("fastbn", "fastbn"), ("torch", "PyTorch"), (None, "copy floor")]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for j, (name, label) in enumerate(names):
        speedups = []
        for k in keys:
            t = by[k]
            if name is None:
                a, b = t[counts[0]]["copy_floor_s"], t[counts[-1]]["copy_floor_s"]
            else:
                a, b = _t(t[counts[0]], name), _t(t[counts[-1]], name)
            speedups.append(a / b if a and b else 0.0)
        ax.bar(np.arange(len(keys)) + j * width, speedups, width, label=label)
    ax.axhline(counts[-1] / counts[0], color="gray", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(keys)) + width)
    ax.set_xticklabels([f"{lab.split(' ', 1)[0]} {lab.split()[1]}\n{op}" for lab, op in keys],
                       fontsize=7)
    ax.set_ylabel(f"speedup {counts[0]} → {counts[-1]} threads")
    ax.legend(fontsize=8)
    ax.set_title(f"Thread scaling (time at {counts[0]} thread / time at {counts[-1]}), default "
                 "calls", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# writing tables into markdown files

def _markers(path):
    text = Path(path).read_text()
    return {m for m in REQUIRED_MARKERS + OPTIONAL_MARKERS
            if f"<!-- {m}:start -->" in text and f"<!-- {m}:end -->" in text}


def replace_between(path, marker, body):
    """Replace the text between <!-- marker:start --> and <!-- marker:end --> in path."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = Path(path).read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{path}: expected one '{start}' followed by one '{end}' line; add "
                         f"them where the generated table belongs, then run again")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    Path(path).write_text(pattern.sub(lambda m: f"{start}\n{body}\n{end}", text))


def check_markers(docs, readme):
    """Fail (before anything is measured or written) if a required marker is missing."""
    for path, marker in [(docs, m) for m in REQUIRED_MARKERS] + [(readme, "bench:cpu")]:
        replace_between(path, marker, _current(path, marker))


def readme_block(result):
    m = result["machine"]
    parts = [f"Machine: {machine_line(m)}.", CONVENTIONS]
    if result.get("note"):
        parts.insert(0, f"**{result['note']}**")
    if result.get("results"):
        parts.append(f"Large tensors, {result['results'][0]['threads']} threads:\n\n"
                     + summary_table(result["results"]))
    if result.get("small"):
        parts.append("Small and medium tensors, float32 (all dtypes in the docs), default calls, "
                     "× PyTorch on the same threads:\n\n" + small_summary(result["small"]))
    cold = cold_summary(result.get("cold_start"))
    if cold:
        parts.append(cold)
    parts.append("Full tables, method, per-call overhead, fused ops, thread scaling and "
                 "first-call times: [docs/benchmarks.md](docs/benchmarks.md).")
    return "\n\n".join(parts)


def render(result, docs=DOCS, readme=README):
    m = result["machine"]
    check_markers(docs, readme)
    present = _markers(docs)
    head = f"Machine: {machine_line(m)}.\n\n{CONVENTIONS}\n\n"
    if result.get("note"):
        head = f"**{result['note']}**\n\n" + head
    blocks = {}
    if result.get("results"):
        blocks["bench:cpu"] = head + full_table(result["results"])
    scaling = result.get("thread_scaling") or []
    if scaling:
        body = scaling_table(scaling)
        if scaling_figure(scaling, Path(docs).parent / FIGURE_NAME):
            body += f"\n\n![thread scaling]({FIGURE_NAME})"
        blocks["bench:cpu-threads"] = body
    if result.get("cold_start"):
        blocks["bench:cpu-compile"] = cold_table(result["cold_start"])
    if result.get("small"):
        blocks["bench:cpu-small"] = head + small_table(result["small"])
        blocks["bench:cpu-overhead"] = overhead_table(result["small"])
    if result.get("fused"):
        blocks["bench:cpu-fused"] = f"Machine: {machine_line(m)}.\n\n" + fused_table(result["fused"])
    if result.get("trainer"):
        blocks["bench:cpu-trainer"] = trainer_table(result["trainer"])
    if result.get("tasks"):
        blocks["bench:cpu-tasks"] = tasks_table(result["tasks"])
    for marker, body in blocks.items():
        if marker in present:
            replace_between(docs, marker, body)
        else:
            print(f"{docs}: no <!-- {marker}:start/end --> markers; that table is not written")
    replace_between(readme, "bench:cpu", readme_block(result))


def _current(path, marker):
    text = Path(path).read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start in text and end in text:
        return text[text.index(start) + len(start):text.index(end)].strip("\n")
    return ""


# ----------------------------------------------------------------------------------------------

def _threads_list(text):
    return sorted({int(v) for v in text.split(",") if v.strip()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny cases, one round (what CI runs)")
    ap.add_argument("--cases", default="", help="only cases whose label contains this")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated, of {','.join(SECTIONS)} (default all; --smoke "
                         "leaves out trainer and cold unless named)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--small-rounds", type=int, default=None, help="default: --rounds")
    ap.add_argument("--threads", type=int, default=None, help="numba/torch threads for the "
                    "large and fused sections (default: numba's default)")
    ap.add_argument("--small-threads", default="1,2", help="thread counts of the small section")
    ap.add_argument("--trainer-steps", type=int, default=200)
    ap.add_argument("--trainer-repeats", type=int, default=11)
    ap.add_argument("--cold-dtypes", default="float16,float32,float64",
                    help="dtypes of the cold section")
    ap.add_argument("--warmup-timeout", type=int, default=300, help="seconds the cold "
                    "fastbn.warmup() may take before it is stopped (and reported as such)")
    ap.add_argument("--max-discarded", type=int, default=None, help="rounds thrown away for "
                    "other processes' load per measurement, at most (default 6 x rounds)")
    ap.add_argument("--no-scaling", action="store_true", help="leave out the scaling section")
    ap.add_argument("--no-compile", action="store_true", help="leave out the cold section")
    ap.add_argument("--no-docs", action="store_true",
                    help="do not rewrite docs/benchmarks.md and README.md")
    ap.add_argument("--render", type=Path, help="only regenerate the tables from this JSON")
    ap.add_argument("--merge", type=Path, help="start from this JSON and replace only the "
                    "sections measured now (with --out)")
    ap.add_argument("--docs", type=Path, default=DOCS)
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)

    if args.render:
        render(json.loads(args.render.read_text()), args.docs, args.readme)
        return 0
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; expected some of {list(SECTIONS)}")
    if args.smoke and args.sections == ap.get_default("sections"):
        sections = [s for s in sections if s not in ("trainer", "cold")]
    if args.no_scaling:
        sections = [s for s in sections if s != "scaling"]
    if args.no_compile:
        sections = [s for s in sections if s != "cold"]
    if not args.no_docs:      # fail before measuring if a marker is missing
        check_markers(args.docs, args.readme)
    global MAX_DISCARDED
    # a smoke run checks the machinery, not the machine: no round is thrown away for load (CI
    # runs the simulator lane beside it, which would discard every round, with a pause each)
    MAX_DISCARDED = 0 if args.smoke and args.max_discarded is None else args.max_discarded
    if args.threads:
        registry.set_num_threads(args.threads)
    impls, skipped = registry.available()
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    rounds = 1 if args.smoke else args.rounds
    small_rounds = 1 if args.smoke else (args.small_rounds or args.rounds)
    slow_rounds = 1 if args.smoke else 3

    def pick(cases):
        return [c for c in cases if args.cases in c.label]

    import fastbn
    fastbn_warmup = fastbn.warmup(dtypes=("float16", "float32", "float64"))
    print(f"fastbn.warmup(): {fastbn_warmup:.2f} s", flush=True)
    result = {"machine": machine(), "skipped": skipped, "rounds": rounds,
              "small_rounds": small_rounds, "sections": sections, "results": []}
    if hasattr(fastbn, "output_pool_stats"):
        result["machine"]["output_pool"] = fastbn.output_pool_stats()
    else:
        result["machine"]["output_pool"] = None
        print("fastbn exports no output pool (fastbn.output_pool_stats): fresh outputs are "
              "plain np.empty arrays", flush=True)
    started = time.perf_counter()
    result["section_s"] = {}

    def done(section, since):
        result["section_s"][section] = time.perf_counter() - since
        print(f"[{section}: {result['section_s'][section]:.0f} s]", flush=True)
        save()

    def save():
        """The JSON so far (after every section: a crash later loses nothing measured)."""
        if not args.out:
            return
        merged = result
        if args.merge:
            merged = json.loads(args.merge.read_text())
            section_s = {**merged.get("section_s", {}), **result["section_s"]}
            merged.update({k: v for k, v in result.items() if k not in ("results",)
                           or "large" in sections})
            merged["section_s"] = section_s
            merged["merged_sections"] = sorted(set(merged.get("merged_sections", []))
                                               | set(sections))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(merged, indent=1))

    if "large" in sections:
        since = time.perf_counter()
        for case in pick(SMOKE_CASES if args.smoke else FULL_CASES):
            result["results"] += run_case(case, impls, rounds, slow_rounds=slow_rounds)
            save()
        done("large", since)
    result["machine"]["numba_threading_layer"] = _threading_layer()
    if "scaling" in sections:
        since = time.perf_counter()
        scale_cases = SMOKE_CASES[-2:] if args.smoke else SCALING_CASES
        scale_cases = pick(scale_cases) or scale_cases[:1]
        counts = sorted({1, registry.num_threads()})
        result["thread_scaling"] = run_scaling(scale_cases, impls, rounds, counts)
        done("scaling", since)
    if "small" in sections:
        since = time.perf_counter()
        small = pick(SMOKE_CASES if args.smoke else SMALL_CASES)
        result["small"] = run_at_threads(small, impls, small_rounds,
                                         _threads_list(args.small_threads), section="small",
                                         slow_rounds=slow_rounds)
        done("small", since)
    if "fused" in sections:
        since = time.perf_counter()
        if hasattr(fastbn, "batch_norm_act_forward"):
            fused_impls, fused_skipped = registry.available(table=registry.FUSED_IMPLEMENTATIONS)
            result["skipped"].update({f"fused {k}": v for k, v in fused_skipped.items()})
            result["fused"] = []
            for case in pick(SMOKE_FUSED_CASES if args.smoke else FUSED_CASES):
                result["fused"] += run_case(case, fused_impls, rounds, ops=FUSED_OPERATIONS,
                                            slow_rounds=slow_rounds, section="fused")
                save()
        else:
            print("fastbn has no batch_norm_act_forward: no fused section", flush=True)
        done("fused", since)
    if "trainer" in sections:
        since = time.perf_counter()
        steps, repeats = (5, 1) if args.smoke else (args.trainer_steps, args.trainer_repeats)
        result["trainer"] = run_trainer(_threads_list(args.small_threads), steps, repeats)
        done("trainer", since)
    if "tasks" in sections:
        cases = pick(SMOKE_CASES if args.smoke else
                     list(FULL_CASES) + [c for c in SMALL_CASES if c.dtype == "float32"])
        try:
            table, note = task_counts(cases)
        except Exception as e:                         # the cpu plan changed shape
            table, note = None, f"task counts unavailable: {type(e).__name__}: {e}"
        result["tasks"] = {"table": table, "note": note}
        print(tasks_table(result["tasks"]))
    if "cold" in sections:
        since = time.perf_counter()
        from . import cold_start
        result["cold_start"] = cold_start.measure(dtypes=tuple(args.cold_dtypes.split(",")),
                                                  warmup_timeout=args.warmup_timeout)
        print(cold_table(result["cold_start"]))
        done("cold", since)
    result["elapsed_s"] = time.perf_counter() - started
    print(f"measured in {result['elapsed_s']:.0f} s", flush=True)
    save()
    if args.out:
        print(f"wrote {args.out}")
    if not args.no_docs:
        render(json.loads(args.out.read_text()) if args.out and args.merge else result,
               args.docs, args.readme)
        print(f"updated {args.docs} and {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
