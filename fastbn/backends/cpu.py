"""Numba CPU kernels on the canonical ``(outer, C, inner)`` view.

Batch norm is memory-bound: the floor is one read of x and one write of y (a copy). The kernels
are organized so that everything beyond that floor comes from cache:

* channel runs (``inner >= CPU_MIN_RUN``, e.g. NCHW): a channel is ``outer`` contiguous runs of
  ``inner`` values. A task owns a whole channel: it streams the channel once from memory for
  the statistics and normalizes it (or applies the gradient) from L2 straight after. With fewer
  channels than ``CPU_MIN_TASKS``, each channel is cut into fixed segments instead, whose
  statistics are merged in order before anything is written.
* matrices (``inner == 1``, e.g. NHWC or (N, C); or short runs, e.g. NCHW 7x7): x is viewed as
  a (rows, columns) matrix, column j belonging to channel ``(j // inner) % C``.
  - column blocks: when a block of whole channels over all rows fits ``CPU_FUSED_BYTES``, a task
    owns the block: statistics, then normalization (or gradient) from cache;
  - row blocks: otherwise a fixed number of row blocks accumulate per-column partial sums, added
    in block order; then every row block is normalized (a second read of x from memory, or from
    L3 when x fits). A few channels (C < 64) are viewed several rows to a matrix row, so that
    the column loops stay long enough to vectorize.

Statistics are shifted sums in float64, ``S1 = sum(x - K)``, ``S2 = sum((x - K)^2)``, with K a
mean of data of the same channel seen first (a run, or the first rows), so the ``S2 - S1^2/n``
cancellation costs a few float64 ulps (docs/perf_log.md has the error bound). The elementwise
passes run in float32 for float16/float32 data: the mean is split into a float32 part and a
remainder folded into the shift, so ``x - mean`` loses nothing where it cancels. float64 data
is computed in float64. float16 travels as its uint16 bits, converted in registers
(``vcvtph2ps``/``vcvtps2ph``): Numba's CPU target has no float16 type.

Every split (segments, blocks, pieces) depends on the shape and ``_config`` only, never on the
thread count, so results are bitwise the same for any number of threads.

Kernel versions (measurements in docs/perf_log.md):
  v1  per channel two-pass + normalize; channels-last chunked two-pass + Chan merge; float16
      widened by copies; all arithmetic float64.
  v2  one-pass shifted sums; 0-based loops over 1-D slices (a ``range(lo, hi)`` index defeats
      vectorization); in-register float16; channels-last in one call with per-task partials;
      channels split into segments when C is small.
  v3  float32 elementwise passes for float16/float32; the matrix regime with fused column
      blocks, rows grouped for small C and short channel runs; piece loops without divisions;
      cheaper host helpers for small calls.
"""
import threading
import types as pytypes

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic, overload
from numpy.lib.stride_tricks import as_strided

from .. import _config
from . import _host
from ._host import *  # noqa: F401,F403  (the shared host-array helpers)

name = "cpu"

# Numba's workqueue threading layer is not re-entrant; OpenMP and TBB are. Parallel launches
# take this lock so concurrent calls from Python threads are safe under any layer.
_parallel_launch = threading.Lock()


def _kernel(fn):
    """Compile fn twice: serial for small tensors, parallel for large ones.

    The parallel variant jits a twin of fn with its own qualified name: Numba's cache keys its
    entries by qualified name, line and signature, not by the parallel flag, so one function
    jitted both ways would load whichever variant was compiled first for both (and the
    "parallel" kernel could silently run on one thread)."""
    twin = pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                                fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_parallel"
    return (njit(**_config.JIT_OPTIONS)(fn),
            njit(parallel=True, **_config.JIT_OPTIONS)(twin))


def _helper(fn):
    return njit(inline="always", **_config.JIT_OPTIONS)(fn)


def _launch(pair, size, *args):
    serial, parallel = pair
    if size < _config.CPU_PARALLEL_MIN_SIZE:
        return serial(*args)
    with _parallel_launch:
        return parallel(*args)


# ----------------------------------------------------------------------------------------------
# element access: float16 data is passed as its uint16 bits

@intrinsic
def _half_bits_to_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _float32_to_half_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


def _widen(value):
    """An element as float64 (for sums)."""


def _load(value):
    """An element in the type of the elementwise arithmetic: float32 for float16 and float32
    data, float64 for float64 data."""


def _narrow(value, out):
    """A value as an element of the array out (float16: rounded to float32, then float16)."""


def _compute_empty(n, like):
    """An uninitialized (n,) array of like's elementwise-arithmetic type."""


def _compute_value(value, like):
    """A float64 value in like's elementwise-arithmetic type."""


def _is_half_or_single(dtype):
    return dtype in (types.uint16, types.float32)


@overload(_widen, inline="always")
def _widen_overload(value):
    if value == types.uint16:
        return lambda value: np.float64(_half_bits_to_float32(value))
    return lambda value: np.float64(value)


@overload(_load, inline="always")
def _load_overload(value):
    if value == types.uint16:
        return lambda value: _half_bits_to_float32(value)
    return lambda value: value


@overload(_narrow, inline="always")
def _narrow_overload(value, out):
    if out.dtype == types.uint16:
        return lambda value, out: _float32_to_half_bits(np.float32(value))
    return lambda value, out: value


@overload(_compute_empty, inline="always")
def _compute_empty_overload(n, like):
    if _is_half_or_single(like.dtype):
        return lambda n, like: np.empty(n, np.float32)
    return lambda n, like: np.empty(n, np.float64)


@overload(_compute_value, inline="always")
def _compute_value_overload(value, like):
    if _is_half_or_single(like.dtype):
        return lambda value, like: np.float32(value)
    return lambda value, like: value


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to start loading the cache line of array[index] into L2 (a hint: it never
    faults and never waits)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]),
            "llvm.prefetch.p0")
        builder.call(prefetch, [address, i32(0), i32(2), i32(1)])    # read, into L2, data
        return context.get_dummy_value()
    return types.void(array, types.intp), codegen


def _bits(a):
    return a.view(np.uint16) if a.dtype == np.float16 else a


# ----------------------------------------------------------------------------------------------
# per-channel coefficients of the elementwise passes, in the arithmetic type of the data

def _normalize_coefficients(mean, scale, shift, like):
    """(m, s, b) with y = (x - m) * s + b: m is the mean rounded to the arithmetic type and the
    rounding is folded into b, so x - m is exact where x and the mean cancel."""
    m = _compute_value(mean, like)
    rest = mean - np.float64(m)
    return m, _compute_value(scale, like), _compute_value(shift - rest * scale, like)


def _backward_coefficients(count, s_dy, s_dy_xc, s_xc, mean, invstd, weight, training):
    """(mu, a, mean_dy, b, dgamma) of dx = a * (dy - mean_dy - (x - mu) * b)."""
    mu = mean
    if training:
        # re-centre on the exact batch mean (the saved mean may be rounded to float32)
        shift = s_xc / count
        mu += shift
        s_dy_xc -= shift * s_dy
    a = weight * invstd
    if training:
        return mu, a, s_dy / count, invstd * invstd * s_dy_xc / count, s_dy_xc * invstd
    return mu, a, 0.0, 0.0, s_dy_xc * invstd


def _apply_coefficients(mu, a, mean_dy, b, like):
    """(m, a, g, b) with dx = a * ((dy - g) - (x - m) * b) in the arithmetic type."""
    m = _compute_value(mu, like)
    rest = mu - np.float64(m)
    return (m, _compute_value(a, like), _compute_value(mean_dy - rest * b, like),
            _compute_value(b, like))


_normalize_coefficients_jit = _helper(_normalize_coefficients)
_backward_coefficients_jit = _helper(_backward_coefficients)
_apply_coefficients_jit = _helper(_apply_coefficients)


# ----------------------------------------------------------------------------------------------
# 1-D runs (0-based loops over slices: LLVM vectorizes them)

def _run_sum(run):
    total = 0.0
    for k in range(run.shape[0]):
        total += _widen(run[k])
    return total


def _run_shifted_sums(run, shift):
    s1 = 0.0
    s2 = 0.0
    for k in range(run.shape[0]):
        d = _widen(run[k]) - shift
        s1 += d
        s2 += d * d
    return s1, s2


def _run_normalize(run, m, s, b, out):
    for k in range(run.shape[0]):
        out[k] = _narrow((_load(run[k]) - m) * s + b, out)


def _run_backward_sums(run_dy, run_x, mean):
    s_dy = 0.0
    s_dy_xc = 0.0
    s_xc = 0.0
    for k in range(run_x.shape[0]):
        g = _widen(run_dy[k])
        xc = _widen(run_x[k]) - mean
        s_dy += g
        s_dy_xc += g * xc
        s_xc += xc
    return s_dy, s_dy_xc, s_xc


def _run_backward_apply(run_dy, run_x, m, a, g, b, out):
    for k in range(run_x.shape[0]):
        out[k] = _narrow(a * ((_load(run_dy[k]) - g) - (_load(run_x[k]) - m) * b), out)


_run_sum_jit = _helper(_run_sum)
_run_shifted_sums_jit = _helper(_run_shifted_sums)
_run_normalize_jit = _helper(_run_normalize)
_run_backward_sums_jit = _helper(_run_backward_sums)
_run_backward_apply_jit = _helper(_run_backward_apply)


# ----------------------------------------------------------------------------------------------
# channel runs (inner >= CPU_MIN_RUN): a channel's values lo..hi, flat index o * inner + i
#
# A channel is `outer` runs far apart in memory; at the start of each run the hardware
# prefetcher has to find the stream again. So the reading passes process a run in pieces of
# CPU_PIECE values and, before each piece, prefetch the same piece of the next run (or of the
# next channel's first run): the loads are one run ahead, as in a contiguous stream.

def _prefetch_next_run(x, c, o, i0, i1):
    outer, channels, inner = x.shape
    if o + 1 < outer:
        ahead = x[o + 1, c]
    elif np.int64(c) + 1 < channels:
        ahead = x[0, np.int64(c) + 1]
    else:
        return
    step = max(1, 64 // x.itemsize)
    for k in range(i0, min(i1, inner), step):
        _prefetch(ahead, k)


_prefetch_next_run_jit = _helper(_prefetch_next_run)

def _channel_range_moments(x, c, lo, hi, block, piece):
    """(count, mean, M2) of channel c's values lo..hi.

    Shifted sums over blocks of about ``block`` values: the shift is the mean so far (for the
    first block, the mean of its first run), and each block is folded in with
    mean += S1/n, M2 += S2 - S1^2/n (Chan's merge with K = the current mean)."""
    inner = x.shape[2]
    o = lo // inner
    i = lo - o * inner
    count = 0.0
    mean = 0.0
    m2 = 0.0
    s1 = 0.0
    s2 = 0.0
    pending = 0
    pos = lo
    while pos < hi:
        take = min(inner - i, hi - pos, block - pending, piece)
        _prefetch_next_run_jit(x, c, o, i, i + take)
        run = x[o, c, i:i + take]
        if count == 0.0 and pending == 0:
            mean = _run_sum_jit(run) / take
        a, b = _run_shifted_sums_jit(run, mean)
        s1 += a
        s2 += b
        pending += take
        pos += take
        i += take
        if i == inner:
            i = 0
            o += 1
        if pending >= block or pos >= hi:
            count += pending
            mean += s1 / count
            m2 += s2 - s1 * s1 / count
            s1 = 0.0
            s2 = 0.0
            pending = 0
    return count, mean, m2


def _channel_range_normalize(x, c, lo, hi, m, s, b, y):
    inner = x.shape[2]
    o = lo // inner
    i = lo - o * inner
    pos = lo
    while pos < hi:
        take = min(inner - i, hi - pos)
        _run_normalize_jit(x[o, c, i:i + take], m, s, b, y[o, c, i:i + take])
        pos += take
        i = 0
        o += 1


def _channel_range_backward_sums(dy, x, c, lo, hi, mean, piece):
    inner = x.shape[2]
    o = lo // inner
    i = lo - o * inner
    s_dy = 0.0
    s_dy_xc = 0.0
    s_xc = 0.0
    pos = lo
    while pos < hi:
        take = min(inner - i, hi - pos, piece)
        _prefetch_next_run_jit(dy, c, o, i, i + take)
        _prefetch_next_run_jit(x, c, o, i, i + take)
        a, b, d = _run_backward_sums_jit(dy[o, c, i:i + take], x[o, c, i:i + take], mean)
        s_dy += a
        s_dy_xc += b
        s_xc += d
        pos += take
        i += take
        if i == inner:
            i = 0
            o += 1
    return s_dy, s_dy_xc, s_xc


def _channel_range_backward_apply(dy, x, c, lo, hi, m, a, g, b, dx):
    inner = x.shape[2]
    o = lo // inner
    i = lo - o * inner
    pos = lo
    while pos < hi:
        take = min(inner - i, hi - pos)
        _run_backward_apply_jit(dy[o, c, i:i + take], x[o, c, i:i + take], m, a, g, b,
                                dx[o, c, i:i + take])
        pos += take
        i = 0
        o += 1


_channel_range_moments_jit = _helper(_channel_range_moments)
_channel_range_normalize_jit = _helper(_channel_range_normalize)
_channel_range_backward_sums_jit = _helper(_channel_range_backward_sums)
_channel_range_backward_apply_jit = _helper(_channel_range_backward_apply)


def _moments_channel_major_impl(x, segments, block, piece, mean, m2):
    """Per channel (mean, M2); each channel in ``segments`` equal pieces merged in order."""
    channels = x.shape[1]
    length = x.shape[0] * x.shape[2]
    part = np.empty((3, channels * segments))
    for task in prange(channels * segments):
        c = task // segments
        s = task - c * segments
        count, mu, m = _channel_range_moments_jit(x, c, s * length // segments,
                                                  (s + 1) * length // segments, block, piece)
        part[0, task] = count
        part[1, task] = mu
        part[2, task] = m
    for c in range(channels):
        first = c * segments
        n_a, mean_a, m2_a = part[0, first], part[1, first], part[2, first]
        for task in range(first + 1, first + segments):
            n_b = part[0, task]
            delta = part[1, task] - mean_a
            n_ab = n_a + n_b
            mean_a += delta * (n_b / n_ab)
            m2_a += part[2, task] + delta * delta * (n_a * n_b / n_ab)
            n_a = n_ab
        mean[c] = mean_a
        m2[c] = m2_a


def _forward_train_channel_major_impl(x, weight, bias, eps, block, piece, y, mean, var):
    """Statistics and normalization fused per channel: the second pass reads from cache."""
    channels = x.shape[1]
    length = x.shape[0] * x.shape[2]
    for c in prange(channels):
        count, mu, m2 = _channel_range_moments_jit(x, c, 0, length, block, piece)
        v = m2 / count
        mean[c] = mu
        var[c] = v
        m, s, b = _normalize_coefficients_jit(mu, weight[c] / np.sqrt(v + eps), bias[c], x)
        _channel_range_normalize_jit(x, c, 0, length, m, s, b, y)


def _normalize_channel_major_impl(x, mean, scale, shift, run, y):
    """y = (x - mean) * scale + shift in tasks of about ``run`` consecutive values of x."""
    outer, channels, inner = x.shape
    total = outer * channels * inner
    tasks = (total + run - 1) // run
    for task in prange(tasks):
        lo = task * total // tasks
        hi = (task + 1) * total // tasks
        oc = lo // inner
        i = lo - oc * inner
        o = oc // channels
        c = oc - o * channels
        pos = lo
        while pos < hi:
            take = min(inner - i, hi - pos)
            m, s, b = _normalize_coefficients_jit(mean[c], scale[c], shift[c], x)
            _run_normalize_jit(x[o, c, i:i + take], m, s, b, y[o, c, i:i + take])
            pos += take
            i = 0
            c += 1
            if c == channels:
                c = 0
                o += 1


def _backward_channel_major_impl(dy, x, mean, invstd, weight, training, segments, piece, dx,
                                 sum_dy, sum_dy_xhat):
    """Per channel: sums, then dx. With one segment per channel the second pass reads the
    channel from cache; with more, all sums are merged (in order) before any dx is written."""
    channels = x.shape[1]
    length = x.shape[0] * x.shape[2]
    count = float(length)
    if segments == 1:
        for c in prange(channels):
            s_dy, s_dy_xc, s_xc = _channel_range_backward_sums_jit(dy, x, c, 0, length, mean[c],
                                                                   piece)
            mu, a, mean_dy, b, dgamma = _backward_coefficients_jit(
                count, s_dy, s_dy_xc, s_xc, mean[c], invstd[c], weight[c], training)
            sum_dy[c] = s_dy
            sum_dy_xhat[c] = dgamma
            m, a_, g, b_ = _apply_coefficients_jit(mu, a, mean_dy, b, x)
            _channel_range_backward_apply_jit(dy, x, c, 0, length, m, a_, g, b_, dx)
        return
    part = np.empty((3, channels * segments))
    for task in prange(channels * segments):
        c = task // segments
        s = task - c * segments
        part[0, task], part[1, task], part[2, task] = _channel_range_backward_sums_jit(
            dy, x, c, s * length // segments, (s + 1) * length // segments, mean[c], piece)
    coefficients = np.empty((4, channels))
    for c in range(channels):
        s_dy = 0.0
        s_dy_xc = 0.0
        s_xc = 0.0
        for task in range(c * segments, (c + 1) * segments):
            s_dy += part[0, task]
            s_dy_xc += part[1, task]
            s_xc += part[2, task]
        mu, a, mean_dy, b, dgamma = _backward_coefficients_jit(
            count, s_dy, s_dy_xc, s_xc, mean[c], invstd[c], weight[c], training)
        sum_dy[c] = s_dy
        sum_dy_xhat[c] = dgamma
        coefficients[0, c] = mu
        coefficients[1, c] = a
        coefficients[2, c] = mean_dy
        coefficients[3, c] = b
    for task in prange(channels * segments):
        c = task // segments
        s = task - c * segments
        m, a_, g, b_ = _apply_coefficients_jit(coefficients[0, c], coefficients[1, c],
                                               coefficients[2, c], coefficients[3, c], x)
        _channel_range_backward_apply_jit(dy, x, c, s * length // segments,
                                          (s + 1) * length // segments, m, a_, g, b_, dx)


# ----------------------------------------------------------------------------------------------
# matrices: x is (rows, width) with width = groups * C * inner: a matrix row holds ``groups``
# rows of the canonical view, and channel c owns ``inner`` consecutive columns in each group.
# A task's per-column arrays cover channels c0..c1 in column order (group, channel, i).

def _fold(columns, c0, c1, inner, groups, out):
    """out[c] += the sum of channel c's columns, for c in c0..c1."""
    span = c1 - c0
    if inner == 1:
        for group in range(groups):
            part = columns[group * span:(group + 1) * span]
            dst = out[c0:c1]
            for c in range(span):
                dst[c] += part[c]
    else:
        for group in range(groups):
            for c in range(span):
                run = columns[(group * span + c) * inner:(group * span + c + 1) * inner]
                total = 0.0
                for i in range(inner):
                    total += run[i]
                out[c0 + c] += total


def _spread(values, c0, c1, inner, groups, columns):
    """columns[j] = values[c] for every column j of channel c, for c in c0..c1."""
    span = c1 - c0
    if inner == 1:
        for group in range(groups):
            part = columns[group * span:(group + 1) * span]
            src = values[c0:c1]
            for c in range(span):
                part[c] = src[c]
    else:
        for group in range(groups):
            for c in range(span):
                value = values[c0 + c]
                run = columns[(group * span + c) * inner:(group * span + c + 1) * inner]
                for i in range(inner):
                    run[i] = value


_fold_jit = _helper(_fold)
_spread_jit = _helper(_spread)


def _shifts(x, shift_rows, j0, c0, c1, inner, groups):
    """The shift K of channels c0..c1: their mean over the first shift_rows rows; returned per
    channel (an array of length c1) and per column."""
    width = (c1 - c0) * inner * groups
    acc = np.zeros(width)
    for r in range(shift_rows):
        xr = x[r, j0:j0 + width]
        for j in range(width):
            acc[j] += _widen(xr[j])
    k = np.zeros(c1)
    _fold_jit(acc, c0, c1, inner, groups, k)
    count = float(shift_rows) * inner * groups
    for c in range(c0, c1):
        k[c] /= count
    columns = np.empty(width)
    _spread_jit(k, c0, c1, inner, groups, columns)
    return k, columns


def _finish_moments(s1, s2, k, c0, c1, inner, groups, count, mean, m2):
    """mean = K + S1/n, M2 = S2 - S1^2/n from per-column shifted sums."""
    t1 = np.zeros(c1)
    t2 = np.zeros(c1)
    _fold_jit(s1, c0, c1, inner, groups, t1)
    _fold_jit(s2, c0, c1, inner, groups, t2)
    for c in range(c0, c1):
        mean[c] = k[c] + t1[c] / count
        m2[c] = t2[c] - t1[c] * t1[c] / count


def _prefetch_rows(x, r, count, j0, j1):
    """Prefetch columns j0..j1 of rows r..r+count (those that exist)."""
    step = max(1, 64 // x.itemsize)
    for q in range(r, min(r + count, x.shape[0])):
        row = x[q]
        for k in range(j0, j1, step):
            _prefetch(row, k)


_prefetch_rows_jit = _helper(_prefetch_rows)


def _rows_shifted_sums(x, r0, r1, j0, shift, s1, s2, piece):
    """s1[j] += sum(x[r, j0 + j] - shift[j]), s2[j] += sum((x[r, j0 + j] - shift[j])^2) over
    rows r0..r1; four rows at a time, so the accumulators are loaded and stored once per four
    rows. With piece > 0 the columns go in pieces, each after a prefetch of the same piece of
    the next four rows (for rows far apart in memory: column blocks)."""
    width = shift.shape[0]
    j1 = j0 + width
    n = r1 - r0
    n4 = n - n % 4
    step = piece if piece > 0 else width
    for r in range(0, n4, 4):
        for p0 in range(0, width, step):
            p1 = min(p0 + step, width)
            if piece > 0:
                _prefetch_rows_jit(x, r0 + r + 4, 4, j0 + p0, j0 + p1)
            x0 = x[r0 + r, j0 + p0:j0 + p1]
            x1 = x[r0 + r + 1, j0 + p0:j0 + p1]
            x2 = x[r0 + r + 2, j0 + p0:j0 + p1]
            x3 = x[r0 + r + 3, j0 + p0:j0 + p1]
            k = shift[p0:p1]
            a1 = s1[p0:p1]
            a2 = s2[p0:p1]
            for j in range(p1 - p0):
                d0 = _widen(x0[j]) - k[j]
                d1 = _widen(x1[j]) - k[j]
                d2 = _widen(x2[j]) - k[j]
                d3 = _widen(x3[j]) - k[j]
                a1[j] += (d0 + d1) + (d2 + d3)
                a2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for r in range(n4, n):
        xr = x[r0 + r, j0:j1]
        for j in range(width):
            d = _widen(xr[j]) - shift[j]
            s1[j] += d
            s2[j] += d * d


def _rows_normalize(x, r0, r1, j0, m, s, b, short, y):
    width = m.shape[0]
    for r in range(r1 - r0):
        xr = x[r0 + r, j0:j0 + width]
        yr = y[r0 + r, j0:j0 + width]
        if short:
            for j in range(width):
                yr[j] = _narrow(_load(xr[j]) * s[j] + b[j], yr)
        else:
            for j in range(width):
                yr[j] = _narrow((_load(xr[j]) - m[j]) * s[j] + b[j], yr)


def _rows_backward_sums(dy, x, r0, r1, j0, mean, s_dy, s_dy_xc, s_xc, piece):
    """Per column sums of dy, dy * (x - mean), x - mean over rows r0..r1; two rows at a time
    (pieces and prefetch as in _rows_shifted_sums)."""
    width = mean.shape[0]
    j1 = j0 + width
    n = r1 - r0
    n2 = n - n % 2
    step = piece if piece > 0 else width
    for r in range(0, n2, 2):
        for p0 in range(0, width, step):
            p1 = min(p0 + step, width)
            if piece > 0:
                _prefetch_rows_jit(dy, r0 + r + 2, 2, j0 + p0, j0 + p1)
                _prefetch_rows_jit(x, r0 + r + 2, 2, j0 + p0, j0 + p1)
            g0 = dy[r0 + r, j0 + p0:j0 + p1]
            g1 = dy[r0 + r + 1, j0 + p0:j0 + p1]
            x0 = x[r0 + r, j0 + p0:j0 + p1]
            x1 = x[r0 + r + 1, j0 + p0:j0 + p1]
            mu = mean[p0:p1]
            t_dy = s_dy[p0:p1]
            t_dy_xc = s_dy_xc[p0:p1]
            t_xc = s_xc[p0:p1]
            for j in range(p1 - p0):
                a0 = _widen(g0[j])
                a1 = _widen(g1[j])
                c0 = _widen(x0[j]) - mu[j]
                c1 = _widen(x1[j]) - mu[j]
                t_dy[j] += a0 + a1
                t_dy_xc[j] += a0 * c0 + a1 * c1
                t_xc[j] += c0 + c1
    for r in range(n2, n):
        gr = dy[r0 + r, j0:j1]
        xr = x[r0 + r, j0:j1]
        for j in range(width):
            a0 = _widen(gr[j])
            c0 = _widen(xr[j]) - mean[j]
            s_dy[j] += a0
            s_dy_xc[j] += a0 * c0
            s_xc[j] += c0


def _rows_backward_apply(dy, x, r0, r1, j0, m, a, g, b, dx):
    width = m.shape[0]
    for r in range(r1 - r0):
        gr = dy[r0 + r, j0:j0 + width]
        xr = x[r0 + r, j0:j0 + width]
        out = dx[r0 + r, j0:j0 + width]
        for j in range(width):
            out[j] = _narrow(a[j] * ((_load(gr[j]) - g[j]) - (_load(xr[j]) - m[j]) * b[j]), out)


# (a compile-time constant: Numba freezes globals into the compiled code)
_SHORT_FORM = 16.0


def _normalize_columns(mean, invstd, weight, bias, c0, c1, inner, groups, like):
    """Per-column coefficients of channels c0..c1 and whether the short form applies.

    Long form: y = (x - m) * s + b, m the mean in the arithmetic type (see
    _normalize_coefficients). Short form, when every channel's mean is within _SHORT_FORM
    standard deviations (1/invstd) of 0: y = x * s + b with b = shift - mean * s, one load per
    element less; the cancellation it risks costs at most about that many ulps."""
    m = _compute_empty(c1, like)
    s = _compute_empty(c1, like)
    b = _compute_empty(c1, like)
    short = True
    for c in range(c0, c1):
        scale = weight[c] * invstd[c]
        if not abs(mean[c]) * invstd[c] <= _SHORT_FORM:
            short = False
        m[c], s[c], b[c] = _normalize_coefficients_jit(mean[c], scale, bias[c], like)
    if short:
        for c in range(c0, c1):
            scale = weight[c] * invstd[c]
            m[c] = 0.0
            b[c] = _compute_value(bias[c] - mean[c] * scale, like)
    width = (c1 - c0) * inner * groups
    col_m = _compute_empty(width, like)
    col_s = _compute_empty(width, like)
    col_b = _compute_empty(width, like)
    _spread_jit(m, c0, c1, inner, groups, col_m)
    _spread_jit(s, c0, c1, inner, groups, col_s)
    _spread_jit(b, c0, c1, inner, groups, col_b)
    return col_m, col_s, col_b, short


def _apply_columns(count, totals, mean, invstd, weight, training, c0, c1, inner, groups, like,
                   sum_dy, sum_dy_xhat):
    """Per-column (m, a, g, b) of dx = a * ((dy - g) - (x - m) * b) for channels c0..c1, from
    their sums (totals[0..2, c]); writes dbeta and dgamma."""
    m = _compute_empty(c1, like)
    a = _compute_empty(c1, like)
    g = _compute_empty(c1, like)
    b = _compute_empty(c1, like)
    for c in range(c0, c1):
        mu, a64, mean_dy, b64, dgamma = _backward_coefficients_jit(
            count, totals[0, c], totals[1, c], totals[2, c], mean[c], invstd[c], weight[c],
            training)
        sum_dy[c] = totals[0, c]
        sum_dy_xhat[c] = dgamma
        m[c], a[c], g[c], b[c] = _apply_coefficients_jit(mu, a64, mean_dy, b64, like)
    width = (c1 - c0) * inner * groups
    col_m = _compute_empty(width, like)
    col_a = _compute_empty(width, like)
    col_g = _compute_empty(width, like)
    col_b = _compute_empty(width, like)
    _spread_jit(m, c0, c1, inner, groups, col_m)
    _spread_jit(a, c0, c1, inner, groups, col_a)
    _spread_jit(g, c0, c1, inner, groups, col_g)
    _spread_jit(b, c0, c1, inner, groups, col_b)
    return col_m, col_a, col_g, col_b


_shifts_jit = _helper(_shifts)
_finish_moments_jit = _helper(_finish_moments)
_rows_shifted_sums_jit = _helper(_rows_shifted_sums)
_rows_normalize_jit = _helper(_rows_normalize)
_rows_backward_sums_jit = _helper(_rows_backward_sums)
_rows_backward_apply_jit = _helper(_rows_backward_apply)
_normalize_columns_jit = _helper(_normalize_columns)
_apply_columns_jit = _helper(_apply_columns)


# row blocks: per-column partial sums of every block (in parallel), added in block order; then
# every block is normalized

def _matrix_moments(x, inner, channels, groups, blocks, shift_rows, mean, m2):
    rows, width = x.shape
    k, shift = _shifts_jit(x, shift_rows, 0, 0, channels, inner, groups)
    s1 = np.empty((blocks, width))
    s2 = np.empty((blocks, width))
    for task in prange(blocks):
        s1[task, :] = 0.0               # zeroed by the task that uses them
        s2[task, :] = 0.0
        _rows_shifted_sums_jit(x, task * rows // blocks, (task + 1) * rows // blocks, 0, shift,
                               s1[task], s2[task], 0)
    for task in range(1, blocks):
        for j in range(width):
            s1[0, j] += s1[task, j]
            s2[0, j] += s2[task, j]
    _finish_moments_jit(s1[0], s2[0], k, 0, channels, inner, groups,
                        float(rows) * inner * groups, mean, m2)


_matrix_moments_jit = _helper(_matrix_moments)


def _moments_matrix_impl(x, inner, channels, groups, blocks, shift_rows, mean, m2):
    _matrix_moments_jit(x, inner, channels, groups, blocks, shift_rows, mean, m2)


def _forward_train_matrix_impl(x, inner, channels, groups, weight, bias, eps, blocks, shift_rows,
                               y, mean, var):
    rows = x.shape[0]
    m2 = np.empty(channels)
    _matrix_moments_jit(x, inner, channels, groups, blocks, shift_rows, mean, m2)
    count = float(rows) * inner * groups
    invstd = np.empty(channels)
    for c in range(channels):
        var[c] = m2[c] / count
        invstd[c] = 1.0 / np.sqrt(var[c] + eps)
    col_m, col_s, col_b, short = _normalize_columns_jit(mean, invstd, weight, bias, 0, channels,
                                                        inner, groups, x)
    for task in prange(blocks):
        _rows_normalize_jit(x, task * rows // blocks, (task + 1) * rows // blocks, 0, col_m,
                            col_s, col_b, short, y)


def _normalize_matrix_impl(x, inner, channels, groups, blocks, mean, invstd, weight, bias, y):
    rows = x.shape[0]
    col_m, col_s, col_b, short = _normalize_columns_jit(mean, invstd, weight, bias, 0, channels,
                                                        inner, groups, x)
    for task in prange(blocks):
        _rows_normalize_jit(x, task * rows // blocks, (task + 1) * rows // blocks, 0, col_m,
                            col_s, col_b, short, y)


def _backward_matrix_impl(dy, x, inner, channels, groups, mean, invstd, weight, training, blocks,
                          dx, sum_dy, sum_dy_xhat):
    rows, width = x.shape
    col_mean = np.empty(width)
    _spread_jit(mean, 0, channels, inner, groups, col_mean)
    part = np.empty((blocks, 3, width))
    for task in prange(blocks):
        part[task] = 0.0
        _rows_backward_sums_jit(dy, x, task * rows // blocks, (task + 1) * rows // blocks, 0,
                                col_mean, part[task, 0], part[task, 1], part[task, 2], 0)
    totals = np.zeros((3, channels))
    for task in range(blocks):
        for k in range(3):
            _fold_jit(part[task, k], 0, channels, inner, groups, totals[k])
    col_m, col_a, col_g, col_b = _apply_columns_jit(
        float(rows) * inner * groups, totals, mean, invstd, weight, training, 0, channels, inner,
        groups, x, sum_dy, sum_dy_xhat)
    for task in prange(blocks):
        _rows_backward_apply_jit(dy, x, task * rows // blocks, (task + 1) * rows // blocks, 0,
                                 col_m, col_a, col_g, col_b, dx)


# column blocks (groups == 1): a task owns channels c0..c1 over all rows, so its second pass
# reads them from cache

def _block_moments(x, c0, c1, inner, shift_rows, piece, mean, m2):
    rows = x.shape[0]
    j0 = c0 * inner
    k, shift = _shifts_jit(x, shift_rows, j0, c0, c1, inner, 1)
    s1 = np.zeros(shift.shape[0])
    s2 = np.zeros(shift.shape[0])
    _rows_shifted_sums_jit(x, 0, rows, j0, shift, s1, s2, piece)
    _finish_moments_jit(s1, s2, k, c0, c1, inner, 1, float(rows) * inner, mean, m2)


_block_moments_jit = _helper(_block_moments)


def _moments_blocks_impl(x, inner, channels, per_task, shift_rows, piece, mean, m2):
    tasks = (channels + per_task - 1) // per_task
    for task in prange(tasks):
        _block_moments_jit(x, task * per_task, min((task + 1) * per_task, channels), inner,
                           shift_rows, piece, mean, m2)


def _forward_train_blocks_impl(x, inner, channels, weight, bias, eps, per_task, shift_rows,
                               piece, y, mean, var):
    rows = x.shape[0]
    tasks = (channels + per_task - 1) // per_task
    for task in prange(tasks):
        c0 = task * per_task
        c1 = min(c0 + per_task, channels)
        m2 = np.empty(c1)
        _block_moments_jit(x, c0, c1, inner, shift_rows, piece, mean, m2)
        invstd = np.empty(c1)
        for c in range(c0, c1):
            var[c] = m2[c] / (float(rows) * inner)
            invstd[c] = 1.0 / np.sqrt(var[c] + eps)
        col_m, col_s, col_b, short = _normalize_columns_jit(mean, invstd, weight, bias, c0, c1,
                                                            inner, 1, x)
        _rows_normalize_jit(x, 0, rows, c0 * inner, col_m, col_s, col_b, short, y)


def _backward_blocks_impl(dy, x, inner, channels, mean, invstd, weight, training, per_task,
                          piece, dx, sum_dy, sum_dy_xhat):
    rows = x.shape[0]
    tasks = (channels + per_task - 1) // per_task
    for task in prange(tasks):
        c0 = task * per_task
        c1 = min(c0 + per_task, channels)
        width = (c1 - c0) * inner
        col_mean = np.empty(width)
        _spread_jit(mean, c0, c1, inner, 1, col_mean)
        sums = np.zeros((3, width))
        _rows_backward_sums_jit(dy, x, 0, rows, c0 * inner, col_mean, sums[0], sums[1], sums[2],
                                piece)
        totals = np.zeros((3, c1))
        for k in range(3):
            _fold_jit(sums[k], c0, c1, inner, 1, totals[k])
        col_m, col_a, col_g, col_b = _apply_columns_jit(
            float(rows) * inner, totals, mean, invstd, weight, training, c0, c1, inner, 1, x,
            sum_dy, sum_dy_xhat)
        _rows_backward_apply_jit(dy, x, 0, rows, c0 * inner, col_m, col_a, col_g, col_b, dx)


_moments_channel_major = _kernel(_moments_channel_major_impl)
_forward_train_channel_major = _kernel(_forward_train_channel_major_impl)
_normalize_channel_major = _kernel(_normalize_channel_major_impl)
_backward_channel_major = _kernel(_backward_channel_major_impl)
_moments_matrix = _kernel(_moments_matrix_impl)
_forward_train_matrix = _kernel(_forward_train_matrix_impl)
_normalize_matrix = _kernel(_normalize_matrix_impl)
_backward_matrix = _kernel(_backward_matrix_impl)
_moments_blocks = _kernel(_moments_blocks_impl)
_forward_train_blocks = _kernel(_forward_train_blocks_impl)
_backward_blocks = _kernel(_backward_blocks_impl)


# ----------------------------------------------------------------------------------------------
# how the work is split: by the shape and _config only, never by the thread count

def _segments(x3):
    """Pieces per channel for channel runs: 1 unless there are too few channels to keep
    CPU_MIN_TASKS tasks busy, and no piece shorter than CPU_CHUNK_ELEMENTS."""
    outer, channels, inner = x3.shape
    if channels == 0 or channels >= _config.CPU_MIN_TASKS:
        return 1
    wanted = -(-_config.CPU_MIN_TASKS // channels)
    return max(1, min(wanted, outer * inner // max(_config.CPU_CHUNK_ELEMENTS, 1)))


class _Matrix:
    """x3 (outer, C, inner) as a (rows, columns) matrix, and how it is split."""

    __slots__ = ("rows", "width", "inner", "channels", "group", "itemsize")

    def __init__(self, x3):
        outer, channels, inner = x3.shape
        self.inner = inner
        self.channels = channels
        self.itemsize = x3.itemsize
        self.group = 1
        if (inner == 1 and channels < _config.CPU_ROW_ELEMENTS
                and outer * channels >= _config.CPU_PARALLEL_MIN_SIZE and _rows_contiguous(x3)):
            # several rows per matrix row, so that the column loops are long (a loop's setup
            # costs about as much as 64 elements)
            want = -(-_config.CPU_ROW_ELEMENTS // channels)
            self.group = next(g for g in range(min(want, outer), 0, -1) if outer % g == 0)
        self.rows = outer // self.group
        self.width = channels * inner * self.group

    def view(self, a3):
        """The (rows, width) view of an x-shaped canonical array (any of x, dy, y, dx); never a
        copy (reshape raises instead)."""
        if self.inner == 1:
            a2 = a3[:, :, 0]
            return a2 if self.group == 1 else np.reshape(a2, (self.rows, self.width), copy=False)
        return np.reshape(a3, (self.rows, self.width), copy=False)

    def blocks_per_task(self, inputs):
        """Channels per column block when a block over all rows fits CPU_FUSED_BYTES (and is
        at least two cache lines wide); 0 when it does not (use row blocks)."""
        if self.inner == 1:
            return 0        # a block's rows would be too short to loop over efficiently
        channel_bytes = self.rows * self.inner * self.itemsize * inputs
        least = -(-128 // (self.inner * self.itemsize))
        if channel_bytes * least > _config.CPU_FUSED_BYTES:
            return 0
        fits = max(least, _config.CPU_FUSED_BYTES // max(channel_bytes, 1))
        # enough blocks to keep CPU_MIN_TASKS tasks, where the cache-line width allows it
        spread = max(least, -(-self.channels // _config.CPU_MIN_TASKS))
        return min(fits, spread, self.channels)

    def row_blocks(self):
        wanted = self.rows * self.width // max(_config.CPU_CHUNK_ELEMENTS, 1)
        memory_cap = max(1, (1 << 22) // max(self.width, 1))    # the partial sums stay small
        return max(1, min(self.rows, _config.CPU_MAX_TASKS, memory_cap, wanted))

    def shift_rows(self, per_task=0):
        """Rows whose mean is the shift of the shifted sums: about CPU_CHUNK_ELEMENTS values
        of a task's columns."""
        width = per_task * self.inner if per_task else self.width
        return max(1, min(self.rows, _config.CPU_CHUNK_ELEMENTS // max(width, 1)))


def _rows_contiguous(x3):
    return x3.strides[1] == x3.itemsize and x3.strides[0] == x3.shape[1] * x3.itemsize


def _mergeable(a3):
    return a3.shape[2] == 1 or a3.strides[1] == a3.shape[2] * a3.strides[2]


def _matrix_plan(x3, others, inputs):
    """(matrix, channels per column block or 0 for row blocks), or None for channel runs.
    Short channel runs (1 < inner < CPU_MIN_RUN) take the matrix path only as column blocks."""
    if x3.shape[2] >= _config.CPU_MIN_RUN or not all(_mergeable(a) for a in (x3,) + others):
        return None
    mat = _Matrix(x3)
    if mat.group > 1 and not all(_rows_contiguous(a) for a in others):
        mat.group = 1
        mat.rows, mat.width = x3.shape[0], x3.shape[1]
    per_task = mat.blocks_per_task(inputs)
    if per_task == 0 and mat.inner > 1:
        return None
    return mat, per_task


def _as_one_channel_run(x3):
    """A single channel with inner == 1 is one long run: (1, 1, outer)."""
    return as_strided(x3, (1, 1, x3.shape[0]), (0, 0, x3.strides[0]))


def _block():
    return max(1, _config.CPU_CHUNK_ELEMENTS)


# ----------------------------------------------------------------------------------------------
# operations (the same names in every backend)

def _ones(channels):
    return np.ones(channels)


def _zeros(channels):
    return np.zeros(channels)


def _small_rows(x3):
    """Small channels-last calls go straight to the serial matrix kernel, one row block (the
    planning costs more than their work)."""
    return x3.size < _config.CPU_PARALLEL_MIN_SIZE and x3.shape[2] == 1 and x3.shape[1] > 1


def _shift_rows_of(rows, width):
    return max(1, min(rows, _config.CPU_CHUNK_ELEMENTS // width))


def channel_moments(x3):
    channels = x3.shape[1]
    mean = np.empty(channels)
    m2 = np.empty(channels)
    if channels == 0 or x3.size == 0:
        mean.fill(np.nan)
        m2.fill(np.nan)
        return mean, m2
    if _small_rows(x3):
        _moments_matrix[0](_bits(x3)[:, :, 0], 1, channels, 1, 1,
                           _shift_rows_of(x3.shape[0], channels), mean, m2)
        return mean, m2
    if channels == 1 and x3.shape[2] == 1:
        x3 = _as_one_channel_run(x3)
    x = _bits(x3)
    plan = _matrix_plan(x3, (), 1)
    if plan is None:
        _launch(_moments_channel_major, x3.size, x, _segments(x3), _block(), _config.CPU_PIECE,
                mean, m2)
        return mean, m2
    mat, per_task = plan
    if per_task:
        _launch(_moments_blocks, x3.size, mat.view(x), mat.inner, channels, per_task,
                mat.shift_rows(per_task), _config.CPU_PIECE, mean, m2)
    else:
        _launch(_moments_matrix, x3.size, mat.view(x), mat.inner, channels, mat.group,
                mat.row_blocks(), mat.shift_rows(), mean, m2)
    return mean, m2


def forward_train(x3, weight, bias, eps, y3):
    channels = x3.shape[1]
    weight = _ones(channels) if weight is None else weight
    bias = _zeros(channels) if bias is None else bias
    mean = np.empty(channels)
    var = np.empty(channels)
    if x3.size == 0:
        return mean, var
    if _small_rows(x3):
        _forward_train_matrix[0](_bits(x3)[:, :, 0], 1, channels, 1, weight, bias, float(eps), 1,
                                 _shift_rows_of(x3.shape[0], channels), _bits(y3)[:, :, 0], mean,
                                 var)
        return mean, var
    if channels == 1 and x3.shape[2] == 1:
        x3, y3 = _as_one_channel_run(x3), _as_one_channel_run(y3)
    x = _bits(x3)
    y = _bits(y3)
    plan = _matrix_plan(x3, (y3,), 1)
    if plan is not None:
        mat, per_task = plan
        if per_task:
            _launch(_forward_train_blocks, x3.size, mat.view(x), mat.inner, channels, weight,
                    bias, float(eps), per_task, mat.shift_rows(per_task), _config.CPU_PIECE,
                    mat.view(y), mean, var)
        else:
            _launch(_forward_train_matrix, x3.size, mat.view(x), mat.inner, channels, mat.group,
                    weight, bias, float(eps), mat.row_blocks(), mat.shift_rows(), mat.view(y),
                    mean, var)
        return mean, var
    if x3.shape[2] > 1 and _segments(x3) == 1:
        _launch(_forward_train_channel_major, x3.size, x, weight, bias, float(eps), _block(),
                _config.CPU_PIECE, y, mean, var)
        return mean, var
    # few channels (or an unusual memory layout): all statistics, then the normalization
    mean, m2 = channel_moments(x3)
    var = m2 / (x3.shape[0] * x3.shape[2])
    forward_eval(x3, mean, 1.0 / np.sqrt(var + eps), weight, bias, y3)
    return mean, var


def forward_eval(x3, mean, invstd, weight, bias, y3):
    channels = x3.shape[1]
    weight = _ones(channels) if weight is None else weight
    shift = _zeros(channels) if bias is None else bias
    if x3.size == 0:
        return
    if _small_rows(x3):
        _normalize_matrix[0](_bits(x3)[:, :, 0], 1, channels, 1, 1, mean, invstd, weight,
                             shift, _bits(y3)[:, :, 0])
        return
    if channels == 1 and x3.shape[2] == 1:
        x3, y3 = _as_one_channel_run(x3), _as_one_channel_run(y3)
    x = _bits(x3)
    y = _bits(y3)
    if x3.shape[2] == 1:
        mat, _ = _matrix_plan(x3, (y3,), 1)
        _launch(_normalize_matrix, x3.size, mat.view(x), 1, channels, mat.group,
                mat.row_blocks(), mean, invstd, weight, shift, mat.view(y))
        return
    _launch(_normalize_channel_major, x3.size, x, mean, weight * invstd, shift, _block(), y)


def backward(dy3, x3, mean, invstd, weight, training, dx3):
    channels = x3.shape[1]
    weight = _ones(channels) if weight is None else weight
    sum_dy = np.zeros(channels)
    sum_dy_xhat = np.zeros(channels)
    if x3.size == 0:
        return sum_dy, sum_dy_xhat
    if _small_rows(x3):
        _backward_matrix[0](_bits(dy3)[:, :, 0], _bits(x3)[:, :, 0], 1, channels, 1, mean,
                            invstd, weight, bool(training), 1, _bits(dx3)[:, :, 0], sum_dy,
                            sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    if channels == 1 and x3.shape[2] == 1:
        dy3, x3, dx3 = (_as_one_channel_run(dy3), _as_one_channel_run(x3),
                        _as_one_channel_run(dx3))
    dy = _bits(dy3)
    x = _bits(x3)
    dx = _bits(dx3)
    plan = _matrix_plan(x3, (dy3, dx3), 2)
    if plan is not None:
        mat, per_task = plan
        if per_task:
            _launch(_backward_blocks, x3.size, mat.view(dy), mat.view(x), mat.inner, channels,
                    mean, invstd, weight, bool(training), per_task, _config.CPU_PIECE,
                    mat.view(dx), sum_dy, sum_dy_xhat)
        else:
            _launch(_backward_matrix, x3.size, mat.view(dy), mat.view(x), mat.inner, channels,
                    mat.group, mean, invstd, weight, bool(training), mat.row_blocks(),
                    mat.view(dx), sum_dy, sum_dy_xhat)
        return sum_dy, sum_dy_xhat
    _launch(_backward_channel_major, x3.size, dy, x, mean, invstd, weight, bool(training),
            _segments(x3), _config.CPU_PIECE, dx, sum_dy, sum_dy_xhat)
    return sum_dy, sum_dy_xhat


# ----------------------------------------------------------------------------------------------
# host helpers with less per-call overhead than the shared NumPy versions in _host.py (they
# dominate the time of small calls such as a (60, 100) batch)

_NOTHING_SKIPPED = np.empty(0, np.intp)
_NOTHING_SKIPPED.flags.writeable = False


def asarray(a, name):
    return a if type(a) is np.ndarray else _host.asarray(a, name)


def view3(a, shape3, strides3):
    if a.flags.c_contiguous:
        # a C-contiguous array's canonical view is its C-order reshape (no copy)
        view = a.reshape(shape3)
        if all(s == t or n <= 1 for s, t, n in zip(view.strides, strides3, shape3)):
            return view
    return _host.view3(a, shape3, strides3)


def _update_running_stats_impl(running_mean, running_var, mean, var, count, momentum):
    unbiased = count / (count - 1.0)
    skipped = 0
    for c in range(mean.shape[0]):
        if np.isfinite(mean[c]) and np.isfinite(var[c]):
            running_mean[c] = (1.0 - momentum) * running_mean[c] + momentum * mean[c]
            running_var[c] = (1.0 - momentum) * running_var[c] + momentum * (var[c] * unbiased)
        else:
            skipped += 1
    return skipped


def _invstd_from_var_impl(var, eps):
    out = np.empty(var.shape[0])
    for c in range(var.shape[0]):
        out[c] = 1.0 / np.sqrt(var[c] + eps)
    return out


# exactly NumPy's arithmetic (no fastmath), so that they agree with the _host.py versions
_exact = njit(**dict(_config.JIT_OPTIONS, fastmath=False))
_update_running_stats = _exact(_update_running_stats_impl)
_invstd_from_var = _exact(_invstd_from_var_impl)


def update_running_stats(running_mean, running_var, mean, var, count, momentum, eps):
    """As _host.update_running_stats, in one compiled loop for float32/float64 vectors."""
    if (type(running_mean) is not np.ndarray or type(running_var) is not np.ndarray
            or running_mean.dtype == np.float16 or running_var.dtype == np.float16):
        return _host.update_running_stats(running_mean, running_var, mean, var, count,
                                          momentum, eps)
    if _update_running_stats(running_mean, running_var, mean, var, float(count),
                             float(momentum)) == 0:
        return _NOTHING_SKIPPED
    return np.flatnonzero(~(np.isfinite(mean) & np.isfinite(var)))


def invstd_from_var(var, eps):
    return _invstd_from_var(var, float(eps))
