"""numba-cuda kernels on the canonical ``(outer, C, inner)`` view, and their launchers.

Two memory regimes, as on the CPU:

* channel-major (``inner > 1``, e.g. NCHW): a channel is ``outer`` contiguous runs of ``inner``
  values. Its values, in (outer, inner) order, are cut into ``splits`` pieces of ``chunk``
  values; a block reduces one (channel, piece) work item, adjacent threads reading adjacent
  values, so one large channel is spread over many blocks and many channels over few.
* channels-last (``inner == 1``, e.g. NHWC or (N, C)): the (rows, C) matrix. A block is a tile of
  ``tile`` adjacent channels (adjacent threads read adjacent channels of a row: coalesced) by
  ``tpb / tile`` rows, and the rows are cut into ``splits`` pieces.

Every reduction is two kernels. The first writes one float64 partial per (channel, piece):
(count, mean, M2) for the statistics, plain sums for the backward pass. Inside a block each
thread sums its values shifted by its own first value, turns the sums into (count, mean, M2),
and the threads are merged by a shared-memory tree with Chan's formula. The second kernel merges
the pieces of each channel, again in a fixed tree order. There are no floating-point atomics: a
result depends on the launch configuration only, so it is bitwise the same from run to run.

Element-wise passes (normalize, dx) walk the flattened tensor with a grid-stride loop and carry
the (o, c, i) index forward by additions instead of dividing per element. Threads issue
``unroll`` loads before using them, to keep enough bytes in flight.

All accumulation and per-element arithmetic is float64; float16/float32 values are widened on
load and rounded once on store. Launch settings come from ``fastbn._config`` (CUDA_*), read at
every call; kernels are compiled per (threads per block, unroll) because shared and local arrays
need compile-time sizes.

Importing this module never touches a GPU; ``check_available()`` (called by
``fastbn.backends.load``) says clearly what is missing when there is none.
"""
import contextlib
import functools
import importlib.util
import math
import threading
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from .. import _config

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
_as_cuda_array = getattr(cuda, "as_cuda_array", None)
_from_cuda_array_interface = getattr(cuda, "from_cuda_array_interface", None)
_simulator_lock = threading.Lock() if SIMULATOR else contextlib.nullcontext()


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
    chunk = _cdiv(_cdiv(count, splits), settings.tpb) * settings.tpb
    splits = _cdiv(count, chunk)
    return splits, chunk, min(channels * splits, settings.max_blocks)


def plan_channels_last(rows, channels, settings):
    """(tile, splits, rows_per_split, blocks) for the (rows, C) matrix."""
    tile = min(settings.tile, settings.tpb, _next_power_of_two(channels))
    tiles = _cdiv(channels, tile)
    row_threads = settings.tpb // tile
    splits = max(1, min(_cdiv(rows, row_threads * settings.min_items),
                        _cdiv(settings.max_blocks, tiles)))
    rows_per_split = _cdiv(rows, splits)
    splits = _cdiv(rows, rows_per_split)
    return tile, splits, rows_per_split, min(tiles * splits, settings.max_blocks)


def _elementwise_blocks(size, settings):
    return min(_cdiv(size, settings.tpb * settings.unroll), settings.max_blocks)


# ----------------------------------------------------------------------------------------------
# device functions

@cuda.jit(device=True, inline=True)
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub & LeVeque 1979)."""
    if n_b == 0.0:
        return n_a, mean_a, m2_a
    if n_a == 0.0:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


@cuda.jit(device=True, inline=True)
def _from_shifted_sums(n, shift, total, total_sq):
    """(count, mean, M2) of n values whose deviations from ``shift`` sum to total, total_sq."""
    if n == 0:
        return 0.0, 0.0, 0.0
    offset = total / n
    m2 = total_sq - total * offset
    if m2 < 0.0:       # rounding; NaN stays NaN
        m2 = 0.0
    return np.float64(n), shift + offset, m2


@cuda.jit(device=True)
def _block_merge_moments(sh_n, sh_mean, sh_m2, tid, width, groups):
    """Tree-merge slots ``tid % width + k * width`` (k < groups, a power of two) into slot
    ``tid % width``, in a fixed order. Every thread of the block must call it."""
    group = tid // width
    stride = groups // 2
    while stride > 0:
        if group < stride:
            other = tid + stride * width
            n, mean, m2 = _chan_merge(sh_n[tid], sh_mean[tid], sh_m2[tid],
                                      sh_n[other], sh_mean[other], sh_m2[other])
            sh_n[tid] = n
            sh_mean[tid] = mean
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


# ----------------------------------------------------------------------------------------------
# kernels

def kernel_functions(tpb, unroll):
    """The Python functions of every kernel, with the block size and unroll compiled in.

    ``_kernels`` compiles them with ``cuda.jit``; tests compile them to PTX for a real GPU
    architecture with ``cuda.compile_ptx`` (the simulator would accept code a GPU won't)."""

    # ---- statistics: partials per (channel, piece), then a merge per channel ----------------

    def moments_partials_channel_major(x, chunk, splits, part):
        outer, channels, inner = x.shape
        count = outer * inner
        tid = cuda.threadIdx.x
        sh_n = cuda.shared.array(tpb, np.float64)
        sh_mean = cuda.shared.array(tpb, np.float64)
        sh_m2 = cuda.shared.array(tpb, np.float64)
        vals = cuda.local.array(unroll, np.float64)
        step_o = tpb // inner
        step_i = tpb - step_o * inner
        for item in range(cuda.blockIdx.x, channels * splits, cuda.gridDim.x):
            c = item // splits
            start = (item - c * splits) * chunk
            end = min(start + chunk, count)
            n = 0
            shift = 0.0
            total = 0.0
            total_sq = 0.0
            e = start + tid
            o = e // inner
            i = e - o * inner
            if e < end:
                shift = np.float64(x[o, c, i])
            while e < end:
                for u in range(unroll):
                    if e + u * tpb < end:
                        vals[u] = np.float64(x[o, c, i])
                    o += step_o
                    i += step_i
                    if i >= inner:
                        i -= inner
                        o += 1
                for u in range(unroll):
                    if e + u * tpb < end:
                        d = vals[u] - shift
                        total += d
                        total_sq += d * d
                        n += 1
                e += unroll * tpb
            n_f, mean, m2 = _from_shifted_sums(n, shift, total, total_sq)
            sh_n[tid] = n_f
            sh_mean[tid] = mean
            sh_m2[tid] = m2
            cuda.syncthreads()
            _block_merge_moments(sh_n, sh_mean, sh_m2, tid, 1, tpb)
            if tid == 0:
                part[0, item] = sh_n[0]
                part[1, item] = sh_mean[0]
                part[2, item] = sh_m2[0]
            cuda.syncthreads()

    def moments_partials_channels_last(x, tile, rows_per_split, splits, part):
        rows, channels = x.shape[0], x.shape[1]
        tid = cuda.threadIdx.x
        lane = tid % tile
        row0 = tid // tile
        row_threads = tpb // tile
        tiles = (channels + tile - 1) // tile
        sh_n = cuda.shared.array(tpb, np.float64)
        sh_mean = cuda.shared.array(tpb, np.float64)
        sh_m2 = cuda.shared.array(tpb, np.float64)
        vals = cuda.local.array(unroll, np.float64)
        for item in range(cuda.blockIdx.x, tiles * splits, cuda.gridDim.x):
            t = item // splits
            s = item - t * splits
            c = t * tile + lane
            r = s * rows_per_split + row0
            end = min((s + 1) * rows_per_split, rows)
            n = 0
            shift = 0.0
            total = 0.0
            total_sq = 0.0
            if c < channels:
                if r < end:
                    shift = np.float64(x[r, c, 0])
                while r < end:
                    for u in range(unroll):
                        if r + u * row_threads < end:
                            vals[u] = np.float64(x[r + u * row_threads, c, 0])
                    for u in range(unroll):
                        if r + u * row_threads < end:
                            d = vals[u] - shift
                            total += d
                            total_sq += d * d
                            n += 1
                    r += unroll * row_threads
            n_f, mean, m2 = _from_shifted_sums(n, shift, total, total_sq)
            sh_n[tid] = n_f
            sh_mean[tid] = mean
            sh_m2[tid] = m2
            cuda.syncthreads()
            _block_merge_moments(sh_n, sh_mean, sh_m2, tid, tile, row_threads)
            if row0 == 0 and c < channels:
                w = c * splits + s
                part[0, w] = sh_n[lane]
                part[1, w] = sh_mean[lane]
                part[2, w] = sh_m2[lane]
            cuda.syncthreads()

    def finalize_moments(part, splits, count, eps, training, mean, m2, var, invstd):
        """Merge each channel's pieces: mean and M2; for training also var = M2 / count and
        invstd = 1 / sqrt(var + eps)."""
        channels = mean.shape[0]
        tid = cuda.threadIdx.x
        sh_n = cuda.shared.array(tpb, np.float64)
        sh_mean = cuda.shared.array(tpb, np.float64)
        sh_m2 = cuda.shared.array(tpb, np.float64)
        for c in range(cuda.blockIdx.x, channels, cuda.gridDim.x):
            n = 0.0
            mu = 0.0
            q = 0.0
            for s in range(tid, splits, tpb):
                w = c * splits + s
                n, mu, q = _chan_merge(n, mu, q, part[0, w], part[1, w], part[2, w])
            sh_n[tid] = n
            sh_mean[tid] = mu
            sh_m2[tid] = q
            cuda.syncthreads()
            _block_merge_moments(sh_n, sh_mean, sh_m2, tid, 1, tpb)
            if tid == 0:
                mean[c] = sh_mean[0]
                m2[c] = sh_m2[0]
                if training:
                    v = sh_m2[0] / count
                    var[c] = v
                    invstd[c] = 1.0 / math.sqrt(v + eps)
            cuda.syncthreads()

    # ---- element-wise ------------------------------------------------------------------------

    def normalize(x, mean, invstd, weight, has_weight, bias, has_bias, y):
        """y = (x - mean) * (weight * invstd) + bias, per channel."""
        outer, channels, inner = x.shape
        size = outer * channels * inner
        vals = cuda.local.array(unroll, np.float64)
        e = cuda.grid(1)
        step = cuda.gridsize(1)
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
                    scale = invstd[c]
                    if has_weight:
                        scale = weight[c] * scale
                    shift = bias[c] if has_bias else 0.0
                    y[o, c, i] = (vals[u] - mean[c]) * scale + shift
                o, c, i = _advance(o, c, i, step_o, step_c, step_i, channels, inner)
            e += unroll * step

    # ---- backward: sums per (channel, piece), coefficients per channel, then dx --------------

    def backward_partials_channel_major(dy, x, mean, chunk, splits, part):
        outer, channels, inner = x.shape
        count = outer * inner
        tid = cuda.threadIdx.x
        sh_dy = cuda.shared.array(tpb, np.float64)
        sh_dy_xc = cuda.shared.array(tpb, np.float64)
        sh_xc = cuda.shared.array(tpb, np.float64)
        g_vals = cuda.local.array(unroll, np.float64)
        x_vals = cuda.local.array(unroll, np.float64)
        step_o = tpb // inner
        step_i = tpb - step_o * inner
        for item in range(cuda.blockIdx.x, channels * splits, cuda.gridDim.x):
            c = item // splits
            start = (item - c * splits) * chunk
            end = min(start + chunk, count)
            mu = mean[c]
            s_dy = 0.0
            s_dy_xc = 0.0
            s_xc = 0.0
            e = start + tid
            o = e // inner
            i = e - o * inner
            while e < end:
                for u in range(unroll):
                    if e + u * tpb < end:
                        g_vals[u] = np.float64(dy[o, c, i])
                        x_vals[u] = np.float64(x[o, c, i])
                    o += step_o
                    i += step_i
                    if i >= inner:
                        i -= inner
                        o += 1
                for u in range(unroll):
                    if e + u * tpb < end:
                        xc = x_vals[u] - mu
                        s_dy += g_vals[u]
                        s_dy_xc += g_vals[u] * xc
                        s_xc += xc
                e += unroll * tpb
            sh_dy[tid] = s_dy
            sh_dy_xc[tid] = s_dy_xc
            sh_xc[tid] = s_xc
            cuda.syncthreads()
            _block_sum3(sh_dy, sh_dy_xc, sh_xc, tid, 1, tpb)
            if tid == 0:
                part[0, item] = sh_dy[0]
                part[1, item] = sh_dy_xc[0]
                part[2, item] = sh_xc[0]
            cuda.syncthreads()

    def backward_partials_channels_last(dy, x, mean, tile, rows_per_split, splits, part):
        rows, channels = x.shape[0], x.shape[1]
        tid = cuda.threadIdx.x
        lane = tid % tile
        row0 = tid // tile
        row_threads = tpb // tile
        tiles = (channels + tile - 1) // tile
        sh_dy = cuda.shared.array(tpb, np.float64)
        sh_dy_xc = cuda.shared.array(tpb, np.float64)
        sh_xc = cuda.shared.array(tpb, np.float64)
        g_vals = cuda.local.array(unroll, np.float64)
        x_vals = cuda.local.array(unroll, np.float64)
        for item in range(cuda.blockIdx.x, tiles * splits, cuda.gridDim.x):
            t = item // splits
            s = item - t * splits
            c = t * tile + lane
            r = s * rows_per_split + row0
            end = min((s + 1) * rows_per_split, rows)
            s_dy = 0.0
            s_dy_xc = 0.0
            s_xc = 0.0
            if c < channels:
                mu = mean[c]
                while r < end:
                    for u in range(unroll):
                        if r + u * row_threads < end:
                            g_vals[u] = np.float64(dy[r + u * row_threads, c, 0])
                            x_vals[u] = np.float64(x[r + u * row_threads, c, 0])
                    for u in range(unroll):
                        if r + u * row_threads < end:
                            xc = x_vals[u] - mu
                            s_dy += g_vals[u]
                            s_dy_xc += g_vals[u] * xc
                            s_xc += xc
                    r += unroll * row_threads
            sh_dy[tid] = s_dy
            sh_dy_xc[tid] = s_dy_xc
            sh_xc[tid] = s_xc
            cuda.syncthreads()
            _block_sum3(sh_dy, sh_dy_xc, sh_xc, tid, tile, row_threads)
            if row0 == 0 and c < channels:
                w = c * splits + s
                part[0, w] = sh_dy[lane]
                part[1, w] = sh_dy_xc[lane]
                part[2, w] = sh_xc[lane]
            cuda.syncthreads()

    def finalize_backward(part, splits, count, mean, invstd, weight, has_weight, training,
                          sum_dy, sum_dy_xhat, coef):
        """Per channel: dbeta, dgamma and the dx coefficients (mu, a, mean_dy, b) of
        dx = a * (dy - mean_dy - (x - mu) * b)."""
        channels = mean.shape[0]
        tid = cuda.threadIdx.x
        sh_dy = cuda.shared.array(tpb, np.float64)
        sh_dy_xc = cuda.shared.array(tpb, np.float64)
        sh_xc = cuda.shared.array(tpb, np.float64)
        for c in range(cuda.blockIdx.x, channels, cuda.gridDim.x):
            a = 0.0
            b = 0.0
            d = 0.0
            for s in range(tid, splits, tpb):
                w = c * splits + s
                a += part[0, w]
                b += part[1, w]
                d += part[2, w]
            sh_dy[tid] = a
            sh_dy_xc[tid] = b
            sh_xc[tid] = d
            cuda.syncthreads()
            _block_sum3(sh_dy, sh_dy_xc, sh_xc, tid, 1, tpb)
            if tid == 0:
                s_dy = sh_dy[0]
                s_dy_xc = sh_dy_xc[0]
                mu = mean[c]
                if training:
                    # re-centre on the exact batch mean (the saved mean may be rounded)
                    shift = sh_xc[0] / count
                    mu += shift
                    s_dy_xc -= shift * s_dy
                sum_dy[c] = s_dy
                sum_dy_xhat[c] = s_dy_xc * invstd[c]
                gamma = weight[c] if has_weight else 1.0
                coef[0, c] = mu
                coef[1, c] = gamma * invstd[c]
                if training:
                    coef[2, c] = s_dy / count
                    coef[3, c] = invstd[c] * invstd[c] * s_dy_xc / count
                else:
                    coef[2, c] = 0.0
                    coef[3, c] = 0.0
            cuda.syncthreads()

    def backward_apply(dy, x, coef, training, dx):
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
                    g_vals[u] = np.float64(dy[lo, lc, li])
                    if training:      # eval: dx = a * dy does not read x
                        x_vals[u] = np.float64(x[lo, lc, li])
                lo, lc, li = _advance(lo, lc, li, step_o, step_c, step_i, channels, inner)
            for u in range(unroll):
                if e + u * step < size:
                    if training:
                        dx[o, c, i] = coef[1, c] * (g_vals[u] - coef[2, c]
                                                    - (x_vals[u] - coef[0, c]) * coef[3, c])
                    else:
                        dx[o, c, i] = coef[1, c] * g_vals[u]
                o, c, i = _advance(o, c, i, step_o, step_c, step_i, channels, inner)
            e += unroll * step

    # ---- per-channel vectors -----------------------------------------------------------------

    def cast_copy(src, dst):
        for c in range(cuda.grid(1), dst.shape[0], cuda.gridsize(1)):
            dst[c] = src[c]

    def invstd_from_var(var, eps, out):
        for c in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            out[c] = 1.0 / math.sqrt(var[c] + eps)

    def var_from_m2(m2, count, out):
        for c in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            out[c] = m2[c] / count

    def update_running_stats(running_mean, running_var, mean, var, momentum, unbias, skipped):
        for c in range(cuda.grid(1), mean.shape[0], cuda.gridsize(1)):
            if math.isfinite(mean[c]) and math.isfinite(var[c]):
                running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) \
                    + momentum * mean[c]
                running_var[c] = (1.0 - momentum) * np.float64(running_var[c]) \
                    + momentum * (var[c] * unbias)
                skipped[c] = 0
            else:
                skipped[c] = 1

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
        moments_partials_channel_major=moments_partials_channel_major,
        moments_partials_channels_last=moments_partials_channels_last,
        finalize_moments=finalize_moments,
        normalize=normalize,
        backward_partials_channel_major=backward_partials_channel_major,
        backward_partials_channels_last=backward_partials_channels_last,
        finalize_backward=finalize_backward,
        backward_apply=backward_apply,
        cast_copy=cast_copy,
        invstd_from_var=invstd_from_var,
        var_from_m2=var_from_m2,
        update_running_stats=update_running_stats,
        strided_copy=strided_copy,
    )


@functools.lru_cache(maxsize=None)
def _kernels(tpb, unroll):
    return SimpleNamespace(**{key: _jit(fn) for key, fn in kernel_functions(tpb, unroll).items()})


def _launch(settings, kernel_name, blocks, *args):
    """Launch one kernel (nothing to do for an empty grid)."""
    if blocks <= 0:
        return
    blocks = max(blocks, settings.min_blocks)
    kernel = getattr(_kernels(settings.tpb, settings.unroll), kernel_name)
    with _simulator_lock:
        kernel[blocks, settings.tpb](*args)


def _launch_vector(kernel_name, n, *args):
    """Launch a per-channel kernel over n channels."""
    settings = _settings()
    _launch(settings, kernel_name, min(_cdiv(n, settings.tpb), settings.max_blocks), *args)


# ----------------------------------------------------------------------------------------------
# array helpers (the same names as in _host.py); arrays are numba device arrays

_COPY_RANK = 8


def _is_numba_device_array(a):
    return bool(getattr(type(a), "__cuda_ndarray__", False))


def asarray(a, name):
    """A numba device array viewing ``a``'s memory (CuPy, PyTorch, numba: no copy)."""
    if _is_numba_device_array(a):
        return a
    if not SIMULATOR and hasattr(a, "__cuda_array_interface__"):
        try:
            return _as_cuda_array(a)
        except Exception as exc:  # noqa: BLE001 - report what numba refused
            raise TypeError(f"{name}: could not use {type(a).__name__} as a CUDA array "
                            f"({exc})") from None
    raise TypeError(f"{name}: got a host array ({type(a).__name__}) while other arguments are "
                    f"CUDA device arrays; pass every array on the device (numba.cuda.to_device, "
                    f"cupy.asarray, tensor.cuda()) or every array on the host (NumPy)")


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


def empty(shape, dtype):
    return _device_array(tuple(shape), dtype=np.dtype(dtype))


def empty_like(a):
    """Same shape and dtype in a's memory order (as numpy.empty_like(order='K'))."""
    order = sorted(range(a.ndim), key=lambda d: -abs(a.strides[d]))
    base = empty(tuple(a.shape[d] for d in order), a.dtype)
    if order == list(range(a.ndim)):
        return base
    strides = [0] * a.ndim
    for d, stride in zip(order, base.strides):
        strides[d] = stride
    return _view(base, a.shape, strides)


def is_writeable(a):
    if SIMULATOR:
        return bool(np.asarray(a).flags.writeable)
    return not a.__cuda_array_interface__["data"][1]


def view3(a, shape3, strides3):
    return _view(a, shape3, strides3)


def _extent(a):
    if a.size == 0:
        return None
    low = high = _pointer(a)
    for n, stride in zip(a.shape, a.strides):
        if stride > 0:
            high += (n - 1) * stride
        else:
            low += (n - 1) * stride
    return low, high + a.dtype.itemsize


def may_share_memory(a, b):
    """Whether the memory extents of two device arrays overlap (as numpy.may_share_memory)."""
    extent_a, extent_b = _extent(a), _extent(b)
    return (extent_a is not None and extent_b is not None
            and extent_a[0] < extent_b[1] and extent_b[0] < extent_a[1])


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
            _view(src, shape8, tuple(s for _, s, _ in merged)),
            _view(dst, shape8, tuple(d for _, _, d in merged)))


def gather3(a, perm, shape3):
    """Contiguous (outer, C, inner) copy of a device array whose axes do not merge into a view."""
    out = empty(shape3, a.dtype)
    shape = tuple(a.shape[p] for p in perm)
    _copy_strided(a, out, shape, tuple(a.strides[p] for p in perm),
                  _c_strides(shape, a.dtype.itemsize))
    return out


def scatter3(dst, src3, perm):
    """Write a contiguous (outer, C, inner) result into dst (the inverse of gather3)."""
    shape = tuple(dst.shape[p] for p in perm)
    _copy_strided(src3, dst, shape, _c_strides(shape, src3.dtype.itemsize),
                  tuple(dst.strides[p] for p in perm))


def copyto(dst, src):
    """dst[:] = src for (C,) vectors, casting to dst's dtype."""
    _launch_vector("cast_copy", dst.shape[0], src, dst)


def to_float64(a):
    """A contiguous float64 copy of a (C,) vector (a itself when it already is one)."""
    if a.dtype == np.float64 and a.is_c_contiguous():
        return a
    out = empty(a.shape, np.float64)
    copyto(out, a)
    return out


def to_host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


def to_device(a):
    return _to_device(np.ascontiguousarray(a))


def invstd_from_var(var, eps):
    out = empty(var.shape, np.float64)
    _launch_vector("invstd_from_var", var.shape[0], var, float(eps), out)
    return out


def var_from_m2(m2, count):
    out = empty(m2.shape, np.float64)
    _launch_vector("var_from_m2", m2.shape[0], m2, float(count), out)
    return out


def update_running_stats(running_mean, running_var, mean, var, count, momentum, eps):
    """r = (1-momentum) r + momentum * batch (unbiased variance) on the device; returns (on the
    host) the channels left unchanged because their batch statistics are not finite."""
    channels = mean.shape[0]
    if channels == 0:
        return np.zeros(0, np.intp)
    skipped = empty((channels,), np.uint8)
    _launch_vector("update_running_stats", channels, running_mean, running_var, mean, var,
                   float(momentum), count / (count - 1), skipped)
    return np.flatnonzero(skipped.copy_to_host())


# ----------------------------------------------------------------------------------------------
# operations (the same names in every backend)

def _nan_vector(channels):
    return to_device(np.full(channels, np.nan))


def _moment_partials(settings, x3):
    outer, channels, inner = x3.shape
    if inner == 1:
        tile, splits, rows_per_split, blocks = plan_channels_last(outer, channels, settings)
        part = empty((3, channels * splits), np.float64)
        _launch(settings, "moments_partials_channels_last", blocks, x3, tile, rows_per_split,
                splits, part)
    else:
        splits, chunk, blocks = plan_channel_major(outer, channels, inner, settings)
        part = empty((3, channels * splits), np.float64)
        _launch(settings, "moments_partials_channel_major", blocks, x3, chunk, splits, part)
    return part, splits


def channel_moments(x3):
    outer, channels, inner = x3.shape
    if x3.size == 0:
        return _nan_vector(channels), _nan_vector(channels)
    settings = _settings()
    mean, m2 = empty((channels,), np.float64), empty((channels,), np.float64)
    part, splits = _moment_partials(settings, x3)
    _launch(settings, "finalize_moments", min(channels, settings.max_blocks), part, splits,
            float(outer * inner), 1.0, False, mean, m2, mean, m2)
    return mean, m2


def _normalize(settings, x3, mean, invstd, weight, bias, y3):
    _launch(settings, "normalize", _elementwise_blocks(x3.size, settings), x3, mean, invstd,
            mean if weight is None else weight, weight is not None,
            mean if bias is None else bias, bias is not None, y3)


def forward_train(x3, weight, bias, eps, y3):
    outer, channels, inner = x3.shape
    if x3.size == 0:             # no channels (the API asks for 2+ values per channel)
        return _nan_vector(channels), _nan_vector(channels)
    settings = _settings()
    mean, m2, var, invstd = (empty((channels,), np.float64) for _ in range(4))
    part, splits = _moment_partials(settings, x3)
    _launch(settings, "finalize_moments", min(channels, settings.max_blocks), part, splits,
            float(outer * inner), float(eps), True, mean, m2, var, invstd)
    _normalize(settings, x3, mean, invstd, weight, bias, y3)
    return mean, var


def forward_eval(x3, mean, invstd, weight, bias, y3):
    if x3.size:
        _normalize(_settings(), x3, mean, invstd, weight, bias, y3)


def backward(dy3, x3, mean, invstd, weight, training, dx3):
    outer, channels, inner = x3.shape
    if x3.size == 0:
        zeros = np.zeros(channels)
        return to_device(zeros), to_device(zeros)
    settings = _settings()
    if inner == 1:
        tile, splits, rows_per_split, blocks = plan_channels_last(outer, channels, settings)
        part = empty((3, channels * splits), np.float64)
        _launch(settings, "backward_partials_channels_last", blocks, dy3, x3, mean, tile,
                rows_per_split, splits, part)
    else:
        splits, chunk, blocks = plan_channel_major(outer, channels, inner, settings)
        part = empty((3, channels * splits), np.float64)
        _launch(settings, "backward_partials_channel_major", blocks, dy3, x3, mean, chunk,
                splits, part)
    sum_dy, sum_dy_xhat = empty((channels,), np.float64), empty((channels,), np.float64)
    coef = empty((4, channels), np.float64)
    training = bool(training)
    _launch(settings, "finalize_backward", min(channels, settings.max_blocks), part, splits,
            float(outer * inner), mean, invstd, mean if weight is None else weight,
            weight is not None, training, sum_dy, sum_dy_xhat, coef)
    _launch(settings, "backward_apply", _elementwise_blocks(x3.size, settings), dy3, x3, coef,
            training, dx3)
    return sum_dy, sum_dy_xhat


def _backward_partials(settings, dy3, x3, mean):
    """(3, C * splits) float64 partials of sum(dy), sum(dy * (x - mean)), sum(x - mean)."""
    outer, channels, inner = x3.shape
    if inner == 1:
        tile, splits, rows_per_split, blocks = plan_channels_last(outer, channels, settings)
        part = empty((3, channels * splits), np.float64)
        _launch(settings, "backward_partials_channels_last", blocks, dy3, x3, mean, tile,
                rows_per_split, splits, part)
    else:
        splits, chunk, blocks = plan_channel_major(outer, channels, inner, settings)
        part = empty((3, channels * splits), np.float64)
        _launch(settings, "backward_partials_channel_major", blocks, dy3, x3, mean, chunk,
                splits, part)
    return part, splits


def backward_reduce(dy3, x3, mean):
    """Backward's per-channel reductions alone, as host float64 vectors: sum(dy),
    sum(dy * (x - mean)), sum(x - mean). The synchronized backward (fastbn.distributed) adds
    them over processes, then calls backward_apply with the global coefficients."""
    channels = x3.shape[1]
    if x3.size == 0:
        return np.zeros(channels), np.zeros(channels), np.zeros(channels)
    part, splits = _backward_partials(_settings(), dy3, x3, mean)
    # the partials are small (3 x C x splits); add them on the host in a fixed order
    sums = to_host(part).reshape(3, channels, splits).sum(axis=2)
    return sums[0], sums[1], sums[2]


def backward_apply(dy3, x3, mean, scale, mean_dy, coef, dx3):
    """dx = scale * (dy - mean_dy - (x - mean) * coef), with float64 (C,) coefficients."""
    if x3.size == 0:
        return
    settings = _settings()
    coefficients = to_device(np.ascontiguousarray(np.stack(
        [to_host(v) for v in (mean, scale, mean_dy, coef)]).astype(np.float64)))
    _launch(settings, "backward_apply", _elementwise_blocks(x3.size, settings), dy3, x3,
            coefficients, True, dx3)
