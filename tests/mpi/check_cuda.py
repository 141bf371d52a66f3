"""Run under ``mpiexec -n K python -m mpi4py tests/mpi/check_cuda.py``, on a GPU or with
``NUMBA_ENABLE_CUDASIM=1`` (numba's simulator: tiny shapes only).

The synchronized operations with the cuda backend: CUDA device arrays (the statistics are
exchanged through the host), and NumPy arrays with ``backend="cuda"`` (the host round trip),
against single-process cpu results on the concatenated batch, with a zero-row rank.
"""
import sys

import numpy as np
from mpi4py import MPI
from numba import cuda

import fastbn
from fastbn import distributed

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
failures = []
SHARD_SIZES = {1: [5], 2: [0, 5], 3: [3, 0, 2]}[size]


def check(ok, what):
    if not ok:
        failures.append(f"rank {rank}: {what}")


def close(got, want, tol, what):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        check(False, f"{what}: shape {got.shape} != {want.shape}")
        return
    err = np.abs(got - want)
    check(np.all(err <= tol * (1 + np.abs(want))),
          f"{what}: max error {err.max() if err.size else 0:.3g}")


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def run_case(shape, axis, dtype, on_device):
    tag = f"{shape} axis {axis} {np.dtype(dtype).name} {'device' if on_device else 'host'}"
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    gamma, beta = rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels)
    sdtype = fastbn.stats_dtype(dtype)
    rm0, rv0 = np.zeros(channels, sdtype), np.ones(channels, sdtype)
    start = sum(SHARD_SIZES[:rank])
    local = slice(start, start + SHARD_SIZES[rank])
    tol = 1e-5 if dtype == np.float32 else 1e-12

    ref_rm, ref_rv = rm0.copy(), rv0.copy()
    ref = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=ref_rm,
                                    running_var=ref_rv, backend="cpu")
    ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, gamma, axis=axis,
                                           backend="cpu")

    if on_device:
        put = cuda.to_device
        args = dict(backend=None)
    else:
        put = np.array
        args = dict(backend="cuda")
    x_l, dy_l = put(np.ascontiguousarray(x[local])), put(np.ascontiguousarray(dy[local]))
    g, b, rm, rv = put(gamma), put(beta), put(rm0.copy()), put(rv0.copy())
    out = distributed.batch_norm_forward(x_l, g, b, comm=comm, axis=axis, running_mean=rm,
                                         running_var=rv, **args)
    check(on_device == hasattr(out.y, "copy_to_host"), f"{tag}: y is not where x was")
    close(host(out.y), ref.y[local], tol, f"{tag}: y")
    close(host(out.mean), ref.mean, tol, f"{tag}: mean")
    close(host(out.invstd), ref.invstd, tol, f"{tag}: invstd")
    close(host(rm), ref_rm, tol, f"{tag}: running_mean")
    close(host(rv), ref_rv, tol, f"{tag}: running_var")
    grads = distributed.batch_norm_backward(dy_l, x_l, out.mean, out.invstd, g, comm=comm,
                                            axis=axis, **args)
    close(host(grads.dx), ref_grads.dx[local], tol, f"{tag}: dx")
    close(host(grads.dgamma), ref_grads.dgamma, tol, f"{tag}: dgamma")
    close(host(grads.dbeta), ref_grads.dbeta, tol, f"{tag}: dbeta")
    for value, what in ((out.mean, "mean"), (out.invstd, "invstd"), (grads.dgamma, "dgamma")):
        blobs = comm.allgather(host(value).tobytes())
        check(all(blob == blobs[0] for blob in blobs), f"{tag}: {what} differs across ranks")


def main():
    for shape, axis in (((5, 3, 2, 3), 1), ((5, 4), 1), ((5, 2, 3, 3), -1)):
        for dtype in (np.float32, np.float64):
            run_case(shape, axis, dtype, on_device=True)
    run_case((5, 3, 2, 3), 1, np.float32, on_device=False)
    everything = comm.gather(failures, root=0)
    if rank == 0:
        flat = [f for per_rank in everything for f in per_rank]
        for line in flat:
            print("FAIL", line)
        print(f"check_cuda: {size} ranks, {len(flat)} failures")
    return 1 if comm.allreduce(len(failures)) else 0


if __name__ == "__main__":
    sys.exit(main())
