"""Trainer step time: fastbn.nn against the same MLP in PyTorch on the CPU, same threads.

One step = forward, softmax cross-entropy, backward and an SGD update of the paper's
784-100-100-100-10 sigmoid network (with and without BatchNorm before each hidden sigmoid) on a
mini-batch of 60, drawn the same way in both. Both sides run float32 with the same number of
threads (torch.set_num_threads; NumPy's BLAS and Numba's pool limited to the same). Each
timing is the median over ``--repeats`` blocks of ``--steps`` steps, after a warm-up block.

The ratio is torch time / fastbn time: 1.00x = equal, higher = fastbn faster.

    python -m benchmarks.bench_trainer [--threads N] [--steps 200] [--repeats 15] [--json FILE]

(tests/test_nn.py runs it once, tiny, so it cannot rot.)
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import numpy as np


def machine():
    """CPU model, core counts and library versions, recorded with every result."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba
    import torch
    return {"cpu": model, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "numba": numba.__version__, "torch": torch.__version__,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


@contextlib.contextmanager
def limited_threads(threads):
    """Give NumPy's BLAS, Numba and PyTorch the same number of threads (restored after)."""
    import numba
    import torch
    saved = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits
        blas = threadpool_limits(limits=threads, user_api="blas")
    except ImportError:
        print("threadpoolctl not installed: NumPy's BLAS threads are not limited "
              "(set OPENBLAS_NUM_THREADS before starting)", file=sys.stderr)
        blas = contextlib.nullcontext()
    try:
        with blas:
            yield
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])


def fastbn_stepper(batch_norm, x, labels, batch_size, seed=0):
    from fastbn import nn
    from fastbn.nn.paper import paper_network
    model = paper_network(batch_norm, init_std=0.01, seed=seed)
    trainer = nn.Trainer(model, nn.SGD(model.parameters(), lr=0.5), x, labels,
                         batch_size=batch_size, rng=np.random.default_rng(seed))
    return trainer.step


def torch_stepper(batch_norm, x, labels, batch_size, seed=0):
    import torch
    torch.manual_seed(seed)
    layers, width = [], 784
    for size in (100, 100, 100):
        layers.append(torch.nn.Linear(width, size, bias=not batch_norm))
        if batch_norm:
            layers.append(torch.nn.BatchNorm1d(size))
        layers.append(torch.nn.Sigmoid())
        width = size
    layers.append(torch.nn.Linear(width, 10))
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.01)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x_t, labels_t = torch.from_numpy(x), torch.from_numpy(labels)
    rng = np.random.default_rng(seed)
    order, position = rng.permutation(len(x)), 0

    def step():
        nonlocal order, position
        if position + batch_size > len(order):
            order, position = rng.permutation(len(x)), 0
        index = torch.from_numpy(order[position:position + batch_size])
        position += batch_size
        model.train()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x_t[index]), labels_t[index])
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def time_steps(step, steps, repeats):
    """Median milliseconds per step over ``repeats`` blocks (one warm-up block first)."""
    for _ in range(steps):
        step()
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        blocks.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(blocks), min(blocks)


def run(threads, steps, repeats, batch_size=60):
    from fastbn.data import load_dataset
    x, labels = load_dataset("mnist").arrays()[:2]
    results = []
    with limited_threads(threads):
        for batch_norm in (False, True):
            name = "with BN" if batch_norm else "without BN"
            ours = time_steps(fastbn_stepper(batch_norm, x, labels, batch_size), steps, repeats)
            theirs = time_steps(torch_stepper(batch_norm, x, labels, batch_size), steps,
                                repeats)
            results.append({"network": name, "fastbn_ms_per_step": ours[0],
                            "fastbn_ms_per_step_min": ours[1], "torch_ms_per_step": theirs[0],
                            "torch_ms_per_step_min": theirs[1], "ratio": theirs[0] / ours[0]})
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0))
                        if hasattr(os, "sched_getaffinity") else os.cpu_count())
    parser.add_argument("--steps", type=int, default=200, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    args = parser.parse_args(argv)
    import fastbn
    fastbn.warmup("cpu", dtypes=("float32",))
    info = machine()
    results = run(args.threads, args.steps, args.repeats)
    print(f"machine: {info['cpu']}, {info['usable_cpus']} usable CPUs; threads = {args.threads}")
    print(f"{'network':<12} {'fastbn ms/step':>15} {'torch ms/step':>14} {'ratio':>7}")
    for r in results:
        print(f"{r['network']:<12} {r['fastbn_ms_per_step']:>15.3f} "
              f"{r['torch_ms_per_step']:>14.3f} {r['ratio']:>6.2f}x")
    print("ratio = torch time / fastbn time: 1.00x = equal, higher = fastbn faster")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "threads": args.threads, "steps": args.steps,
                       "repeats": args.repeats, "batch_size": 60, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
