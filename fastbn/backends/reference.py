"""NumPy float64 reference: the paper's formulas, written to be read, not to be fast.

Arrays are the canonical ``(outer, C, inner)`` view; a channel is everything on axes 0 and 2.
Every operation of the contract (``_contract.py``) is here, with the same parameters as in every
backend. Every backend must agree with this module (see tests/). The math is in docs/math.md.
"""
import numpy as np

from ._host import *  # noqa: F401,F403  (the shared host-array helpers)

name = "reference"
REDUCE = (0, 2)   # the per-channel reduction axes of the canonical view


def _per_channel(v):
    """A (C,) vector as float64, broadcast against the (outer, C, inner) view."""
    return np.asarray(v, dtype=np.float64)[None, :, None]


def _values(a3):
    return a3.astype(np.float64)


def _activate(z, activation):
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))
    return z


def _activation_grad(dy, y3, activation):
    """dL/dz from dL/dy, with the activation's derivative recovered from its output y."""
    if activation == "relu":
        return np.where(_values(y3) > 0.0, dy, 0.0)
    if activation == "sigmoid":
        y = _values(y3)
        return dy * y * (1.0 - y)
    return dy


def channel_moments(x3):
    """Two-pass, in float64: mean, then the sum of squared deviations M2 (Algorithm 1's stats)."""
    x = _values(x3)
    if x.shape[0] * x.shape[2] == 0:
        nan = np.full(x.shape[1], np.nan)
        return nan, nan.copy()
    mean = x.mean(axis=REDUCE)
    m2 = ((x - mean[None, :, None]) ** 2).sum(axis=REDUCE)
    return mean, m2


def moments(x3, mean, var):
    """Per-channel mean and biased variance (sigma_B^2 = M2 / m)."""
    batch_mean, m2 = channel_moments(x3)
    mean[...] = batch_mean
    var[...] = m2 / (x3.shape[0] * x3.shape[2])


def _normalize(x3, mean, invstd, weight, bias, activation, residual3, y3):
    """y = act(gamma * (x - mean) * invstd + beta + residual)."""
    z = (_values(x3) - _per_channel(mean)) * _per_channel(invstd)
    if weight is not None:
        z = z * _per_channel(weight)
    if bias is not None:
        z = z + _per_channel(bias)
    if residual3 is not None:
        z = z + _values(residual3)
    y3[...] = _activate(z, activation)


def forward_train(x3, weight, bias, eps, momentum, running_mean, running_var, activation,
                  residual3, warn, y3, mean, invstd):
    """Algorithm 1: normalize with the mini-batch mean and biased variance, scale and shift;
    then the moving averages that stand in for Algorithm 2's population statistics."""
    count = x3.shape[0] * x3.shape[2]
    batch_mean, m2 = channel_moments(x3)
    batch_var = m2 / count                   # biased: sigma_B^2 = 1/m sum (x - mu_B)^2
    batch_invstd = 1.0 / np.sqrt(batch_var + eps)
    _normalize(x3, batch_mean, batch_invstd, weight, bias, activation, residual3, y3)
    mean[...] = batch_mean
    with np.errstate(over="ignore"):
        invstd[...] = batch_invstd
    if running_mean is not None:
        update_running_stats(running_mean, running_var, batch_mean, batch_var, count, momentum,
                             warn)


def forward_eval(x3, weight, bias, running_mean, running_var, eps, activation, residual3, y3,
                 mean, invstd):
    """Algorithm 2, step 11: y = gamma * (x - E[x]) / sqrt(Var[x] + eps) + beta."""
    population_invstd = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
    _normalize(x3, running_mean, population_invstd, weight, bias, activation, residual3, y3)
    mean[...] = running_mean
    with np.errstate(over="ignore"):
        invstd[...] = population_invstd


def backward(dy3, x3, mean, invstd, weight, training, activation, y3, dx3, dgamma, dbeta,
             dresidual3):
    """Backpropagation through Algorithm 1 (paper section 3) or through the frozen eval transform,
    after the activation (its derivative from the output y).

    In training mode the saved mean is re-centred on the exact batch mean: a mean saved in
    float32 is rounded, and for data whose mean is large against its spread that rounding would
    otherwise show up in every gradient.
    """
    count = x3.shape[0] * x3.shape[2]
    dz = _activation_grad(_values(dy3), y3, activation)
    centered = _values(x3) - _per_channel(mean)
    if training and count > 0:
        centered -= centered.mean(axis=REDUCE, keepdims=True)
    xhat = centered * _per_channel(invstd)
    sum_dz = dz.sum(axis=REDUCE)                       # dL/dbeta
    sum_dz_xhat = (dz * xhat).sum(axis=REDUCE)         # dL/dgamma
    gamma = np.ones(x3.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    scale = _per_channel(gamma * np.asarray(invstd, dtype=np.float64))
    if training and count > 0:
        # dL/dx = gamma/sigma * (dz - mean(dz) - xhat * mean(dz * xhat))
        dx = scale * (dz - _per_channel(sum_dz / count) - xhat * _per_channel(sum_dz_xhat / count))
    else:
        dx = dz * scale
    if dresidual3 is not None:
        dresidual3[...] = dz
    dx3[...] = dx
    dgamma[...] = sum_dz_xhat
    dbeta[...] = sum_dz


def backward_reduce(dy3, x3, mean):
    """Backward's per-channel reductions alone: sum(dy), sum(dy * (x - mean)), sum(x - mean).
    The synchronized backward (fastbn.distributed) adds them over processes, then calls
    backward_apply with coefficients from the global sums."""
    dy = _values(dy3)
    centered = _values(x3) - _per_channel(mean)
    return np.stack([dy.sum(axis=REDUCE), (dy * centered).sum(axis=REDUCE),
                     centered.sum(axis=REDUCE)])


def backward_apply(dy3, x3, mean, scale, mean_dy, coef, dx3):
    """dx = scale * (dy - mean_dy - (x - mean) * coef): backward's last step, per-channel
    coefficients given (for Algorithm 1: scale = gamma * invstd, mean_dy = mean(dy),
    coef = invstd^2 * mean(dy * (x - mean)))."""
    dx3[...] = _per_channel(scale) * (_values(dy3) - _per_channel(mean_dy)
                                      - (_values(x3) - _per_channel(mean)) * _per_channel(coef))


def update_running_stats(running_mean, running_var, mean, var, count, momentum, warn):
    """r = (1 - momentum) r + momentum * batch, with the unbiased variance var * m / (m - 1).

    A channel whose new running statistics are not finite in the running statistics' own dtype
    (a non-finite batch, or a value that overflows float16/float32) keeps its old ones; ``warn``
    is told which, before anything changes."""
    with np.errstate(over="ignore", invalid="ignore"):
        unbiased = np.asarray(var, dtype=np.float64) * (count / (count - 1))
        new_mean = ((1.0 - momentum) * running_mean.astype(np.float64)
                    + momentum * np.asarray(mean, dtype=np.float64)).astype(running_mean.dtype)
        new_var = ((1.0 - momentum) * running_var.astype(np.float64)
                   + momentum * unbiased).astype(running_var.dtype)
    finite = np.isfinite(new_mean) & np.isfinite(new_var)
    if not finite.all() and warn is not None:
        warn([int(c) for c in np.flatnonzero(~finite)])
    np.copyto(running_mean, new_mean, where=finite)
    np.copyto(running_var, new_var, where=finite)
