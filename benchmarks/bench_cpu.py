"""CPU benchmark: fastbn against PyTorch (same thread count), the NumPy reference and a plain copy.

    python -m benchmarks.bench_cpu --out benchmarks/results/cpu.json     # full run, updates docs
    python -m benchmarks.bench_cpu --smoke --out /tmp/smoke.json --no-docs
    python -m benchmarks.bench_cpu --render benchmarks/results/cpu.json  # tables from a JSON only

Method (docs/benchmarks.md): every implementation is warmed up (compiled) and validated against
the NumPy float64 reference on the case before it is timed; then the implementations are timed
in interleaved rounds (each round runs each once, so load from other processes hits all of them
alike) and each figure is the median over the rounds. Every ratio compares timings from the same
rounds. The full run rewrites the tables between ``<!-- bench:cpu:start -->`` and
``<!-- bench:cpu:end -->`` in docs/benchmarks.md and README.md, and the thread-scaling and
compile-time tables between the ``bench:cpu-threads`` and ``bench:cpu-compile`` markers of
docs/benchmarks.md.
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
from .cases import FULL_CASES, OPERATIONS, SCALING_CASES, SMOKE_CASES, Problem

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
FIGURE_NAME = "img/cpu_thread_scaling.png"      # next to docs/benchmarks.md

TARGETS = {"fwd-train": 1.2, "eval": 1.1, "backward": 1.6}   # x copy floor, at most


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


def measure(callables, rounds, slow=(), slow_rounds=3, min_sample_s=2e-3, max_foreign=0.1):
    """Interleaved rounds: each round times every callable once (a callable shorter than
    min_sample_s is repeated inside its sample), so load from elsewhere hits all of them alike.

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
            start = time.perf_counter()
            for _ in range(n):
                fn()
            this_round[name] = (time.perf_counter() - start) / n
        foreign_after = _foreign_cpu_ticks()
        if foreign_before is not None and discarded < 6 * rounds:
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
    return tuple(np.array(o, copy=True) for o in outputs)


def run_case(case, impls, rounds, ops=OPERATIONS, slow_rounds=3):
    """Validate then time every implementation on every operation of one case."""
    problem = Problem.make(case)
    prepared = {name: impl.prepare(problem) for name, impl in impls.items()}
    rows = []
    for op in ops:
        reference = _snapshot(prepared["reference"][op]())
        errors, valid = {}, {}
        for name, ops_of in prepared.items():
            err = registry.validate(name, op, ops_of[op](), reference, problem)
            errors[name] = err
            if err <= 1.0:
                valid[name] = ops_of[op]
        load_before = os.getloadavg()[0]
        timings = measure(valid, rounds, slow=[n for n in valid if impls[n].slow],
                          slow_rounds=slow_rounds)
        row = {"case": case.name, "shape": list(case.shape), "layout": case.layout,
               "dtype": case.dtype, "label": case.label, "op": op,
               "bytes": case.bytes_moved(op), "copy_bytes": 2 * case.nbytes,
               "threads": registry.num_threads(),
               "load_avg_1min": [load_before, os.getloadavg()[0]],
               "timings": timings,
               "validation_error": {k: (None if not math.isfinite(v) else v)
                                    for k, v in errors.items()},
               "invalid": sorted(n for n in prepared if n not in valid)}
        row.update(_ratios(row))
        rows.append(row)
        print(_row_text(row), flush=True)
    return rows


def _ratios(row):
    t = {name: v["median_s"] for name, v in row["timings"].items()}
    floor = [t[n] for n in registry.COPY_FLOOR if n in t]
    out = {"copy_floor_s": min(floor) if floor else None}
    fb = t.get("fastbn")
    out["x_copy"] = fb / out["copy_floor_s"] if fb and floor else None
    out["x_torch"] = t["torch"] / fb if fb and "torch" in t else None
    out["torch_x_copy"] = t["torch"] / out["copy_floor_s"] if "torch" in t and floor else None
    out["x_reference"] = t["reference"] / fb if fb and "reference" in t else None
    out["gbps"] = row["bytes"] / fb / 1e9 if fb else None
    return out


def _row_text(row):
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    fb = row["timings"].get("fastbn", {}).get("median_s")
    return (f"{row['label']:34s} {row['op']:9s} fastbn {f(fb and fb * 1e3, '8.3f')} ms  "
            f"{f(row['gbps'], '6.1f')} GB/s  x copy {f(row['x_copy'], '5.2f')}  "
            f"x torch {f(row['x_torch'], '6.2f')}  (load {row['load_avg_1min'][0]:.1f})"
            + (f"  INVALID {row['invalid']}" if row["invalid"] else ""))


def run_scaling(cases, impls, rounds, thread_counts):
    """fastbn, PyTorch and the copy floor at each thread count (ops fwd-train, eval, backward)."""
    saved = registry.num_threads()
    rows = []
    try:
        for threads in thread_counts:
            registry.set_num_threads(threads)
            for case in cases:
                rows += run_case(case, impls, rounds, ops=("fwd-train", "eval", "backward"),
                                 slow_rounds=1)
    finally:
        registry.set_num_threads(saved)
    return rows


# ----------------------------------------------------------------------------------------------
# tables

def _fmt(v, fmt, suffix=""):
    return "–" if v is None else format(v, fmt) + suffix


def _mark(v, target):
    return "" if v is None or target is None or v <= target else " ⚠"


def full_table(rows):
    lines = ["| case | operation | fastbn | GB/s | × copy floor | PyTorch × copy | × PyTorch "
             "| × NumPy ref |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fb = r["timings"].get("fastbn", {}).get("median_s")
        lines.append(
            f"| {r['label']} | {r['op']} | {_fmt(fb and fb * 1e3, '.3f', ' ms')} | "
            f"{_fmt(r['gbps'], '.1f')} | {_fmt(r['x_copy'], '.2f')}{_mark(r['x_copy'], TARGETS.get(r['op']))} | "
            f"{_fmt(r['torch_x_copy'], '.2f')} | {_fmt(r['x_torch'], '.2f', 'x')} | "
            f"{_fmt(r['x_reference'], '.1f', 'x')} |")
    return "\n".join(lines)


def summary_table(rows):
    """One line per case: × copy floor and × PyTorch for each operation."""
    by_case = {}
    for r in rows:
        by_case.setdefault(r["label"], {})[r["op"]] = r
    head = "| case | " + " | ".join(f"{op} × copy | {op} × torch" for op in OPERATIONS) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(OPERATIONS))]
    for label, ops in by_case.items():
        cells = []
        for op in OPERATIONS:
            r = ops.get(op)
            cells.append(_fmt(r and r["x_copy"], ".2f") + _mark(r and r["x_copy"], TARGETS.get(op)))
            cells.append(_fmt(r and r["x_torch"], ".1f", "x"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(m):
    cpu = m.get("cpu", {})
    return (f"{cpu.get('Model name', '?')} ({cpu.get('CPU(s)', '?')} CPUs, L2 {cpu.get('L2 cache', '?')}, "
            f"L3 {cpu.get('L3 cache', '?')}), {m['numba_threads']} numba threads "
            f"({m.get('numba_threading_layer')}), numba {m['numba']}, numpy {m['numpy']}, "
            f"torch {m.get('torch')}, Python {m['python']}, {m['date']}")


CONVENTIONS = (
    "× copy floor = fastbn time / time of a plain parallel copy of the same tensor (the faster "
    "of NumPy `copyto` and a numba `prange` copy) in the same rounds: 1.00 = at the memory floor, "
    "lower is better (targets: fwd-train ≤ 1.2, eval ≤ 1.1, backward ≤ 1.6; ⚠ = missed). "
    "× PyTorch and × NumPy ref = their time / fastbn time: 1.00x = equal, higher = fastbn "
    "faster. GB/s counts the bytes the operation must move (x and y; x, dy and dx for the "
    "backward; x for moments). Times are medians of interleaved rounds.")


def scaling_table(rows):
    by = {}
    for r in rows:
        by.setdefault((r["label"], r["op"]), {})[r["threads"]] = r
    counts = sorted({r["threads"] for r in rows})
    if len(counts) < 2:
        return "(no thread-scaling data)"
    lo, hi = counts[0], counts[-1]
    lines = [f"| case | operation | fastbn {lo}→{hi} threads | PyTorch {lo}→{hi} | copy floor "
             f"{lo}→{hi} | fastbn × copy at {lo} / {hi} |",
             "|---|---|---:|---:|---:|---:|"]
    for (label, op), t in by.items():
        if lo not in t or hi not in t:
            continue

        def speedup(name):
            a = t[lo]["timings"].get(name, {}).get("median_s")
            b = t[hi]["timings"].get(name, {}).get("median_s")
            return a / b if a and b else None
        copy_up = (t[lo]["copy_floor_s"] / t[hi]["copy_floor_s"]
                   if t[lo]["copy_floor_s"] and t[hi]["copy_floor_s"] else None)
        lines.append(f"| {label} | {op} | {_fmt(speedup('fastbn'), '.2f', 'x')} | "
                     f"{_fmt(speedup('torch'), '.2f', 'x')} | {_fmt(copy_up, '.2f', 'x')} | "
                     f"{_fmt(t[lo]['x_copy'], '.2f')} / {_fmt(t[hi]['x_copy'], '.2f')} |")
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
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for j, (name, label) in enumerate(names):
        speedups = []
        for k in keys:
            t = by[k]
            if name is None:
                a, b = t[counts[0]]["copy_floor_s"], t[counts[-1]]["copy_floor_s"]
            else:
                a = t[counts[0]]["timings"].get(name, {}).get("median_s")
                b = t[counts[-1]]["timings"].get(name, {}).get("median_s")
            speedups.append(a / b if a and b else 0.0)
        ax.bar(np.arange(len(keys)) + j * width, speedups, width, label=label)
    ax.axhline(counts[-1] / counts[0], color="gray", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(keys)) + width)
    ax.set_xticklabels([f"{lab.split(' ', 1)[0]} {lab.split()[1]}\n{op}" for lab, op in keys],
                       fontsize=7)
    ax.set_ylabel(f"speedup {counts[0]} → {counts[-1]} threads")
    ax.legend(fontsize=8)
    ax.set_title("Thread scaling (time at 1 thread / time at 2 threads)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compile_table(comp):
    if not comp:
        return "(no compile-time data)"
    lines = ["| measurement | empty cache (compiles) | from the numba cache |",
             "|---|---:|---:|"]
    fc = comp["first_call"]
    lines.append(f"| `import fastbn` | {fc['cold']['import_s']:.2f} s | "
                 f"{fc['cached']['import_s']:.2f} s |")
    for label in ("NCHW parallel", "NHWC parallel", "NC serial"):
        for op in OPERATIONS:
            lines.append(f"| first {op}, {label} | {fc['cold'][label][op]:.3f} s | "
                         f"{fc['cached'][label][op]:.3f} s |")
    wu = comp["warmup"]
    lines.append(f"| `fastbn.warmup()` | {wu['cold']['warmup_s']:.2f} s | "
                 f"{wu['cached']['warmup_s']:.2f} s |")
    worst = max(wu["cached"][label][op] for label in ("NCHW parallel", "NHWC parallel",
                                                      "NC serial") for op in OPERATIONS)
    lines.append(f"| slowest first call after `warmup()` | – | {worst * 1e3:.2f} ms |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# writing tables into markdown files

def replace_between(path, marker, body):
    """Replace the text between <!-- marker:start --> and <!-- marker:end --> in path."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = Path(path).read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"{path}: expected one '{start}' followed by one '{end}' line; add "
                         f"them where the generated table belongs, then run again")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    Path(path).write_text(pattern.sub(lambda m: f"{start}\n{body}\n{end}", text))


def render(result, docs=DOCS, readme=README):
    m = result["machine"]
    head = f"Machine: {machine_line(m)}.\n\n{CONVENTIONS}\n\n"
    rows = result["results"]
    # check every marker before writing anything
    for path, marker in ((docs, "bench:cpu"), (readme, "bench:cpu"), (docs, "bench:cpu-threads"),
                         (docs, "bench:cpu-compile")):
        replace_between(path, marker, _current(path, marker))
    replace_between(docs, "bench:cpu", head + full_table(rows))
    replace_between(readme, "bench:cpu", head + summary_table(rows)
                    + "\n\nFull table, method and thread scaling: "
                      "[docs/benchmarks.md](docs/benchmarks.md).")
    scaling = result.get("thread_scaling") or []
    body = scaling_table(scaling)
    if scaling and scaling_figure(scaling, Path(docs).parent / FIGURE_NAME):
        body += f"\n\n![thread scaling]({FIGURE_NAME})"
    replace_between(docs, "bench:cpu-threads", body)
    replace_between(docs, "bench:cpu-compile", compile_table(result.get("compile")))


def _current(path, marker):
    text = Path(path).read_text()
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start in text and end in text:
        return text[text.index(start) + len(start):text.index(end)].strip("\n")
    return ""


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--smoke", action="store_true", help="tiny cases, one round (what CI runs)")
    ap.add_argument("--cases", default="", help="only cases whose label contains this")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="numba/torch threads "
                    "(default: numba's default)")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-docs", action="store_true",
                    help="do not rewrite docs/benchmarks.md and README.md")
    ap.add_argument("--render", type=Path, help="only regenerate the tables from this JSON")
    ap.add_argument("--docs", type=Path, default=DOCS)
    ap.add_argument("--readme", type=Path, default=README)
    args = ap.parse_args(argv)

    if args.render:
        render(json.loads(args.render.read_text()), args.docs, args.readme)
        return 0
    if not args.no_docs:      # fail before measuring if a marker is missing
        for path, marker in ((args.docs, "bench:cpu"), (args.readme, "bench:cpu"),
                             (args.docs, "bench:cpu-threads"), (args.docs, "bench:cpu-compile")):
            replace_between(path, marker, _current(path, marker))
    if args.threads:
        registry.set_num_threads(args.threads)
    impls, skipped = registry.available()
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    cases = SMOKE_CASES if args.smoke else FULL_CASES
    cases = [c for c in cases if args.cases in c.label]
    rounds = 1 if args.smoke else args.rounds
    fastbn_warmup = __import__("fastbn").warmup(dtypes=("float16", "float32", "float64"))
    print(f"fastbn.warmup(): {fastbn_warmup:.2f} s")
    result = {"machine": machine(), "skipped": skipped, "rounds": rounds, "results": []}
    for case in cases:
        result["results"] += run_case(case, impls, rounds, slow_rounds=1 if args.smoke else 3)
    result["machine"]["numba_threading_layer"] = _threading_layer()
    if not args.no_scaling:
        scale_cases = SMOKE_CASES[-2:] if args.smoke else SCALING_CASES
        scale_cases = [c for c in scale_cases if args.cases in c.label] or scale_cases[:1]
        counts = sorted({1, registry.num_threads()})
        result["thread_scaling"] = run_scaling(scale_cases, impls, rounds, counts)
    if not args.no_compile:
        from . import compile_time
        result["compile"] = compile_time.measure()
        print(compile_table(result["compile"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    if not args.no_docs:
        render(result, args.docs, args.readme)
        print(f"updated {args.docs} and {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
