"""Numba CPU kernels on the canonical ``(outer, C, inner)`` view.

Batch norm is memory-bound: the floor is one read of x and one write of y (a copy). The kernels
are organized so that everything beyond that floor comes from cache. A plan (``_plan``) picks
one of three ways to split a call, from the shape, the strides and ``_config`` only:

* ``runs`` (channel-major, ``inner >= CPU_MIN_RUN``, e.g. NCHW): a channel is ``outer``
  contiguous runs of ``inner`` values. A task owns a whole channel: it streams the channel once
  from memory for the statistics and normalizes it (or applies the gradient) from L2 straight
  after. With fewer channels than ``CPU_MIN_TASKS``, each channel is cut into fixed segments
  instead (``CPU_TASKS`` tasks in all), whose sums are merged in order before anything is
  written.
* ``blocks`` (short runs, e.g. NCHW 7x7): x is viewed as a (rows, C * inner) matrix; a task
  owns a block of whole channels over all rows (it fits ``CPU_FUSED_BYTES``): statistics, then
  normalization (or gradient) from cache.
* ``rows`` (channels-last, ``inner == 1``: NHWC, (N, C)): the matrix is split into row blocks
  that accumulate per-column partial sums, added in block order; then every row block is
  normalized. A few channels (C < CPU_ROW_ELEMENTS) are viewed several rows to a matrix row,
  so that the column loops stay long enough to vectorize. The elementwise operations over
  short runs take row blocks too: runs of at least CPU_MIN_SCALAR_RUN values one run at a
  time with per-channel coefficients, shorter ones with per-column coefficient vectors.

``_KERNELS`` maps (operation, plan) to the function that runs it; every operation of the
contract is one host prologue (per-channel vectors in one dtype, the plan) and one table lookup.

Compile time. Numba compiles a kernel once per argument type, and one fused kernel costs
seconds to compile, so the prologue hands kernels few types: the per-channel vectors of a call
as they are when they are contiguous, writeable and all of one dtype, else all as float64
copies (``_vectors``); x-shaped arrays C-contiguous (``_fits``; other layouts go through a
copy). The per-channel steps between passes (``_serial``) are compiled once per signature and
shared by the kernels that call them; only the per-element helpers are inlined.

Statistics are shifted sums in float64, ``S1 = sum(x - K)``, ``S2 = sum((x - K)^2)``, with K a
mean of data of the same channel seen first (a run, or the first rows), so the ``S2 - S1^2/n``
cancellation costs a few float64 ulps (docs/perf_log.md has the error bound). The elementwise
passes run in float32 for float16/float32 data: the mean is split into a float32 part and a
remainder folded into the shift, so ``x - mean`` loses nothing where it cancels. float64 data
is computed in float64. float16 travels as its uint16 bits, converted in registers
(``vcvtph2ps``/``vcvtps2ph``): Numba's CPU target has no float16 type.

Bitwise determinism. Every split depends on the shape and ``_config`` only, never on the thread
count. Tasks run on a pool of Python threads, each calling the same compiled kernel (nogil) on a
range of tasks, so one compiled function serves serial and parallel calls, and the code that
runs after a compile is the code the cache stores: Numba's ``parallel=True`` compiles each
prange body twice (once on its own, which the compiling process runs, and once re-optimized
inside the caller's module, which the cache stores and a later process loads), and with
value-changing fast-math flags the two copies round differently (issue 13.1). For the same
reason only the reduction loops carry a fast-math flag (``reassoc``, which they need to
vectorize); the elementwise passes are strict IEEE, so their vector body, scalar remainder and
the alias-checked fallback LLVM keeps for in-place calls compute the same bits.

Kernel versions (measurements in docs/perf_log.md):
  v1  per channel two-pass + normalize; channels-last chunked two-pass + Chan merge; float16
      widened by copies; all arithmetic float64.
  v2  one-pass shifted sums; 0-based loops over 1-D slices (a ``range(lo, hi)`` index defeats
      vectorization); in-register float16; channels-last in one call with per-task partials;
      channels split into segments when C is small.
  v3  float32 elementwise passes for float16/float32; the matrix regime with fused column
      blocks, rows grouped for small C and short channel runs; piece loops without divisions;
      cheaper host helpers for small calls.
  v4  software prefetch one run ahead; short form y = x * s + b for matrices.
  v6  whole operations (the backend contract): fused activation and residual, running
      statistics, backward_reduce/backward_apply kernels; one compiled task kernel per
      (operation, plan) run on a thread pool instead of prange (bitwise the same compiled or
      cached, serial or parallel, in place or not); only reductions reassociate; splits sized
      for 64 cores; saturated scale for a constant channel with a tiny eps.
  v7  fewer compiled specializations (vector dtypes unified, contiguous x-shaped arrays,
      shared per-channel steps): about half the kernels to compile; a mix of vector dtypes
      gives the bits of the unmixed call.
  v8  elementwise passes over runs of CPU_MIN_SCALAR_RUN..CPU_MIN_RUN values go run by run
      with per-channel coefficients (per-column vectors outgrew the caches).
  v9  the direct path for the common call (forward_direct / backward_direct: the same passes,
      without the API's layers); the fused sigmoid's exp as vectorizable arithmetic.
"""
import concurrent.futures
import math
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic, overload
from numpy.lib.stride_tricks import as_strided

from .. import _config
from .. import _layout
from . import reference
from ._host import *  # noqa: F401,F403  (the shared host-array helpers)

name = "cpu"


def _jit(reduces):
    """njit with the config's options: kernels that reduce may reassociate their sums (to
    vectorize them); purely elementwise ones are strict IEEE."""
    fastmath = set(_config.CPU_REDUCTION_FASTMATH) if reduces else False
    return njit(**dict(_config.CPU_JIT_OPTIONS, fastmath=fastmath))


def _helper(fn):
    # inlined into the Numba IR of each caller (the hot loops): it takes the caller's flags, so
    # a reducing kernel's sums in it may reassociate (and vectorize)
    return njit(inline="always", **dict(_config.CPU_JIT_OPTIONS, fastmath=False))(fn)


def _serial(fn):
    # the per-channel steps (coefficients, merges, shifts: once per task, not per element):
    # compiled once per signature with strict IEEE arithmetic and shared by every kernel that
    # calls them (LLVM links them into the caller's code). Inlining them into each caller's
    # Numba IR instead costs seconds of compile time per kernel specialization.
    return njit(**dict(_config.CPU_JIT_OPTIONS, fastmath=False))(fn)


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


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 (int32 bits) or float64 (int64 bits) with these bits."""
    if bits == types.int32:
        result, llvm_type = types.float32, ir.FloatType()
    elif bits == types.int64:
        result, llvm_type = types.float64, ir.DoubleType()
    else:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvm_type)
    return result(bits), codegen


def _exp(t):
    """exp(t) in t's type (float32 or float64), in arithmetic that vectorizes (a scalar libm
    call per element does not: a fused sigmoid spent 80% of its time there)."""


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


def _compute_scale(value, like):
    """A float64 scale in like's arithmetic type, saturated at that type's largest finite value.

    A constant channel with a tiny eps (1e-80) has invstd = 1e40, finite in float64 but not in
    float32; (x - mean) is exactly 0 there, and 0 * FLT_MAX = 0 keeps y = beta (0 without beta),
    as in the float64 reference, where 0 * inf would give NaN. Elsewhere the saturation changes
    nothing: a float32 result of a scale beyond FLT_MAX overflows either way."""


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


_FLOAT32_MAX = float(np.finfo(np.float32).max)


@overload(_compute_scale, inline="always")
def _compute_scale_overload(value, like):
    if _is_half_or_single(like.dtype):
        def impl(value, like):
            if value > _FLOAT32_MAX:
                return np.float32(_FLOAT32_MAX)
            if value < -_FLOAT32_MAX:
                return np.float32(-_FLOAT32_MAX)
            return np.float32(value)
        return impl
    return lambda value, like: value


# ---- activation and residual: compile-time options ----
#
# The activation reaches a kernel as a type tag (None, or a scalar whose type names it), so each
# activation compiles its own loops and the plain operation pays nothing; residual3, y3 (for the
# activation's derivative) and dresidual3 are None or arrays, and None removes their code.

_RELU = np.int8(1)
_SIGMOID = np.int16(2)
_ACTIVATION_TAGS = {None: None, "relu": _RELU, "sigmoid": _SIGMOID}


def _activate(z, act):
    """act(z)."""


def _grad_through(g, y, k, act):
    """dL/dz = g * act'(z), the derivative recovered from the output y[k]."""


def _plus(z, res, k):
    """z + res[k], or z when res is None."""


def _run_of(a, o, c, i0, i1):
    """a[o, c, i0:i1], or None when a is None."""


def _row_of(a, r, j0, j1):
    """a[r, j0:j1], or None when a is None."""


def _store(out, k, value):
    """out[k] = value (narrowed), or nothing when out is None."""


def _zero_of(numba_type):
    return np.float32(0.0) if numba_type == types.float32 else np.float64(0.0)


@overload(_activate, inline="always")
def _activate_overload(z, act):
    zero = _zero_of(z)
    one = zero + 1
    if act == types.int8:          # relu (NaN stays NaN)
        return lambda z, act: np.maximum(z, zero)
    if act == types.int16:         # sigmoid
        return lambda z, act: one / (one + _exp(-z))
    return lambda z, act: z


@overload(_exp, inline="always")
def _exp_overload(t):
    """Cephes' expf and exp: t = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, so r is
    exact), exp(r) by a polynomial (float32, about 1 ulp) or a Pade form (float64, about 1e-16
    relative), times 2^n built from its exponent bits. t is clamped to where 2^n is a normal
    number: exp(88) and exp(709) stand in for overflow, exp(-87) and exp(-708) for underflow
    (only 1 + exp(t) is used: the same to the last bit there, but for the subnormal sigmoids
    below 6e-39 in float32). NaN stays NaN. Plain IEEE arithmetic, so the same bits wherever
    it runs."""
    if t == types.float32:
        f = np.float32

        def exp32(t):
            bad = t != t
            c = f(88.0) if t > f(88.0) else t
            c = f(-87.0) if c < f(-87.0) else c
            c = f(0.0) if bad else c
            n = np.floor(c * f(1.44269504088896341) + f(0.5))
            r = c - n * f(0.693359375)
            r = r - n * f(-2.12194440e-4)
            p = f(1.9875691500e-4) * r + f(1.3981999507e-3)
            p = p * r + f(8.3334519073e-3)
            p = p * r + f(4.1665795894e-2)
            p = p * r + f(1.6666665459e-1)
            p = p * r + f(5.0000001201e-1)
            p = p * (r * r) + r + f(1.0)
            e = p * _float_from_bits(np.int32((np.int64(n) + 127) << 23))
            return t if bad else e
        return exp32
    if t == types.float64:
        def exp64(t):
            bad = t != t
            c = 709.0 if t > 709.0 else t
            c = -708.0 if c < -708.0 else c
            c = 0.0 if bad else c
            n = np.floor(c * 1.4426950408889634073599 + 0.5)
            r = c - n * 6.93145751953125e-1
            r = r - n * 1.42860682030941723212e-6
            xx = r * r
            px = r * ((1.26177193074810590878e-4 * xx + 3.02994407707441961300e-2) * xx
                      + 9.99999999999999999910e-1)
            q = ((3.00198505138664455042e-6 * xx + 2.52448340349684104192e-3) * xx
                 + 2.27265548208155028766e-1) * xx + 2.00000000000000000009e0
            e = (1.0 + 2.0 * (px / (q - px))) * _float_from_bits((np.int64(n) + 1023) << 52)
            return t if bad else e
        return exp64


@overload(_grad_through, inline="always")
def _grad_through_overload(g, y, k, act):
    zero = _zero_of(g)
    one = zero + 1
    if act == types.int8:
        if g == types.float64:
            def relu_grad64(g, y, k, act):
                if _widen(y[k]) > zero:
                    return g
                return zero
            return relu_grad64

        def relu_grad(g, y, k, act):
            if _load(y[k]) > zero:
                return g
            return zero
        return relu_grad
    if act == types.int16:
        if g == types.float64:
            def sigmoid_grad64(g, y, k, act):
                v = _widen(y[k])
                return g * v * (one - v)
            return sigmoid_grad64

        def sigmoid_grad(g, y, k, act):
            v = _load(y[k])
            return g * v * (one - v)
        return sigmoid_grad
    return lambda g, y, k, act: g


@overload(_plus, inline="always")
def _plus_overload(z, res, k):
    if res is None or isinstance(res, types.NoneType):
        return lambda z, res, k: z
    return lambda z, res, k: z + _load(res[k])


@overload(_run_of, inline="always")
def _run_of_overload(a, o, c, i0, i1):
    if a is None or isinstance(a, types.NoneType):
        return lambda a, o, c, i0, i1: None
    return lambda a, o, c, i0, i1: a[o, c, i0:i1]


@overload(_row_of, inline="always")
def _row_of_overload(a, r, j0, j1):
    if a is None or isinstance(a, types.NoneType):
        return lambda a, r, j0, j1: None
    return lambda a, r, j0, j1: a[r, j0:j1]


@overload(_store, inline="always")
def _store_overload(out, k, value):
    if out is None or isinstance(out, types.NoneType):
        return lambda out, k, value: None

    def impl(out, k, value):
        out[k] = _narrow(value, out)
    return impl


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
    """Kernels see float16 arrays as their uint16 bits; None stays None."""
    return a.view(np.uint16) if a is not None and a.dtype.char == "e" else a


# ----------------------------------------------------------------------------------------------
# per-channel coefficients of the elementwise passes, in the arithmetic type of the data

@_helper
def _normalize_coefficients(mean, scale, shift, like):
    """(m, s, b) with y = (x - m) * s + b: m is the mean rounded to the arithmetic type and the
    rounding is folded into b, so x - m is exact where x and the mean cancel."""
    m = _compute_value(mean, like)
    rest = mean - np.float64(m)
    return m, _compute_scale(scale, like), _compute_value(shift - rest * scale, like)


@_helper
def _backward_coefficients(count, s_dy, s_dy_xc, s_xc, mean, invstd, weight, training):
    """(mu, a, mean_dy, b, dgamma) of dx = a * (dz - mean_dy - (x - mu) * b), in float64
    whatever the dtype of the per-channel vectors."""
    mu = np.float64(mean)
    invstd = np.float64(invstd)
    weight = np.float64(weight)
    if training:
        # re-centre on the exact batch mean (the saved mean may be rounded to float32)
        shift = s_xc / count
        mu += shift
        s_dy_xc -= shift * s_dy
    a = weight * invstd
    if training:
        return mu, a, s_dy / count, invstd * invstd * s_dy_xc / count, s_dy_xc * invstd
    return mu, a, 0.0, 0.0, s_dy_xc * invstd


@_helper
def _apply_coefficients(mu, a, mean_dy, b, like):
    """(m, a, g, b) with dx = a * ((dz - g) - (x - m) * b) in the arithmetic type."""
    m = _compute_value(mu, like)
    rest = mu - np.float64(m)
    return (m, _compute_scale(a, like), _compute_value(mean_dy - rest * b, like),
            _compute_value(b, like))


# ----------------------------------------------------------------------------------------------
# 1-D runs (0-based loops over slices: LLVM vectorizes them)

@_helper
def _run_sum(run):
    total = 0.0
    for k in range(run.shape[0]):
        total += _widen(run[k])
    return total


@_helper
def _run_shifted_sums(run, shift):
    s1 = 0.0
    s2 = 0.0
    for k in range(run.shape[0]):
        d = _widen(run[k]) - shift
        s1 += d
        s2 += d * d
    return s1, s2


@_helper
def _run_normalize(run, m, s, b, res, act, out):
    for k in range(run.shape[0]):
        out[k] = _narrow(_activate(_plus((_load(run[k]) - m) * s + b, res, k), act), out)


@_helper
def _run_backward_sums(run_dy, run_x, run_y, act, mean):
    s_dy = 0.0
    s_dy_xc = 0.0
    s_xc = 0.0
    for k in range(run_x.shape[0]):
        g = _grad_through(_widen(run_dy[k]), run_y, k, act)
        xc = _widen(run_x[k]) - mean
        s_dy += g
        s_dy_xc += g * xc
        s_xc += xc
    return s_dy, s_dy_xc, s_xc


@_helper
def _run_backward_apply(run_dy, run_x, run_y, act, m, a, g, b, out, dres):
    for k in range(run_x.shape[0]):
        dz = _grad_through(_load(run_dy[k]), run_y, k, act)
        value = a * ((dz - g) - (_load(run_x[k]) - m) * b)
        _store(dres, k, dz)
        out[k] = _narrow(value, out)


# ----------------------------------------------------------------------------------------------
# channel runs: a channel's values lo..hi, flat index o * inner + i
#
# A channel is `outer` runs far apart in memory; at the start of each run the hardware
# prefetcher has to find the stream again. So the reading passes process a run in pieces of
# CPU_PIECE values and, before each piece, prefetch the same piece of the next run (or of the
# next channel's first run): the loads are one run ahead, as in a contiguous stream.

@_helper
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


@_helper
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
        _prefetch_next_run(x, c, o, i, i + take)
        run = x[o, c, i:i + take]
        if count == 0.0 and pending == 0:
            mean = _run_sum(run) / take
        a, b = _run_shifted_sums(run, mean)
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


@_helper
def _channel_range_normalize(x, c, lo, hi, m, s, b, res, act, y):
    inner = x.shape[2]
    o = lo // inner
    i = lo - o * inner
    pos = lo
    while pos < hi:
        take = min(inner - i, hi - pos)
        _run_normalize(x[o, c, i:i + take], m, s, b, _run_of(res, o, c, i, i + take), act,
                       y[o, c, i:i + take])
        pos += take
        i = 0
        o += 1


@_helper
def _channel_range_backward_sums(dy, x, y, act, c, lo, hi, mean, piece):
    inner = x.shape[2]
    o = lo // inner
    i = lo - o * inner
    s_dy = 0.0
    s_dy_xc = 0.0
    s_xc = 0.0
    pos = lo
    while pos < hi:
        take = min(inner - i, hi - pos, piece)
        _prefetch_next_run(dy, c, o, i, i + take)
        _prefetch_next_run(x, c, o, i, i + take)
        a, b, d = _run_backward_sums(dy[o, c, i:i + take], x[o, c, i:i + take],
                                     _run_of(y, o, c, i, i + take), act, mean)
        s_dy += a
        s_dy_xc += b
        s_xc += d
        pos += take
        i += take
        if i == inner:
            i = 0
            o += 1
    return s_dy, s_dy_xc, s_xc


@_helper
def _channel_range_backward_apply(dy, x, y, act, c, lo, hi, m, a, g, b, dx, dres):
    inner = x.shape[2]
    o = lo // inner
    i = lo - o * inner
    pos = lo
    while pos < hi:
        take = min(inner - i, hi - pos)
        _run_backward_apply(dy[o, c, i:i + take], x[o, c, i:i + take],
                            _run_of(y, o, c, i, i + take), act, m, a, g, b,
                            dx[o, c, i:i + take], _run_of(dres, o, c, i, i + take))
        pos += take
        i = 0
        o += 1


@_helper
def _segment(length, segments, s):
    return s * length // segments, (s + 1) * length // segments


# ---- runs: task kernels (each runs tasks t0..t1; a task is a channel, or a channel segment)

@_jit(reduces=True)
def _runs_moments(x, segments, block, piece, part, t0, t1):
    """part[:, task] = (count, mean, M2) of segment task % segments of channel task // segments."""
    length = x.shape[0] * x.shape[2]
    for task in range(t0, t1):
        c = task // segments
        lo, hi = _segment(length, segments, task - c * segments)
        part[0, task], part[1, task], part[2, task] = _channel_range_moments(x, c, lo, hi,
                                                                             block, piece)


@_jit(reduces=True)
def _runs_forward_train(x, weight, bias, eps, res, act, block, piece, y, stats, t0, t1):
    """One task per channel: statistics, then the normalization from cache."""
    length = x.shape[0] * x.shape[2]
    for c in range(t0, t1):
        count, mu, m2 = _channel_range_moments(x, c, 0, length, block, piece)
        var = m2 / count
        stats[0, c] = mu
        stats[1, c] = var
        invstd = 1.0 / np.sqrt(var + eps)
        m, s, b = _normalize_coefficients(mu, weight[c] * invstd, bias[c], x)
        _channel_range_normalize(x, c, 0, length, m, s, b, res, act, y)


@_jit(reduces=False)
def _runs_normalize(x, coefficients, segments, res, act, y, t0, t1):
    """y = act((x - mean) * scale + shift + res), coefficients[0..2, c] = (mean, scale, shift)."""
    length = x.shape[0] * x.shape[2]
    for task in range(t0, t1):
        c = task // segments
        lo, hi = _segment(length, segments, task - c * segments)
        m, s, b = _normalize_coefficients(coefficients[0, c], coefficients[1, c],
                                          coefficients[2, c], x)
        _channel_range_normalize(x, c, lo, hi, m, s, b, res, act, y)


@_jit(reduces=True)
def _runs_backward_sums(dy, x, y, act, mean, segments, piece, part, t0, t1):
    """part[:, task] = the three backward sums of one channel segment."""
    length = x.shape[0] * x.shape[2]
    for task in range(t0, t1):
        c = task // segments
        lo, hi = _segment(length, segments, task - c * segments)
        part[0, task], part[1, task], part[2, task] = _channel_range_backward_sums(
            dy, x, y, act, c, lo, hi, mean[c], piece)


@_jit(reduces=True)
def _runs_backward(dy, x, y, act, mean, invstd, weight, training, piece, dx, dres, dbeta,
                   dgamma, t0, t1):
    """One task per channel: sums, then dx from cache; writes dbeta and dgamma."""
    length = x.shape[0] * x.shape[2]
    for c in range(t0, t1):
        s_dy, s_dy_xc, s_xc = _channel_range_backward_sums(dy, x, y, act, c, 0, length,
                                                           mean[c], piece)
        mu, a, mean_dy, b, dgamma_c = _backward_coefficients(
            float(length), s_dy, s_dy_xc, s_xc, mean[c], invstd[c], weight[c], training)
        dbeta[c] = s_dy
        dgamma[c] = dgamma_c
        m, a_, g, b_ = _apply_coefficients(mu, a, mean_dy, b, x)
        _channel_range_backward_apply(dy, x, y, act, c, 0, length, m, a_, g, b_, dx, dres)


@_jit(reduces=False)
def _runs_backward_apply(dy, x, y, act, coefficients, segments, dx, dres, t0, t1):
    """dx = a * ((dz - g) - (x - mu) * b), coefficients[0..3, c] = (mu, a, g, b) in float64."""
    length = x.shape[0] * x.shape[2]
    for task in range(t0, t1):
        c = task // segments
        lo, hi = _segment(length, segments, task - c * segments)
        m, a, g, b = _apply_coefficients(coefficients[0, c], coefficients[1, c],
                                         coefficients[2, c], coefficients[3, c], x)
        _channel_range_backward_apply(dy, x, y, act, c, lo, hi, m, a, g, b, dx, dres)


# ----------------------------------------------------------------------------------------------
# matrices: x is (rows, width) with width = groups * C * inner: a matrix row holds ``groups``
# rows of the canonical view, and channel c owns ``inner`` consecutive columns in each group.
# A task's per-column arrays cover channels c0..c1 in column order (group, channel, i).

@_helper
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


@_helper
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


@_serial
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
    _fold(acc, c0, c1, inner, groups, k)
    count = float(shift_rows) * inner * groups
    for c in range(c0, c1):
        k[c] /= count
    columns = np.empty(width)
    _spread(k, c0, c1, inner, groups, columns)
    return k, columns


@_serial
def _finish_moments(s1, s2, k, c0, c1, inner, groups, count, mean, m2):
    """mean = K + S1/n, M2 = S2 - S1^2/n from per-column shifted sums."""
    t1 = np.zeros(c1)
    t2 = np.zeros(c1)
    _fold(s1, c0, c1, inner, groups, t1)
    _fold(s2, c0, c1, inner, groups, t2)
    for c in range(c0, c1):
        mean[c] = k[c] + t1[c] / count
        m2[c] = t2[c] - t1[c] * t1[c] / count


@_helper
def _prefetch_rows(x, r, count, j0, j1):
    """Prefetch columns j0..j1 of rows r..r+count (those that exist)."""
    step = max(1, 64 // x.itemsize)
    for q in range(r, min(r + count, x.shape[0])):
        row = x[q]
        for k in range(j0, j1, step):
            _prefetch(row, k)


@_helper
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
                _prefetch_rows(x, r0 + r + 4, 4, j0 + p0, j0 + p1)
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


@_helper
def _rows_normalize(x, r0, r1, j0, m, s, b, short, res, act, y):
    width = m.shape[0]
    for r in range(r0, r1):
        xr = x[r, j0:j0 + width]
        yr = y[r, j0:j0 + width]
        rr = _row_of(res, r, j0, j0 + width)
        if short:
            for j in range(width):
                yr[j] = _narrow(_activate(_plus(_load(xr[j]) * s[j] + b[j], rr, j), act), yr)
        else:
            for j in range(width):
                yr[j] = _narrow(_activate(_plus((_load(xr[j]) - m[j]) * s[j] + b[j], rr, j),
                                          act), yr)


@_helper
def _rows_backward_sums(dy, x, y, act, r0, r1, j0, mean, s_dy, s_dy_xc, s_xc, piece):
    """Per column sums of dz, dz * (x - mean), x - mean over rows r0..r1; two rows at a time
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
                _prefetch_rows(dy, r0 + r + 2, 2, j0 + p0, j0 + p1)
                _prefetch_rows(x, r0 + r + 2, 2, j0 + p0, j0 + p1)
            g0 = dy[r0 + r, j0 + p0:j0 + p1]
            g1 = dy[r0 + r + 1, j0 + p0:j0 + p1]
            y0 = _row_of(y, r0 + r, j0 + p0, j0 + p1)
            y1 = _row_of(y, r0 + r + 1, j0 + p0, j0 + p1)
            x0 = x[r0 + r, j0 + p0:j0 + p1]
            x1 = x[r0 + r + 1, j0 + p0:j0 + p1]
            mu = mean[p0:p1]
            t_dy = s_dy[p0:p1]
            t_dy_xc = s_dy_xc[p0:p1]
            t_xc = s_xc[p0:p1]
            for j in range(p1 - p0):
                a0 = _grad_through(_widen(g0[j]), y0, j, act)
                a1 = _grad_through(_widen(g1[j]), y1, j, act)
                c0 = _widen(x0[j]) - mu[j]
                c1 = _widen(x1[j]) - mu[j]
                t_dy[j] += a0 + a1
                t_dy_xc[j] += a0 * c0 + a1 * c1
                t_xc[j] += c0 + c1
    for r in range(n2, n):
        gr = dy[r0 + r, j0:j1]
        yr = _row_of(y, r0 + r, j0, j1)
        xr = x[r0 + r, j0:j1]
        for j in range(width):
            a0 = _grad_through(_widen(gr[j]), yr, j, act)
            c0 = _widen(xr[j]) - mean[j]
            s_dy[j] += a0
            s_dy_xc[j] += a0 * c0
            s_xc[j] += c0


@_helper
def _rows_backward_apply(dy, x, y, act, r0, r1, j0, m, a, g, b, dx, dres):
    width = m.shape[0]
    for r in range(r0, r1):
        gr = dy[r, j0:j0 + width]
        xr = x[r, j0:j0 + width]
        yr = _row_of(y, r, j0, j0 + width)
        out = dx[r, j0:j0 + width]
        rr = _row_of(dres, r, j0, j0 + width)
        for j in range(width):
            dz = _grad_through(_load(gr[j]), yr, j, act)
            value = a[j] * ((dz - g[j]) - (_load(xr[j]) - m[j]) * b[j])
            _store(rr, j, dz)
            out[j] = _narrow(value, out)


@_helper
def _rows_normalize_runs(x, r0, r1, inner, m, s, b, res, act, y):
    """_rows_normalize run by run: channel c is columns c * inner .. (c + 1) * inner of each
    row, normalized with its own coefficients m[c], s[c], b[c] (no per-column vectors to
    stream beside x)."""
    for r in range(r0, r1):
        for c in range(m.shape[0]):
            j0 = c * inner
            _run_normalize(x[r, j0:j0 + inner], m[c], s[c], b[c],
                           _row_of(res, r, j0, j0 + inner), act, y[r, j0:j0 + inner])


@_helper
def _rows_backward_apply_runs(dy, x, y, act, r0, r1, inner, m, a, g, b, dx, dres):
    """_rows_backward_apply run by run, with per-channel coefficients."""
    for r in range(r0, r1):
        for c in range(m.shape[0]):
            j0 = c * inner
            j1 = j0 + inner
            _run_backward_apply(dy[r, j0:j1], x[r, j0:j1], _row_of(y, r, j0, j1), act, m[c],
                                a[c], g[c], b[c], dx[r, j0:j1], _row_of(dres, r, j0, j1))


# (a compile-time constant: Numba freezes globals into the compiled code)
_SHORT_FORM = 16.0


@_serial
def _normalize_channels(mean, scale, shift, c0, c1, like):
    """Per-channel (m, s, b) of y = (x - m) * s + b for channels c0..c1 (arrays of length c1),
    in the arithmetic type (see _normalize_coefficients)."""
    m = _compute_empty(c1, like)
    s = _compute_empty(c1, like)
    b = _compute_empty(c1, like)
    for c in range(c0, c1):
        m[c], s[c], b[c] = _normalize_coefficients(mean[c], scale[c], shift[c], like)
    return m, s, b


@_serial
def _gradient_channels(coefficients, c0, c1, like):
    """Per-channel (m, a, g, b) of dx = a * ((dz - g) - (x - m) * b) for channels c0..c1
    (arrays of length c1) from float64 coefficients[0..3, c] = (mu, a, mean_dy, b)."""
    m = _compute_empty(c1, like)
    a = _compute_empty(c1, like)
    g = _compute_empty(c1, like)
    b = _compute_empty(c1, like)
    for c in range(c0, c1):
        m[c], a[c], g[c], b[c] = _apply_coefficients(coefficients[0, c], coefficients[1, c],
                                                     coefficients[2, c], coefficients[3, c],
                                                     like)
    return m, a, g, b


@_serial
def _normalize_columns(mean, scale, shift, invstd, c0, c1, inner, groups, like):
    """Per-column coefficients of channels c0..c1 and whether the short form applies.

    Long form: y = (x - m) * s + b, m the mean in the arithmetic type (see
    _normalize_coefficients). Short form, when every channel's mean is within _SHORT_FORM
    standard deviations (1/invstd) of 0: y = x * s + b with b = shift - mean * s, one load per
    element less; the cancellation it risks costs at most about that many ulps."""
    short = True
    for c in range(c0, c1):
        if not abs(mean[c]) * invstd[c] <= _SHORT_FORM:
            short = False
    m, s, b = _normalize_channels(mean, scale, shift, c0, c1, like)
    if short:
        for c in range(c0, c1):
            m[c] = 0.0
            b[c] = _compute_value(shift[c] - mean[c] * scale[c], like)
    width = (c1 - c0) * inner * groups
    col_m = _compute_empty(width, like)
    col_s = _compute_empty(width, like)
    col_b = _compute_empty(width, like)
    _spread(m, c0, c1, inner, groups, col_m)
    _spread(s, c0, c1, inner, groups, col_s)
    _spread(b, c0, c1, inner, groups, col_b)
    return col_m, col_s, col_b, short


@_serial
def _apply_columns(coefficients, c0, c1, inner, groups, like):
    """Per-column (m, a, g, b) of dx = a * ((dz - g) - (x - m) * b) for channels c0..c1 from
    float64 coefficients[0..3, c] = (mu, a, mean_dy, b)."""
    m, a, g, b = _gradient_channels(coefficients, c0, c1, like)
    width = (c1 - c0) * inner * groups
    col_m = _compute_empty(width, like)
    col_a = _compute_empty(width, like)
    col_g = _compute_empty(width, like)
    col_b = _compute_empty(width, like)
    _spread(m, c0, c1, inner, groups, col_m)
    _spread(a, c0, c1, inner, groups, col_a)
    _spread(g, c0, c1, inner, groups, col_g)
    _spread(b, c0, c1, inner, groups, col_b)
    return col_m, col_a, col_g, col_b


@_serial
def _gradient_coefficients(count, totals, mean, invstd, weight, training, c0, c1, coefficients,
                           dbeta, dgamma):
    """coefficients[:, c] = (mu, a, mean_dy, b), dbeta[c] and dgamma[c] for channels c0..c1
    from their backward sums totals[0..2, c]."""
    for c in range(c0, c1):
        mu, a, mean_dy, b, dgamma_c = _backward_coefficients(
            count, totals[0, c], totals[1, c], totals[2, c], mean[c], invstd[c], weight[c],
            training)
        coefficients[0, c] = mu
        coefficients[1, c] = a
        coefficients[2, c] = mean_dy
        coefficients[3, c] = b
        dbeta[c] = totals[0, c]
        dgamma[c] = dgamma_c


# ---- rows: task kernels (a task is a block of rows; block task is rows
# task * rows // blocks .. (task + 1) * rows // blocks)

@_jit(reduces=True)
def _rows_shift(x, shift_rows, channels, inner, groups, k):
    """k[c] = the shift of channel c; returns it per column."""
    kc, columns = _shifts(x, shift_rows, 0, 0, channels, inner, groups)
    for c in range(channels):      # (a loop: a slice copy compiles a shape-mismatch error path)
        k[c] = kc[c]
    return columns


@_jit(reduces=True)
def _rows_moments(x, shift, blocks, part, t0, t1):
    """part[task, 0/1, :] = per-column shifted sums S1, S2 of row block task."""
    rows = x.shape[0]
    for task in range(t0, t1):
        part[task, 0, :] = 0.0
        part[task, 1, :] = 0.0
        _rows_shifted_sums(x, task * rows // blocks, (task + 1) * rows // blocks, 0, shift,
                           part[task, 0], part[task, 1], 0)


@_jit(reduces=False)
def _rows_normalize_blocks(x, col_m, col_s, col_b, short, res, act, blocks, y, t0, t1):
    rows = x.shape[0]
    for task in range(t0, t1):
        _rows_normalize(x, task * rows // blocks, (task + 1) * rows // blocks, 0, col_m, col_s,
                        col_b, short, res, act, y)


@_jit(reduces=True)
def _rows_backward_sums_blocks(dy, x, y, act, col_mean, blocks, part, t0, t1):
    rows = x.shape[0]
    for task in range(t0, t1):
        part[task] = 0.0
        _rows_backward_sums(dy, x, y, act, task * rows // blocks, (task + 1) * rows // blocks, 0,
                            col_mean, part[task, 0], part[task, 1], part[task, 2], 0)


@_jit(reduces=False)
def _rows_backward_apply_blocks(dy, x, y, act, col_m, col_a, col_g, col_b, blocks, dx, dres,
                                t0, t1):
    rows = x.shape[0]
    for task in range(t0, t1):
        _rows_backward_apply(dy, x, y, act, task * rows // blocks, (task + 1) * rows // blocks,
                             0, col_m, col_a, col_g, col_b, dx, dres)


@_jit(reduces=False)
def _rows_normalize_runs_blocks(x, m, s, b, inner, res, act, blocks, y, t0, t1):
    rows = x.shape[0]
    for task in range(t0, t1):
        _rows_normalize_runs(x, task * rows // blocks, (task + 1) * rows // blocks, inner, m, s,
                             b, res, act, y)


@_jit(reduces=False)
def _rows_backward_apply_runs_blocks(dy, x, y, act, m, a, g, b, inner, blocks, dx, dres, t0,
                                     t1):
    rows = x.shape[0]
    for task in range(t0, t1):
        _rows_backward_apply_runs(dy, x, y, act, task * rows // blocks,
                                  (task + 1) * rows // blocks, inner, m, a, g, b, dx, dres)


# ---- column blocks (groups == 1): a task owns channels c0..c1 over all rows, so its second
# pass reads them from cache

@_helper
def _block_moments(x, c0, c1, inner, shift_rows, piece, mean, m2):
    rows = x.shape[0]
    j0 = c0 * inner
    k, shift = _shifts(x, shift_rows, j0, c0, c1, inner, 1)
    s1 = np.zeros(shift.shape[0])
    s2 = np.zeros(shift.shape[0])
    _rows_shifted_sums(x, 0, rows, j0, shift, s1, s2, piece)
    _finish_moments(s1, s2, k, c0, c1, inner, 1, float(rows) * inner, mean, m2)


@_jit(reduces=True)
def _blocks_moments(x, inner, channels, per_task, shift_rows, piece, stats, t0, t1):
    """stats[0, c] = mean, stats[1, c] = M2."""
    for task in range(t0, t1):
        _block_moments(x, task * per_task, min((task + 1) * per_task, channels), inner,
                       shift_rows, piece, stats[0], stats[1])


@_jit(reduces=True)
def _blocks_forward_train(x, inner, channels, weight, bias, eps, res, act, per_task, shift_rows,
                          piece, y, stats, t0, t1):
    """stats[0, c] = mean, stats[1, c] = biased variance; y normalized from cache."""
    rows = x.shape[0]
    for task in range(t0, t1):
        c0 = task * per_task
        c1 = min(c0 + per_task, channels)
        _block_moments(x, c0, c1, inner, shift_rows, piece, stats[0], stats[1])
        invstd = np.empty(c1)
        scale = np.empty(c1)
        for c in range(c0, c1):
            stats[1, c] = stats[1, c] / (float(rows) * inner)
            invstd[c] = 1.0 / np.sqrt(stats[1, c] + eps)
            scale[c] = weight[c] * invstd[c]
        col_m, col_s, col_b, short = _normalize_columns(stats[0], scale, bias, invstd, c0, c1,
                                                        inner, 1, x)
        _rows_normalize(x, 0, rows, c0 * inner, col_m, col_s, col_b, short, res, act, y)


@_jit(reduces=True)
def _blocks_backward(dy, x, y, act, inner, channels, mean, invstd, weight, training, per_task,
                     piece, dx, dres, dbeta, dgamma, t0, t1):
    rows = x.shape[0]
    for task in range(t0, t1):
        c0 = task * per_task
        c1 = min(c0 + per_task, channels)
        width = (c1 - c0) * inner
        col_mean = np.empty(width)
        _spread(mean, c0, c1, inner, 1, col_mean)
        part = np.zeros((3, width))
        _rows_backward_sums(dy, x, y, act, 0, rows, c0 * inner, col_mean, part[0], part[1],
                            part[2], piece)
        totals = np.zeros((3, c1))
        for k in range(3):
            _fold(part[k], c0, c1, inner, 1, totals[k])
        coefficients = np.empty((4, c1))
        _gradient_coefficients(float(rows) * inner, totals, mean, invstd, weight, training,
                               c0, c1, coefficients, dbeta, dgamma)
        col_m, col_a, col_g, col_b = _apply_columns(coefficients, c0, c1, inner, 1, x)
        _rows_backward_apply(dy, x, y, act, 0, rows, c0 * inner, col_m, col_a, col_g, col_b,
                             dx, dres)


# ---- merges and per-channel coefficients (serial, between the phases of a split call)

@_jit(reduces=False)
def _merge_segments(part, segments, stats):
    _merge_segments_body(part, segments, stats)


@_serial
def _merge_segments_body(part, segments, stats):
    """stats[0, c] = mean, stats[1, c] = M2 of channel c from its segments' (count, mean, M2),
    merged in order (Chan)."""
    for c in range(stats.shape[1]):
        first = c * segments
        n_a, mean_a, m2_a = part[0, first], part[1, first], part[2, first]
        for task in range(first + 1, first + segments):
            n_b = part[0, task]
            delta = part[1, task] - mean_a
            n_ab = n_a + n_b
            mean_a += delta * (n_b / n_ab)
            m2_a += part[2, task] + delta * delta * (n_a * n_b / n_ab)
            n_a = n_ab
        stats[0, c] = mean_a
        stats[1, c] = m2_a


@_jit(reduces=False)
def _merge_row_blocks(part, k, inner, groups, count, stats):
    _merge_row_blocks_body(part, k, inner, groups, count, stats)


@_serial
def _merge_row_blocks_body(part, k, inner, groups, count, stats):
    """stats[0, c] = mean, stats[1, c] = M2 from the row blocks' per-column shifted sums, added
    in block order."""
    blocks = part.shape[0]
    for task in range(1, blocks):
        for q in range(2):
            dst = part[0, q]
            src = part[task, q]
            for j in range(dst.shape[0]):
                dst[j] += src[j]
    _finish_moments(part[0, 0], part[0, 1], k, 0, k.shape[0], inner, groups, count, stats[0],
                    stats[1])


@_jit(reduces=False)
def _sum_segments(part, segments, totals):
    _sum_segments_body(part, segments, totals)


@_serial
def _sum_segments_body(part, segments, totals):
    """totals[q, c] = part[q, c * segments] + ... (in order)."""
    for c in range(totals.shape[1]):
        for q in range(3):
            total = 0.0
            for task in range(c * segments, (c + 1) * segments):
                total += part[q, task]
            totals[q, c] = total


@_jit(reduces=False)
def _fold_row_blocks(part, inner, groups, totals):
    _fold_row_blocks_body(part, inner, groups, totals)


@_serial
def _fold_row_blocks_body(part, inner, groups, totals):
    """totals[q, c] = the sum over row blocks (in order) and over channel c's columns."""
    totals[:] = 0.0
    channels = totals.shape[1]
    for task in range(part.shape[0]):
        for q in range(3):
            _fold(part[task, q], 0, channels, inner, groups, totals[q])


@_serial
def _train_coefficients_body(stats, count, eps, weight, bias, coefficients):
    """stats[1] from M2 to the biased variance; coefficients[:, c] = (mean, scale, shift) and
    coefficients[3, c] = invstd."""
    for c in range(stats.shape[1]):
        var = stats[1, c] / count
        stats[1, c] = var
        invstd = 1.0 / np.sqrt(var + eps)
        coefficients[0, c] = stats[0, c]
        coefficients[1, c] = weight[c] * invstd
        coefficients[2, c] = bias[c]
        coefficients[3, c] = invstd


@_jit(reduces=False)
def _spread_columns(values, inner, groups, columns):
    _spread(values, 0, values.shape[0], inner, groups, columns)


@_jit(reduces=False)
def _column_coefficients(coefficients, inner, groups, like):
    """Per-column normalization coefficients (col_m, col_s, col_b, short)."""
    return _normalize_columns(coefficients[0], coefficients[1], coefficients[2],
                              coefficients[3], 0, coefficients.shape[1], inner, groups, like)


@_jit(reduces=False)
def _column_gradient_coefficients(coefficients, inner, groups, like):
    return _apply_columns(coefficients, 0, coefficients.shape[1], inner, groups, like)


# the serial step between the two parallel phases of a split call, one compiled call each (the
# same strict arithmetic as the steps above; fewer functions to compile)

@_jit(reduces=False)
def _segments_train_between(part, segments, count, eps, weight, bias, stats, coefficients):
    _merge_segments_body(part, segments, stats)
    _train_coefficients_body(stats, count, eps, weight, bias, coefficients)


@_jit(reduces=False)
def _rows_train_between(part, k, inner, groups, count, eps, weight, bias, stats, coefficients,
                        like):
    _merge_row_blocks_body(part, k, inner, groups, count, stats)
    _train_coefficients_body(stats, count, eps, weight, bias, coefficients)
    return _normalize_columns(coefficients[0], coefficients[1], coefficients[2],
                              coefficients[3], 0, coefficients.shape[1], inner, groups, like)


@_jit(reduces=False)
def _segments_backward_between(part, segments, count, mean, invstd, weight, training,
                               coefficients, dbeta, dgamma):
    totals = np.empty((3, mean.shape[0]))
    _sum_segments_body(part, segments, totals)
    _gradient_coefficients(count, totals, mean, invstd, weight, training, 0, totals.shape[1],
                           coefficients, dbeta, dgamma)


@_jit(reduces=False)
def _rows_backward_between(part, inner, groups, count, mean, invstd, weight, training,
                           coefficients, dbeta, dgamma, like):
    totals = np.empty((3, mean.shape[0]))
    _fold_row_blocks_body(part, inner, groups, totals)
    _gradient_coefficients(count, totals, mean, invstd, weight, training, 0, totals.shape[1],
                           coefficients, dbeta, dgamma)
    return _apply_columns(coefficients, 0, coefficients.shape[1], inner, groups, like)


# ---- rows: one serial call for a single row block (small tensors: a (60, 100) batch), the
# same arithmetic as the split kernels above with blocks == 1

@_jit(reduces=True)
def _rows_moments_whole(x, shift_rows, inner, groups, stats):
    rows, width = x.shape
    channels = stats.shape[1]
    k, shift = _shifts(x, shift_rows, 0, 0, channels, inner, groups)
    s1 = np.zeros(width)
    s2 = np.zeros(width)
    _rows_shifted_sums(x, 0, rows, 0, shift, s1, s2, 0)
    _finish_moments(s1, s2, k, 0, channels, inner, groups, float(rows) * inner * groups,
                    stats[0], stats[1])


@_jit(reduces=True)
def _rows_forward_train_whole(x, weight, bias, eps, res, act, shift_rows, inner, groups, y,
                              stats):
    rows, width = x.shape
    channels = stats.shape[1]
    k, shift = _shifts(x, shift_rows, 0, 0, channels, inner, groups)
    s1 = np.zeros(width)
    s2 = np.zeros(width)
    _rows_shifted_sums(x, 0, rows, 0, shift, s1, s2, 0)
    count = float(rows) * inner * groups
    _finish_moments(s1, s2, k, 0, channels, inner, groups, count, stats[0], stats[1])
    invstd = np.empty(channels)
    scale = np.empty(channels)
    for c in range(channels):
        stats[1, c] = stats[1, c] / count
        invstd[c] = 1.0 / np.sqrt(stats[1, c] + eps)
        scale[c] = weight[c] * invstd[c]
    col_m, col_s, col_b, short = _normalize_columns(stats[0], scale, bias, invstd, 0, channels,
                                                    inner, groups, x)
    _rows_normalize(x, 0, rows, 0, col_m, col_s, col_b, short, res, act, y)


@_jit(reduces=False)
def _rows_forward_eval_whole(x, coefficients, inner, groups, res, act, y):
    col_m, col_s, col_b, short = _normalize_columns(
        coefficients[0], coefficients[1], coefficients[2], coefficients[3], 0,
        coefficients.shape[1], inner, groups, x)
    _rows_normalize(x, 0, x.shape[0], 0, col_m, col_s, col_b, short, res, act, y)


@_jit(reduces=True)
def _rows_backward_whole(dy, x, y, act, mean, invstd, weight, training, inner, groups, dx, dres,
                         dbeta, dgamma):
    rows, width = x.shape
    channels = mean.shape[0]
    col_mean = np.empty(width)
    _spread(mean, 0, channels, inner, groups, col_mean)
    part = np.zeros((3, width))
    _rows_backward_sums(dy, x, y, act, 0, rows, 0, col_mean, part[0], part[1], part[2], 0)
    totals = np.zeros((3, channels))
    for q in range(3):
        _fold(part[q], 0, channels, inner, groups, totals[q])
    coefficients = np.empty((4, channels))
    _gradient_coefficients(float(rows) * inner * groups, totals, mean, invstd, weight, training,
                           0, channels, coefficients, dbeta, dgamma)
    col_m, col_a, col_g, col_b = _apply_columns(coefficients, 0, channels, inner, groups, x)
    _rows_backward_apply(dy, x, y, act, 0, rows, 0, col_m, col_a, col_g, col_b, dx, dres)


def _as_element(value, out):
    """A float64 value rounded to out's dtype (float32 or float64)."""


@overload(_as_element, inline="always")
def _as_element_overload(value, out):
    if out.dtype == types.float32:
        return lambda value, out: np.float32(value)
    return lambda value, out: value


# ---- per-channel inputs and outputs (exactly NumPy's arithmetic: these match the reference)

@_jit(reduces=False)
def _eval_coefficients(running_mean, running_var, weight, bias, eps, coefficients, mean, invstd):
    _eval_coefficients_body(running_mean, running_var, weight, bias, eps, coefficients, mean,
                            invstd)


@_jit(reduces=False)
def _rows_forward_eval_small(x, running_mean, running_var, weight, bias, eps, res, act, y,
                             coefficients, mean, invstd):
    """A small channels-last eval in one call: coefficients, outputs, y."""
    _eval_coefficients_body(running_mean, running_var, weight, bias, eps, coefficients, mean,
                            invstd)
    col_m, col_s, col_b, short = _normalize_columns(
        coefficients[0], coefficients[1], coefficients[2], coefficients[3], 0,
        coefficients.shape[1], 1, 1, x)
    _rows_normalize(x, 0, x.shape[0], 0, col_m, col_s, col_b, short, res, act, y)


@_serial
def _eval_coefficients_body(running_mean, running_var, weight, bias, eps, coefficients, mean,
                            invstd):
    """coefficients[:, c] = (mean, scale, shift, invstd); mean/invstd outputs written."""
    for c in range(coefficients.shape[1]):
        inv = 1.0 / np.sqrt(running_var[c] + eps)
        coefficients[0, c] = running_mean[c]
        coefficients[1, c] = weight[c] * inv
        coefficients[2, c] = bias[c]
        coefficients[3, c] = inv
        mean[c] = running_mean[c]
        invstd[c] = inv


@_jit(reduces=False)
def _finish_forward_train(stats, eps, mean, invstd, running_mean, running_var, count, momentum):
    """The mean and invstd outputs; then the running statistics, when given (not None) and
    every new value is finite (returns how many channels' values are not; 0 when none given)."""
    for c in range(stats.shape[1]):
        mean[c] = stats[0, c]
        invstd[c] = 1.0 / np.sqrt(stats[1, c] + eps)
    if running_mean is None:
        return 0
    return _running_update_body(running_mean, running_var, stats[0], stats[1], count, momentum)


@_jit(reduces=False)
def _write_moments(stats, count, mean, var):
    for c in range(stats.shape[1]):
        mean[c] = stats[0, c]
        var[c] = stats[1, c] / count


@_jit(reduces=False)
def _write_pair(values, first, second):
    for c in range(values.shape[1]):
        first[c] = values[0, c]
        second[c] = values[1, c]


@_jit(reduces=False)
def _running_update(running_mean, running_var, mean, var, count, momentum):
    return _running_update_body(running_mean, running_var, mean, var, count, momentum)


@_serial
def _running_update_body(running_mean, running_var, mean, var, count, momentum):
    """r = (1 - momentum) r + momentum * batch (unbiased var) for every channel, in NumPy's
    arithmetic, but only when every new value is finite in the running statistics' dtype;
    returns the number of channels whose values are not (then nothing was written)."""
    unbiased = count / (count - 1.0)
    bad = 0
    for c in range(mean.shape[0]):
        new_mean = _as_element((1.0 - momentum) * np.float64(running_mean[c])
                               + momentum * mean[c], running_mean)
        new_var = _as_element((1.0 - momentum) * np.float64(running_var[c])
                              + momentum * (var[c] * unbiased), running_var)
        if not (np.isfinite(new_mean) and np.isfinite(new_var)):
            bad += 1
    if bad:
        return bad
    for c in range(mean.shape[0]):
        running_mean[c] = (1.0 - momentum) * np.float64(running_mean[c]) + momentum * mean[c]
        running_var[c] = ((1.0 - momentum) * np.float64(running_var[c])
                          + momentum * (var[c] * unbiased))
    return 0


# ----------------------------------------------------------------------------------------------
# running tasks: a pool of Python threads, each calling the compiled (nogil) kernel on ranges of
# tasks. Which task computes what depends on the shape only, so the thread count (and the order
# in which threads take tasks) never changes a result.

_pool = None
_pool_lock = threading.Lock()


def _get_pool():
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),
                    thread_name_prefix="fastbn-cpu")
    return _pool


def _threads(tasks, size):
    if tasks <= 1 or size < _config.CPU_PARALLEL_MIN_SIZE:
        return 1
    return min(tasks, numba.get_num_threads())


def _run(kernel, tasks, size, *args):
    """kernel(*args, t0, t1) for tasks 0..tasks: in the calling thread for small calls, else
    over numba.get_num_threads() threads taking chunks of tasks in turn."""
    threads = _threads(tasks, size)
    if threads == 1:
        kernel(*args, 0, tasks)
        return
    chunk = max(1, tasks // (threads * 4))
    claimed = iter(range(0, tasks, chunk))   # next() is atomic under the GIL
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                t0 = next(claimed, None)
            if t0 is None:
                return
            kernel(*args, t0, min(t0 + chunk, tasks))

    pool = _get_pool()
    futures = [pool.submit(work) for _ in range(threads - 1)]
    try:
        work()
    finally:
        for future in futures:
            future.result()


# ----------------------------------------------------------------------------------------------
# the plan: how a call is split, from the shape, the strides and _config only

RUNS = "runs"          # channel-major: a task per channel, or per channel segment
BLOCKS = "blocks"      # short channel runs: a task per block of whole channels (fused)
ROWS = "rows"          # channels-last (and elementwise passes over short runs): row blocks

# the operations whose statistics and elementwise pass are fused into one task where possible
_FUSED = frozenset({"moments", "forward_train", "backward"})
# the operations without per-task partial sums
_ELEMENTWISE = frozenset({"forward_eval", "backward_apply"})


class Plan:
    """How one call is split (every field depends on the shape and _config only)."""

    __slots__ = ("kind", "regime", "tasks", "segments", "rows", "width", "inner", "groups",
                 "per_task", "blocks", "shift_rows", "one_run")

    def __repr__(self):
        return "Plan(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def _segments(shape3):
    """Pieces per channel for channel runs: 1 (a task per channel, statistics and elementwise
    pass fused) unless there are fewer than CPU_MIN_TASKS channels; then CPU_TASKS tasks in
    all, none shorter than CPU_CHUNK_ELEMENTS values."""
    outer, channels, inner = shape3
    if channels == 0 or channels >= _config.CPU_MIN_TASKS:
        return 1
    wanted = -(-_config.CPU_TASKS // channels)
    return max(1, min(wanted, outer * inner // max(_config.CPU_CHUNK_ELEMENTS, 1)))


def _plan_for(op, shape3, itemsize, inputs, mergeable=True, rows_contiguous=True):
    """The plan of op on x-shaped arrays of shape3; inputs: how many x-shaped arrays a fused
    task reads (its working set); mergeable: every array's (C, inner) axes merge into one
    (a matrix view exists); rows_contiguous: every array's rows are contiguous (channels-last
    rows may be grouped)."""
    outer, channels, inner = shape3
    plan = Plan()
    plan.regime = _layout.regime(shape3)
    plan.one_run = channels == 1 and inner == 1
    if plan.one_run:
        # a single channels-last channel is one long run: (1, 1, outer)
        outer, inner = 1, outer
        shape3 = (1, 1, inner)
    plan.inner = inner
    plan.groups = 1
    plan.segments = 1
    plan.per_task = 0
    plan.blocks = 1
    plan.shift_rows = 1
    plan.rows, plan.width = outer, channels * inner
    kind = RUNS
    if inner < _config.CPU_MIN_RUN and mergeable and not plan.one_run:
        if inner == 1:
            kind = ROWS
        elif op in _FUSED:
            per_task = _block_channels(outer, channels, inner, itemsize, inputs)
            if per_task:
                kind = BLOCKS
                plan.per_task = per_task
        elif op in _ELEMENTWISE:
            kind = ROWS
        # (backward_reduce over short runs: a task per channel, no wide partial sums)
    plan.kind = kind
    if kind == RUNS:
        plan.segments = _segments(shape3)
        plan.tasks = channels * plan.segments
        return plan
    if kind == BLOCKS:
        plan.tasks = -(-channels // plan.per_task)
        plan.shift_rows = max(1, min(outer, _config.CPU_CHUNK_ELEMENTS
                                     // max(plan.per_task * inner, 1)))
        return plan
    if (inner == 1 and channels < _config.CPU_ROW_ELEMENTS and rows_contiguous
            and outer * channels >= _config.CPU_GROUP_MIN_SIZE):
        # several rows per matrix row, so that the column loops are long (a loop's setup
        # costs about as much as 64 elements)
        want = -(-_config.CPU_ROW_ELEMENTS // channels)
        plan.groups = next(g for g in range(min(want, outer), 0, -1) if outer % g == 0)
    plan.rows = outer // plan.groups
    plan.width = channels * inner * plan.groups
    wanted = plan.rows * plan.width // max(_config.CPU_CHUNK_ELEMENTS, 1)
    cap = _config.CPU_MAX_TASKS
    if op not in _ELEMENTWISE:
        cap = min(cap, max(1, (1 << 22) // max(plan.width, 1)))   # the partial sums stay small
    plan.blocks = max(1, min(plan.rows, cap, wanted))
    plan.tasks = plan.blocks
    plan.shift_rows = max(1, min(plan.rows, _config.CPU_CHUNK_ELEMENTS // max(plan.width, 1)))
    return plan


def _block_channels(rows, channels, inner, itemsize, inputs):
    """Channels per column block when a block over all rows fits CPU_FUSED_BYTES (and is at
    least two cache lines wide); 0 when it does not. As many blocks as CPU_TASKS where the
    tensor is large enough, but none with fewer than 2 * CPU_CHUNK_ELEMENTS values where that
    can be helped: a task costs a few microseconds of setup (its per-channel arrays), so a small
    tensor cut into 64 tasks spends more on them than on its values."""
    channel_bytes = rows * inner * itemsize * inputs
    least = -(-128 // (inner * itemsize))
    if channel_bytes * least > _config.CPU_FUSED_BYTES:
        return 0
    fits = max(least, _config.CPU_FUSED_BYTES // max(channel_bytes, 1))
    blocks = min(_config.CPU_TASKS,
                 max(1, rows * channels * inner // max(2 * _config.CPU_CHUNK_ELEMENTS, 1)))
    spread = max(least, -(-channels // blocks))
    return min(fits, spread, channels)


def _mergeable(a3):
    return a3.shape[2] == 1 or a3.strides[1] == a3.shape[2] * a3.strides[2]


def _rows_contiguous(a3):
    return a3.strides[1] == a3.itemsize and a3.strides[0] == a3.shape[1] * a3.itemsize


_plans = {}


def _settings():
    """The _config values a plan depends on (tests change them)."""
    c = _config
    return (c.CPU_MIN_RUN, c.CPU_TASKS, c.CPU_MIN_TASKS, c.CPU_MAX_TASKS, c.CPU_CHUNK_ELEMENTS,
            c.CPU_FUSED_BYTES, c.CPU_ROW_ELEMENTS, c.CPU_GROUP_MIN_SIZE)


def _plan(op, x3, inputs):
    """The plan of op for x3, cached (planning costs microseconds; a training loop asks for the
    same few plans every step). It depends on x3 alone, so that the layout of the other arrays
    never changes a result: one that does not fit the plan's view is copied (see _Output)."""
    key = (op, x3.shape, x3.itemsize, inputs, _mergeable(x3),
           x3.shape[2] == 1 and _rows_contiguous(x3), _settings())
    plan = _plans.get(key)
    if plan is None:
        plan = _plan_for(op, *key[1:6])
        if len(_plans) > 1024:
            _plans.clear()
        _plans[key] = plan
    return plan


def plan_tasks(shape3, itemsize, op):
    """How many tasks op splits a C-contiguous (outer, C, inner) tensor into (the parallelism
    a call offers; the benchmark suite tabulates it). op is an operation of the contract."""
    inputs = {"backward": 2}.get(op, 1)
    return _plan_for(op, tuple(int(n) for n in shape3), int(itemsize), inputs).tasks


def _fits(plan, a3):
    """Whether a kernel takes a3 as it is: C-contiguous (then every plan's view exists).
    Kernels compile for contiguous x-shaped arrays only, one type per dtype, not one per
    layout; the other layouts (rare: out= views, Fortran order) go through a copy."""
    return a3.flags.c_contiguous


def _view(plan, a3):
    """a3 as the plan's kernels see it (float16 as uint16 bits; None stays None)."""
    if a3 is None:
        return None
    a3 = _bits(a3)
    if plan.one_run:
        return as_strided(a3, (1, 1, a3.shape[0]), (0, 0, a3.strides[0]))
    if plan.kind == RUNS:
        return a3
    if plan.inner == 1:
        a3 = a3[:, :, 0]
        if plan.groups == 1:
            return a3
    if a3.flags.c_contiguous:
        return a3.reshape(plan.rows, plan.width)     # (never a copy; 5x cheaper than below)
    return np.reshape(a3, (plan.rows, plan.width), copy=False)


def _contiguous(a3):
    """An input that a kernel reduces over, C-contiguous (a copy when it is not).

    The reductions are vectorized sums whose order of additions is the compiled loop's (that is
    what 'reassoc' permits); a strided input compiles to another loop and so another order. With
    every reduced input contiguous, the bits do not depend on the caller's memory layouts (an
    F-order y from the forward's out=, a permuted dy)."""
    if a3 is None or a3.flags.c_contiguous:
        return a3
    return np.ascontiguousarray(a3)


def _input(plan, a3):
    """The kernel view of an input, through a contiguous copy when its layout does not fit."""
    if a3 is not None and not _fits(plan, a3):
        a3 = np.ascontiguousarray(a3)
    return _view(plan, a3)


class _Output:
    """The kernel view of an output; a contiguous scratch array, copied back by done(), when
    the output's layout does not fit the plan (or it is x3 itself while an input was copied:
    in place stays in place)."""

    __slots__ = ("target", "scratch", "view")

    def __init__(self, plan, a3):
        self.target = a3
        self.scratch = None
        if a3 is not None and not _fits(plan, a3):
            self.scratch = np.empty(a3.shape, a3.dtype)
            a3 = self.scratch
        self.view = _view(plan, a3)

    def done(self):
        if self.scratch is not None:
            self.target[...] = self.scratch


def _block():
    return max(1, _config.CPU_CHUNK_ELEMENTS)


# ----------------------------------------------------------------------------------------------
# per-channel host helpers

_constants = {}


def _constant(value, channels, dtype):
    """A vector of value, cached per (channel count, dtype) (identity gamma/beta). Private:
    never handed out nor written; writeable, so that it has the type of the caller's vectors
    (Numba compiles read-only arrays separately)."""
    key = (value, channels, dtype)
    vector = _constants.get(key)
    if vector is None:
        vector = np.full(channels, value, dtype)
        if len(_constants) > 64:
            _constants.clear()
        _constants[key] = vector
    return vector


def _plain(v):
    """Whether a kernel can take vector v as it is: contiguous, writeable float32/float64."""
    flags = v.flags
    return v.dtype.char in "fd" and flags.c_contiguous and flags.writeable


def _vectors(channels, vectors, defaults):
    """The per-channel input vectors of one kernel call (each a vector or None; defaults: the
    value a None stands for), in one type: as they are when every given one is a contiguous,
    writeable vector of one dtype (float32 or float64: the common case costs nothing);
    otherwise all as contiguous float64 copies (exact: kernels read every value as float64).
    None becomes a cached constant vector. So a kernel compiles for two vector types, not for
    every mix of dtypes and layouts."""
    dtype = None
    for v in vectors:
        if v is not None:
            if dtype is None:
                dtype = v.dtype
            if v.dtype != dtype or not _plain(v):
                return [_constant(d, channels, _FLOAT64) if v is None
                        else np.array(v, _FLOAT64) for v, d in zip(vectors, defaults)]
    if dtype is None:
        dtype = _FLOAT64
    return [_constant(d, channels, dtype) if v is None else v
            for v, d in zip(vectors, defaults)]


_FLOAT64 = np.dtype(np.float64)
_IDENTITY = (1.0, 0.0)      # gamma, beta


def _direct(out):
    """Whether kernels can write out itself (contiguous float32/float64)."""
    return out.dtype.char in "fd" and out.flags.c_contiguous


# ----------------------------------------------------------------------------------------------
# what each (operation, plan) runs: the kernels above in their phases

def _moments_runs(plan, size, x, stats):
    part = np.empty((3, plan.tasks))
    _run(_runs_moments, plan.tasks, size, x, plan.segments, _block(), _config.CPU_PIECE, part)
    _merge_segments(part, plan.segments, stats)


def _moments_blocks(plan, size, x, stats):
    _run(_blocks_moments, plan.tasks, size, x, plan.inner, stats.shape[1], plan.per_task,
         plan.shift_rows, _config.CPU_PIECE, stats)


def _moments_rows(plan, size, x, stats):
    if plan.blocks == 1:
        _rows_moments_whole(x, plan.shift_rows, plan.inner, plan.groups, stats)
        return
    k = np.empty(stats.shape[1])
    shift = _rows_shift(x, plan.shift_rows, stats.shape[1], plan.inner, plan.groups, k)
    part = np.empty((plan.blocks, 2, plan.width))
    _run(_rows_moments, plan.tasks, size, x, shift, plan.blocks, part)
    _merge_row_blocks(part, k, plan.inner, plan.groups,
                      float(plan.rows) * plan.inner * plan.groups, stats)


def _forward_train_runs(plan, size, x, weight, bias, eps, res, act, y, stats):
    if plan.segments == 1:
        _run(_runs_forward_train, plan.tasks, size, x, weight, bias, eps, res, act, _block(),
             _config.CPU_PIECE, y, stats)
        return
    part = np.empty((3, plan.tasks))
    _run(_runs_moments, plan.tasks, size, x, plan.segments, _block(), _config.CPU_PIECE, part)
    coefficients = np.empty((4, stats.shape[1]))
    _segments_train_between(part, plan.segments, float(x.shape[0] * x.shape[2]), eps, weight,
                            bias, stats, coefficients)
    _run(_runs_normalize, plan.tasks, size, x, coefficients, plan.segments, res, act, y)


def _forward_train_blocks(plan, size, x, weight, bias, eps, res, act, y, stats):
    _run(_blocks_forward_train, plan.tasks, size, x, plan.inner, stats.shape[1], weight, bias,
         eps, res, act, plan.per_task, plan.shift_rows, _config.CPU_PIECE, y, stats)


def _forward_train_rows(plan, size, x, weight, bias, eps, res, act, y, stats):
    if plan.blocks == 1:
        _rows_forward_train_whole(x, weight, bias, eps, res, act, plan.shift_rows, plan.inner,
                                  plan.groups, y, stats)
        return
    k = np.empty(stats.shape[1])
    shift = _rows_shift(x, plan.shift_rows, stats.shape[1], plan.inner, plan.groups, k)
    part = np.empty((plan.blocks, 2, plan.width))
    _run(_rows_moments, plan.tasks, size, x, shift, plan.blocks, part)
    coefficients = np.empty((4, stats.shape[1]))
    col_m, col_s, col_b, short = _rows_train_between(
        part, k, plan.inner, plan.groups, float(plan.rows) * plan.inner * plan.groups, eps,
        weight, bias, stats, coefficients, x)
    _run(_rows_normalize_blocks, plan.tasks, size, x, col_m, col_s, col_b, short, res, act,
         plan.blocks, y)


def _normalize_rows(plan, size, x, coefficients, res, act, y):
    if plan.inner >= _config.CPU_MIN_SCALAR_RUN:
        m, s, b = _normalize_channels(coefficients[0], coefficients[1], coefficients[2], 0,
                                      coefficients.shape[1], x)
        _run(_rows_normalize_runs_blocks, plan.tasks, size, x, m, s, b, plan.inner, res, act,
             plan.blocks, y)
        return
    col_m, col_s, col_b, short = _column_coefficients(coefficients, plan.inner, plan.groups, x)
    _run(_rows_normalize_blocks, plan.tasks, size, x, col_m, col_s, col_b, short, res, act,
         plan.blocks, y)


def _forward_eval_runs(plan, size, x, coefficients, res, act, y):
    _run(_runs_normalize, plan.tasks, size, x, coefficients, plan.segments, res, act, y)


def _forward_eval_rows(plan, size, x, coefficients, res, act, y):
    if plan.blocks == 1 and plan.inner < _config.CPU_MIN_SCALAR_RUN:
        _rows_forward_eval_whole(x, coefficients, plan.inner, plan.groups, res, act, y)
        return
    _normalize_rows(plan, size, x, coefficients, res, act, y)


def _backward_runs(plan, size, dy, x, y, act, mean, invstd, weight, training, dx, dres, dbeta,
                   dgamma):
    if plan.segments == 1:
        _run(_runs_backward, plan.tasks, size, dy, x, y, act, mean, invstd, weight, training,
             _config.CPU_PIECE, dx, dres, dbeta, dgamma)
        return
    part = np.empty((3, plan.tasks))
    _run(_runs_backward_sums, plan.tasks, size, dy, x, y, act, mean, plan.segments,
         _config.CPU_PIECE, part)
    coefficients = np.empty((4, mean.shape[0]))
    _segments_backward_between(part, plan.segments, float(x.shape[0] * x.shape[2]), mean,
                               invstd, weight, training, coefficients, dbeta, dgamma)
    _backward_apply_runs(plan, size, dy, x, y, act, coefficients, dx, dres)


def _backward_blocks(plan, size, dy, x, y, act, mean, invstd, weight, training, dx, dres,
                     dbeta, dgamma):
    _run(_blocks_backward, plan.tasks, size, dy, x, y, act, plan.inner, mean.shape[0], mean,
         invstd, weight, training, plan.per_task, _config.CPU_PIECE, dx, dres, dbeta, dgamma)


def _backward_rows(plan, size, dy, x, y, act, mean, invstd, weight, training, dx, dres, dbeta,
                   dgamma):
    if plan.blocks == 1:
        _rows_backward_whole(dy, x, y, act, mean, invstd, weight, training, plan.inner,
                             plan.groups, dx, dres, dbeta, dgamma)
        return
    col_mean = np.empty(plan.width)
    _spread_columns(mean, plan.inner, plan.groups, col_mean)
    part = np.empty((plan.blocks, 3, plan.width))
    _run(_rows_backward_sums_blocks, plan.tasks, size, dy, x, y, act, col_mean, plan.blocks,
         part)
    coefficients = np.empty((4, mean.shape[0]))
    col_m, col_a, col_g, col_b = _rows_backward_between(
        part, plan.inner, plan.groups, float(plan.rows) * plan.inner * plan.groups, mean,
        invstd, weight, training, coefficients, dbeta, dgamma, x)
    _run(_rows_backward_apply_blocks, plan.tasks, size, dy, x, y, act, col_m, col_a, col_g,
         col_b, plan.blocks, dx, dres)


def _backward_reduce_runs(plan, size, dy, x, y, act, mean):
    part = np.empty((3, plan.tasks))
    _run(_runs_backward_sums, plan.tasks, size, dy, x, y, act, mean, plan.segments,
         _config.CPU_PIECE, part)
    totals = np.empty((3, mean.shape[0]))
    _sum_segments(part, plan.segments, totals)
    return totals


def _backward_reduce_rows(plan, size, dy, x, y, act, mean):
    col_mean = np.empty(plan.width)
    _spread_columns(mean, plan.inner, plan.groups, col_mean)
    part = np.empty((plan.blocks, 3, plan.width))
    _run(_rows_backward_sums_blocks, plan.tasks, size, dy, x, y, act, col_mean, plan.blocks,
         part)
    totals = np.empty((3, mean.shape[0]))
    _fold_row_blocks(part, plan.inner, plan.groups, totals)
    return totals


def _backward_apply_runs(plan, size, dy, x, y, act, coefficients, dx, dres):
    _run(_runs_backward_apply, plan.tasks, size, dy, x, y, act, coefficients, plan.segments,
         dx, dres)


def _backward_apply_rows(plan, size, dy, x, y, act, coefficients, dx, dres):
    if plan.inner >= _config.CPU_MIN_SCALAR_RUN:
        m, a, g, b = _gradient_channels(coefficients, 0, coefficients.shape[1], x)
        _run(_rows_backward_apply_runs_blocks, plan.tasks, size, dy, x, y, act, m, a, g, b,
             plan.inner, plan.blocks, dx, dres)
        return
    col_m, col_a, col_g, col_b = _column_gradient_coefficients(coefficients, plan.inner,
                                                               plan.groups, x)
    _run(_rows_backward_apply_blocks, plan.tasks, size, dy, x, y, act, col_m, col_a, col_g,
         col_b, plan.blocks, dx, dres)


#: (operation, plan kind) -> what runs it. Elementwise operations and backward_reduce have no
#: fused BLOCKS variant: their plan on short runs is ROWS.
_KERNELS = {
    ("moments", RUNS): _moments_runs,
    ("moments", BLOCKS): _moments_blocks,
    ("moments", ROWS): _moments_rows,
    ("forward_train", RUNS): _forward_train_runs,
    ("forward_train", BLOCKS): _forward_train_blocks,
    ("forward_train", ROWS): _forward_train_rows,
    ("forward_eval", RUNS): _forward_eval_runs,
    ("forward_eval", ROWS): _forward_eval_rows,
    ("backward", RUNS): _backward_runs,
    ("backward", BLOCKS): _backward_blocks,
    ("backward", ROWS): _backward_rows,
    ("backward_reduce", RUNS): _backward_reduce_runs,
    ("backward_reduce", ROWS): _backward_reduce_rows,
    ("backward_apply", RUNS): _backward_apply_runs,
    ("backward_apply", ROWS): _backward_apply_rows,
}


# ----------------------------------------------------------------------------------------------
# operations (the contract, _contract.py; the same names and parameters in every backend)

_small_plans = {}


def _small_rows_plan(x3, *others):
    """The plan of a small channels-last call, cached (planning costs more than their work):
    one serial row block, rows not grouped. None for other calls, and when any of the other
    x-shaped arrays (None or arrays) is not C-contiguous (then the general path copies)."""
    for a in others:
        if a is not None and not a.flags.c_contiguous:
            return None
    return _small_plan(x3.shape, x3.itemsize)


def _small_plan(shape3, itemsize):
    """_small_rows_plan for C-contiguous arrays of shape3."""
    if shape3[2] != 1 or shape3[1] < 2 or shape3[0] * shape3[1] >= _config.CPU_PARALLEL_MIN_SIZE:
        return None
    settings = _settings()
    cached = _small_plans.get(shape3)
    if cached is None or cached[1] != settings:
        plan = _plan_for("forward_eval", shape3, itemsize, 1, True, False)
        if plan.blocks != 1:
            plan = None
        if len(_small_plans) > 256:
            _small_plans.clear()
        cached = _small_plans[shape3] = (plan, settings)
    return cached[0]


def _channel_stats(x3):
    """(2, C) float64: the per-channel mean and M2 (NaN without values)."""
    stats = np.empty((2, x3.shape[1]))
    if x3.size == 0:
        stats.fill(np.nan)
        return stats
    x3 = _contiguous(x3)
    plan = _small_rows_plan(x3) or _plan("moments", x3, 1)
    _KERNELS["moments", plan.kind](plan, x3.size, _view(plan, x3), stats)
    return stats


def channel_moments(x3):
    stats = _channel_stats(x3)
    return stats[0], stats[1]


def moments(x3, mean, var):
    stats = _channel_stats(x3)
    count = float(x3.shape[0] * x3.shape[2])
    if _direct(mean) and _direct(var):
        _write_moments(stats, count, mean, var)
        return
    with np.errstate(over="ignore", invalid="ignore"):
        mean[...] = stats[0]
        var[...] = stats[1] / count


def _train_pass(x3, weight, bias, eps, residual3, act, y3, stats):
    """stats (2, C) float64 (mean, biased var) and y3 of one forward_train: x3 contiguous, the
    vectors from _vectors."""
    plan = _small_rows_plan(x3, y3, residual3)
    if plan is not None:                        # every array fits: views without checks
        _rows_forward_train_whole(_bits(x3)[:, :, 0], weight, bias, eps,
                                  None if residual3 is None else _bits(residual3)[:, :, 0],
                                  act, plan.shift_rows, 1, 1, _bits(y3)[:, :, 0], stats)
        return
    plan = _plan("forward_train", x3, 1 if residual3 is None else 2)
    y = _Output(plan, y3)
    _KERNELS["forward_train", plan.kind](plan, x3.size, _view(plan, x3), weight, bias, eps,
                                         _input(plan, residual3), act, y.view, stats)
    y.done()


def forward_train(x3, weight, bias, eps, momentum, running_mean, running_var, activation,
                  residual3, warn, y3, mean, invstd):
    channels = x3.shape[1]
    if channels == 0:
        return
    eps = float(eps)
    stats = np.empty((2, channels))
    weight, bias = _vectors(channels, (weight, bias), _IDENTITY)
    _train_pass(_contiguous(x3), weight, bias, eps, residual3, _ACTIVATION_TAGS[activation], y3,
                stats)
    count = x3.shape[0] * x3.shape[2]
    direct = _direct(mean) and _direct(invstd)
    update = running_mean is not None
    fast_update = (update and _direct(running_mean) and _direct(running_var)
                   and running_mean.dtype == running_var.dtype == mean.dtype)
    if direct:
        # outputs and (when every new value is finite) the running statistics in one call
        if _finish_forward_train(stats, eps, mean, invstd,
                                 running_mean if fast_update else None,
                                 running_var if fast_update else None,
                                 float(count), float(momentum)) == 0 and fast_update:
            return
    else:
        with np.errstate(over="ignore", divide="ignore"):
            mean[...] = stats[0]
            invstd[...] = 1.0 / np.sqrt(stats[1] + eps)
    if update:
        update_running_stats(running_mean, running_var, stats[0], stats[1], count, momentum,
                             warn)


def _eval_pass(x3, running_mean, running_var, weight, bias, eps, residual3, act, y3,
               coefficients, mean, invstd):
    """coefficients (4, C), the mean/invstd outputs (contiguous float32/float64) and y3 of one
    forward_eval: x3 contiguous, the vectors from _vectors."""
    plan = _small_rows_plan(x3, y3, residual3)
    if plan is not None:                        # coefficients and y in one call
        _rows_forward_eval_small(_bits(x3)[:, :, 0], running_mean, running_var, weight, bias,
                                 eps, None if residual3 is None else _bits(residual3)[:, :, 0],
                                 act, _bits(y3)[:, :, 0], coefficients, mean, invstd)
        return
    _eval_coefficients(running_mean, running_var, weight, bias, eps, coefficients, mean, invstd)
    if x3.size:
        plan = _plan("forward_eval", x3, 1)
        y = _Output(plan, y3)
        _KERNELS["forward_eval", plan.kind](plan, x3.size, _view(plan, x3), coefficients,
                                            _input(plan, residual3), act, y.view)
        y.done()


def forward_eval(x3, weight, bias, running_mean, running_var, eps, activation, residual3, y3,
                 mean, invstd):
    channels = x3.shape[1]
    eps = float(eps)
    coefficients = np.empty((4, channels))
    direct = _direct(mean) and _direct(invstd)
    running_mean, running_var, weight, bias = _vectors(
        channels, (running_mean, running_var, weight, bias), (0.0, 1.0, 1.0, 0.0))
    _eval_pass(_contiguous(x3), running_mean, running_var, weight, bias, eps, residual3,
               _ACTIVATION_TAGS[activation], y3, coefficients,
               mean if direct else coefficients[0], invstd if direct else coefficients[3])
    if not direct:
        with np.errstate(over="ignore"):
            mean[...] = coefficients[0]
            invstd[...] = coefficients[3]


def _backward_pass(dy3, x3, y3, act, mean, invstd, weight, training, dx3, dresidual3, dbeta,
                   dgamma):
    """dx3 (and dresidual3), dbeta and dgamma (contiguous float32/float64) of one backward:
    dy3, x3, y3 contiguous and not empty, the vectors from _vectors."""
    plan = _small_rows_plan(x3, dx3, dresidual3)
    if plan is not None:                        # every array fits: views without checks
        _rows_backward_whole(_bits(dy3)[:, :, 0], _bits(x3)[:, :, 0],
                             None if y3 is None else _bits(y3)[:, :, 0], act, mean, invstd,
                             weight, training, 1, 1, _bits(dx3)[:, :, 0],
                             None if dresidual3 is None else _bits(dresidual3)[:, :, 0],
                             dbeta, dgamma)
        return
    plan = _plan("backward", x3, 2 if y3 is None else 3)
    dx = _Output(plan, dx3)
    dres = _Output(plan, dresidual3)
    _KERNELS["backward", plan.kind](plan, x3.size, _input(plan, dy3), _view(plan, x3),
                                    _input(plan, y3), act, mean, invstd, weight, training,
                                    dx.view, dres.view, dbeta, dgamma)
    dx.done()
    dres.done()


def backward(dy3, x3, mean, invstd, weight, training, activation, y3, dx3, dgamma, dbeta,
             dresidual3):
    channels = x3.shape[1]
    direct = _direct(dgamma) and _direct(dbeta)
    sums = None if direct else np.empty((2, channels))
    dbeta_out, dgamma_out = (dbeta, dgamma) if direct else (sums[0], sums[1])
    if x3.size == 0:
        dbeta_out[...] = 0.0
        dgamma_out[...] = 0.0
    else:
        act = _ACTIVATION_TAGS[activation]
        if act is None:
            y3 = None      # the derivative needs y only through an activation
        mean, invstd, weight = _vectors(channels, (mean, invstd, weight), (0.0, 1.0, 1.0))
        _backward_pass(_contiguous(dy3), _contiguous(x3), _contiguous(y3), act, mean, invstd,
                       weight, bool(training), dx3, dresidual3, dbeta_out, dgamma_out)
    if not direct:
        with np.errstate(over="ignore", invalid="ignore"):
            dbeta[...] = sums[0]
            dgamma[...] = sums[1]


def backward_reduce(dy3, x3, mean):
    channels = x3.shape[1]
    if x3.size == 0:
        return np.zeros((3, channels))
    dy3, x3 = _contiguous(dy3), _contiguous(x3)
    plan = _plan("backward_reduce", x3, 2)
    return _KERNELS["backward_reduce", plan.kind](plan, x3.size, _input(plan, dy3),
                                                  _view(plan, x3), None, None,
                                                  _vectors(channels, (mean,), (0.0,))[0])


def backward_apply(dy3, x3, mean, scale, mean_dy, coef, dx3):
    channels = x3.shape[1]
    if x3.size == 0:
        return
    coefficients = np.empty((4, channels))
    coefficients[0] = mean
    coefficients[1] = scale
    coefficients[2] = mean_dy
    coefficients[3] = coef
    dy3, x3 = _contiguous(dy3), _contiguous(x3)
    plan = _plan("backward_apply", x3, 2)
    dx = _Output(plan, dx3)
    _KERNELS["backward_apply", plan.kind](plan, x3.size, _input(plan, dy3), _view(plan, x3),
                                          None, None, coefficients, dx.view, None)
    dx.done()


def update_running_stats(running_mean, running_var, mean, var, count, momentum, warn):
    """As reference.update_running_stats (the same arithmetic), in one compiled loop for
    float32/float64 running statistics whose new values are all finite."""
    if (_direct(running_mean) and _direct(running_var)
            and running_mean.dtype == running_var.dtype
            and _running_update(running_mean, running_var,
                                *_vectors(running_mean.shape[0], (mean, var), (0.0, 0.0)),
                                float(count), float(momentum)) == 0):
        return
    reference.update_running_stats(running_mean, running_var, mean, var, count, momentum, warn)


# ----------------------------------------------------------------------------------------------
# direct calls: the whole public operation on its raw arguments, for the common kind of call
# (plain C-contiguous NumPy arrays, float32/float64 vectors of one dtype, no out=). Checking
# that kind costs a few attribute reads; the operation then runs the very passes above, with the
# arguments the API's path would give them, so it computes the same bits. Anything else (and a
# batch whose running statistics would not be finite) returns None: the API then validates in
# full, explains what is wrong, or warns, and runs the operation.

_NATIVE_VECTOR_DTYPES = frozenset({np.dtype(np.float32), np.dtype(np.float64)})
_NATIVE_DTYPES = frozenset({np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)})
_STATS_DTYPES = {np.dtype(np.float16): np.dtype(np.float32),
                 np.dtype(np.float32): np.dtype(np.float32),
                 np.dtype(np.float64): np.dtype(np.float64)}
_direct_layouts = {}


def _direct_layout(x, axis):
    """(shape3, values per channel) of a C-contiguous, non-empty float array x with an int
    axis, cached per (shape, strides, dtype, axis); None for any other x."""
    key = (x.shape, x.strides, x.dtype, axis)
    entry = _direct_layouts.get(key, False)
    if entry is False:
        entry = None
        if (x.dtype in _NATIVE_DTYPES and x.ndim >= 2 and -x.ndim <= axis < x.ndim
                and x.size > 0 and x.flags.c_contiguous):
            shape3 = _layout.layout_of(x.shape, x.strides, axis % x.ndim).shape3
            entry = (shape3, shape3[0] * shape3[2])
        if len(_direct_layouts) > 1024:
            _direct_layouts.clear()
        _direct_layouts[key] = entry
    return entry


def _vector_dtype(channels, vectors):
    """The one dtype of the given vectors when each is a contiguous, writeable, native
    float32/float64 (C,) ndarray of it (float64 when none is given); None otherwise."""
    dtype = _FLOAT64
    first = True
    for v in vectors:
        if v is None:
            continue
        if type(v) is not np.ndarray or v.shape != (channels,):
            return None
        if first:
            dtype = v.dtype
            if dtype not in _NATIVE_VECTOR_DTYPES:
                return None
            first = False
        elif v.dtype != dtype:
            return None
        flags = v.flags
        if not (flags.c_contiguous and flags.writeable):
            return None
    return dtype


def _like_x(a, x):
    return type(a) is np.ndarray and a.shape == x.shape and a.strides == x.strides \
        and a.dtype == x.dtype


def _owner(a):
    return a.base is None and a.flags.owndata


def _updated_apart(running_mean, running_var, x, gamma, beta, residual):
    """Whether the running statistics (written) cannot overlap each other or any input: each
    array owns its memory and none is another, or else no two memory bounds meet (bounds that
    meet go to the API's exact checks, which decide and explain)."""
    if running_mean is running_var:
        return False
    if (running_mean.base is None and running_var.base is None and x.base is None
            and (gamma is None or gamma.base is None) and (beta is None or beta.base is None)
            and (residual is None or residual.base is None)
            and running_mean.flags.owndata and running_var.flags.owndata and x.flags.owndata
            and (gamma is None or gamma.flags.owndata) and (beta is None or beta.flags.owndata)
            and (residual is None or residual.flags.owndata)):
        # owners, and not the same arrays: an input that is one of the statistics is the one
        # case left (the statistics are distinct, their dtype and shape tell x and residual
        # apart from them)
        return gamma is not running_mean and gamma is not running_var \
            and beta is not running_mean and beta is not running_var
    if np.may_share_memory(running_mean, running_var):
        return False
    for a in (x, gamma, beta, residual):
        if a is not None and (np.may_share_memory(running_mean, a)
                              or np.may_share_memory(running_var, a)):
            return False
    return True


def _activation_tag(activation):
    """The kernels' tag of a valid activation; False for anything else."""
    if activation is None:
        return None
    if type(activation) is str:
        return _ACTIVATION_TAGS.get(activation, False)
    return False


def forward_direct(x, gamma, beta, activation, residual, axis, eps, training, running_mean,
                   running_var, momentum):
    if not (_config.CPU_DIRECT and type(x) is np.ndarray and type(axis) is int
            and type(eps) is float and 0.0 < eps < math.inf and type(momentum) is float
            and 0.0 <= momentum <= 1.0 and type(training) is bool
            and (running_mean is None) == (running_var is None)
            and (training or running_mean is not None)):
        return None
    act = _activation_tag(activation)
    if act is False or (residual is not None and not _like_x(residual, x)):
        return None
    layout = _direct_layout(x, axis)
    if layout is None:
        return None
    shape3, count = layout
    channels = shape3[1]
    sdtype = _STATS_DTYPES[x.dtype]
    y = empty_like(x)
    mean = np.empty(channels, sdtype)
    invstd = np.empty(channels, sdtype)
    residual3 = None if residual is None else residual.reshape(shape3)
    if training:
        dtype = _vector_dtype(channels, (gamma, beta))
        if dtype is None or count < 2:
            return None
        if running_mean is not None:
            running_dtype = _vector_dtype(channels, (running_mean, running_var))
            # (is None first: NumPy reads None as float64, so None == float64 is True)
            if (running_dtype is None or running_dtype != sdtype
                    or not _updated_apart(running_mean, running_var, x, gamma, beta, residual)):
                return None
        stats = np.empty((2, channels))
        weight = _constant(1.0, channels, dtype) if gamma is None else gamma
        bias = _constant(0.0, channels, dtype) if beta is None else beta
        plan = _small_plan(shape3, x.itemsize)
        if plan is not None:        # _train_pass's small call, on (outer, C) views
            rows = (shape3[0], channels)
            _rows_forward_train_whole(_bits(x).reshape(rows), weight, bias, eps,
                                      None if residual is None else _bits(residual).reshape(rows),
                                      act, plan.shift_rows, 1, 1, _bits(y).reshape(rows), stats)
        else:
            _train_pass(x.reshape(shape3), weight, bias, eps, residual3, act, y.reshape(shape3),
                        stats)
        if _finish_forward_train(stats, eps, mean, invstd, running_mean, running_var,
                                 float(count), momentum):
            return None         # (nothing updated: the API's path warns, and updates the rest)
        return y, mean, invstd
    dtype = _vector_dtype(channels, (running_mean, running_var, gamma, beta))
    if dtype is None:
        return None
    weight = _constant(1.0, channels, dtype) if gamma is None else gamma
    bias = _constant(0.0, channels, dtype) if beta is None else beta
    plan = _small_plan(shape3, x.itemsize)
    if plan is not None:            # _eval_pass's small call, on (outer, C) views
        rows = (shape3[0], channels)
        _rows_forward_eval_small(_bits(x).reshape(rows), running_mean, running_var, weight, bias,
                                 eps, None if residual is None else _bits(residual).reshape(rows),
                                 act, _bits(y).reshape(rows), np.empty((4, channels)), mean,
                                 invstd)
    else:
        _eval_pass(x.reshape(shape3), running_mean, running_var, weight, bias, eps, residual3,
                   act, y.reshape(shape3), np.empty((4, channels)), mean, invstd)
    return y, mean, invstd


def backward_direct(dy, x, mean, invstd, gamma, activation, y, residual, axis, training):
    if not (_config.CPU_DIRECT and type(x) is np.ndarray and _like_x(dy, x)
            and type(axis) is int and type(training) is bool and type(residual) is bool
            and mean is not None and invstd is not None):
        return None
    act = _activation_tag(activation)
    if act is False or (y is None and act is not None) or (y is not None and not _like_x(y, x)):
        return None
    layout = _direct_layout(x, axis)
    if layout is None:
        return None
    shape3 = layout[0]
    channels = shape3[1]
    dtype = _vector_dtype(channels, (mean, invstd, gamma))
    if dtype is None:
        return None
    dx = empty_like(x)
    dresidual = empty_like(x) if residual else None
    dgamma = np.empty(channels, dtype)
    dbeta = np.empty(channels, dtype)
    weight = _constant(1.0, channels, dtype) if gamma is None else gamma
    plan = _small_plan(shape3, x.itemsize)
    if plan is not None:            # _backward_pass's small call, on (outer, C) views
        rows = (shape3[0], channels)
        _rows_backward_whole(_bits(dy).reshape(rows), _bits(x).reshape(rows),
                             None if act is None else _bits(y).reshape(rows), act, mean, invstd,
                             weight, training, 1, 1, _bits(dx).reshape(rows),
                             None if dresidual is None else _bits(dresidual).reshape(rows),
                             dbeta, dgamma)
    else:
        _backward_pass(dy.reshape(shape3), x.reshape(shape3),
                       None if act is None else y.reshape(shape3), act, mean, invstd, weight,
                       training, dx.reshape(shape3),
                       None if dresidual is None else dresidual.reshape(shape3), dbeta, dgamma)
    return dx, dgamma, dbeta, dresidual
