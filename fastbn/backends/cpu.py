"""Numba CPU kernels on the canonical ``(outer, C, inner)`` view.

Two memory regimes:

* channel-major (``inner > 1``, e.g. NCHW): each channel is ``outer`` contiguous runs of
  ``inner`` values. Threads take whole channels; statistics and normalization are fused per
  channel, so the second and third passes read the channel from cache.
* channels-last (``inner == 1``, e.g. NHWC or (N, C)): channels are contiguous across a row.
  Rows are split into fixed chunks; each chunk computes per-channel (mean, M2) by two passes
  over its cache-resident rows, and the chunk partials are merged with Chan's formula in a
  fixed order. The chunking depends on the shape only, so results do not depend on the thread
  count.

All accumulation and per-element arithmetic is float64. float16 (which Numba's CPU target does
not support) is widened to float32 at the boundary.
"""
import threading

import numpy as np
from numba import njit, prange

from .. import _config
from ._host import *  # noqa: F401,F403  (the shared host-array helpers)

name = "cpu"

# Numba's workqueue threading layer is not re-entrant; OpenMP and TBB are. Parallel launches
# take this lock so concurrent calls from Python threads are safe under any layer.
_parallel_launch = threading.Lock()


def _kernel(fn):
    """Compile fn twice: serial for small tensors, parallel for large ones."""
    return (njit(**_config.JIT_OPTIONS)(fn),
            njit(parallel=True, **_config.JIT_OPTIONS)(fn))


def _launch(pair, size, *args):
    serial, parallel = pair
    if size < _config.CPU_PARALLEL_MIN_SIZE:
        return serial(*args)
    with _parallel_launch:
        return parallel(*args)


def _rows_per_chunk(channels):
    return max(1, _config.CPU_CHUNK_ELEMENTS // max(channels, 1))


# ----------------------------------------------------------------------------------------------
# channel-major kernels (inner > 1)

def _channel_major_moments(x, c):
    """Compensated two-pass mean and M2 of one channel, in float64."""
    outer, inner = x.shape[0], x.shape[2]
    total = 0.0
    for o in range(outer):
        for i in range(inner):
            total += np.float64(x[o, c, i])
    count = outer * inner
    mean = total / count
    m2 = 0.0
    residual = 0.0
    for o in range(outer):
        for i in range(inner):
            d = np.float64(x[o, c, i]) - mean
            m2 += d * d
            residual += d
    # the residual sum corrects the rounding of the mean (Bjorck's corrected two-pass)
    return mean + residual / count, m2 - residual * residual / count


_channel_major_moments_jit = njit(inline="always", **_config.JIT_OPTIONS)(_channel_major_moments)


def _moments_channel_major_impl(x, mean, m2):
    for c in prange(x.shape[1]):
        mean[c], m2[c] = _channel_major_moments_jit(x, c)


def _forward_train_channel_major_impl(x, weight, bias, eps, y, mean, var):
    outer, channels, inner = x.shape
    count = outer * inner
    for c in prange(channels):
        mu, m2 = _channel_major_moments_jit(x, c)
        mean[c] = mu
        var[c] = m2 / count
        scale = weight[c] / np.sqrt(m2 / count + eps)
        shift = bias[c]
        for o in range(outer):
            for i in range(inner):
                y[o, c, i] = (np.float64(x[o, c, i]) - mu) * scale + shift


def _normalize_channel_major_impl(x, mean, scale, shift, y):
    outer, channels, inner = x.shape
    for oc in prange(outer * channels):
        o = oc // channels
        c = oc - o * channels
        mu, s, b = mean[c], scale[c], shift[c]
        for i in range(inner):
            y[o, c, i] = (np.float64(x[o, c, i]) - mu) * s + b


def _backward_channel_major_impl(dy, x, mean, invstd, weight, training, dx, sum_dy, sum_dy_xhat):
    outer, channels, inner = x.shape
    count = outer * inner
    for c in prange(channels):
        mu = mean[c]
        s_dy = 0.0
        s_dy_xc = 0.0
        s_xc = 0.0
        for o in range(outer):
            for i in range(inner):
                g = np.float64(dy[o, c, i])
                xc = np.float64(x[o, c, i]) - mu
                s_dy += g
                s_dy_xc += g * xc
                s_xc += xc
        if training:
            # re-centre on the exact batch mean (the saved mean may be rounded to float32)
            shift = s_xc / count
            mu += shift
            s_dy_xc -= shift * s_dy
        sum_dy[c] = s_dy
        sum_dy_xhat[c] = s_dy_xc * invstd[c]
        a = weight[c] * invstd[c]
        if training:
            mean_dy = s_dy / count
            b = invstd[c] * invstd[c] * s_dy_xc / count
        else:
            mean_dy = 0.0
            b = 0.0
        for o in range(outer):
            for i in range(inner):
                dx[o, c, i] = a * (np.float64(dy[o, c, i]) - mean_dy
                                   - (np.float64(x[o, c, i]) - mu) * b)


# ----------------------------------------------------------------------------------------------
# channels-last kernels (inner == 1): x is the (rows, C) matrix

def _chunk_moments(x, rows, chunk, part_mean, part_m2):
    """Two passes over one cache-resident chunk of rows: per-channel mean, then M2."""
    n_rows, channels = x.shape
    r0 = chunk * rows
    r1 = min(r0 + rows, n_rows)
    for c in range(channels):
        part_mean[chunk, c] = 0.0
        part_m2[chunk, c] = 0.0
    for r in range(r0, r1):
        for c in range(channels):
            part_mean[chunk, c] += np.float64(x[r, c])
    for c in range(channels):
        part_mean[chunk, c] /= r1 - r0
    for r in range(r0, r1):
        for c in range(channels):
            d = np.float64(x[r, c]) - part_mean[chunk, c]
            part_m2[chunk, c] += d * d


_chunk_moments_jit = njit(inline="always", **_config.JIT_OPTIONS)(_chunk_moments)


def _moments_channels_last_impl(x, rows, mean, m2):
    n_rows, channels = x.shape
    n_chunks = (n_rows + rows - 1) // rows
    part_mean = np.empty((n_chunks, channels))
    part_m2 = np.empty((n_chunks, channels))
    for chunk in prange(n_chunks):
        _chunk_moments_jit(x, rows, chunk, part_mean, part_m2)
    # Chan et al.: merge (n_a, mean_a, M2_a) with (n_b, mean_b, M2_b), chunks in order
    for c in prange(channels):
        n_a = float(min(rows, n_rows))
        mean_a = part_mean[0, c]
        m2_a = part_m2[0, c]
        for chunk in range(1, n_chunks):
            n_b = float(min(rows, n_rows - chunk * rows))
            delta = part_mean[chunk, c] - mean_a
            n_ab = n_a + n_b
            mean_a += delta * (n_b / n_ab)
            m2_a += part_m2[chunk, c] + delta * delta * (n_a * n_b / n_ab)
            n_a = n_ab
        mean[c] = mean_a
        m2[c] = m2_a


def _normalize_channels_last_impl(x, rows, mean, scale, shift, y):
    n_rows, channels = x.shape
    n_chunks = (n_rows + rows - 1) // rows
    for chunk in prange(n_chunks):
        for r in range(chunk * rows, min((chunk + 1) * rows, n_rows)):
            for c in range(channels):
                y[r, c] = (np.float64(x[r, c]) - mean[c]) * scale[c] + shift[c]


def _backward_sums_channels_last_impl(dy, x, rows, mean, s_dy, s_dy_xc, s_xc):
    n_rows, channels = x.shape
    n_chunks = (n_rows + rows - 1) // rows
    part = np.zeros((n_chunks, 3, channels))
    for chunk in prange(n_chunks):
        for r in range(chunk * rows, min((chunk + 1) * rows, n_rows)):
            for c in range(channels):
                g = np.float64(dy[r, c])
                xc = np.float64(x[r, c]) - mean[c]
                part[chunk, 0, c] += g
                part[chunk, 1, c] += g * xc
                part[chunk, 2, c] += xc
    for c in prange(channels):
        a = 0.0
        b = 0.0
        d = 0.0
        for chunk in range(n_chunks):
            a += part[chunk, 0, c]
            b += part[chunk, 1, c]
            d += part[chunk, 2, c]
        s_dy[c] = a
        s_dy_xc[c] = b
        s_xc[c] = d


def _backward_apply_channels_last_impl(dy, x, rows, mu, a, mean_dy, b, dx):
    n_rows, channels = x.shape
    n_chunks = (n_rows + rows - 1) // rows
    for chunk in prange(n_chunks):
        for r in range(chunk * rows, min((chunk + 1) * rows, n_rows)):
            for c in range(channels):
                dx[r, c] = a[c] * (np.float64(dy[r, c]) - mean_dy[c]
                                   - (np.float64(x[r, c]) - mu[c]) * b[c])


_moments_channel_major = _kernel(_moments_channel_major_impl)
_forward_train_channel_major = _kernel(_forward_train_channel_major_impl)
_normalize_channel_major = _kernel(_normalize_channel_major_impl)
_backward_channel_major = _kernel(_backward_channel_major_impl)
_moments_channels_last = _kernel(_moments_channels_last_impl)
_normalize_channels_last = _kernel(_normalize_channels_last_impl)
_backward_sums_channels_last = _kernel(_backward_sums_channels_last_impl)
_backward_apply_channels_last = _kernel(_backward_apply_channels_last_impl)


# ----------------------------------------------------------------------------------------------
# operations (the same names in every backend)

def _widen(a):
    """Numba's CPU target has no float16: compute float16 tensors in float32."""
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _output_for(out3):
    return np.empty(out3.shape, np.float32) if out3.dtype == np.float16 else out3


def _finish(tmp, out3):
    if tmp is not out3:
        np.copyto(out3, tmp, casting="unsafe")


def _ones(channels):
    return np.ones(channels)


def _zeros(channels):
    return np.zeros(channels)


def channel_moments(x3):
    x3 = _widen(x3)
    channels = x3.shape[1]
    mean = np.empty(channels)
    m2 = np.empty(channels)
    if channels == 0 or x3.size == 0:
        mean.fill(np.nan)
        m2.fill(np.nan)
        return mean, m2
    if x3.shape[2] == 1:
        _launch(_moments_channels_last, x3.size, x3[:, :, 0], _rows_per_chunk(channels), mean, m2)
    else:
        _launch(_moments_channel_major, x3.size, x3, mean, m2)
    return mean, m2


def forward_train(x3, weight, bias, eps, y3):
    channels = x3.shape[1]
    weight = _ones(channels) if weight is None else weight
    bias = _zeros(channels) if bias is None else bias
    if x3.shape[2] == 1:
        mean, m2 = channel_moments(x3)
        var = m2 / x3.shape[0]
        forward_eval(x3, mean, 1.0 / np.sqrt(var + eps), weight, bias, y3)
        return mean, var
    x = _widen(x3)
    y = _output_for(y3)
    mean = np.empty(channels)
    var = np.empty(channels)
    _launch(_forward_train_channel_major, x.size, x, weight, bias, float(eps), y, mean, var)
    _finish(y, y3)
    return mean, var


def forward_eval(x3, mean, invstd, weight, bias, y3):
    channels = x3.shape[1]
    scale = invstd if weight is None else weight * invstd
    shift = _zeros(channels) if bias is None else bias
    if x3.size == 0:
        return
    x = _widen(x3)
    y = _output_for(y3)
    if x.shape[2] == 1:
        _launch(_normalize_channels_last, x.size, x[:, :, 0], _rows_per_chunk(channels),
                mean, scale, shift, y[:, :, 0])
    else:
        _launch(_normalize_channel_major, x.size, x, mean, scale, shift, y)
    _finish(y, y3)


def backward(dy3, x3, mean, invstd, weight, training, dx3):
    channels = x3.shape[1]
    weight = _ones(channels) if weight is None else weight
    sum_dy = np.zeros(channels)
    sum_dy_xhat = np.zeros(channels)
    if x3.size == 0:
        return sum_dy, sum_dy_xhat
    dy = _widen(dy3)
    x = _widen(x3)
    dx = _output_for(dx3)
    if x.shape[2] == 1:
        count = x.shape[0]
        rows = _rows_per_chunk(channels)
        s_dy_xc = np.empty(channels)
        s_xc = np.empty(channels)
        _launch(_backward_sums_channels_last, x.size, dy[:, :, 0], x[:, :, 0], rows, mean,
                sum_dy, s_dy_xc, s_xc)
        mu = mean
        if training:
            shift = s_xc / count                 # re-centre on the exact batch mean
            mu = mean + shift
            s_dy_xc = s_dy_xc - shift * sum_dy
        sum_dy_xhat = s_dy_xc * invstd
        a = weight * invstd
        if training:
            mean_dy, b = sum_dy / count, invstd * invstd * s_dy_xc / count
        else:
            mean_dy, b = _zeros(channels), _zeros(channels)
        _launch(_backward_apply_channels_last, x.size, dy[:, :, 0], x[:, :, 0], rows,
                mu, a, mean_dy, b, dx[:, :, 0])
    else:
        _launch(_backward_channel_major, x.size, dy, x, mean, invstd, weight, bool(training),
                dx, sum_dy, sum_dy_xhat)
    _finish(dx, dx3)
    return sum_dy, sum_dy_xhat
