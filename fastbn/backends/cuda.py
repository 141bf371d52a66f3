"""numba-cuda kernels on the canonical ``(outer, C, inner)`` view, and their launchers.

Every operation of the backend contract (``_contract.py``) is here, with reference.py's
semantics, in at most two kernel launches, with no host wait and no device-to-host copy:

==========================  =================================================================
operation                   launches
==========================  =================================================================
forward_train               1. statistics (+ last block per channel: mean/invstd, running stats)
                            2. normalize (+ weight, bias, residual, activation)
forward_eval                1. normalize from the running statistics (+ writes mean/invstd)
backward                    1. gradient sums (+ last block per channel: dgamma, dbeta, dx coef)
                            2. dx (+ dresidual)
moments, channel_moments    1. statistics (+ last block per channel: the outputs)
update_running_stats        1. per channel
backward_apply              1. dx
backward_reduce             1. gradient sums (then the host copy the contract asks for)
==========================  =================================================================

Two memory regimes, as on the CPU:

* channel-major (``inner > 1``, e.g. NCHW): a channel is ``outer`` contiguous runs of ``inner``
  values. Its values, in (outer, inner) order, are cut into ``splits`` pieces of ``chunk``
  values; a block reduces one (channel, piece) work item, adjacent threads reading adjacent
  values, so one large channel is spread over many blocks and many channels over few.
* channels-last (``inner == 1``, e.g. NHWC or (N, C)): the (rows, C) matrix. A block is a tile of
  ``tile`` adjacent channels (adjacent threads read adjacent channels of a row: coalesced) by
  ``tpb / tile`` rows, and the rows are cut into ``splits`` pieces.

A reduction writes one float64 partial per (channel, piece) into a cached scratch buffer -- for
the statistics a (count, shift, offset, M2) summary, mean = shift + offset with the shift a data
value, merged with Chan's formula; for the backward three plain sums -- and the block that
finishes a channel's (or tile's) last piece -- a per-channel device counter says which --
merges that channel's partials in a fixed tree order and writes the results. Which
block is last changes from run to run, the merge order does not: results are bitwise the same
from run to run. There are no floating-point atomics on results (partials are read back with
an atomic add of 0.0, a load that bypasses the incoherent L1 cache).

All accumulation and per-element arithmetic is float64; float16/float32 values are widened on
load and rounded once on store. Per-channel vectors (weight, bias, running statistics, the saved
statistics) are read in their own dtypes: no cast launches. Launch settings come from
``fastbn._config`` (CUDA_*), read at every call; kernels are compiled per (threads per block,
unroll) because shared and local arrays need compile-time sizes.

Streams, the caller's array library and the non-finite record: see docs/cuda.md and
``fastbn.cuda`` (public helpers). Importing this module never touches a GPU;
``check_available()`` (called by ``fastbn.backends.load``) says clearly what is missing.
"""
import contextlib
import contextvars
import functools
import importlib.util
import math
import sys
import threading
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from .. import _config
from . import STREAM
from ._memory import is_device_array

_INSTALL_HINT = 'pip install "fastbn[cuda]"'

if importlib.util.find_spec("numba_cuda") is None:
    raise ImportError('backend "cuda": needs the numba-cuda package (NVIDIA\'s maintained CUDA '
                      f'target for Numba), which is not installed; {_INSTALL_HINT}')
try:
    from numba import cuda
    from numba.cuda.core import config as _numba_cuda_config
except ImportError as exc:           # e.g. numba-cuda without its cuda-bindings
    raise ImportError(f'backend "cuda": numba-cuda could not be imported ({exc}); '
                      f'{_INSTALL_HINT}') from exc

name = "cuda"
ON_DEVICE = True
#: True under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1 set before Python started).
SIMULATOR = bool(_numba_cuda_config.ENABLE_CUDASIM)

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _FakeCUDAArray

# Host code calls numba.cuda through these names, never through the module global ``cuda``: while
# a kernel runs, the simulator swaps every global of its module that is numba.cuda for a fake,
# which another thread's host code would otherwise see. The simulator runs one kernel at a time
# (kernels sharing a module share the swap); on a GPU, launches need no lock.
_jit = cuda.jit
_device_array = cuda.device_array
_to_device = cuda.to_device
_default_stream = cuda.default_stream
_external_stream = cuda.external_stream
_as_cuda_array = getattr(cuda, "as_cuda_array", None)
_from_cuda_array_interface = getattr(cuda, "from_cuda_array_interface", None)
_simulator_lock = threading.Lock() if SIMULATOR else contextlib.nullcontext()

#: The contract's ``owns``: CUDA device memory, decided without importing a GPU library.
owns = is_device_array


# ----------------------------------------------------------------------------------------------
# availability

def _driver_problem():
    """Why no GPU can be used (None when one can)."""
    from numba.cuda.cudadrv import driver, nvvm
    try:
        if not driver.driver.is_available:
            return f"the CUDA driver could not be initialized: {driver.driver.initialization_error}"
    except Exception as exc:  # noqa: BLE001 - numba raises several types here
        return f"the CUDA driver could not be initialized: {exc}"
    if not nvvm.is_available():
        return ("libNVVM (the CUDA compiler library) was not found; pip install "
                '"numba-cuda[cu13]" (or [cu12]) or install the CUDA toolkit')
    return None


def check_available():
    """Raise RuntimeError, saying what is missing, when no CUDA GPU can run these kernels."""
    if SIMULATOR:
        return
    problem = _driver_problem()
    if problem is not None:
        raise RuntimeError(
            f'backend "cuda": no usable CUDA GPU: {problem}. The cuda backend needs an NVIDIA '
            f'GPU with its driver ({_INSTALL_HINT} installs the Python side). Without one use '
            'backend="cpu", or set NUMBA_ENABLE_CUDASIM=1 before Python starts to run the '
            "kernels on numba's (slow) CUDA simulator.")


# ----------------------------------------------------------------------------------------------
# launch configuration

class _Settings(NamedTuple):
    tpb: int            # threads per block
    max_blocks: int
    min_blocks: int     # grids are padded to this many (idle) blocks
    min_items: int      # least values per thread before a channel is split across blocks
    tile: int           # channels-last: threads along channels
    unroll: int


def _power_of_two(value, setting):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"fastbn._config.{setting}: expected a power of two >= 1, got {value!r}")
    return value


def _positive(value, setting):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"fastbn._config.{setting}: expected an integer >= 1, got {value!r}")
    return value


def _settings():
    return _Settings(
        tpb=_power_of_two(_config.CUDA_THREADS_PER_BLOCK, "CUDA_THREADS_PER_BLOCK"),
        max_blocks=_positive(_config.CUDA_MAX_BLOCKS, "CUDA_MAX_BLOCKS"),
        min_blocks=_positive(_config.CUDA_MIN_BLOCKS, "CUDA_MIN_BLOCKS"),
        min_items=_positive(_config.CUDA_MIN_ITEMS_PER_THREAD, "CUDA_MIN_ITEMS_PER_THREAD"),
        tile=_power_of_two(_config.CUDA_CHANNEL_TILE, "CUDA_CHANNEL_TILE"),
        unroll=_positive(_config.CUDA_UNROLL, "CUDA_UNROLL"))


def _cdiv(a, b):
    return -(-a // b)


def _next_power_of_two(n):
    return 1 << max(0, int(n) - 1).bit_length()


def plan_channel_major(outer, channels, inner, settings):
    """(splits, chunk, blocks): each channel's ``outer * inner`` values in ``splits`` pieces of
    ``chunk`` values (a multiple of the block size), one block per (channel, piece)."""
    count = outer * inner
    splits = max(1, min(_cdiv(count, settings.tpb * settings.min_items),
                        _cdiv(settings.max_blocks, max(channels, 1))))
    chunk = max(_cdiv(_cdiv(count, splits), settings.tpb), 1) * settings.tpb
    splits = max(_cdiv(count, chunk), 1)
    return splits, chunk, min(channels * splits, settings.max_blocks)


def plan_channels_last(rows, channels, settings):
    """(tile, splits, rows_per_split, blocks) for the (rows, C) matrix."""
    tile = min(settings.tile, settings.tpb, _next_power_of_two(channels))
    tiles = _cdiv(channels, tile)
    row_threads = settings.tpb // tile
    splits = max(1, min(_cdiv(rows, row_threads * settings.min_items),
                        _cdiv(settings.max_blocks, tiles)))
    rows_per_split = max(_cdiv(rows, splits), 1)
    splits = max(_cdiv(rows, rows_per_split), 1)
    return tile, splits, rows_per_split, min(tiles * splits, settings.max_blocks)


def _elementwise_blocks(size, settings):
    return min(_cdiv(size, settings.tpb * settings.unroll), settings.max_blocks)


# Reduction modes (what the last block of a channel writes) and activation codes.
STATS_CHANNEL_MOMENTS, STATS_MOMENTS, STATS_TRAIN = 0, 1, 2
GRAD_BACKWARD, GRAD_REDUCE = 0, 1
ACTIVATION_CODES = {None: 0, "relu": 1, "sigmoid": 2}


# ----------------------------------------------------------------------------------------------
# device functions

@cuda.jit(device=True, inline=True)
def _chan_merge(n_a, shift_a, offset_a, m2_a, n_b, shift_b, offset_b, m2_b):
    """Merge two (count, shift, offset, M2) summaries, mean = shift + offset (Chan, Golub &
    LeVeque 1979). The shift is a data value (or another summary's shift), the offset small:
    the difference of two shifts of clustered data is exact, so the means' difference keeps
    the offsets' precision instead of an ulp of the data's magnitude."""
    if n_b == 0.0:
        return n_a, shift_a, offset_a, m2_a
    if n_a == 0.0:
        return n_b, shift_b, offset_b, m2_b
    n = n_a + n_b
    delta = (shift_b - shift_a) + (offset_b - offset_a)
    return (n, shift_a, offset_a + delta * (n_b / n),
            m2_a + m2_b + delta * delta * (n_a * n_b / n))


@cuda.jit(device=True, inline=True)
def _fold_batch(n, shift, offset, m2, k, m, s1, s2):
    """A thread's summary with a batch of m values folded in, whose deviations from k sum to s1
    and whose squares sum to s2. k is the summary's mean so far (the first value for the first
    batch), so the s2 - s1^2/m cancellation stays small even after an outlier first value."""
    if m == 0:
        return n, shift, offset, m2
    count = np.float64(m)
    batch_offset = s1 / count
    batch_m2 = s2 - s1 * batch_offset
    if n == 0.0:
        return count, k, batch_offset, batch_m2
    total = n + count
    delta = ((k - shift) - offset) + batch_offset
    return (total, shift, offset + delta * (count / total),
            m2 + batch_m2 + delta * delta * (n * count / total))


@cuda.jit(device=True)
def _block_merge_moments(sh_n, sh_shift, sh_offset, sh_m2, tid, width, groups):
    """Tree-merge slots ``tid % width + k * width`` (k < groups, a power of two) into slot
    ``tid % width``, in a fixed order. Every thread of the block must call it."""
    group = tid // width
    stride = groups // 2
    while stride > 0:
        if group < stride:
            other = tid + stride * width
            n, shift, offset, m2 = _chan_merge(sh_n[tid], sh_shift[tid], sh_offset[tid],
                                               sh_m2[tid], sh_n[other], sh_shift[other],
                                               sh_offset[other], sh_m2[other])
            sh_n[tid] = n
            sh_shift[tid] = shift
            sh_offset[tid] = offset
            sh_m2[tid] = m2
        cuda.syncthreads()
        stride //= 2


@cuda.jit(device=True)
def _block_sum3(sh_a, sh_b, sh_c, tid, width, groups):
    """Like _block_merge_moments for three plain sums."""
    group = tid // width
    stride = groups // 2
    while stride > 0:
        if group < stride:
            other = tid + stride * width
            sh_a[tid] += sh_a[other]
            sh_b[tid] += sh_b[other]
            sh_c[tid] += sh_c[other]
        cuda.syncthreads()
        stride //= 2


@cuda.jit(device=True, inline=True)
def _coherent_load(part, index):
    """A load that sees other blocks' stores (after their threadfence): an atomic add of 0.0
    goes to L2, where a plain load may hit a stale L1 line."""
    return cuda.atomic.add(part, index, 0.0)


@cuda.jit(device=True)
def _finish_item_moments(sh_n, sh_shift, sh_offset, sh_m2, sh_last, part, counter, slot,
                         channel, valid, piece, splits, pieces, tid, width, groups):
    """The part of a statistics work item that both regimes share: merge the block's threads
    (slot ``tid % width`` of each of ``groups`` groups holds one thread's summary of channel
    ``channel``); when the channel has several pieces, publish this piece's summary and, in the
    block that completes the channel's (or tile's) counter ``slot``, merge every piece in a
    fixed order. Returns whether this block finishes; the merged summary is then in slot
    ``tid % width``. Every thread of the block must call it."""
    _block_merge_moments(sh_n, sh_shift, sh_offset, sh_m2, tid, width, groups)
    if splits == 1:
        return True
    lane = tid % width
    group = tid // width
    if group == 0 and valid:
        w = channel * splits + piece
        part[w] = sh_n[lane]
        part[pieces + w] = sh_shift[lane]
        part[2 * pieces + w] = sh_offset[lane]
        part[3 * pieces + w] = sh_m2[lane]
        cuda.threadfence()
    cuda.syncthreads()
    if tid == 0:
        sh_last[0] = cuda.atomic.add(counter, slot, 1) == splits - 1
    cuda.syncthreads()
    if not sh_last[0]:
        return False
    cuda.threadfence()
    n = 0.0
    shift = 0.0
    offset = 0.0
    m2 = 0.0
    if valid:
        for p in range(group, splits, groups):      # a fixed order, whoever is last
            w = channel * splits + p
            n, shift, offset, m2 = _chan_merge(
                n, shift, offset, m2, _coherent_load(part, w), _coherent_load(part, pieces + w),
                _coherent_load(part, 2 * pieces + w), _coherent_load(part, 3 * pieces + w))
    sh_n[tid] = n
    sh_shift[tid] = shift
    sh_offset[tid] = offset
    sh_m2[tid] = m2
    cuda.syncthreads()
    _block_merge_moments(sh_n, sh_shift, sh_offset, sh_m2, tid, width, groups)
    if tid == 0:
        counter[slot] = 0
    return True


@cuda.jit(device=True)
def _finish_item_sums(sh_a, sh_b, sh_c, sh_last, part, counter, slot, channel, valid, piece,
                      splits, pieces, tid, width, groups):
    """_finish_item_moments for the backward's three plain sums."""
    _block_sum3(sh_a, sh_b, sh_c, tid, width, groups)
    if splits == 1:
        return True
    lane = tid % width
    group = tid // width
    if group == 0 and valid:
        w = channel * splits + piece
        part[w] = sh_a[lane]
        part[pieces + w] = sh_b[lane]
        part[2 * pieces + w] = sh_c[lane]
        cuda.threadfence()
    cuda.syncthreads()
    if tid == 0:
        sh_last[0] = cuda.atomic.add(counter, slot, 1) == splits - 1
    cuda.syncthreads()
    if not sh_last[0]:
        return False
    cuda.threadfence()
    a = 0.0
    b = 0.0
    d = 0.0
    if valid:
        for p in range(group, splits, groups):
            w = channel * splits + p
            a += _coherent_load(part, w)
            b += _coherent_load(part, pieces + w)
            d += _coherent_load(part, 2 * pieces + w)
    sh_a[tid] = a
    sh_b[tid] = b
    sh_c[tid] = d
    cuda.syncthreads()
    _block_sum3(sh_a, sh_b, sh_c, tid, width, groups)
    if tid == 0:
        counter[slot] = 0
    return True


@cuda.jit(device=True, inline=True)
def _advance(o, c, i, step_o, step_c, step_i, channels, inner):
    """(o, c, i) moved forward by a flat step pre-split into (step_o, step_c, step_i)."""
    i += step_i
    c += step_c
    o += step_o
    if i >= inner:
        i -= inner
        c += 1
    if c >= channels:
        c -= channels
        o += 1
    return o, c, i


@cuda.jit(device=True, inline=True)
def _split_flat(e, channels, inner):
    """(o, c, i) of flat index e of an (outer, channels, inner) array."""
    plane = channels * inner
    o = e // plane
    rest = e - o * plane
    c = rest // inner
    return o, c, rest - c * inner


@cuda.jit(device=True, inline=True)
def _activate(z, activation):
    if activation == 1:
        return z if z > 0.0 else 0.0
    if activation == 2:
        return 1.0 / (1.0 + math.exp(-z))
    return z


@cuda.jit(device=True, inline=True)
def _activation_grad(g, y, activation):
    """dL/dz from dL/dy, the activation's derivative recovered from its output y."""
    if activation == 1:
        return g if y > 0.0 else 0.0
    if activation == 2:
        return g * y * (1.0 - y)
    return g


@cuda.jit(device=True, inline=True)
def _update_running(c, running_mean, running_var, mean, biased_var, momentum, unbias,
                    limit_mean, limit_var, flags):
    """r = (1 - momentum) r + momentum * batch (unbiased variance), for channel c, unless a new
    value would not be finite in the running statistics' dtype (|v| >= limit: it rounds to
    inf; NaN fails the test too). flags[c] records a skipped channel."""
    new_mean = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * mean
    new_var = (1.0 - momentum) * np.float64(running_var[c]) + momentum * (biased_var * unbias)
    if abs(new_mean) < limit_mean and abs(new_var) < limit_var:
        running_mean[c] = new_mean
        running_var[c] = new_var
        flags[c] = 0
    else:
        flags[c] = 1


@cuda.jit(device=True, inline=True)
def _finish_stats(c, n, shift, offset, m2, mode, eps, out_a, out_b, stat, has_running,
                  running_mean, running_var, momentum, unbias, limit_mean, limit_var, flags):
    """What a channel's last block writes from its merged (count, shift, offset, M2)."""
    mean = shift + offset
    if m2 < 0.0:                  # rounding; NaN stays NaN
        m2 = 0.0
    if n == 0.0:                  # no values: NaN statistics (as the reference)
        out_a[c] = math.nan
        out_b[c] = math.nan
        if mode == 2:
            stat[0, c] = math.nan
            stat[1, c] = math.nan
            if has_running:
                flags[c] = 1
        return
    if mode == 0:                 # channel_moments: float64 mean and M2
        out_a[c] = mean
        out_b[c] = m2
    elif mode == 1:               # moments: mean and biased variance in the outputs' dtype
        out_a[c] = mean
        out_b[c] = m2 / n
    else:                         # forward_train
        var = m2 / n
        invstd = 1.0 / math.sqrt(var + eps)
        stat[0, c] = mean
        stat[1, c] = invstd
        out_a[c] = mean
        out_b[c] = invstd
        if has_running:
            _update_running(c, running_mean, running_var, mean, var, momentum, unbias,
                            limit_mean, limit_var, flags)


@cuda.jit(device=True, inline=True)
def _finish_grad(c, s_dz, s_dz_xc, s_xc, count, mode, mean, invstd, weight, has_weight,
                 training, coef, dgamma, dbeta):
    """What a channel's last block writes from its merged gradient sums: dgamma, dbeta and the
    dx coefficients (mu, scale, mean_dz, b) of dx = scale (dz - mean_dz - (x - mu) b); or, for
    backward_reduce, the three sums."""
    if mode == 1:
        coef[0, c] = s_dz
        coef[1, c] = s_dz_xc
        coef[2, c] = s_xc
        return
    mu = np.float64(mean[c])
    inv = np.float64(invstd[c])
    if training and count > 0.0:
        # re-centre on the exact batch mean (the saved mean may be rounded)
        shift = s_xc / count
        mu += shift
        s_dz_xc -= shift * s_dz
    dbeta[c] = s_dz
    dgamma[c] = s_dz_xc * inv
    gamma = np.float64(weight[c]) if has_weight else 1.0
    coef[0, c] = mu
    coef[1, c] = gamma * inv
    if training and count > 0.0:
        coef[2, c] = s_dz / count
        coef[3, c] = inv * inv * s_dz_xc / count
    else:
        coef[2, c] = 0.0
        coef[3, c] = 0.0


# ----------------------------------------------------------------------------------------------
# kernels

def kernel_functions(tpb, unroll):
    """The Python functions of every kernel, with the block size and unroll compiled in.

    ``_kernels`` compiles them with ``cuda.jit``; tests compile them to PTX for a real GPU
    architecture with ``cuda.compile_ptx`` (the simulator would accept code a GPU won't)."""

    # ---- statistics: a partial per (channel, piece); the last piece's block merges ----------

    def stats_channel_major(x, chunk, splits, part, counter, mode, eps, out_a, out_b, stat,
                            has_running, running_mean, running_var, momentum, unbias,
                            limit_mean, limit_var, flags):
        outer, channels, inner = x.shape
        count = outer * inner
        pieces = channels * splits
        tid = cuda.threadIdx.x
        sh_n = cuda.shared.array(tpb, np.float64)
        sh_shift = cuda.shared.array(tpb, np.float64)
        sh_offset = cuda.shared.array(tpb, np.float64)
        sh_m2 = cuda.shared.array(tpb, np.float64)
        sh_last = cuda.shared.array(1, np.int32)
        vals = cuda.local.array(unroll, np.float64)
        step_o = tpb // inner
        step_i = tpb - step_o * inner
        for item in range(cuda.blockIdx.x, pieces, cuda.gridDim.x):
            c = item // splits
            s = item - c * splits
            start = s * chunk
            end = min(start + chunk, count)
            n = 0.0
            shift = 0.0
            offset = 0.0
            m2 = 0.0
            e = start + tid
            o = e // inner
            i = e - o * inner
            while e < end:
                for u in range(unroll):
                    if e + u * tpb < end:
                        vals[u] = np.float64(x[o, c, i])
                    o += step_o
                    i += step_i
                    if i >= inner:
                        i -= inner
                        o += 1
                k = shift + offset if n > 0.0 else vals[0]
                s1 = 0.0
                s2 = 0.0
                m = 0
                for u in range(unroll):
                    if e + u * tpb < end:
                        d = vals[u] - k
                        s1 += d
                        s2 += d * d
                        m += 1
                n, shift, offset, m2 = _fold_batch(n, shift, offset, m2, k, m, s1, s2)
                e += unroll * tpb
            sh_n[tid] = n
            sh_shift[tid] = shift
            sh_offset[tid] = offset
            sh_m2[tid] = m2
            cuda.syncthreads()
            if _finish_item_moments(sh_n, sh_shift, sh_offset, sh_m2, sh_last, part, counter, c,
                                    c, True, s, splits, pieces, tid, 1, tpb) and tid == 0:
                _finish_stats(c, sh_n[0], sh_shift[0], sh_offset[0], sh_m2[0], mode, eps,
                              out_a, out_b, stat, has_running, running_mean, running_var,
                              momentum, unbias, limit_mean, limit_var, flags)
            cuda.syncthreads()

    def stats_channels_last(x, tile, rows_per_split, splits, part, counter, mode, eps, out_a,
                            out_b, stat, has_running, running_mean, running_var, momentum,
                            unbias, limit_mean, limit_var, flags):
        rows, channels = x.shape[0], x.shape[1]
        pieces = channels * splits
        tid = cuda.threadIdx.x
        lane = tid % tile
        row0 = tid // tile
        row_threads = tpb // tile
        tiles = (channels + tile - 1) // tile
        sh_n = cuda.shared.array(tpb, np.float64)
        sh_shift = cuda.shared.array(tpb, np.float64)
        sh_offset = cuda.shared.array(tpb, np.float64)
        sh_m2 = cuda.shared.array(tpb, np.float64)
        sh_last = cuda.shared.array(1, np.int32)
        vals = cuda.local.array(unroll, np.float64)
        for item in range(cuda.blockIdx.x, tiles * splits, cuda.gridDim.x):
            t = item // splits
            s = item - t * splits
            c = t * tile + lane
            r = s * rows_per_split + row0
            end = min((s + 1) * rows_per_split, rows)
            n = 0.0
            shift = 0.0
            offset = 0.0
            m2 = 0.0
            if c < channels:
                while r < end:
                    for u in range(unroll):
                        if r + u * row_threads < end:
                            vals[u] = np.float64(x[r + u * row_threads, c, 0])
                    k = shift + offset if n > 0.0 else vals[0]
                    s1 = 0.0
                    s2 = 0.0
                    m = 0
                    for u in range(unroll):
                        if r + u * row_threads < end:
                            d = vals[u] - k
                            s1 += d
                            s2 += d * d
                            m += 1
                    n, shift, offset, m2 = _fold_batch(n, shift, offset, m2, k, m, s1, s2)
                    r += unroll * row_threads
            sh_n[tid] = n
            sh_shift[tid] = shift
            sh_offset[tid] = offset
            sh_m2[tid] = m2
            cuda.syncthreads()
            if _finish_item_moments(sh_n, sh_shift, sh_offset, sh_m2, sh_last, part, counter, t,
                                    c, c < channels, s, splits, pieces, tid, tile, row_threads) \
                    and row0 == 0 and c < channels:
                _finish_stats(c, sh_n[lane], sh_shift[lane], sh_offset[lane], sh_m2[lane], mode,
                              eps, out_a, out_b, stat, has_running, running_mean, running_var,
                              momentum, unbias, limit_mean, limit_var, flags)
            cuda.syncthreads()

    # ---- element-wise: y = act((x - mean) invstd gamma + beta + residual) --------------------

    def normalize(x, mean, invstd, from_running, eps, weight, has_weight, bias, has_bias,
                  residual, has_residual, activation, y, mean_out, invstd_out, write_stats):
        """mean/invstd: the float64 batch statistics (forward_train), or the running statistics
        (from_running: invstd holds the running variance). write_stats: the first C threads
        also write mean_out, invstd_out (forward_eval)."""
        outer, channels, inner = x.shape
        size = outer * channels * inner
        vals = cuda.local.array(unroll, np.float64)
        e = cuda.grid(1)
        step = cuda.gridsize(1)
        if write_stats:
            for c in range(e, channels, step):
                mean_out[c] = mean[c]
                invstd_out[c] = 1.0 / math.sqrt(np.float64(invstd[c]) + eps)
        if size == 0:             # only the statistics to write
            return
        step_o, step_c, step_i = _split_flat(step, channels, inner)
        o, c, i = _split_flat(e, channels, inner)
        while e < size:
            lo, lc, li = o, c, i
            for u in range(unroll):
                if e + u * step < size:
                    vals[u] = np.float64(x[lo, lc, li])
                lo, lc, li = _advance(lo, lc, li, step_o, step_c, step_i, channels, inner)
            for u in range(unroll):
                if e + u * step < size:
                    if from_running:
                        inv = 1.0 / math.sqrt(np.float64(invstd[c]) + eps)
                    else:
                        inv = np.float64(invstd[c])
                    z = (vals[u] - np.float64(mean[c])) * inv
                    if has_weight:
                        z = z * np.float64(weight[c])
                    if has_bias:
                        z = z + np.float64(bias[c])
                    if has_residual:
                        z = z + np.float64(residual[o, c, i])
                    y[o, c, i] = _activate(z, activation)
                o, c, i = _advance(o, c, i, step_o, step_c, step_i, channels, inner)
            e += unroll * step

    # ---- backward: sums per (channel, piece); the last piece's block finishes ----------------

    def grad_channel_major(dy, x, y, activation, mean, invstd, weight, has_weight, training,
                           chunk, splits, part, counter, mode, coef, dgamma, dbeta):
        outer, channels, inner = x.shape
        count = outer * inner
        pieces = channels * splits
        tid = cuda.threadIdx.x
        sh_dz = cuda.shared.array(tpb, np.float64)
        sh_dz_xc = cuda.shared.array(tpb, np.float64)
        sh_xc = cuda.shared.array(tpb, np.float64)
        sh_last = cuda.shared.array(1, np.int32)
        g_vals = cuda.local.array(unroll, np.float64)
        x_vals = cuda.local.array(unroll, np.float64)
        step_o = tpb // inner
        step_i = tpb - step_o * inner
        for item in range(cuda.blockIdx.x, pieces, cuda.gridDim.x):
            c = item // splits
            s = item - c * splits
            start = s * chunk
            end = min(start + chunk, count)
            mu = np.float64(mean[c])
            s_dz = 0.0
            s_dz_xc = 0.0
            s_xc = 0.0
            e = start + tid
            o = e // inner
            i = e - o * inner
            while e < end:
                for u in range(unroll):
                    if e + u * tpb < end:
                        g_vals[u] = _activation_grad(np.float64(dy[o, c, i]),
                                                     np.float64(y[o, c, i]), activation)
                        x_vals[u] = np.float64(x[o, c, i])
                    o += step_o
                    i += step_i
                    if i >= inner:
                        i -= inner
                        o += 1
                for u in range(unroll):
                    if e + u * tpb < end:
                        xc = x_vals[u] - mu
                        s_dz += g_vals[u]
                        s_dz_xc += g_vals[u] * xc
                        s_xc += xc
                e += unroll * tpb
            sh_dz[tid] = s_dz
            sh_dz_xc[tid] = s_dz_xc
            sh_xc[tid] = s_xc
            cuda.syncthreads()
            if _finish_item_sums(sh_dz, sh_dz_xc, sh_xc, sh_last, part, counter, c, c, True, s,
                                 splits, pieces, tid, 1, tpb) and tid == 0:
                _finish_grad(c, sh_dz[0], sh_dz_xc[0], sh_xc[0], np.float64(count), mode, mean,
                             invstd, weight, has_weight, training, coef, dgamma, dbeta)
            cuda.syncthreads()

    def grad_channels_last(dy, x, y, activation, mean, invstd, weight, has_weight, training,
                           tile, rows_per_split, splits, part, counter, mode, coef, dgamma,
                           dbeta):
        rows, channels = x.shape[0], x.shape[1]
        pieces = channels * splits
        tid = cuda.threadIdx.x
        lane = tid % tile
        row0 = tid // tile
        row_threads = tpb // tile
        tiles = (channels + tile - 1) // tile
        sh_dz = cuda.shared.array(tpb, np.float64)
        sh_dz_xc = cuda.shared.array(tpb, np.float64)
        sh_xc = cuda.shared.array(tpb, np.float64)
        sh_last = cuda.shared.array(1, np.int32)
        g_vals = cuda.local.array(unroll, np.float64)
        x_vals = cuda.local.array(unroll, np.float64)
        for item in range(cuda.blockIdx.x, tiles * splits, cuda.gridDim.x):
            t = item // splits
            s = item - t * splits
            c = t * tile + lane
            r = s * rows_per_split + row0
            end = min((s + 1) * rows_per_split, rows)
            s_dz = 0.0
            s_dz_xc = 0.0
            s_xc = 0.0
            if c < channels:
                mu = np.float64(mean[c])
                while r < end:
                    for u in range(unroll):
                        if r + u * row_threads < end:
                            q = r + u * row_threads
                            g_vals[u] = _activation_grad(np.float64(dy[q, c, 0]),
                                                         np.float64(y[q, c, 0]), activation)
                            x_vals[u] = np.float64(x[q, c, 0])
                    for u in range(unroll):
                        if r + u * row_threads < end:
                            xc = x_vals[u] - mu
                            s_dz += g_vals[u]
                            s_dz_xc += g_vals[u] * xc
                            s_xc += xc
                    r += unroll * row_threads
            sh_dz[tid] = s_dz
            sh_dz_xc[tid] = s_dz_xc
            sh_xc[tid] = s_xc
            cuda.syncthreads()
            if _finish_item_sums(sh_dz, sh_dz_xc, sh_xc, sh_last, part, counter, t, c,
                                 c < channels, s, splits, pieces, tid, tile, row_threads) \
                    and row0 == 0 and c < channels:
                _finish_grad(c, sh_dz[lane], sh_dz_xc[lane], sh_xc[lane], np.float64(rows), mode,
                             mean, invstd, weight, has_weight, training, coef, dgamma, dbeta)
            cuda.syncthreads()

    def grad_apply(dy, x, y, activation, mu, scale, mean_dz, b, training, dx, dresidual,
                   has_dresidual):
        """dx = scale (dz - mean_dz - (x - mu) b) (training) or scale dz, per channel; dz is dy
        through the activation (recovered from y); dresidual = dz when asked."""
        outer, channels, inner = x.shape
        size = outer * channels * inner
        g_vals = cuda.local.array(unroll, np.float64)
        x_vals = cuda.local.array(unroll, np.float64)
        e = cuda.grid(1)
        step = cuda.gridsize(1)
        step_o, step_c, step_i = _split_flat(step, channels, inner)
        o, c, i = _split_flat(e, channels, inner)
        while e < size:
            lo, lc, li = o, c, i
            for u in range(unroll):
                if e + u * step < size:
                    g_vals[u] = _activation_grad(np.float64(dy[lo, lc, li]),
                                                 np.float64(y[lo, lc, li]), activation)
                    if training:      # eval: dx = scale dz does not read x
                        x_vals[u] = np.float64(x[lo, lc, li])
                lo, lc, li = _advance(lo, lc, li, step_o, step_c, step_i, channels, inner)
            for u in range(unroll):
                if e + u * step < size:
                    if training:
                        dx[o, c, i] = np.float64(scale[c]) * (
                            g_vals[u] - np.float64(mean_dz[c])
                            - (x_vals[u] - np.float64(mu[c])) * np.float64(b[c]))
                    else:
                        dx[o, c, i] = np.float64(scale[c]) * g_vals[u]
                    if has_dresidual:
                        dresidual[o, c, i] = g_vals[u]
                o, c, i = _advance(o, c, i, step_o, step_c, step_i, channels, inner)
            e += unroll * step

    # ---- per channel -------------------------------------------------------------------------

    def update_running_stats(running_mean, running_var, mean, var, momentum, unbias,
                             limit_mean, limit_var, flags):
        for c in range(cuda.grid(1), mean.shape[0], cuda.gridsize(1)):
            _update_running(c, running_mean, running_var, np.float64(mean[c]),
                            np.float64(var[c]), momentum, unbias, limit_mean, limit_var, flags)

    # ---- layout copies (arrays whose axes do not merge into the canonical view) --------------

    def strided_copy(src, dst):
        """dst[...] = src for two 8-d arrays of one shape and any strides."""
        n0, n1, n2, n3, n4, n5, n6, n7 = src.shape
        size = n0 * n1 * n2 * n3 * n4 * n5 * n6 * n7
        for e in range(cuda.grid(1), size, cuda.gridsize(1)):
            r = e
            i7 = r % n7
            r //= n7
            i6 = r % n6
            r //= n6
            i5 = r % n5
            r //= n5
            i4 = r % n4
            r //= n4
            i3 = r % n3
            r //= n3
            i2 = r % n2
            r //= n2
            i1 = r % n1
            i0 = r // n1
            dst[i0, i1, i2, i3, i4, i5, i6, i7] = src[i0, i1, i2, i3, i4, i5, i6, i7]

    return dict(
        stats_channel_major=stats_channel_major,
        stats_channels_last=stats_channels_last,
        normalize=normalize,
        grad_channel_major=grad_channel_major,
        grad_channels_last=grad_channels_last,
        grad_apply=grad_apply,
        update_running_stats=update_running_stats,
        strided_copy=strided_copy,
    )


#: (operation, regime) -> the reduction kernel; regime "channels_last" is inner == 1.
REDUCTIONS = {
    ("stats", "channel_major"): "stats_channel_major",
    ("stats", "channels_last"): "stats_channels_last",
    ("grad", "channel_major"): "grad_channel_major",
    ("grad", "channels_last"): "grad_channels_last",
}


@functools.lru_cache(maxsize=None)
def _kernels(tpb, unroll):
    return SimpleNamespace(**{key: _jit(fn) for key, fn in kernel_functions(tpb, unroll).items()})


# ----------------------------------------------------------------------------------------------
# the call: launch stream, array library (per public call, set by the API)

class _Call:
    """What one public call's arguments said: the stream to launch on and the array library
    its outputs come from.

    A call opened by call_scope ends with the scope. Without one, ``asarray(x, "x")`` (the
    first conversion of every public operation) starts an *implicit* call that lasts until the
    next one; to be used only by that call, it holds the arrays the call converted, allocated
    or gathered (alive, so no later allocation can reuse their addresses) and their memory
    ranges: a launch on none of them (the host round trip, a later direct backend call)
    ignores it, and its outputs' library is used only until its operation has run."""
    __slots__ = ("stream", "named_stream", "library", "library_arg", "like", "implicit",
                 "arrays", "ranges", "completed")

    def __init__(self, stream=None, implicit=False):
        self.stream = stream              # the stream= argument (None: not given)
        self.named_stream = None          # the first stream an input named
        self.library = None               # "torch", "cupy", ... of the first foreign argument
        self.library_arg = None
        self.like = None                  # that argument (allocation follows its device)
        self.implicit = implicit
        self.arrays = []                  # the call's arrays, kept alive (no address reuse)
        self.ranges = []                  # and their byte ranges
        self.completed = False            # an implicit call's operation has run

    def register(self, a):
        if self.implicit:
            self.arrays.append(a)
            self.ranges.append(byte_bounds(a))

    def covers(self, a):
        """Whether a views the memory of one of this call's arrays."""
        if a is None or not self.ranges:
            return False
        low, high = byte_bounds(a)
        return any(r_low <= low and high <= r_high for r_low, r_high in self.ranges)


_call = contextvars.ContextVar("fastbn_cuda_call", default=None)


def _active_call(arrays=(), allocating=False):
    """The call a launch on these arrays, or an allocation, belongs to, or None."""
    call = _call.get()
    if call is None or not call.implicit:
        return call
    if allocating:
        return None if call.completed else call
    return call if any(a is not None and call.covers(a) for a in arrays) else None


def _complete(x3):
    """An operation of an implicit call has run: later allocations are not its outputs."""
    call = _call.get()
    if call is not None and call.implicit and call.covers(x3):
        call.completed = True
        call.like = None


@contextlib.contextmanager
def call_scope(stream=None):
    """One public call. Inside it every launch goes to ``stream`` (a numba, PyTorch or CuPy
    stream, or an integer handle; None: ``fastbn.backends.STREAM``, else the stream the inputs
    name, else the default stream), ``asarray`` checks that the arguments come from one array
    library, ``empty``/``empty_like`` allocate from it and ``result`` gives back the caller's
    type. The API is to wrap validation, allocation and the backend call in one scope (without
    one, an implicit call starting at ``asarray(x, "x")`` does the same, see _Call)."""
    if stream is not None:
        stream = _as_stream(stream)           # a bad stream= fails before anything runs
    token = _call.set(_Call(stream))
    try:
        yield
    finally:
        _call.reset(token)


class _SimulatedStream:
    """An integer stream handle under the simulator, which has no external streams."""

    def __init__(self, handle):
        self.handle = handle

    def synchronize(self):
        pass

    def __repr__(self):
        return f"<simulated stream {self.handle}>"


_external_streams = {}


def _as_stream(stream):
    """A numba stream for a numba stream or an integer handle (0: the default stream)."""
    if isinstance(stream, (bool, np.bool_)):
        raise TypeError(f"stream: expected a numba stream or an integer handle, got {stream!r}")
    if isinstance(stream, (int, np.integer)):
        handle = int(stream)
        if handle == 0:
            return _default_stream()
        found = _external_streams.get(handle)
        if found is None:
            found = _SimulatedStream(handle) if SIMULATOR else _external_stream(handle)
            _external_streams[handle] = found
        return found
    if hasattr(stream, "synchronize") or hasattr(stream, "__cuda_stream__"):
        if not SIMULATOR and not hasattr(stream, "handle"):     # e.g. a torch or cupy stream
            return _as_stream(_stream_handle(stream))
        return stream
    raise TypeError(f"stream: expected a numba stream or an integer handle, got "
                    f"{type(stream).__name__}")


def _stream_handle(stream):
    """The integer handle of a numba, PyTorch or CuPy stream object."""
    for attribute in ("cuda_stream", "ptr"):
        if hasattr(stream, attribute):
            return int(getattr(stream, attribute))
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    return int(stream)


def _named_stream(a):
    """The stream an input names, or None: PyTorch's current stream for its device, the v3
    ``__cuda_array_interface__`` 'stream' (1: legacy default, 2: per-thread default), or the
    stream a numba array is bound to."""
    if _is_numba_device_array(a):
        stream = getattr(a, "stream", 0)
        return stream if stream not in (0, None) else None
    module = type(a).__module__
    if module.startswith("torch"):
        torch = sys.modules["torch"]
        return _as_stream(int(torch.cuda.current_stream(a.device).cuda_stream))
    iface = getattr(a, "__cuda_array_interface__", None)
    handle = iface.get("stream") if isinstance(iface, dict) else None
    return None if handle is None else _as_stream(int(handle))


def current_stream(arrays=(), stream=None):
    """The stream to launch on: ``stream`` (a numba, PyTorch or CuPy stream or an integer
    handle), else the current call's ``stream=`` (call_scope, or ``fastbn.backends.STREAM``,
    which the API sets from its ``stream=`` keyword), else the first stream an input of the call
    named (see ``_named_stream``; ``arrays`` are asked too), else numba's default stream."""
    call = _active_call(arrays)
    if stream is None and call is not None:
        stream = call.stream
    if stream is None:
        stream = STREAM.get()
    if stream is not None:
        return _as_stream(stream)
    if call is not None and call.named_stream is not None:
        return call.named_stream
    for a in arrays:
        if a is not None:
            named = _named_stream(a)
            if named is not None:
                return named
    return _default_stream()


def _stream_key(stream):
    if SIMULATOR:       # the simulator runs every launch to completion: one scratch set
        return 0
    return int(stream)


# ----------------------------------------------------------------------------------------------
# scratch: partials, counters, float64 statistics and coefficients, cached per device, stream,
# host thread and (power-of-two) size; counters are zeroed once, and every kernel leaves them
# at zero

_scratch_cache = {}
_scratch_lock = threading.Lock()


def _device_id():
    if SIMULATOR:
        return 0
    return cuda.current_context().device.id


def _scratch(kind, size, dtype, stream):
    size = _next_power_of_two(max(int(size), 1))
    # per host thread too: two threads launching on one stream interleave their launches
    key = (_device_id(), _stream_key(stream), threading.get_ident(), kind, size,
           np.dtype(dtype).str)
    found = _scratch_cache.get(key)
    if found is None:
        with _scratch_lock:
            found = _scratch_cache.get(key)
            if found is None:
                if kind == "counter":       # zero once (a copy at creation, not per call)
                    found = _to_device(np.zeros(size, dtype), stream=stream)
                else:
                    found = _device_array(size, dtype=np.dtype(dtype), stream=stream)
                _scratch_cache[key] = found
    return found


def _scratch2(kind, rows, channels, stream):
    """A (rows, channels) float64 C-contiguous view of a cached buffer."""
    flat = _scratch(kind, rows * channels, np.float64, stream)
    return flat[:rows * channels].reshape(rows, channels)


# ----------------------------------------------------------------------------------------------
# launching

_launch_hooks = []          # tests: functions called with (kernel name, blocks, stream, args)


def _launch(settings, kernel_name, blocks, stream, *args):
    """Launch one kernel on ``stream`` (nothing to do for an empty grid)."""
    if blocks <= 0:
        return
    blocks = max(blocks, settings.min_blocks)
    kernel = getattr(_kernels(settings.tpb, settings.unroll), kernel_name)
    for hook in _launch_hooks:
        hook(kernel_name, blocks, stream, args)
    with _simulator_lock:
        try:
            kernel[blocks, settings.tpb, stream](*args)
        except BaseException:
            # a failed kernel may leave counters non-zero: drop this stream's scratch
            key = _stream_key(stream)
            for k in [k for k in _scratch_cache if k[1] == key]:
                del _scratch_cache[k]
            raise


# ----------------------------------------------------------------------------------------------
# the non-finite record (the device path's stand-in for the CPU's warning)

_records = threading.local()


def _record_nonfinite(flags, channels, stream):
    _records.last = (flags, channels, stream)


def nonfinite_channels():
    """The channels that the most recent running-statistics update issued by this thread left
    unchanged because their new values would not be finite (in the running statistics' dtype),
    as a NumPy int array (empty when there were none, or no update yet). This waits for that
    update to finish (it copies C bytes to the host): call it when you want to know, not in
    every step. ``fastbn.cuda.nonfinite_channels`` is the public name."""
    last = getattr(_records, "last", None)
    if last is None:
        return np.zeros(0, np.intp)
    flags, channels, stream = last
    host = np.empty(channels, np.uint8)
    if channels:
        if SIMULATOR:
            host = flags[:channels].copy_to_host()
        else:
            flags[:channels].copy_to_host(host, stream=stream)
            stream.synchronize()
    return np.flatnonzero(host)


def _limit(dtype):
    """|v| below this rounds to a finite value of ``dtype`` (round to nearest even)."""
    info = np.finfo(dtype)
    if info.dtype == np.float64:
        return math.inf
    return float(info.max) + 2.0 ** (int(info.maxexp) - int(info.nmant) - 2)


# ----------------------------------------------------------------------------------------------
# array helpers (the contract's HELPERS); kernels see numba device arrays

_COPY_RANK = 8


def _is_numba_device_array(a):
    return bool(getattr(type(a), "__cuda_ndarray__", False))


def _library(a):
    """The array library of a device array: "numba", "torch", "cupy", or its top module."""
    if _is_numba_device_array(a):
        return "numba"
    return type(a).__module__.partition(".")[0]


def _simulated_interface_array(a):
    """Under the simulator, device memory is host memory: view an object exporting
    ``__cuda_array_interface__`` (a test's stand-in for CuPy/PyTorch) as a simulator array."""
    iface = dict(a.__cuda_array_interface__)
    holder = SimpleNamespace(__array_interface__=dict(
        shape=tuple(iface["shape"]), typestr=iface["typestr"], data=tuple(iface["data"]),
        strides=iface.get("strides"), version=3))
    return _FakeCUDAArray(np.asarray(holder))


def _numba(a, name="array"):
    """A numba device array viewing a's memory (no copy, no host wait)."""
    if _is_numba_device_array(a):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        try:
            if SIMULATOR:
                return _simulated_interface_array(a)
            return _as_cuda_array(a, sync=False)
        except Exception as exc:  # noqa: BLE001 - report what numba refused
            raise TypeError(f"{name}: could not use {type(a).__name__} as a CUDA array "
                            f"({exc})") from None
    raise TypeError(f"{name}: got a host array ({type(a).__name__}) while other arguments are "
                    f"CUDA device arrays; pass every array on the device (numba.cuda.to_device, "
                    f"cupy.asarray, tensor.cuda()) or every array on the host (NumPy)")


def asarray(a, name):
    """A numba device array viewing ``a``'s memory (CuPy, PyTorch, numba: no copy, imported
    with ``sync=False``: ordering is kept by launching on the stream the inputs name).

    It records, for the current call (call_scope, or the implicit call that ``name == "x"``
    starts), the call's array library (outputs come from it) and the first stream an input
    names; arrays of two different foreign libraries in one call are a TypeError naming both
    arguments (numba device arrays mix with any library)."""
    array = _numba(a, name)
    call = _call.get()
    if name == "x" and (call is None or call.implicit):
        call = _Call(implicit=True)           # a public call without call_scope starts
        _call.set(call)
    if call is None:
        return array
    call.register(array)
    library = _library(a)
    if library != "numba":
        if call.library is None:
            call.library, call.library_arg, call.like = library, name, a
        elif library != call.library:
            raise TypeError(f"{name}: got a {library} array while {call.library_arg} is a "
                            f"{call.library} array; pass the arrays of one call from one "
                            f"library (or numba device arrays, which mix with any)")
        array._fastbn_source = a           # result() gives the caller's object back
    if call.named_stream is None and call.stream is None:
        call.named_stream = _named_stream(a)
    return array


def result(a):
    """The caller's object for an array of this backend: the PyTorch tensor or CuPy array that
    ``asarray`` viewed or ``empty`` allocated, else ``a`` itself (the API returns outputs
    through this, so that PyTorch in gives PyTorch out)."""
    return getattr(a, "_fastbn_source", a)


def _torch_dtype(dtype):
    torch = sys.modules["torch"]
    return {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
            "uint8": torch.uint8, "int32": torch.int32, "int64": torch.int64}[np.dtype(dtype).name]


def _torch_empty(shape, dtype, strides, like):
    """torch.empty (its caching allocator, stream-ordered) on like's device."""
    torch = sys.modules["torch"]
    if strides is None:
        return torch.empty(tuple(shape), dtype=_torch_dtype(dtype), device=like.device)
    itemsize = np.dtype(dtype).itemsize
    return torch.empty_strided(tuple(shape), tuple(s // itemsize for s in strides),
                               dtype=_torch_dtype(dtype), device=like.device)


def _cupy_empty(shape, dtype, strides, like):
    """cupy.empty (its memory pool) on like's device."""
    cupy = sys.modules["cupy"]
    with like.device:
        if strides is None:
            return cupy.empty(tuple(shape), dtype=dtype)
        span = _span(shape, strides, np.dtype(dtype).itemsize)
        base = cupy.empty(span // np.dtype(dtype).itemsize, dtype=dtype)
        return cupy.ndarray(tuple(shape), dtype=dtype, memptr=base.data, strides=strides)


#: library -> allocate(shape, dtype, strides or None, like) (tests register stand-ins here)
ALLOCATORS = {"torch": _torch_empty, "cupy": _cupy_empty}


def _span(shape, strides, itemsize):
    return (sum((int(n) - 1) * int(s) for n, s in zip(shape, strides)) + itemsize
            if all(n > 0 for n in shape) else 0)


def _allocate(shape, dtype, strides, like):
    """A numba device array; from like's library when it is a foreign one (the numba array
    views that memory and result() gives the foreign object back)."""
    if like is None:
        call = _active_call(allocating=True)
        like = call.like if call is not None else None
    allocate = ALLOCATORS.get(_library(like)) if like is not None else None
    if allocate is None:
        base = _device_array(tuple(shape), dtype=np.dtype(dtype))
        array = base if strides is None else _view(base, shape, strides)
        call = _active_call(allocating=True)
        if call is not None:
            call.register(array)
        return array
    owner = allocate(tuple(shape), np.dtype(dtype), strides, like)
    array = _numba(owner)
    array._fastbn_source = owner
    call = _active_call(allocating=True)
    if call is not None:
        call.register(array)
    return array


def forward_direct(x, gamma, beta, activation, residual, axis, eps, training, running_mean,
                   running_var, momentum):
    """No direct path (launches are already one per operation): the API validates and runs
    the operation."""
    return None


def backward_direct(dy, x, mean, invstd, gamma, activation, y, residual, axis, training):
    return None


def empty(shape, dtype, like=None):
    """An uninitialized device array, from the call's array library (PyTorch in: torch.empty on
    the input's device, its caching allocator; CuPy in: CuPy's pool; otherwise numba). ``like``:
    the caller's array whose library and device to follow (default: the first foreign argument
    of the call_scope). Returns a numba array; result() gives the library's object."""
    return _allocate(tuple(shape), dtype, None, like)


def empty_like(a, like=None):
    """Same shape and dtype in a's memory order (as numpy.empty_like(order='K')), from the
    call's array library (or a's, or like's)."""
    if like is None:
        like = result(a) if not _is_numba_device_array(result(a)) else None
    a = _numba(a)
    order = sorted(range(a.ndim), key=lambda d: -abs(a.strides[d]))
    if order == list(range(a.ndim)):
        return _allocate(a.shape, a.dtype, None, like)
    dense = [0] * a.ndim
    step = a.dtype.itemsize
    for d in reversed(order):
        dense[d] = step
        step *= max(int(a.shape[d]), 1)
    return _allocate(a.shape, a.dtype, tuple(dense), like)


def is_writeable(a):
    if SIMULATOR:
        return bool(np.asarray(_numba(a)).flags.writeable) and not (
            hasattr(a, "__cuda_array_interface__") and a.__cuda_array_interface__["data"][1])
    return not a.__cuda_array_interface__["data"][1]


def _pointer(a):
    if SIMULATOR:
        return np.asarray(a).__array_interface__["data"][0]
    return a.__cuda_array_interface__["data"][0]


def _view(a, shape, strides):
    """A device array with this shape and these byte strides, starting at a's first element."""
    shape, strides = tuple(int(n) for n in shape), tuple(int(s) for s in strides)
    if SIMULATOR:
        return _FakeCUDAArray(np.lib.stride_tricks.as_strided(np.asarray(a), shape, strides))
    if 0 in shape:
        return _device_array(shape, a.dtype)
    desc = dict(shape=shape, strides=strides, typestr=a.dtype.str,
                data=(_pointer(a), False), version=3)
    return _from_cuda_array_interface(desc, owner=a, sync=False)


def _c_strides(shape, itemsize):
    strides = []
    step = itemsize
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


def view3(a, shape3, strides3):
    if isinstance(a, np.ndarray):      # a host array: the operation refuses it by name
        return np.lib.stride_tricks.as_strided(a, shape3, strides3)
    return _view(_numba(a), shape3, strides3)


def byte_bounds(a):
    """(low, high) device addresses that a may touch (high exclusive; (p, p) when empty). A
    host array (refused by the operation itself, naming it) gives its host bounds."""
    if isinstance(a, np.ndarray):
        return tuple(np.lib.array_utils.byte_bounds(a))
    a = _numba(a)
    low = high = _pointer(a)
    if a.size == 0:
        return low, low
    for n, stride in zip(a.shape, a.strides):
        if stride > 0:
            high += (n - 1) * stride
        else:
            low += (n - 1) * stride
    return low, high + a.dtype.itemsize


def shares_memory(a, b):
    """Whether the memory extents of two device arrays overlap (conservative: interleaved
    views of one buffer count as overlapping)."""
    if a.size == 0 or b.size == 0 or isinstance(a, np.ndarray) != isinstance(b, np.ndarray):
        return False
    low_a, high_a = byte_bounds(a)
    low_b, high_b = byte_bounds(b)
    return low_a < high_b and low_b < high_a



def _copy_strided(src, dst, shape, src_strides, dst_strides):
    """dst = src, elementwise, for views of one shape given by (shape, strides) pairs."""
    dims = [(int(n), s, d) for n, s, d in zip(shape, src_strides, dst_strides) if n != 1]
    if any(n == 0 for n, _, _ in dims):
        return
    merged = []
    for n, s, d in dims:            # merge axes that are one run in both arrays
        if merged and merged[-1][1] == s * n and merged[-1][2] == d * n:
            merged[-1] = (merged[-1][0] * n, s, d)
        else:
            merged.append((n, s, d))
    if len(merged) > _COPY_RANK:
        raise ValueError(f"x: arrays whose memory layout has more than {_COPY_RANK} separate "
                         f"axes are not supported by the cuda backend; pass a contiguous copy")
    merged = [(1, 0, 0)] * (_COPY_RANK - len(merged)) + merged
    shape8 = tuple(n for n, _, _ in merged)
    settings = _settings()
    _launch(settings, "strided_copy", _elementwise_blocks(math.prod(shape8), settings),
            current_stream((src, dst)),
            _view(src, shape8, tuple(s for _, s, _ in merged)),
            _view(dst, shape8, tuple(d for _, _, d in merged)))


def gather3(a, perm, shape3):
    """Contiguous (outer, C, inner) copy of a device array whose axes do not merge into a view
    (a numba scratch copy: the caller never sees it)."""
    if isinstance(a, np.ndarray):      # a host array: the operation refuses it by name
        return np.ascontiguousarray(a.transpose(perm)).reshape(shape3)
    a = _numba(a)
    out = _device_array(tuple(shape3), dtype=a.dtype)
    shape = tuple(a.shape[p] for p in perm)
    call = _active_call((a,))
    if call is not None:
        call.register(out)                       # the call's operation runs on this copy
    _copy_strided(a, out, shape, tuple(a.strides[p] for p in perm),
                  _c_strides(shape, a.dtype.itemsize))
    return out


def scatter3(dst, src3, perm):
    """Write a contiguous (outer, C, inner) result into dst (the inverse of gather3)."""
    dst = _numba(dst)
    shape = tuple(dst.shape[p] for p in perm)
    _copy_strided(src3, dst, shape, _c_strides(shape, src3.dtype.itemsize),
                  tuple(dst.strides[p] for p in perm))


def to_host(a):
    """A NumPy array with a's values (waits for the copy)."""
    if isinstance(a, np.ndarray):
        return a
    return _numba(a).copy_to_host()


def to_device(a):
    """a's values in device memory (a numba array; device arrays are returned as they are)."""
    if is_device_array(a):
        return _numba(a)
    call = _call.get()
    if call is not None and call.implicit and not call.completed:
        _call.set(None)         # host data: a new (round-trip) call, not a failed call's rest
    array = _to_device(np.ascontiguousarray(a), stream=current_stream())
    array._fastbn_host_copy = True      # host data: its call waits on the host anyway
    return array


def _warn_for_host_copies(warn, running_mean):
    """Running statistics that are device copies of host arrays (the host round trip, which
    copies them back only after the operation returns) get the host backends' warning, before
    the caller's arrays change: a warn that raises leaves them unchanged. Running statistics
    that live on the device only get the on-device record (no host wait)."""
    if warn is not None and getattr(running_mean, "_fastbn_host_copy", False):
        skipped = nonfinite_channels()
        if skipped.size:
            warn([int(c) for c in skipped])


# ----------------------------------------------------------------------------------------------
# operations (the contract's OPERATIONS, reference.py's semantics)

def _vector_or(v, fallback):
    """(array, present): a stand-in of a fixed type for a missing per-channel vector, so that
    the kernels compile once per dtype combination, not per None pattern."""
    return (fallback, False) if v is None else (v, True)


def _reduce_stats(x3, mode, out_a, out_b, stat=None, eps=1.0, running_mean=None,
                  running_var=None, momentum=0.0):
    """One launch: the statistics kernel of x3's regime, finishing per channel as ``mode``."""
    outer, channels, inner = x3.shape
    if channels == 0:
        return None
    if outer * inner == 0:        # no values: the channels-last kernel writes NaN statistics
        x3, outer, inner = _device_array((0, channels, 1), dtype=x3.dtype), 0, 1
    settings = _settings()
    stream = current_stream((x3,))
    count = outer * inner
    has_running = running_mean is not None
    flags = _scratch("flags", channels, np.uint8, stream) if has_running else \
        _scratch("flags", 1, np.uint8, stream)
    if stat is None:          # not written: a stand-in of the type forward_train passes
        stat = _scratch2("stat", 2, channels, stream)
    if not has_running:
        running_mean = running_var = out_a
    unbias = count / (count - 1) if count > 1 else math.inf
    limits = (_limit(running_mean.dtype), _limit(running_var.dtype))
    if inner == 1:
        tile, splits, rows_per_split, blocks = plan_channels_last(outer, channels, settings)
        part = _scratch("part", 4 * channels * splits, np.float64, stream)
        counter = _scratch("counter", _cdiv(channels, tile), np.int32, stream)
        _launch(settings, REDUCTIONS["stats", "channels_last"], blocks, stream, x3, tile,
                rows_per_split, splits, part, counter, mode, float(eps), out_a, out_b, stat,
                has_running, running_mean, running_var, float(momentum), float(unbias),
                *limits, flags)
    else:
        splits, chunk, blocks = plan_channel_major(outer, channels, inner, settings)
        part = _scratch("part", 4 * channels * splits, np.float64, stream)
        counter = _scratch("counter", channels, np.int32, stream)
        _launch(settings, REDUCTIONS["stats", "channel_major"], blocks, stream, x3, chunk,
                splits, part, counter, mode, float(eps), out_a, out_b, stat, has_running,
                running_mean, running_var, float(momentum), float(unbias), *limits, flags)
    if has_running:
        _record_nonfinite(flags, channels, stream)
    return stream


def channel_moments(x3):
    """Exact per-channel mean and M2, float64 device arrays (NaN for channels without values)."""
    x3 = _numba(x3)
    channels = x3.shape[1]
    mean = _device_array(channels, dtype=np.float64)
    m2 = _device_array(channels, dtype=np.float64)
    _reduce_stats(x3, STATS_CHANNEL_MOMENTS, mean, m2)
    _complete(x3)
    return mean, m2


def moments(x3, mean, var):
    """Per-channel mean and biased variance, written in the outputs' dtypes (one launch)."""
    x3 = _numba(x3)
    _reduce_stats(x3, STATS_MOMENTS, _numba(mean), _numba(var))
    _complete(x3)


def _normalize(x3, mean, invstd, from_running, eps, weight, bias, activation, residual3, y3,
               mean_out=None, invstd_out=None):
    settings = _settings()
    weight, has_weight = _vector_or(weight, mean)
    bias, has_bias = _vector_or(bias, mean)
    residual3, has_residual = _vector_or(residual3, x3)
    write_stats = mean_out is not None
    if not write_stats:
        mean_out, invstd_out = mean, invstd
    blocks = max(_elementwise_blocks(x3.size, settings),
                 _cdiv(x3.shape[1], settings.tpb) if write_stats else 0)
    _launch(settings, "normalize", min(blocks, settings.max_blocks), current_stream((x3,)),
            x3, mean, invstd, from_running, float(eps), weight, has_weight, bias, has_bias,
            residual3, has_residual, ACTIVATION_CODES[activation], y3, mean_out, invstd_out,
            write_stats)


def forward_train(x3, weight, bias, eps, momentum, running_mean, running_var, activation,
                  residual3, warn, y3, mean, invstd):
    """Algorithm 1 (+ activation, residual) in two launches: statistics (whose last block per
    channel writes mean/invstd and updates the running statistics), then normalize.

    Channels whose new running statistics would not be finite are left unchanged and recorded
    on the device (nonfinite_channels()); ``warn`` is called only for running statistics that
    are copies of host arrays (the host round trip), as on the host backends."""
    x3, y3, mean, invstd = (_numba(a, n) for a, n in ((x3, "x"), (y3, "y"), (mean, "mean"),
                                                       (invstd, "invstd")))
    weight = None if weight is None else _numba(weight, "gamma")
    bias = None if bias is None else _numba(bias, "beta")
    residual3 = None if residual3 is None else _numba(residual3, "residual")
    if running_mean is not None:
        running_mean = _numba(running_mean, "running_mean")
        running_var = _numba(running_var, "running_var")
    channels = x3.shape[1]
    if channels == 0:
        return
    stream = current_stream((x3,))
    stat = _scratch2("stat", 2, channels, stream)
    _reduce_stats(x3, STATS_TRAIN, mean, invstd, stat, eps, running_mean, running_var, momentum)
    if x3.size:
        _normalize(x3, stat[0], stat[1], False, eps, weight, bias, activation, residual3, y3)
    _complete(x3)
    _warn_for_host_copies(warn, running_mean)


def forward_eval(x3, weight, bias, running_mean, running_var, eps, activation, residual3, y3,
                 mean, invstd):
    """Algorithm 2 (+ activation, residual) in one launch, which also writes mean/invstd."""
    x3, y3, mean, invstd = (_numba(a, n) for a, n in ((x3, "x"), (y3, "y"), (mean, "mean"),
                                                       (invstd, "invstd")))
    weight = None if weight is None else _numba(weight, "gamma")
    bias = None if bias is None else _numba(bias, "beta")
    residual3 = None if residual3 is None else _numba(residual3, "residual")
    _normalize(x3, _numba(running_mean, "running_mean"), _numba(running_var, "running_var"),
               True, eps, weight, bias, activation, residual3, y3, mean, invstd)
    _complete(x3)


def _reduce_grad(dy3, x3, y3, activation, mean, invstd, weight, training, mode, coef, dgamma,
                 dbeta):
    """One launch: the gradient-sums kernel of x3's regime, finishing per channel as mode."""
    outer, channels, inner = x3.shape
    if outer * inner == 0:        # no values: the channels-last kernel writes zero sums
        dy3 = x3 = y3 = _device_array((0, channels, 1), dtype=x3.dtype)
        outer, inner = 0, 1
    settings = _settings()
    stream = current_stream((x3,))
    weight, has_weight = _vector_or(weight, mean)
    if inner == 1:
        tile, splits, rows_per_split, blocks = plan_channels_last(outer, channels, settings)
        part = _scratch("part", 3 * channels * splits, np.float64, stream)
        counter = _scratch("counter", _cdiv(channels, tile), np.int32, stream)
        _launch(settings, REDUCTIONS["grad", "channels_last"], blocks, stream, dy3, x3, y3,
                activation, mean, invstd, weight, has_weight, bool(training), tile,
                rows_per_split, splits, part, counter, mode, coef, dgamma, dbeta)
    else:
        splits, chunk, blocks = plan_channel_major(outer, channels, inner, settings)
        part = _scratch("part", 3 * channels * splits, np.float64, stream)
        counter = _scratch("counter", channels, np.int32, stream)
        _launch(settings, REDUCTIONS["grad", "channel_major"], blocks, stream, dy3, x3, y3,
                activation, mean, invstd, weight, has_weight, bool(training), chunk, splits,
                part, counter, mode, coef, dgamma, dbeta)


def backward(dy3, x3, mean, invstd, weight, training, activation, y3, dx3, dgamma, dbeta,
             dresidual3):
    """Gradients in two launches: sums (whose last block per channel writes dgamma, dbeta and
    the dx coefficients), then dx (and dresidual)."""
    dy3, x3, dx3, mean, invstd, dgamma, dbeta = (_numba(a, n) for a, n in (
        (dy3, "dy"), (x3, "x"), (dx3, "dx"), (mean, "mean"), (invstd, "invstd"),
        (dgamma, "dgamma"), (dbeta, "dbeta")))
    weight = None if weight is None else _numba(weight, "gamma")
    code = ACTIVATION_CODES[activation]
    y3 = x3 if y3 is None or code == 0 else _numba(y3, "y")
    channels = x3.shape[1]
    if channels == 0:
        return
    stream = current_stream((x3,))
    coef = _scratch2("coef", 4, channels, stream)
    _reduce_grad(dy3, x3, y3, code, mean, invstd, weight, training, GRAD_BACKWARD, coef, dgamma,
                 dbeta)
    if x3.size == 0:
        return
    dresidual3, has_dresidual = _vector_or(
        None if dresidual3 is None else _numba(dresidual3, "dresidual"), dx3)
    settings = _settings()
    _launch(settings, "grad_apply", _elementwise_blocks(x3.size, settings), stream, dy3, x3, y3,
            code, coef[0], coef[1], coef[2], coef[3], bool(training), dx3, dresidual3,
            has_dresidual)
    _complete(x3)


def backward_reduce(dy3, x3, mean):
    """sum(dy), sum(dy (x - mean)), sum(x - mean) per channel: one launch, then the (3, C)
    float64 host array the contract asks for (the synchronized backward adds them over
    processes; this is the one operation that copies to the host)."""
    dy3, x3, mean = _numba(dy3), _numba(x3), _numba(mean)
    channels = x3.shape[1]
    if channels == 0:
        return np.zeros((3, 0))
    sums = _device_array((3, channels), dtype=np.float64)
    _reduce_grad(dy3, x3, x3, 0, mean, mean, None, False, GRAD_REDUCE, sums, mean, mean)
    stream = current_stream((x3,))
    if SIMULATOR:
        return sums.copy_to_host()
    host = np.empty((3, channels))
    sums.copy_to_host(host, stream=stream)
    stream.synchronize()
    return host


def _coefficient(v):
    return _numba(v) if is_device_array(v) else to_device(np.asarray(v, np.float64))


def backward_apply(dy3, x3, mean, scale, mean_dy, coef, dx3):
    """dx = scale (dy - mean_dy - (x - mean) coef) with per-channel float64 coefficients (device
    arrays, or host arrays, which are copied up): one launch."""
    dy3, x3, dx3 = _numba(dy3), _numba(x3), _numba(dx3)
    if x3.size == 0:
        return
    settings = _settings()
    vectors = [_coefficient(v) for v in (mean, scale, mean_dy, coef)]
    _launch(settings, "grad_apply", _elementwise_blocks(x3.size, settings),
            current_stream((x3,)), dy3, x3, x3, 0, *vectors, True, dx3, dx3, False)


def update_running_stats(running_mean, running_var, mean, var, count, momentum, warn):
    """r = (1 - momentum) r + momentum * batch (unbiased variance), in one launch; channels
    whose new values would not be finite in the running dtype are left unchanged and recorded
    on the device (nonfinite_channels()); ``warn`` only for copies of host arrays."""
    running_mean, running_var = _numba(running_mean), _numba(running_var)
    mean, var = _coefficient(mean), _coefficient(var)
    channels = mean.shape[0]
    if channels == 0:
        return
    settings = _settings()
    stream = current_stream((running_mean,))
    flags = _scratch("flags", channels, np.uint8, stream)
    unbias = count / (count - 1) if count > 1 else math.inf
    _launch(settings, "update_running_stats",
            min(_cdiv(channels, settings.tpb), settings.max_blocks), stream, running_mean,
            running_var, mean, var, float(momentum), float(unbias),
            _limit(running_mean.dtype), _limit(running_var.dtype), flags)
    _record_nonfinite(flags, channels, stream)
    _warn_for_host_copies(warn, running_mean)


# ----------------------------------------------------------------------------------------------
# eager compilation

def precompile(dtypes=("float16", "float32", "float64"), activations=(None, "relu", "sigmoid")):
    """Compile, ahead of the first real call, every kernel that device arrays of these dtypes use
    with per-channel vectors in the statistics dtype (PyTorch's convention: float32 for float16
    and float32 data), in both regimes, training and eval, forward and backward, with and
    without running statistics. Other dtype mixes compile on first use. Returns the number of
    launches it made (on tiny arrays: the run itself costs nothing)."""
    launches = []
    _launch_hooks.append(lambda *args: launches.append(args[0]))
    try:
        for dtype in dtypes:
            stats = np.float64 if np.dtype(dtype) == np.float64 else np.float32
            for shape in ((2, 3, 5), (5, 3, 1)):
                channels = shape[1]
                x = _to_device(np.linspace(-1.0, 1.0, math.prod(shape)).astype(dtype)
                               .reshape(shape))
                y, dx = empty(shape, dtype), empty(shape, dtype)
                vec = [_to_device(np.ones(channels, stats)) for _ in range(8)]
                weight, bias, running_mean, running_var, mean, invstd, dgamma, dbeta = vec
                for activation in activations:
                    forward_train(x, weight, bias, 1e-5, 0.1, running_mean, running_var,
                                  activation, None, None, y, mean, invstd)
                    forward_eval(x, weight, bias, running_mean, running_var, 1e-5, activation,
                                 None, y, mean, invstd)
                    for training in (True, False):
                        backward(x, x, mean, invstd, weight, training, activation, y, dx,
                                 dgamma, dbeta, None)
                forward_train(x, None, None, 1e-5, 0.1, None, None, None, None, None, y, mean,
                              invstd)
                moments(x, mean, invstd)
                channel_moments(x)
    finally:
        _launch_hooks.pop()
    return len(launches)
