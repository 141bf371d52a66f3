"""NumPy float64 reference: the paper's formulas, written to be read, not to be fast.

Arrays are the canonical ``(outer, C, inner)`` view; a channel is everything on axes 0 and 2.
Every backend must agree with this module (see tests/). The math is in docs/math.md.
"""
import numpy as np

from ._host import *  # noqa: F401,F403  (the shared host-array helpers)
from ._host import to_float64

name = "reference"
REDUCE = (0, 2)   # the per-channel reduction axes of the canonical view


def _per_channel(v):
    """Broadcast a (C,) vector against the (outer, C, inner) view."""
    return v[None, :, None]


def channel_moments(x3):
    """Two-pass, in float64: mean, then the sum of squared deviations M2 (Algorithm 1's stats)."""
    x = x3.astype(np.float64)
    mean = x.mean(axis=REDUCE)
    m2 = ((x - _per_channel(mean)) ** 2).sum(axis=REDUCE)
    return mean, m2


def forward_train(x3, weight, bias, eps, y3):
    """Algorithm 1: normalize with the mini-batch mean and biased variance, then scale and shift."""
    count = x3.shape[0] * x3.shape[2]
    mean, m2 = channel_moments(x3)
    var = m2 / count                        # biased: sigma_B^2 = 1/m sum (x - mu_B)^2
    forward_eval(x3, mean, 1.0 / np.sqrt(var + eps), weight, bias, y3)
    return mean, var


def forward_eval(x3, mean, invstd, weight, bias, y3):
    """y = gamma * (x - mean) * invstd + beta, with the statistics given (Algorithm 2, step 11)."""
    xhat = (x3.astype(np.float64) - _per_channel(mean)) * _per_channel(invstd)
    y = xhat if weight is None else xhat * _per_channel(weight)
    if bias is not None:
        y = y + _per_channel(bias)
    y3[...] = y


def backward(dy3, x3, mean, invstd, weight, training, dx3):
    """Backpropagation through Algorithm 1 (paper section 3) or through the frozen eval transform.

    In training mode the saved mean is re-centred on the exact batch mean: a mean saved in
    float32 is rounded, and for data whose mean is large against its spread that rounding would
    otherwise show up in every gradient.
    """
    count = x3.shape[0] * x3.shape[2]
    dy = dy3.astype(np.float64)
    centered = x3.astype(np.float64) - _per_channel(mean)
    if training:
        centered -= centered.mean(axis=REDUCE, keepdims=True)
    xhat = centered * _per_channel(invstd)
    sum_dy = dy.sum(axis=REDUCE)                       # dL/dbeta
    sum_dy_xhat = (dy * xhat).sum(axis=REDUCE)         # dL/dgamma
    gamma = np.ones_like(invstd) if weight is None else weight
    if training:
        # dL/dx = gamma/sigma * (dy - mean(dy) - xhat * mean(dy * xhat))
        dx = _per_channel(gamma * invstd) * (
            dy - _per_channel(sum_dy / count) - xhat * _per_channel(sum_dy_xhat / count))
    else:
        dx = dy * _per_channel(gamma * invstd)
    dx3[...] = dx
    return sum_dy, sum_dy_xhat


def backward_reduce(dy3, x3, mean):
    """Backward's per-channel reductions alone: sum(dy), sum(dy * (x - mean)), sum(x - mean).
    The synchronized backward (fastbn.distributed) adds them over processes, then calls
    backward_apply with coefficients from the global sums."""
    dy = dy3.astype(np.float64)
    centered = x3.astype(np.float64) - _per_channel(mean)
    return dy.sum(axis=REDUCE), (dy * centered).sum(axis=REDUCE), centered.sum(axis=REDUCE)


def backward_apply(dy3, x3, mean, scale, mean_dy, coef, dx3):
    """dx = scale * (dy - mean_dy - (x - mean) * coef): backward's last step, per-channel
    coefficients given (for Algorithm 1: scale = gamma * invstd, mean_dy = mean(dy),
    coef = invstd^2 * mean(dy * (x - mean)))."""
    dx3[...] = _per_channel(scale) * (dy3.astype(np.float64) - _per_channel(mean_dy)
                                      - (x3.astype(np.float64) - _per_channel(mean))
                                      * _per_channel(coef))
