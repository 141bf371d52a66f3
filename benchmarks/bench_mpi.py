"""The cost of synchronizing batch norm over MPI on this machine: 1 rank vs K ranks on loopback.

    python benchmarks/bench_mpi.py             # ranks 1 and 2 -> benchmarks/results/mpi.json
    python benchmarks/bench_mpi.py --ranks 1 2 3 --repeats 400 --out /tmp/mpi.json
    python benchmarks/bench_mpi.py --smoke            # tiny run, checks the benchmark itself works

The driver launches ``mpiexec -n K python bench_mpi.py --worker`` for each K (one Numba and one
BLAS thread per rank, so K ranks use K cores). Every rank validates the synchronized results
against single-process fastbn on the concatenated batch before anything is timed. Figures:

* per BN call (forward + backward, training), for a few shapes of the same *global* batch:
  ``local``  fastbn.batch_norm_forward/backward on this rank's shard, no communication;
  ``sync``   fastbn.distributed.batch_norm_forward/backward on the same shard;
  ``exchange`` the bare MPI collectives that ``sync`` performs, with the same message sizes.
  The synchronization cost is ``sync - local``. A sample is the time from a barrier to the
  slowest rank's finish; the figure is the median over repeats.
* per training step of the paper's MLP (784-100-100-100-10, sigmoid, BN before each hidden
  nonlinearity, batch 60, SGD): plain single-process fastbn vs synchronized BN with the
  gradients all-reduced (``allreduce_sum_``) on K ranks.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mpi.json"

BN_CASES = [  # name, global shape, channel axis
    ("MLP (60, 100)", (60, 100), 1),
    ("(N, C) 4096x512", (4096, 512), 1),
    ("NCHW 32x64x28x28", (32, 64, 28, 28), 1),
    ("NHWC 32x28x28x64", (32, 28, 28, 64), -1),
]
SMOKE_CASES = [("MLP (60, 100)", (60, 100), 1), ("NCHW 6x5x7x3", (6, 5, 7, 3), 1)]
MLP_SIZES = (784, 100, 100, 100, 10)
MLP_BATCH = 60


# ----------------------------------------------------------------------------------------------
# machine description (recorded with every result file)

def machine():
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__}
    try:
        import mpi4py
        from mpi4py import MPI
        info["mpi4py"] = mpi4py.__version__
        info["mpi_library"] = MPI.Get_library_version().splitlines()[0].strip()
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------------------------
# worker (runs under mpiexec)

def _timed(comm, fns, repeats):
    """Per fn, the samples (barrier -> slowest rank done) in seconds, shape (repeats,).

    The fns are interleaved (one sample of each per repeat), so that a load spike on a shared
    machine hits all of them alike and paired differences stay meaningful."""
    for fn in fns:
        fn()
        fn()
    samples = np.empty((repeats, len(fns)))
    for i in range(repeats):
        for j, fn in enumerate(fns):
            comm.Barrier()
            start = time.perf_counter()
            fn()
            samples[i, j] = time.perf_counter() - start
    return np.max(np.array(comm.allgather(samples)), axis=0)


def _ms(samples):
    return float(np.median(samples)) * 1e3


def _check(got, want, what, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max() if want.size else 0.0, 1.0)
    if got.shape != want.shape or not np.all(np.abs(got - want) <= rtol * scale):
        raise AssertionError(f"{what}: synchronized result differs from single process")


def bench_bn_calls(comm, cases, repeats, dtype):
    import fastbn
    from fastbn import distributed
    size = comm.Get_size()
    rows = []
    for name, shape, axis in cases:
        rng = np.random.default_rng(0)
        x_all = (2.0 + rng.standard_normal(shape)).astype(dtype)
        dy_all = rng.standard_normal(shape).astype(dtype)
        channels = shape[axis]
        gamma, beta = rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels)
        start, stop = distributed.shard(shape[0], comm)
        x, dy = x_all[start:stop], dy_all[start:stop]

        # validate before timing
        out = distributed.batch_norm_forward(x, gamma, beta, comm=comm, axis=axis)
        grads = distributed.batch_norm_backward(dy, x, out.mean, out.invstd, gamma, comm=comm,
                                                axis=axis)
        ref = fastbn.batch_norm_forward(x_all, gamma, beta, axis=axis)
        ref_grads = fastbn.batch_norm_backward(dy_all, x_all, ref.mean, ref.invstd, gamma,
                                               axis=axis)
        rtol = 1e-5 if dtype == np.float32 else 1e-11
        _check(out.y, ref.y[start:stop], f"{name} y", rtol)
        _check(out.invstd, ref.invstd, f"{name} invstd", rtol)
        _check(grads.dx, ref_grads.dx[start:stop], f"{name} dx", rtol)
        _check(grads.dgamma, ref_grads.dgamma, f"{name} dgamma", rtol)

        def local():
            o = fastbn.batch_norm_forward(x, gamma, beta, axis=axis)
            fastbn.batch_norm_backward(dy, x, o.mean, o.invstd, gamma, axis=axis)

        def sync():
            o = distributed.batch_norm_forward(x, gamma, beta, comm=comm, axis=axis)
            distributed.batch_norm_backward(dy, x, o.mean, o.invstd, gamma, comm=comm,
                                            axis=axis)

        # the collectives sync performs: forward header (6) + (mean, M2); backward header (4)
        # + (sum dy, sum dy*xc, sum xc); all float64
        fwd_header, bwd_header = np.zeros(6), np.zeros(4)
        fwd_payload, bwd_payload = np.zeros((2, channels)), np.zeros((3, channels))
        buffers = [(b, np.empty((size,) + b.shape))
                   for b in (fwd_header, fwd_payload, bwd_header, bwd_payload)]

        def exchange():
            for send, recv in buffers:
                comm.Allgather(send, recv)

        t_local, t_sync, t_exchange = _timed(comm, [local, sync, exchange], repeats).T
        sent = sum(b.nbytes for b, _ in buffers)
        rows.append({"case": name, "global_shape": list(shape), "axis": axis,
                     "dtype": np.dtype(dtype).name, "ranks": size,
                     "rows_per_rank": comm.allgather(stop - start),
                     "local_ms": _ms(t_local), "sync_ms": _ms(t_sync),
                     "exchange_ms": _ms(t_exchange),
                     "sync_overhead_ms": _ms(t_sync - t_local),   # median of paired differences
                     "bytes_sent_per_rank": sent, "bytes_received_per_rank": sent * size})
    return rows


class _MLP:
    """The paper's MLP with BN before each hidden sigmoid; NumPy matmuls, fastbn BN."""

    def __init__(self, rng, sizes=MLP_SIZES):
        self.weights = [rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)
                        for n_in, n_out in zip(sizes[:-1], sizes[1:])]
        self.biases = [np.zeros(n) for n in sizes[1:]]
        self.gammas = [np.ones(n) for n in sizes[1:-1]]
        self.betas = [np.zeros(n) for n in sizes[1:-1]]
        self.running = [(np.zeros(n), np.ones(n)) for n in sizes[1:-1]]

    def step(self, x, labels, global_batch, bn_forward, bn_backward, allreduce, lr=0.5):
        """One SGD step; returns the sum of the losses of this rank's rows."""
        saved, h = [], x
        for layer in range(len(self.gammas)):
            z = h @ self.weights[layer] + self.biases[layer]
            rm, rv = self.running[layer]
            out = bn_forward(z, self.gammas[layer], self.betas[layer], running_mean=rm,
                             running_var=rv)
            a = 1.0 / (1.0 + np.exp(-out.y))
            saved.append((h, z, out, a))
            h = a
        logits = h @ self.weights[-1] + self.biases[-1]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.log(p[np.arange(len(labels)), labels] + 1e-300).sum()
        d = p
        d[np.arange(len(labels)), labels] -= 1.0
        d /= global_batch                      # mean over the global batch
        grads_w, grads_b, grads_gamma, grads_beta = [None] * 4, [None] * 4, [None] * 3, [None] * 3
        grads_w[-1], grads_b[-1] = h.T @ d, d.sum(axis=0)
        dh = d @ self.weights[-1].T
        for layer in reversed(range(len(self.gammas))):
            h_in, z, out, a = saved[layer]
            dy = dh * a * (1.0 - a)
            g = bn_backward(dy, z, out.mean, out.invstd, self.gammas[layer])
            grads_gamma[layer], grads_beta[layer] = g.dgamma, g.dbeta   # already global
            grads_w[layer], grads_b[layer] = h_in.T @ g.dx, g.dx.sum(axis=0)
            dh = g.dx @ self.weights[layer].T
        allreduce(grads_w + grads_b)
        for params, grads in ((self.weights, grads_w), (self.biases, grads_b),
                              (self.gammas, grads_gamma), (self.betas, grads_beta)):
            for p_, g_ in zip(params, grads):
                p_ -= lr * g_
        return loss


def bench_mlp_step(comm, repeats):
    import fastbn
    from fastbn import distributed
    size = comm.Get_size()
    rng = np.random.default_rng(1)
    x_all = rng.uniform(0, 1, (MLP_BATCH, MLP_SIZES[0]))
    labels_all = rng.integers(0, MLP_SIZES[-1], MLP_BATCH)
    start, stop = distributed.shard(MLP_BATCH, comm)
    x, labels = x_all[start:stop], labels_all[start:stop]

    def sync_step(model):
        return model.step(x, labels, MLP_BATCH,
                          lambda *a, **k: distributed.batch_norm_forward(*a, comm=comm, **k),
                          lambda *a, **k: distributed.batch_norm_backward(*a, comm=comm, **k),
                          lambda arrays: distributed.allreduce_sum_(arrays, comm))

    def single_step(model):
        return model.step(x_all, labels_all, MLP_BATCH, fastbn.batch_norm_forward,
                          fastbn.batch_norm_backward, lambda arrays: arrays)

    # validate: a few synchronized steps on K ranks track single-process steps
    synced, single = _MLP(np.random.default_rng(2)), _MLP(np.random.default_rng(2))
    for _ in range(3):
        loss = comm.allreduce(sync_step(synced))
        want = single_step(single)
        if not np.isclose(loss, want, rtol=1e-10):
            raise AssertionError(f"MLP step: loss {loss} on {size} ranks, {want} in one process")
    for got, want in zip(synced.weights, single.weights):
        _check(got, want, "MLP weights after 3 steps", 1e-10)

    model, plain = _MLP(np.random.default_rng(3)), _MLP(np.random.default_rng(3))
    grads = [np.ones_like(w) for w in model.weights] + [np.ones_like(b) for b in model.biases]
    fns = [lambda: sync_step(model), lambda: distributed.allreduce_sum_(grads, comm)]
    if size == 1:
        fns.append(lambda: single_step(plain))
    samples = _timed(comm, fns, repeats)
    return {"shape": "784-100-100-100-10, batch 60, float64", "ranks": size,
            "rows_per_rank": comm.allgather(stop - start), "sync_step_ms": _ms(samples[:, 0]),
            "gradient_allreduce_ms": _ms(samples[:, 1]),
            "gradient_values": int(sum(g.size for g in grads)),
            "single_process_step_ms": _ms(samples[:, 2]) if size == 1 else None}


def worker(args):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    cases = SMOKE_CASES if args.smoke else BN_CASES
    result = {"bn_calls": [], "mlp_step": None}
    for dtype in (np.float32,) if args.smoke else (np.float32, np.float64):
        result["bn_calls"] += bench_bn_calls(comm, cases, args.repeats, dtype)
    result["mlp_step"] = bench_mlp_step(comm, args.repeats)
    if comm.Get_rank() == 0:
        Path(args.worker_out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# driver

def mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else "mpiexec"


def run_ranks(ranks, args):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", __file__,
               "--worker", "--worker-out", str(out), "--repeats", str(args.repeats)]
        if args.smoke:
            cmd.append("--smoke")
        env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
                   OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run(cmd, check=True, env=env, timeout=1800)
        return json.loads(out.read_text())


def table(results):
    lines = ["| case | dtype | ranks | rows/rank | local ms | sync ms | sync - local ms | "
             "bare MPI exchange ms | bytes sent/rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["bn_calls"]:
        lines.append(f"| {row['case']} | {row['dtype']} | {row['ranks']} | "
                     f"{'/'.join(map(str, row['rows_per_rank']))} | {row['local_ms']:.3f} | "
                     f"{row['sync_ms']:.3f} | {row['sync_overhead_ms']:+.3f} | "
                     f"{row['exchange_ms']:.4f} | {row['bytes_sent_per_rank']} |")
    lines += ["", "| MLP step (784-100-100-100-10, batch 60) | ranks | rows/rank | ms/step | "
                  "of which gradient allreduce_sum_ ms |", "|---|---|---|---|---|"]
    for step in results["mlp_step"]:
        if step["single_process_step_ms"] is not None:
            lines.append(f"| plain fastbn, one process | 1 | {MLP_BATCH} | "
                         f"{step['single_process_step_ms']:.3f} | - |")
        lines.append(f"| fastbn.distributed + allreduce_sum_ | {step['ranks']} | "
                     f"{'/'.join(map(str, step['rows_per_rank']))} | {step['sync_step_ms']:.3f} | "
                     f"{step['gradient_allreduce_ms']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and repeats")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.smoke:
        args.repeats = min(args.repeats, 5)
    results = {"machine": machine(), "threads_per_rank": 1, "repeats": args.repeats,
               "smoke": args.smoke, "bn_calls": [], "mlp_step": []}
    # other work on the machine skews loopback timings: record how busy it was
    load = [os.getloadavg()[0]]
    for ranks in args.ranks:
        part = run_ranks(ranks, args)
        results["bn_calls"] += part["bn_calls"]
        results["mlp_step"].append(part["mlp_step"])
        load.append(os.getloadavg()[0])
    results["machine"]["load_average_1min"] = load
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
