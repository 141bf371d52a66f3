"""Synchronized batch normalization over MPI (mpi4py): statistics of the global batch.

Each rank holds a shard of the global batch. In training, every rank computes per-channel
``(count, mean, M2)`` of its shard, the ranks all-gather these partials, and every rank merges
them in rank order with Chan's formula, so every rank holds the same statistics bit for bit.
Backward all-gathers per-channel ``sum(dy)``, ``sum(dy * (x - mean))`` and ``sum(x - mean)``
and sums them in rank order. Eval mode needs no communication. docs/distributed.md has the
algorithm, the bytes exchanged and how to run across machines.

Failures never leave ranks waiting: before any data is exchanged, the ranks all-gather a small
header saying whether each one is fine and what it holds (channels, dtype, rows, eps). A rank
whose input is invalid still joins that exchange, and then every rank raises the same
:class:`DistributedError` naming the failing rank and its message. An unexpected exception after
the statistics were exchanged aborts the job (``comm.Abort``) with a message naming the rank.

mpi4py is imported only when a communicator is needed: ``import fastbn`` never imports it.
"""
import os
import sys
import threading
import time
import traceback
import zlib

import numpy as np

from . import _validate, backends
from ._validate import FLOAT_DTYPES
from .api import BatchNormGrads, BatchNormOutput, Canonical
from .api import batch_norm_forward as _local_batch_norm_forward
from .stats import RunningMoments, chan_merge

__all__ = ["batch_norm_forward", "batch_norm_backward", "allreduce_moments", "allreduce_sum_",
           "shard", "shard_bounds", "agree", "same_on_every_rank", "DistributedError"]

_MISSING_MPI = ('fastbn.distributed needs mpi4py and an MPI library; install them with '
                'pip install "fastbn[mpi]" (mpi4py and the mpich wheel, which provides mpiexec)')

class DistributedError(RuntimeError):
    """Raised on every rank when a synchronized operation failed on some rank, or when the
    ranks disagree on what they hold (channels, dtype, eps, ...).

    ``failures`` maps each failing rank to its error message (empty for disagreements).
    """

    def __init__(self, message, failures=None):
        super().__init__(message)
        self.failures = dict(failures or {})


# ----------------------------------------------------------------------------------------------
# communicator and the failure protocol

def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(_MISSING_MPI) from exc
    return MPI


def _resolve_comm(comm):
    """The communicator to use: ``comm``, or ``MPI.COMM_WORLD`` when None."""
    MPI = _mpi()
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm: expected an mpi4py communicator such as MPI.COMM_WORLD, got "
                        f"{type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError("comm: expected a valid communicator, got MPI.COMM_NULL")
    if comm.Is_inter():
        raise ValueError("comm: expected an intracommunicator, got an intercommunicator")
    return comm


def _abort(comm, op_name, exc):
    """Print what failed on this rank and abort the whole job: after the statistics were
    exchanged, a rank that stops would leave the others waiting in their next collective."""
    rank, size = comm.Get_rank(), comm.Get_size()
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"{detail}fastbn.distributed.{op_name}: unexpected "
                     f"{type(exc).__name__} on rank {rank} of {size}: {exc}\n"
                     f"fastbn.distributed: aborting the MPI job (the other ranks would "
                     f"otherwise wait for rank {rank} forever)\n")
    sys.stderr.flush()
    # let the launcher forward the message first: MPI_Abort kills the job's processes, and
    # output still in mpiexec's pipes is lost with them (seen under load: an empty log)
    time.sleep(0.5)
    comm.Abort(1)
    os._exit(1)   # Abort does not return; if an MPI in a broken state lets it, still stop here


def _collective(comm, op_name, fn, *args):
    """Run one MPI call; an MPI-level failure aborts the job rather than leave ranks hanging."""
    try:
        return fn(*args)
    except Exception as exc:
        _abort(comm, op_name, exc)


def _describe(exc):
    return f"{type(exc).__name__}: {exc}"


def agree(comm, op_name, error, fields, n_fields):
    """Step 1 of every synchronized operation, reached by every rank whatever happened.

    Each rank contributes ``[failed, *fields]`` (``n_fields`` float64 values, NaN on a rank
    that failed before it knew them); the gathered table has one row per rank. If any rank
    failed, the ranks gather the error messages and every rank raises the same
    DistributedError (chained to the local exception on the failing rank).
    """
    size = comm.Get_size()
    header = np.full(1 + n_fields, np.nan)
    header[0] = 0.0 if error is None else 1.0
    if error is None:
        header[1:] = fields
    table = np.empty((size, header.size))
    _collective(comm, op_name, comm.Allgather, header, table)
    if table[:, 0].any():
        messages = _collective(comm, op_name, comm.allgather,
                               None if error is None else _describe(error))
        failures = {rank: msg for rank, msg in enumerate(messages) if msg is not None}
        ranks = sorted(failures)
        if len(ranks) == 1:
            text = f"rank {ranks[0]} of {size}: {failures[ranks[0]]}"
        else:
            text = (f"ranks {', '.join(str(r) for r in ranks)} of {size}: "
                    + "; ".join(f"rank {r}: {failures[r]}" for r in ranks))
        raise DistributedError(f"{op_name} failed on {text}", failures) from error
    return table[:, 1:]


def same_on_every_rank(table, op_name, *columns):
    """Raise on every rank when a header column differs across ranks.

    ``columns`` are (index, what, show) triples; ``show`` formats one rank's value."""
    same = (table == table[0]).all(axis=0)
    for column, what, show in columns:
        if not same[column]:
            per_rank = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(table[:, column]))
            raise DistributedError(f"{op_name}: {what} differ across ranks ({per_rank}); every "
                                   f"rank must pass the same")


def _as_int(value):
    return int(value)


def _dtype_name(code):
    return str(FLOAT_DTYPES[int(code)])


def _allgather(comm, op_name, local):
    """All ranks' float64 partials stacked in rank order: shape (size, *local.shape)."""
    local = np.ascontiguousarray(local, dtype=np.float64)
    gathered = np.empty((comm.Get_size(),) + local.shape)
    _collective(comm, op_name, comm.Allgather, local, gathered)
    return gathered


def _merge_moments(counts, means, m2s):
    """Chan's merge of per-rank (count, mean, M2) in rank order: the same operations in the same
    order on every rank, so every rank gets the same bits. Empty ranks contribute nothing."""
    count, mean, m2 = 0, np.zeros(means.shape[1]), np.zeros(means.shape[1])
    for rank_count, rank_mean, rank_m2 in zip(counts, means, m2s):
        count, mean, m2 = chan_merge(count, mean, m2, int(rank_count), rank_mean, rank_m2)
    return count, mean, m2


# ----------------------------------------------------------------------------------------------
# host <-> backend for the small per-channel vectors

def _host(be, a):
    """A float64 host copy of a per-channel vector held by the backend."""
    return np.array(be.to_host(a), dtype=np.float64)


def _to_backend(be, a):
    """A float64 host vector as the backend's array (copied to the device by a device backend)."""
    return be.to_device(a) if be.ON_DEVICE else a


# ----------------------------------------------------------------------------------------------
# public operations

def batch_norm_forward(x, gamma=None, beta=None, *, comm=None, axis=1, eps=1e-5, training=True,
                       running_mean=None, running_var=None, momentum=0.1, backend=None):
    """Batch normalization forward with statistics over the batch split across MPI ranks.

    Every rank calls this collectively with its shard ``x`` of the global batch (shards may
    differ in size; a rank may hold zero rows). Arguments are those of
    :func:`fastbn.batch_norm_forward`, plus:

    Parameters
    ----------
    comm : mpi4py communicator, optional
        Default ``MPI.COMM_WORLD``.
    training : bool
        True: normalize with the global batch mean and biased variance, and update the running
        statistics (the unbiased factor uses the global count). False: normalize with the
        running statistics; no communication (every rank must then pass the same flag).

    Returns
    -------
    BatchNormOutput(y, mean, invstd)
        ``y`` is this rank's shard; ``mean``/``invstd`` are the global statistics, identical
        bit for bit on every rank.

    Raises
    ------
    DistributedError
        On every rank, when some rank's input is invalid (naming that rank and its error), or
        when ranks disagree on channels, dtype, eps or momentum.
    ValueError
        On every rank, in training, when the global batch has fewer than 2 values per channel.

    See Also
    --------
    torch.nn.SyncBatchNorm, fastbn.batch_norm_forward
    """
    if not training:
        # the statistics are the running ones: nothing to exchange
        return _local_batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, training=False,
                                         running_mean=running_mean, running_var=running_var,
                                         momentum=momentum, backend=backend)
    op_name = "batch_norm_forward"
    comm = _resolve_comm(comm)
    error, fields = None, ()
    try:
        be = backends.resolve(backend, (x, gamma, beta, running_mean, running_var))
        a = _validate.forward(be, x, gamma, beta, axis=axis, eps_value=eps, training=training,
                              running_mean=running_mean, running_var=running_var,
                              momentum_value=momentum, local_count=False)
        channels = a.x.shape[a.axis]
        # a rank may hold fewer than 2 (even 0) values per channel: only the global count matters
        partials = np.zeros((2, channels))
        canon = Canonical(be, a.x, a.axis)
        if a.count > 0:
            x3 = canon.view(a.x)
            mean_local, m2_local = be.channel_moments(x3)
            partials[0], partials[1] = _host(be, mean_local), _host(be, m2_local)
        fields = (channels, FLOAT_DTYPES.index(a.x.dtype), a.count, a.eps, a.momentum)
    except Exception as exc:
        error = exc
    table = agree(comm, op_name, error, fields, 5)
    same_on_every_rank(table, op_name, (0, "channel counts", _as_int),
                        (1, "dtypes of x", _dtype_name), (3, "eps values", float),
                        (4, "momentum values", float))
    counts = table[:, 2].astype(np.int64)
    total = int(counts.sum())
    if total < 2:
        raise ValueError(f"x: expected more than 1 value per channel over all ranks in training "
                         f"mode, got {total} (per rank: {[int(c) for c in counts]})")
    gathered = _allgather(comm, op_name, partials)
    total, mean64, m2 = _merge_moments(counts, gathered[:, 0], gathered[:, 1])
    var64 = m2 / total
    # ---- the ranks are in step and the input is valid: anything that fails now aborts ----
    try:
        mean_be, var_be = _to_backend(be, mean64), _to_backend(be, var64)
        y = be.empty_like(a.x)
        mean = be.empty((channels,), a.stats_dtype)
        invstd = be.empty((channels,), a.stats_dtype)
        # normalizing with given statistics is the eval transform, with the global batch's
        y3, y_copied = canon.output(y)
        be.forward_eval(canon.view(a.x), a.gamma, a.beta, mean_be, var_be, a.eps, None, None,
                        y3, mean, invstd)
        canon.finish(y3, y_copied, y)
        if a.running_mean is not None:
            be.update_running_stats(a.running_mean, a.running_var, mean_be, var_be, total,
                                    a.momentum,
                                    lambda channels: _validate.warn_nonfinite(channels, 4))
    except Warning:
        raise   # a warning turned into an error: the same on every rank, nothing changed
    except Exception as exc:
        _abort(comm, op_name, exc)
    return BatchNormOutput(y, mean, invstd)


def batch_norm_backward(dy, x, mean, invstd, gamma=None, *, comm=None, axis=1, backend=None):
    """Gradients of the synchronized :func:`batch_norm_forward` (training mode).

    Every rank calls this collectively with its shards ``dy``, ``x`` and the global ``mean`` and
    ``invstd`` returned by the forward call.

    Returns
    -------
    BatchNormGrads(dx, dgamma, dbeta)
        ``dx`` is this rank's slice of the gradient over the global batch; ``dgamma``/``dbeta``
        are the global sums (already reduced over the ranks: do not all-reduce them again),
        identical bit for bit on every rank.

    For the gradient of the eval-mode transform (no statistics to synchronize) call
    :func:`fastbn.batch_norm_backward` with ``training=False`` on each rank.

    See Also
    --------
    torch.nn.SyncBatchNorm, fastbn.batch_norm_backward
    """
    op_name = "batch_norm_backward"
    comm = _resolve_comm(comm)
    error, fields = None, ()
    try:
        be = backends.resolve(backend, (dy, x, mean, invstd, gamma))
        a = _validate.backward(be, dy, x, mean, invstd, gamma, axis=axis, training=True)
        channels = a.x.shape[a.axis]
        sums = np.zeros((3, channels))
        canon = Canonical(be, a.x, a.axis)
        if a.count > 0:
            x3, dy3 = canon.view(a.x), canon.view(a.dy)
            sums = np.asarray(be.backward_reduce(dy3, x3, a.mean), dtype=np.float64)
        fields = (channels, FLOAT_DTYPES.index(a.x.dtype), a.count)
    except Exception as exc:
        error = exc
    table = agree(comm, op_name, error, fields, 3)
    same_on_every_rank(table, op_name, (0, "channel counts", _as_int),
                        (1, "dtypes of x", _dtype_name))
    total = int(table[:, 2].astype(np.int64).sum())
    gathered = _allgather(comm, op_name, sums)
    sum_dy, sum_dy_xc, sum_xc = gathered[0].copy()
    for rank_sums in gathered[1:]:       # rank order: the same bits on every rank
        sum_dy += rank_sums[0]
        sum_dy_xc += rank_sums[1]
        sum_xc += rank_sums[2]
    # ---- the ranks are in step and the input is valid: anything that fails now aborts ----
    try:
        mean_h, invstd_h = _host(be, a.mean), _host(be, a.invstd)
        weight_h = np.ones(channels) if a.gamma is None else _host(be, a.gamma)
        if total > 0:
            # re-centre on the exact global mean (the saved mean may be rounded to float32)
            shift = sum_xc / total
            sum_dy_xc = sum_dy_xc - shift * sum_dy
            mean_h = mean_h + shift
        dgamma_h = sum_dy_xc * invstd_h
        dx = be.empty_like(a.x)
        if a.count > 0:
            dx3, dx_copied = canon.output(dx)
            be.backward_apply(dy3, x3, *(_to_backend(be, v) for v in (
                mean_h, weight_h * invstd_h, sum_dy / total,
                invstd_h * invstd_h * sum_dy_xc / total)), dx3)
            canon.finish(dx3, dx_copied, dx)
        dgamma = be.to_device(dgamma_h.astype(a.mean.dtype)) if be.ON_DEVICE \
            else dgamma_h.astype(a.mean.dtype)
        dbeta = be.to_device(sum_dy.astype(a.mean.dtype)) if be.ON_DEVICE \
            else sum_dy.astype(a.mean.dtype)
    except Exception as exc:
        _abort(comm, op_name, exc)
    return BatchNormGrads(dx, dgamma, dbeta)


def allreduce_moments(acc, comm=None):
    """Merge a :class:`fastbn.RunningMoments` over every rank, in place; returns ``acc``.

    Afterwards every rank holds the population statistics of all ranks' data, bit for bit the
    same (Chan's merge in rank order).
    """
    op_name = "allreduce_moments"
    comm = _resolve_comm(comm)
    error, fields = None, ()
    try:
        if not isinstance(acc, RunningMoments):
            raise TypeError(f"acc: expected a fastbn.RunningMoments, got {type(acc).__name__}")
        partials = np.stack([acc.mean, acc.m2]).astype(np.float64)
        fields = (acc.num_channels, acc.count)
    except Exception as exc:
        error = exc
    table = agree(comm, op_name, error, fields, 2)
    same_on_every_rank(table, op_name, (0, "channel counts", _as_int))
    gathered = _allgather(comm, op_name, partials)
    acc.count, acc.mean, acc.m2 = _merge_moments(table[:, 1].astype(np.int64),
                                                 gathered[:, 0], gathered[:, 1])
    return acc


def allreduce_sum_(arrays, comm=None):
    """Sum host arrays over every rank, in place (for data-parallel gradient all-reduce).

    ``arrays`` is one NumPy array or a sequence of them (any float dtypes; every rank passes the
    same shapes and dtypes in the same order). They travel together as one float64 message:
    an ``Allreduce`` then a ``Bcast`` from rank 0, so every rank gets the same bits whatever
    the MPI library's reduction order. Returns ``arrays``.
    """
    op_name = "allreduce_sum_"
    comm = _resolve_comm(comm)
    error, fields = None, ()
    try:
        items = [arrays] if isinstance(arrays, np.ndarray) else list(arrays)
        signature = []
        for i, a in enumerate(items):
            if not isinstance(a, np.ndarray):
                raise TypeError(f"arrays[{i}]: expected a NumPy array, got {type(a).__name__}")
            if a.dtype not in FLOAT_DTYPES:
                raise TypeError(f"arrays[{i}]: expected a floating-point array, got dtype "
                                f"{a.dtype}")
            if not a.flags.writeable:
                raise ValueError(f"arrays[{i}]: expected a writeable array (it is updated in "
                                 f"place), got a read-only one")
            signature.append((a.shape, a.dtype.str))
        buffer = _scratch(sum(a.size for a in items))
        offset = 0
        for a in items:
            np.copyto(buffer[offset:offset + a.size].reshape(a.shape), a)
            offset += a.size
        fields = (buffer.size, zlib.crc32(repr(signature).encode()))
    except Exception as exc:
        error = exc
    table = agree(comm, op_name, error, fields, 2)
    same_on_every_rank(table, op_name, (0, "total sizes", _as_int),
                        (1, "array shapes or dtypes", lambda v: f"signature {int(v):08x}"))
    if comm.Get_size() > 1:
        MPI = _mpi()
        _collective(comm, op_name, comm.Allreduce, MPI.IN_PLACE, buffer, MPI.SUM)
        _collective(comm, op_name, comm.Bcast, buffer, 0)
    offset = 0
    for a in items:
        np.copyto(a, buffer[offset:offset + a.size].reshape(a.shape), casting="unsafe")
        offset += a.size
    return arrays


_scratch_buffers = threading.local()


def _scratch(size):
    """A reused float64 buffer: a fresh one each step would page-fault on every message."""
    buffer = getattr(_scratch_buffers, "buffer", None)
    if buffer is None or buffer.size < size:
        buffer = _scratch_buffers.buffer = np.empty(size)
    return buffer[:size]


def shard_bounds(global_batch_size, rank, size):
    """Rows [start, stop) of ``rank``: contiguous, sizes differ by at most one."""
    base, extra = divmod(global_batch_size, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(global_batch_size, comm=None):
    """The rows ``(start, stop)`` of a global batch that this rank holds.

    Consecutive ranks take consecutive rows; sizes differ by at most one (the first
    ``global_batch_size % size`` ranks take one more), and a rank may get none.
    """
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size,
                                                             (int, np.integer)) \
            or global_batch_size < 0:
        raise ValueError(f"global_batch_size: expected a non-negative integer, got "
                         f"{global_batch_size!r}")
    comm = _resolve_comm(comm)
    return shard_bounds(int(global_batch_size), comm.Get_rank(), comm.Get_size())
