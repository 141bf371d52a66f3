"""Run under ``mpiexec -n K python -m mpi4py tests/mpi/check_sync.py`` (K = 2 or 3).

Every synchronized operation of fastbn.distributed is compared with single-process fastbn on
the concatenated global batch, over layouts, dtypes, backends and skewed shards (including a
rank with zero rows and one with a single row), and the statistics are checked to be the same
bit for bit on every rank. Each rank collects failed checks instead of raising, so one wrong
value cannot leave the other ranks waiting; rank 0 prints them all. Exit status: 0 when every
check passed on every rank.
"""
import sys
import zlib

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn import distributed

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
failures = []

# global batch of 9 rows split with skew; every list has one entry per rank
SHARD_SIZES = {
    1: [[9]],
    2: [[0, 9], [7, 2]],
    3: [[5, 0, 4], [1, 7, 1]],
}[size]

LAYOUTS = [  # name, global shape, channel axis
    ("NCHW", (9, 3, 4, 5), 1),
    ("NHWC", (9, 4, 5, 3), -1),
    ("NC", (9, 6), 1),
]
TOL = {np.float32: (3e-6, 3e-6), np.float64: (1e-12, 1e-12)}   # (atol, rtol) for y and dx
STATS_RTOL = {np.float32: 2.5e-7, np.float64: 1e-14}


def check(ok, what):
    if not ok:
        failures.append(f"rank {rank}: {what}")


def close(got, want, atol, rtol, what):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        check(False, f"{what}: shape {got.shape} != {want.shape}")
        return
    scale = np.abs(want).max() if want.size else 0.0
    err = np.abs(got - want)
    bad = err > atol * max(scale, 1.0) + rtol * np.abs(want)
    check(not bad.any(), f"{what}: max error {err.max() if err.size else 0:.3g} "
                         f"(scale {scale:.3g})")


def same_on_every_rank(a, what):
    a = np.asarray(a)
    blobs = comm.allgather((a.dtype.str, a.shape, a.tobytes()))
    check(all(b == blobs[0] for b in blobs), f"{what}: differs across ranks (bits)")


def rows(sizes):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def channel_data(rng, shape, axis, dtype, loc=3.0):
    """Per-channel offsets and scales, so no statistic is trivially zero or one."""
    channels = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = channels
    offsets = rng.uniform(-loc, loc, channels).reshape(bshape)
    scales = rng.uniform(0.5, 2.0, channels).reshape(bshape)
    return (offsets + scales * rng.standard_normal(shape)).astype(dtype)


def check_forward_backward(backend, name, shape, axis, dtype, sizes, affine, loc=3.0):
    tag = f"{backend} {name} {np.dtype(dtype).name} shards {sizes} loc {loc}"
    # the same seed on every rank (str hashes are salted per process)
    rng = np.random.default_rng(zlib.crc32(f"{name} {np.dtype(dtype).name} {sizes}".encode()))
    x = channel_data(rng, shape, axis, dtype, loc)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    gamma = rng.uniform(0.5, 1.5, channels) if affine else None
    beta = rng.standard_normal(channels) if affine else None
    sdtype = fastbn.stats_dtype(dtype)
    running0 = (rng.standard_normal(channels).astype(sdtype),
                rng.uniform(0.5, 2, channels).astype(sdtype))
    local = rows(sizes)
    atol, rtol = TOL[dtype]
    srtol = STATS_RTOL[dtype]

    rm, rv = running0[0].copy(), running0[1].copy()
    out = distributed.batch_norm_forward(x[local], gamma, beta, comm=comm, axis=axis,
                                         running_mean=rm, running_var=rv, momentum=0.3,
                                         backend=backend)
    rm_ref, rv_ref = running0[0].copy(), running0[1].copy()
    ref = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm_ref,
                                    running_var=rv_ref, momentum=0.3, backend=backend)
    check(out.y.dtype == x.dtype and out.y.shape == x[local].shape, f"{tag}: y dtype/shape")
    check(out.mean.dtype == sdtype and out.invstd.dtype == sdtype, f"{tag}: stats dtype")
    close(out.y, ref.y[local], atol, rtol, f"{tag}: y")
    close(out.mean, ref.mean, srtol, srtol, f"{tag}: mean")
    close(out.invstd, ref.invstd, srtol, srtol, f"{tag}: invstd")
    close(rm, rm_ref, srtol, srtol, f"{tag}: running_mean")
    close(rv, rv_ref, srtol, srtol, f"{tag}: running_var (global unbiased factor)")
    for value, what in ((out.mean, "mean"), (out.invstd, "invstd"), (rm, "running_mean"),
                        (rv, "running_var")):
        same_on_every_rank(value, f"{tag}: {what}")

    grads = distributed.batch_norm_backward(dy[local], x[local], out.mean, out.invstd, gamma,
                                            comm=comm, axis=axis, backend=backend)
    ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, gamma, axis=axis,
                                           backend=backend)
    check(grads.dx.dtype == x.dtype and grads.dx.shape == x[local].shape, f"{tag}: dx dtype")
    check(grads.dgamma.dtype == sdtype and grads.dbeta.dtype == sdtype, f"{tag}: dgamma dtype")
    close(grads.dx, ref_grads.dx[local], atol, rtol, f"{tag}: dx")
    close(grads.dgamma, ref_grads.dgamma, atol, rtol, f"{tag}: dgamma")
    close(grads.dbeta, ref_grads.dbeta, atol, rtol, f"{tag}: dbeta")
    same_on_every_rank(grads.dgamma, f"{tag}: dgamma")
    same_on_every_rank(grads.dbeta, f"{tag}: dbeta")


def check_large_mean():
    """Data whose mean is 1e6 times its spread: E[x^2] - E[x]^2 would lose every digit."""
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(7)
        x = (1e6 + rng.standard_normal((9, 4))).astype(dtype)
        dy = rng.standard_normal((9, 4)).astype(dtype)
        local = rows(SHARD_SIZES[-1])
        out = distributed.batch_norm_forward(x[local], comm=comm)
        x64 = x.astype(np.float64)
        var = x64.var(axis=0)
        close(out.mean, x64.mean(axis=0), 0, 1e-7 if dtype == np.float32 else 1e-15,
              f"large mean {np.dtype(dtype).name}: mean")
        close(out.invstd, 1 / np.sqrt(var + 1e-5), 0, 1e-6 if dtype == np.float32 else 1e-10,
              f"large mean {np.dtype(dtype).name}: invstd")
        grads = distributed.batch_norm_backward(dy[local], x[local], out.mean, out.invstd,
                                                comm=comm)
        ref = fastbn.batch_norm_backward(dy, x, out.mean, out.invstd, backend="reference")
        close(grads.dx, ref.dx[local], 1e-5, 1e-5, f"large mean {np.dtype(dtype).name}: dx")
        close(grads.dgamma, ref.dgamma, 1e-5, 1e-5,
              f"large mean {np.dtype(dtype).name}: dgamma")


def check_eval_needs_no_communication():
    """Only rank 0 calls the eval forward: if it communicated, this would hang."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 3)).astype(np.float32)
    rm, rv = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    if rank == 0:
        out = distributed.batch_norm_forward(x, None, None, comm=comm, training=False,
                                             running_mean=rm, running_var=rv)
        ref = fastbn.batch_norm_forward(x, training=False, running_mean=rm, running_var=rv)
        check(np.array_equal(out.y, ref.y), "eval: y differs from fastbn on the local shard")
    comm.Barrier()


def check_running_moments():
    rng = np.random.default_rng(11)
    for shape, axis, sizes in (((9, 3, 4), 1, SHARD_SIZES[0]), ((9, 5), 1, SHARD_SIZES[-1])):
        x = channel_data(rng, shape, axis, np.float64)
        acc = fastbn.RunningMoments(shape[axis]).update(x[rows(sizes)], axis=axis)
        returned = distributed.allreduce_moments(acc, comm)
        full = fastbn.RunningMoments(shape[axis]).update(x, axis=axis)
        check(returned is acc, "allreduce_moments: does not return acc")
        check(acc.count == full.count, f"RunningMoments: count {acc.count} != {full.count}")
        close(acc.mean, full.mean, 1e-14, 1e-14, "RunningMoments: mean")   # means near 0
        close(acc.m2, full.m2, 0, 1e-12, "RunningMoments: m2")
        same_on_every_rank(acc.mean, "RunningMoments: mean")
        same_on_every_rank(acc.m2, "RunningMoments: m2")
    # twice in a row on already-global accumulators: the counts add up again
    acc = fastbn.RunningMoments(2).update(np.ones((rank + 2, 2)))
    distributed.allreduce_moments(acc, comm)
    check(acc.count == sum(r + 2 for r in range(size)), "allreduce_moments: count")


def check_allreduce_sum():
    def contribution(r):
        g = np.random.default_rng(100 + r)
        return [g.standard_normal((3, 4)).astype(np.float32), g.standard_normal(5),
                np.full((2, 2, 2), r + 0.25)]

    arrays = contribution(rank)
    returned = distributed.allreduce_sum_(arrays, comm)
    check(returned is arrays, "allreduce_sum_: does not return its argument")
    want = [sum(contribution(r)[i].astype(np.float64) for r in range(size)) for i in range(3)]
    for i, (got, ref) in enumerate(zip(arrays, want)):
        check(got.dtype == contribution(rank)[i].dtype, f"allreduce_sum_[{i}]: dtype changed")
        close(got, ref, 0, 1e-6 if got.dtype == np.float32 else 1e-15, f"allreduce_sum_[{i}]")
        same_on_every_rank(got, f"allreduce_sum_[{i}]")
    single = np.full(3, float(rank))
    check(distributed.allreduce_sum_(single, comm) is single, "allreduce_sum_: single array")
    close(single, np.full(3, float(sum(range(size)))), 0, 0, "allreduce_sum_ single array")


def check_shard():
    for batch in (0, 1, 7, 60, 61):
        start, stop = distributed.shard(batch, comm)
        bounds = comm.allgather((start, stop))
        check(bounds[0][0] == 0 and bounds[-1][1] == batch
              and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])),
              f"shard({batch}): {bounds} do not tile [0, {batch})")
        lengths = [b - a for a, b in bounds]
        check(max(lengths) - min(lengths) <= 1, f"shard({batch}): uneven beyond one {bounds}")


def main():
    for backend in ("cpu", "reference"):
        for name, shape, axis in LAYOUTS:
            for dtype in (np.float32, np.float64):
                for i, sizes in enumerate(SHARD_SIZES):
                    check_forward_backward(backend, name, shape, axis, dtype, sizes,
                                           affine=(i == 0))
    check_large_mean()
    check_eval_needs_no_communication()
    check_running_moments()
    check_allreduce_sum()
    check_shard()
    everything = comm.gather(failures, root=0)
    if rank == 0:
        flat = [f for per_rank in everything for f in per_rank]
        for line in flat:
            print("FAIL", line)
        print(f"check_sync: {size} ranks, {len(flat)} failures")
    return 1 if comm.allreduce(len(failures)) else 0


if __name__ == "__main__":
    sys.exit(main())
