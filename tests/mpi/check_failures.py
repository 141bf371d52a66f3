"""Failure behaviour of fastbn.distributed, under mpiexec. Usage:

``check_failures.py caught``    (any K >= 2) bad input, or disagreeing ranks, in every operation:
                                every rank must raise a clear error naming the failing rank,
                                leave its running statistics and arrays untouched, and the
                                communicator must stay usable. Exit status 0 when all hold.
``check_failures.py uncaught``  rank 1 passes a bad gamma and nobody catches: every rank must
                                exit with the error (no rank waits forever).
``check_failures.py abort``     rank 1 fails after the statistics were exchanged: the job must
                                be aborted with a message naming rank 1.
"""
import sys

import numpy as np
from mpi4py import MPI

import fastbn
from fastbn import distributed
from fastbn.distributed import DistributedError

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
failures = []
CHANNELS = 4


def check(ok, what):
    if not ok:
        failures.append(f"rank {rank}: {what}")


def data(rows=3, channels=CHANNELS, dtype=np.float64):
    rng = np.random.default_rng(rank)
    return rng.normal(2.0, 1.5, (rows, channels, 5)).astype(dtype)


def expect_error(what, fn, error_type, *needles):
    """fn must raise error_type on this rank with every needle in the message."""
    try:
        fn()
    except error_type as exc:
        message = str(exc)
        missing = [n for n in needles if n not in message]
        check(not missing, f"{what}: message {message!r} lacks {missing}")
        return exc
    except Exception as exc:   # noqa: BLE001  (report, don't propagate: keep ranks in step)
        check(False, f"{what}: expected {error_type.__name__}, got {type(exc).__name__}: {exc}")
        return exc
    check(False, f"{what}: expected {error_type.__name__}, nothing was raised")
    return None


def forward_with_running(x, gamma=None, **kwargs):
    rm, rv = np.full(x.shape[1], 0.5), np.full(x.shape[1], 2.0)
    before = rm.copy(), rv.copy()

    def call():
        distributed.batch_norm_forward(x, gamma, None, comm=comm, running_mean=rm,
                                       running_var=rv, **kwargs)
    return call, (rm, rv), before


def untouched(state, before, what):
    check(all(np.array_equal(a, b) for a, b in zip(state, before)),
          f"{what}: running statistics were modified")


def caught():
    x = data()
    name = f"of {size}"

    # bad gamma on rank 1 only
    call, state, before = forward_with_running(x, np.ones(CHANNELS + (rank == 1)))
    exc = expect_error("bad gamma on rank 1", call, DistributedError,
                       f"batch_norm_forward failed on rank 1 {name}", "gamma: expected shape")
    untouched(state, before, "bad gamma on rank 1")
    check(exc is None or set(getattr(exc, "failures", {})) == {1}, "failures attribute")
    check(exc is None or (exc.__cause__ is not None) == (rank == 1),
          "the failing rank's error is chained, only there")

    # integer x on the last rank
    xs = x.astype(np.int64) if rank == size - 1 else x
    call, state, before = forward_with_running(xs)
    expect_error("integer x on the last rank", call, DistributedError,
                 f"rank {size - 1} {name}", "TypeError", "astype")
    untouched(state, before, "integer x")

    # two failing ranks are both named
    bad = rank in (0, size - 1)
    call, state, before = forward_with_running(x, momentum=2.0 if bad else 0.1)
    expect_error("bad momentum on two ranks", call, DistributedError,
                 f"ranks 0, {size - 1} {name}", "momentum")
    untouched(state, before, "bad momentum")

    # disagreements across ranks are detected, not mixed
    call, state, before = forward_with_running(data(channels=CHANNELS + (rank == 1)))
    expect_error("channel mismatch", call, DistributedError, "channel counts differ",
                 f"rank 1: {CHANNELS + 1}")
    untouched(state, before, "channel mismatch")
    call, state, before = forward_with_running(data(dtype=np.float32 if rank == 0
                                                    else np.float64))
    expect_error("dtype mismatch", call, DistributedError, "dtypes of x differ",
                 "rank 0: float32", "rank 1: float64")
    untouched(state, before, "dtype mismatch")
    call, state, before = forward_with_running(x, eps=1e-3 if rank == 1 else 1e-5)
    expect_error("eps mismatch", call, DistributedError, "eps values differ")
    untouched(state, before, "eps mismatch")

    # fewer than 2 values per channel over all ranks: local shards of 0 or 1 row are fine,
    # the global count is what must reach 2
    x_nc = np.arange(CHANNELS, dtype=np.float64).reshape(1, CHANNELS)[:1 if rank == 0 else 0]
    rm, rv = np.zeros(CHANNELS), np.ones(CHANNELS)
    expect_error("global count 1", lambda: distributed.batch_norm_forward(
        x_nc, comm=comm, running_mean=rm, running_var=rv), ValueError,
        "more than 1 value per channel over all ranks", "got 1")
    untouched((rm, rv), (np.zeros(CHANNELS), np.ones(CHANNELS)), "global count 1")

    # backward: bad dy on rank 1, and a channel mismatch
    out = distributed.batch_norm_forward(x, comm=comm)
    dy = np.ones_like(x)[:, :, :4] if rank == 1 else np.ones_like(x)
    expect_error("bad dy on rank 1", lambda: distributed.batch_norm_backward(
        dy, x, out.mean, out.invstd, comm=comm), DistributedError,
        f"batch_norm_backward failed on rank 1 {name}", "dy: expected x's shape")
    xb = data(channels=CHANNELS + 1) if rank == 0 else x
    mean = np.zeros(xb.shape[1])
    expect_error("backward channel mismatch", lambda: distributed.batch_norm_backward(
        xb, xb, mean, np.ones_like(mean), comm=comm), DistributedError,
        "batch_norm_backward: channel counts differ")

    # RunningMoments
    acc = fastbn.RunningMoments(CHANNELS + (rank == 1)).update(data(channels=CHANNELS
                                                                     + (rank == 1)))
    saved = acc.state_dict()
    expect_error("RunningMoments channel mismatch", lambda: distributed.allreduce_moments(acc, comm),
                 DistributedError, "allreduce_moments: channel counts differ")
    check(acc.count == saved["count"] and np.array_equal(acc.mean, saved["mean"]),
          "RunningMoments modified on error")
    expect_error("not a RunningMoments on rank 1", lambda: distributed.allreduce_moments(
        acc if rank != 1 else "acc", comm), DistributedError, f"rank 1 {name}", "acc: expected")

    # allreduce_sum_
    grads = [np.ones((2, 3 + (rank == 1))), np.ones(4)]
    expect_error("allreduce_sum_ shape mismatch", lambda: distributed.allreduce_sum_(
        grads, comm), DistributedError, "allreduce_sum_")
    check(all((g == 1).all() for g in grads), "allreduce_sum_ modified arrays on error")
    frozen = np.ones(3)
    frozen.flags.writeable = rank != 0
    expect_error("allreduce_sum_ read-only on rank 0", lambda: distributed.allreduce_sum_(
        [frozen], comm), DistributedError, f"rank 0 {name}", "read-only")

    # after all that, the communicator still works and results are right
    out = distributed.batch_norm_forward(x, comm=comm)
    whole = np.concatenate(comm.allgather(x))
    ref = fastbn.batch_norm_forward(whole)
    check(np.allclose(out.mean, ref.mean, rtol=1e-14, atol=1e-14),
          "forward after the failures: wrong mean")

    everything = comm.gather(failures, root=0)
    if rank == 0:
        flat = [f for per_rank in everything for f in per_rank]
        for line in flat:
            print("FAIL", line)
        print(f"check_failures caught: {size} ranks, {len(flat)} failures")
    return 1 if comm.allreduce(len(failures)) else 0


def uncaught():
    x = data()
    gamma = np.ones(CHANNELS + (rank == 1))
    distributed.batch_norm_forward(x, gamma, None, comm=comm)   # raises on every rank
    print(f"rank {rank}: not reached")
    return 0


def abort():
    x = data()
    if rank == 1:
        from fastbn.backends import cpu

        def broken(*args):
            raise RuntimeError("injected failure after the exchange")
        cpu.forward_eval = broken
    distributed.batch_norm_forward(x, comm=comm, backend="cpu")
    comm.Barrier()   # the healthy ranks wait here until the abort ends the job
    print(f"rank {rank}: not reached")
    return 0


if __name__ == "__main__":
    sys.exit({"caught": caught, "uncaught": uncaught, "abort": abort}[sys.argv[1]]())
