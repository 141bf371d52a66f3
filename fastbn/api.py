"""The public operations: validate -> canonical view -> allocate outputs -> dispatch.

Validation happens here, once, before anything is written: on any error no output buffer and
no running statistic has been touched. Kernels assume valid input.
"""
import math
import warnings
from typing import NamedTuple

import numpy as np

from . import backends
from ._layout import Layout, normalize_axis

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class BatchNormOutput(NamedTuple):
    """Result of :func:`batch_norm_forward`."""
    y: object        #: normalized output, x's dtype
    mean: object     #: per-channel mean used (batch mean in training, running mean in eval)
    invstd: object   #: per-channel 1/sqrt(var + eps)


class BatchNormGrads(NamedTuple):
    """Result of :func:`batch_norm_backward`."""
    dx: object
    dgamma: object
    dbeta: object


def values_per_channel(shape, axis):
    """How many values each channel holds: the product of every other dimension."""
    return math.prod(s for d, s in enumerate(shape) if d != axis)


def stats_dtype(dtype):
    """float32 statistics for float16/float32 data, float64 for float64 (as PyTorch)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


# ----------------------------------------------------------------------------------------------
# validation helpers: each error names the argument, what was expected and what was given

def _check_data(x, name="x"):
    if x.dtype not in FLOAT_DTYPES:
        hint = ""
        if x.dtype.kind in "biu":
            hint = f"; convert it first, e.g. {name}.astype(np.float32)"
        raise TypeError(f"{name}: expected a floating-point array (float16, float32 or float64), "
                        f"got dtype {x.dtype}{hint}")
    if x.ndim < 2:
        raise ValueError(f"{name}: expected an array with at least 2 dimensions (batch and "
                         f"channel axes), got shape {tuple(x.shape)}")


def _check_vector(be, v, name, channels, writeable=False, dtype=None):
    if v is None:
        return None
    v = be.asarray(v, name)
    if dtype is not None and v.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {v.dtype}")
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point array, got dtype {v.dtype}")
    if tuple(v.shape) != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},) (one value per channel), "
                         f"got {tuple(v.shape)}")
    if writeable and not be.is_writeable(v):
        raise ValueError(f"{name}: expected a writeable array (it is updated in place), "
                         f"got a read-only one")
    return v


def _check_out(be, a, name, shape, dtype, inputs=()):
    if a is None:
        return None
    a = be.asarray(a, name)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {a.dtype}")
    if not be.is_writeable(a):
        raise ValueError(f"{name}: expected a writeable array, got a read-only one")
    for other in inputs:
        if be.may_share_memory(a, other) and not _same_view(a, other):
            raise ValueError(f"{name}: overlaps an input without being the same view of it; "
                             f"pass the input itself (in place) or a separate array")
    return a


def _same_view(a, b):
    return (a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
            and _data_pointer(a) == _data_pointer(b))


def _data_pointer(a):
    iface = getattr(a, "__array_interface__", None) or a.__cuda_array_interface__
    return iface["data"][0]


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a positive finite number, got {eps!r}")
    return float(eps)


def _check_momentum(momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float, np.floating, np.integer)) \
            or not (0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
    return float(momentum)


def _split_out(out, names):
    if out is None:
        return (None,) * len(names)
    if not isinstance(out, (tuple, list)) or len(out) != len(names):
        raise TypeError(f"out: expected None or a tuple of {len(names)} arrays "
                        f"({', '.join(names)}; any may be None), got {type(out).__name__}")
    return tuple(out)


def _check_backward_inputs(be, dy, x, mean, invstd, gamma, axis):
    """The backward's input checks (shared with fastbn.distributed); returns them converted."""
    x = be.asarray(x, "x")
    _check_data(x)
    dy = be.asarray(dy, "dy")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(f"dy: expected x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy: expected x's dtype {x.dtype}, got {dy.dtype}")
    axis = normalize_axis(axis, x.ndim, x.shape)
    channels = x.shape[axis]
    mean = _check_vector(be, mean, "mean", channels)
    invstd = _check_vector(be, invstd, "invstd", channels)
    if mean is None or invstd is None:
        raise ValueError("mean, invstd: expected the (C,) arrays returned by "
                         "batch_norm_forward, got None")
    if mean.dtype != invstd.dtype:
        raise TypeError(f"invstd: expected mean's dtype {mean.dtype}, got {invstd.dtype}")
    gamma = _check_vector(be, gamma, "gamma", channels)
    return dy, x, axis, mean, invstd, gamma


# ----------------------------------------------------------------------------------------------
# canonical views

class _Canonical:
    """The (outer, C, inner) views of x-shaped arrays, with copies only where axes won't merge."""

    def __init__(self, be, x, axis):
        self.be = be
        self.layout = Layout(x.shape, x.strides, axis)

    def view(self, a):
        """A no-copy view, or a contiguous copy when a's axes do not merge."""
        layout = self.layout
        strides3 = layout.strides3(a.strides)
        if strides3 is None:
            return self.be.gather3(a, layout.perm, layout.shape3)
        return self.be.view3(a, layout.shape3, strides3)

    def output(self, a):
        """(view to write, array to return); a write-back happens in finish() when needed."""
        strides3 = self.layout.strides3(a.strides)
        if strides3 is None:
            return self.be.empty(self.layout.shape3, a.dtype), a
        return self.be.view3(a, self.layout.shape3, strides3), a

    def finish(self, view3, target):
        if not self.be.may_share_memory(view3, target):
            self.be.scatter3(target, view3, self.layout.perm)


# ----------------------------------------------------------------------------------------------
# public operations

def batch_norm_forward(x, gamma=None, beta=None, *, axis=1, eps=1e-5, training=True,
                       running_mean=None, running_var=None, momentum=0.1, out=None,
                       backend=None):
    """Batch normalization forward (Ioffe & Szegedy 2015, Algorithm 1 and 2).

    Parameters
    ----------
    x : array, float16/float32/float64, ndim >= 2
    gamma, beta : (C,) arrays or None (identity)
    axis : int
        The channel axis; every other axis is reduced over.
    eps : float
        Added to the variance, > 0.
    training : bool
        True: normalize with the batch statistics and, if given, update the running
        statistics in place. False: normalize with ``running_mean``/``running_var``.
    running_mean, running_var : (C,) float arrays or None
        Updated as ``r = (1 - momentum) r + momentum * batch`` (unbiased batch variance);
        channels whose batch statistics are not finite are left unchanged, with a warning.
    out : tuple (y, mean, invstd), optional
        Preallocated outputs; any entry may be None.
    backend : {"reference", "cpu", "cuda"}, optional

    Returns
    -------
    BatchNormOutput(y, mean, invstd)
        ``mean``/``invstd`` are float32 for float16/float32 ``x`` and float64 for float64.

    See Also
    --------
    torch.nn.functional.batch_norm, torch.native_batch_norm
    """
    y_out, mean_out, invstd_out = _split_out(out, ("y", "mean", "invstd"))
    be = backends.resolve(backend, (x, gamma, beta, running_mean, running_var,
                                    y_out, mean_out, invstd_out))
    x = be.asarray(x, "x")
    _check_data(x)
    axis = normalize_axis(axis, x.ndim, x.shape)
    channels = x.shape[axis]
    count = values_per_channel(x.shape, axis)
    eps = _check_eps(eps)
    momentum = _check_momentum(momentum)
    training = bool(training)
    sdtype = stats_dtype(x.dtype)
    gamma = _check_vector(be, gamma, "gamma", channels)
    beta = _check_vector(be, beta, "beta", channels)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both or neither, got only "
                         + ("running_mean" if running_var is None else "running_var"))
    running_mean = _check_vector(be, running_mean, "running_mean", channels, writeable=training)
    running_var = _check_vector(be, running_var, "running_var", channels, writeable=training)
    if training and count < 2:
        raise ValueError(f"x: expected more than 1 value per channel in training mode, got "
                         f"{count} for x of shape {tuple(x.shape)} with channel axis {axis}")
    if not training and running_mean is None:
        raise ValueError("running_mean, running_var: required when training=False, got None")
    y_out = _check_out(be, y_out, "out[0] (y)", x.shape, x.dtype, inputs=(x,))
    mean_out = _check_out(be, mean_out, "out[1] (mean)", (channels,), sdtype)
    invstd_out = _check_out(be, invstd_out, "out[2] (invstd)", (channels,), sdtype)
    # ---- everything is valid: from here on, nothing raises for the caller's input ----

    canon = _Canonical(be, x, axis)
    x3 = canon.view(x)
    y = be.empty_like(x) if y_out is None else y_out
    y3, y = canon.output(y)
    weight = None if gamma is None else be.to_float64(gamma)
    bias = None if beta is None else be.to_float64(beta)
    if training:
        mean64, var64 = be.forward_train(x3, weight, bias, eps, y3)
        invstd64 = be.invstd_from_var(var64, eps)
    else:
        mean64 = be.to_float64(running_mean)
        invstd64 = be.invstd_from_var(be.to_float64(running_var), eps)
        be.forward_eval(x3, mean64, invstd64, weight, bias, y3)
    canon.finish(y3, y)
    mean = be.empty((channels,), sdtype) if mean_out is None else mean_out
    invstd = be.empty((channels,), sdtype) if invstd_out is None else invstd_out
    be.copyto(mean, mean64)
    be.copyto(invstd, invstd64)
    if training and running_mean is not None:
        skipped = be.update_running_stats(running_mean, running_var, mean64, var64, count,
                                          momentum, eps)
        if len(skipped):
            warnings.warn(f"batch_norm_forward: batch statistics are not finite in channels "
                          f"{[int(c) for c in skipped]}; their running statistics were left "
                          f"unchanged", RuntimeWarning, stacklevel=2)
    return BatchNormOutput(y, mean, invstd)


def batch_norm_backward(dy, x, mean, invstd, gamma=None, *, axis=1, training=True, out=None,
                        backend=None):
    """Gradients of :func:`batch_norm_forward` with respect to x, gamma and beta.

    ``mean``/``invstd`` are the values returned by the forward call. With ``training=True``
    this is backpropagation through Algorithm 1 (the batch statistics depend on x); with
    ``training=False`` the statistics are constants and ``dx = dy * gamma * invstd``.

    Returns
    -------
    BatchNormGrads(dx, dgamma, dbeta)
        ``dx`` has x's dtype; ``dgamma``/``dbeta`` have the dtype of ``mean``/``invstd``.

    See Also
    --------
    torch.ops.aten.native_batch_norm_backward
    """
    dx_out, dgamma_out, dbeta_out = _split_out(out, ("dx", "dgamma", "dbeta"))
    be = backends.resolve(backend, (dy, x, mean, invstd, gamma, dx_out, dgamma_out, dbeta_out))
    dy, x, axis, mean, invstd, gamma = _check_backward_inputs(be, dy, x, mean, invstd, gamma,
                                                              axis)
    channels = x.shape[axis]
    dx_out = _check_out(be, dx_out, "out[0] (dx)", x.shape, x.dtype, inputs=(x, dy))
    dgamma_out = _check_out(be, dgamma_out, "out[1] (dgamma)", (channels,), mean.dtype)
    dbeta_out = _check_out(be, dbeta_out, "out[2] (dbeta)", (channels,), mean.dtype)
    # ---- everything is valid ----

    canon = _Canonical(be, x, axis)
    x3 = canon.view(x)
    dy3 = canon.view(dy)
    dx = be.empty_like(x) if dx_out is None else dx_out
    dx3, dx = canon.output(dx)
    weight = None if gamma is None else be.to_float64(gamma)
    sum_dy, sum_dy_xhat = be.backward(dy3, x3, be.to_float64(mean), be.to_float64(invstd),
                                      weight, bool(training), dx3)
    canon.finish(dx3, dx)
    dgamma = be.empty((channels,), mean.dtype) if dgamma_out is None else dgamma_out
    dbeta = be.empty((channels,), mean.dtype) if dbeta_out is None else dbeta_out
    be.copyto(dgamma, sum_dy_xhat)
    be.copyto(dbeta, sum_dy)
    return BatchNormGrads(dx, dgamma, dbeta)


def batch_norm(x, running_mean, running_var, gamma=None, beta=None, training=False,
               momentum=0.1, eps=1e-5, axis=1, backend=None):
    """Same argument order and meaning as ``torch.nn.functional.batch_norm``; returns y.

    See Also
    --------
    torch.nn.functional.batch_norm
    """
    return batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, training=training,
                              running_mean=running_mean, running_var=running_var,
                              momentum=momentum, backend=backend).y


def moments(x, *, axis=1, backend=None):
    """Per-channel mean and biased variance over every axis but ``axis``.

    Returns float32 statistics for float16/float32 x and float64 for float64 x.
    """
    be = backends.resolve(backend, (x,))
    x = be.asarray(x, "x")
    _check_data(x)
    axis = normalize_axis(axis, x.ndim, x.shape)
    channels = x.shape[axis]
    count = values_per_channel(x.shape, axis)
    if count < 1:
        raise ValueError(f"x: expected at least 1 value per channel, got 0 for x of shape "
                         f"{tuple(x.shape)} with channel axis {axis}")
    mean64, m2 = be.channel_moments(_Canonical(be, x, axis).view(x))
    sdtype = stats_dtype(x.dtype)
    mean = be.empty((channels,), sdtype)
    var = be.empty((channels,), sdtype)
    be.copyto(mean, mean64)
    be.copyto(var, be.var_from_m2(m2, count))
    return mean, var
