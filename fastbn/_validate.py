"""Validation of every public operation's arguments, in one place (used by api and distributed).

Each check raises before anything is written, so on any error no output buffer and no running
statistic has been touched. Errors name the argument, what was expected and what was given.
Kernels assume what these functions establish.
"""
import math
import warnings
from typing import NamedTuple

import numpy as np

from ._layout import normalize_axis
from .backends._contract import ACTIVATIONS

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# (the checks below first try the common case, a plain ndarray that passes, at the cost of a few
# attribute reads; anything else takes the full path that explains what is wrong)
_FLOATS = frozenset(FLOAT_DTYPES)     # native byte order only: '>f4' is not in it
_STATS = {np.dtype(np.float16): np.dtype(np.float32), np.dtype(np.float32): np.dtype(np.float32),
          np.dtype(np.float64): np.dtype(np.float64)}


def stats_dtype(dtype):
    """float32 statistics for float16/float32 data, float64 for float64 (as PyTorch)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def values_per_channel(shape, axis):
    """How many values each channel holds: the product of every other dimension."""
    return math.prod(s for d, s in enumerate(shape) if d != axis)


def _axis(axis, x):
    if type(axis) is int and -x.ndim <= axis < x.ndim:
        return axis % x.ndim
    return normalize_axis(axis, x.ndim, x.shape)


# ----------------------------------------------------------------------------------------------
# single arguments

def _kind_errors(a, name):
    """What no backend accepts, whatever the array library: masks and foreign byte orders."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name}: expected a plain array, got a masked array (the mask would be "
                        f"ignored); pass np.ma.filled({name}) or the unmasked values")
    dtype = getattr(a, "dtype", None)
    if isinstance(dtype, np.dtype) and not dtype.isnative:
        raise TypeError(f"{name}: expected native byte order, got dtype {dtype.str!r}; convert "
                        f"with {name}.astype({name}.dtype.newbyteorder('='))")


def _is_array(a):
    """An array already (a buffer that can be written in place), not a list or a scalar."""
    return (isinstance(a, np.ndarray) or hasattr(a, "__cuda_array_interface__")
            or getattr(type(a), "__cuda_ndarray__", False))


def as_array(be, a, name):
    """The backend's array for an input, with the errors no backend accepts."""
    _kind_errors(a, name)
    a = be.asarray(a, name)
    _kind_errors(a, name)
    return a


def data(be, x, name="x"):
    if type(x) is np.ndarray and x.dtype in _FLOATS and x.ndim >= 2 and not be.ON_DEVICE:
        return x
    x = as_array(be, x, name)
    if x.dtype not in FLOAT_DTYPES:
        hint = ""
        if x.dtype.kind in "biu":
            hint = f"; convert it first, e.g. {name}.astype(np.float32)"
        raise TypeError(f"{name}: expected a floating-point array (float16, float32 or float64), "
                        f"got dtype {x.dtype}{hint}")
    if x.ndim < 2:
        raise ValueError(f"{name}: expected an array with at least 2 dimensions (batch and "
                         f"channel axes), got shape {tuple(x.shape)}")
    return x


def like(be, a, name, x, x_name="x"):
    """An x-shaped input of x's dtype (dy, residual, y)."""
    if type(a) is np.ndarray and a.shape == x.shape and a.dtype == x.dtype and not be.ON_DEVICE:
        return a
    a = as_array(be, a, name)
    if tuple(a.shape) != tuple(x.shape):
        raise ValueError(f"{name}: expected {x_name}'s shape {tuple(x.shape)}, got "
                         f"{tuple(a.shape)}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name}: expected {x_name}'s dtype {x.dtype}, got {a.dtype}")
    return a


def vector(be, v, name, channels, *, updated=False, dtype=None):
    """A (C,) per-channel float vector, or None. ``updated``: it is written in place, so it must
    already be an array of the backend (a list or tuple could not be updated) and writeable."""
    if v is None:
        return None
    if type(v) is np.ndarray and v.shape == (channels,) and v.dtype in _FLOATS \
            and (dtype is None or v.dtype == dtype) and (not updated or v.flags.writeable) \
            and not be.ON_DEVICE:
        return v
    if updated and not _is_array(v):
        raise TypeError(f"{name}: expected an array (it is updated in place), got "
                        f"{type(v).__name__}")
    v = as_array(be, v, name)
    if v.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point array (float16, float32 or float64), "
                        f"got dtype {v.dtype}")
    if dtype is not None and v.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {v.dtype}")
    if tuple(v.shape) != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},) (one value per channel), "
                         f"got {tuple(v.shape)}")
    if updated and not be.is_writeable(v):
        raise ValueError(f"{name}: expected a writeable array (it is updated in place), "
                         f"got a read-only one")
    return v


def output(be, a, name, shape, dtype):
    """A caller's output buffer, or None."""
    if a is None:
        return None
    if not _is_array(a):
        raise TypeError(f"{name}: expected an array to write into, got {type(a).__name__}")
    a = as_array(be, a, name)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(a.shape)}")
    if a.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {a.dtype}")
    if not be.is_writeable(a):
        raise ValueError(f"{name}: expected a writeable array, got a read-only one")
    return a


def split_out(out, names):
    if out is None:
        return (None,) * len(names)
    if not isinstance(out, (tuple, list)) or len(out) != len(names):
        raise TypeError(f"out: expected None or a tuple of {len(names)} arrays "
                        f"({', '.join(names)}; any may be None), got {type(out).__name__}"
                        + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    return tuple(out)


def _number(value, name):
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name}: expected a finite number, got {value!r} (too large for a "
                         f"float)") from None


def eps(value):
    v = _number(value, "eps")
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"eps: expected a positive finite number, got {value!r}")
    return v


def momentum(value):
    v = _number(value, "momentum")
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"momentum: expected a number in [0, 1], got {value!r}")
    return v


def flag(value, name):
    """Only real booleans: "False", None and 0/1 are refused rather than guessed at."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool (True or False), got {type(value).__name__} "
                        f"{value!r}")
    return bool(value)


def activation(value):
    if not (value is None or (isinstance(value, str) and value in ACTIVATIONS)):
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# overlap between arguments

def no_overlap(be, written, others, allowed=()):
    """Refuse any overlap between a written buffer and any other argument.

    ``written`` and ``others`` are sequences of (name, array or None); ``allowed`` holds
    (written name, other name) pairs that may be the very same view (the in-place calls)."""
    entries = [(n, a) for n, a in written if a is not None]
    rest = [(n, a) for n, a in others if a is not None]
    for i, (name, a) in enumerate(entries):
        for other_name, b in entries[i + 1:] + rest:
            if a is b and (name, other_name) not in allowed:
                raise ValueError(f"{name}: is the same array as {other_name}; pass separate "
                                 f"arrays")
            if not be.shares_memory(a, b):
                continue
            if (name, other_name) in allowed and same_view(be, a, b):
                continue
            raise ValueError(f"{name}: overlaps {other_name} in memory; pass separate arrays"
                             + (f" (or {other_name} itself, for an in-place call)"
                                if (name, other_name) in allowed else ""))


def same_view(be, a, b):
    return (tuple(a.shape) == tuple(b.shape) and tuple(a.strides) == tuple(b.strides)
            and a.dtype == b.dtype and be.byte_bounds(a) == be.byte_bounds(b))


# ----------------------------------------------------------------------------------------------
# whole operations

class Forward(NamedTuple):
    x: object
    gamma: object
    beta: object
    residual: object
    running_mean: object
    running_var: object
    axis: int
    eps: float
    momentum: float
    training: bool
    activation: object
    count: int
    stats_dtype: np.dtype
    y: object
    mean: object
    invstd: object


def _plain_vector(v, channels):
    return v is None or (type(v) is np.ndarray and v.shape == (channels,) and v.dtype in _FLOATS)


def _owners(*arrays):
    """Distinct arrays that each own their memory: none of them can overlap another."""
    given = [a for a in arrays if a is not None]
    for i, a in enumerate(given):
        if a.base is not None or not a.flags.owndata:
            return False
        for b in given[i + 1:]:
            if a is b:
                return False
    return True


def _apart(written, others):
    """Whether no written array's memory bounds meet another argument's (views included: a
    NumPy view of a PyTorch tensor owns nothing). Bounds only, no exact test: arrays whose
    bounds meet take the full checks, which decide and explain."""
    for i, a in enumerate(written):
        for b in written[i + 1:] + others:
            if b is not None and np.may_share_memory(a, b):
                return False
    return True


def _forward_common_case(x, gamma, beta, axis, eps_value, training, running_mean, running_var,
                         momentum_value, activation_value, residual, out, local_count):
    """The validated Forward when every argument is of the common, valid kind (plain ndarrays,
    no out=, owned buffers), at the cost of a few attribute reads; else None (the full checks
    then run and explain what is wrong)."""
    if (out is not None or type(x) is not np.ndarray or x.dtype not in _FLOATS or x.ndim < 2
            or type(axis) is not int or not -x.ndim <= axis < x.ndim
            or type(eps_value) is not float or not 0.0 < eps_value < math.inf
            or type(momentum_value) is not float or not 0.0 <= momentum_value <= 1.0
            or type(training) is not bool
            or not (activation_value is None or (type(activation_value) is str
                                                 and activation_value in ACTIVATIONS))):
        return None
    axis %= x.ndim
    channels = x.shape[axis]
    if channels == 0 or (running_mean is None) != (running_var is None):
        return None
    count = x.size // channels
    if (training and local_count and count < 2) or (not training and running_mean is None):
        return None
    if not (_plain_vector(gamma, channels) and _plain_vector(beta, channels)
            and _plain_vector(running_mean, channels) and _plain_vector(running_var, channels)):
        return None
    if residual is not None and not (type(residual) is np.ndarray and residual.shape == x.shape
                                     and residual.dtype == x.dtype):
        return None
    if training and running_mean is not None and not (
            running_mean.flags.writeable and running_var.flags.writeable
            and (_owners(running_mean, running_var, x, gamma, beta, residual)
                 or _apart((running_mean, running_var), (x, gamma, beta, residual)))):
        return None
    return Forward(x, gamma, beta, residual, running_mean, running_var, axis, eps_value,
                   momentum_value, training, activation_value, count, _STATS[x.dtype], None, None,
                   None)


def forward(be, x, gamma, beta, *, axis, eps_value, training, running_mean, running_var,
            momentum_value, activation_value=None, residual=None, out=None, local_count=True):
    """Every check of a forward call. ``local_count=False`` (the synchronized forward) leaves the
    "more than one value per channel" check to the caller, who knows the global count."""
    if not be.ON_DEVICE:
        common = _forward_common_case(x, gamma, beta, axis, eps_value, training, running_mean,
                                      running_var, momentum_value, activation_value, residual,
                                      out, local_count)
        if common is not None:
            return common
    y_out, mean_out, invstd_out = split_out(out, ("y", "mean", "invstd"))
    x = data(be, x)
    axis = _axis(axis, x)
    channels = x.shape[axis]
    count = x.size // channels if channels else values_per_channel(x.shape, axis)
    eps_value = eps(eps_value)
    momentum_value = momentum(momentum_value)
    training = flag(training, "training")
    activation_value = activation(activation_value)
    sdtype = _STATS[x.dtype]
    gamma = vector(be, gamma, "gamma", channels)
    beta = vector(be, beta, "beta", channels)
    if residual is not None:
        residual = like(be, residual, "residual", x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: expected both or neither, got only "
                         + ("running_mean" if running_var is None else "running_var"))
    running_mean = vector(be, running_mean, "running_mean", channels, updated=training)
    running_var = vector(be, running_var, "running_var", channels, updated=training)
    if training and local_count and count < 2:
        raise ValueError(f"x: expected more than 1 value per channel in training mode, got "
                         f"{count} for x of shape {tuple(x.shape)} with channel axis {axis}")
    if not training and running_mean is None:
        raise ValueError("running_mean, running_var: required when training=False, got None")
    y_out = output(be, y_out, "out[0] (y)", x.shape, x.dtype)
    mean_out = output(be, mean_out, "out[1] (mean)", (channels,), sdtype)
    invstd_out = output(be, invstd_out, "out[2] (invstd)", (channels,), sdtype)
    written = [("out[0] (y)", y_out), ("out[1] (mean)", mean_out),
               ("out[2] (invstd)", invstd_out)]
    inputs = [("x", x), ("gamma", gamma), ("beta", beta), ("residual", residual)]
    if training:
        written += [("running_mean", running_mean), ("running_var", running_var)]
    else:
        inputs += [("running_mean", running_mean), ("running_var", running_var)]
    if any(a is not None for _, a in written):
        no_overlap(be, written, inputs, allowed=(("out[0] (y)", "x"),))
    return Forward(x, gamma, beta, residual, running_mean, running_var, axis, eps_value,
                   momentum_value, training, activation_value, count, sdtype, y_out, mean_out,
                   invstd_out)


class Backward(NamedTuple):
    dy: object
    x: object
    y: object
    mean: object
    invstd: object
    gamma: object
    axis: int
    training: bool
    activation: object
    count: int
    residual: bool       #: whether dresidual is wanted
    dx: object
    dgamma: object
    dbeta: object
    dresidual: object


def _backward_common_case(dy, x, mean, invstd, gamma, axis, training, activation_value, y,
                          residual, out):
    """As _forward_common_case, for the backward (no out=: nothing written can overlap)."""
    if (out is not None or type(x) is not np.ndarray or x.dtype not in _FLOATS or x.ndim < 2
            or type(dy) is not np.ndarray or dy.shape != x.shape or dy.dtype != x.dtype
            or type(axis) is not int or not -x.ndim <= axis < x.ndim
            or type(training) is not bool or type(residual) is not bool
            or not (activation_value is None or (type(activation_value) is str
                                                 and activation_value in ACTIVATIONS))):
        return None
    if y is not None and not (type(y) is np.ndarray and y.shape == x.shape
                              and y.dtype == x.dtype):
        return None
    if activation_value is not None and y is None:
        return None
    axis %= x.ndim
    channels = x.shape[axis]
    if (channels == 0 or mean is None or invstd is None or not _plain_vector(mean, channels)
            or not _plain_vector(invstd, channels) or mean.dtype != invstd.dtype
            or not _plain_vector(gamma, channels)):
        return None
    return Backward(dy, x, y, mean, invstd, gamma, axis, training, activation_value,
                    x.size // channels, residual, None, None, None, None)


def backward(be, dy, x, mean, invstd, gamma, *, axis, training, activation_value=None, y=None,
             residual=False, out=None, fused=False):
    """Every check of a backward call (``out``: 3 entries, or 3 or 4 for the fused one)."""
    if not be.ON_DEVICE:
        common = _backward_common_case(dy, x, mean, invstd, gamma, axis, training,
                                       activation_value, y, residual, out)
        if common is not None:
            return common
    names = ("dx", "dgamma", "dbeta")
    if fused and isinstance(out, (tuple, list)) and len(out) == 4:
        names += ("dresidual",)
    outs = split_out(out, names) + (None,) * (4 - len(names))
    dx_out, dgamma_out, dbeta_out, dresidual_out = outs
    x = data(be, x)
    dy = like(be, dy, "dy", x)
    axis = _axis(axis, x)
    channels = x.shape[axis]
    training = flag(training, "training")
    residual = flag(residual, "residual")   # whether the caller wants dresidual
    activation_value = activation(activation_value)
    if activation_value is not None:
        if y is None:
            raise ValueError(f"y: expected the forward's output (activation "
                             f"{activation_value!r} needs it), got None")
        y = like(be, y, "y", x)
    elif y is not None:
        y = like(be, y, "y", x)
    if mean is None or invstd is None:
        raise ValueError("mean, invstd: expected the (C,) arrays returned by the forward call, "
                         "got None")
    mean = vector(be, mean, "mean", channels)
    invstd = vector(be, invstd, "invstd", channels)
    if mean.dtype != invstd.dtype:
        raise TypeError(f"invstd: expected mean's dtype {mean.dtype}, got {invstd.dtype}")
    gamma = vector(be, gamma, "gamma", channels)
    if dresidual_out is not None and not residual:
        raise ValueError("out[3] (dresidual): given, but residual=False; pass residual=True to "
                         "get the residual's gradient")
    dx_out = output(be, dx_out, "out[0] (dx)", x.shape, x.dtype)
    dgamma_out = output(be, dgamma_out, "out[1] (dgamma)", (channels,), mean.dtype)
    dbeta_out = output(be, dbeta_out, "out[2] (dbeta)", (channels,), mean.dtype)
    dresidual_out = output(be, dresidual_out, "out[3] (dresidual)", x.shape, x.dtype)
    written = [("out[0] (dx)", dx_out), ("out[1] (dgamma)", dgamma_out),
               ("out[2] (dbeta)", dbeta_out), ("out[3] (dresidual)", dresidual_out)]
    if any(a is not None for _, a in written):
        no_overlap(be, written, [("dy", dy), ("x", x), ("y", y), ("mean", mean),
                                 ("invstd", invstd), ("gamma", gamma)],
                   allowed=(("out[0] (dx)", "dy"),))
    count = x.size // channels if channels else values_per_channel(x.shape, axis)
    return Backward(dy, x, y, mean, invstd, gamma, axis, training, activation_value, count,
                    residual, dx_out, dgamma_out, dbeta_out,
                    dresidual_out)


def warn_nonfinite(channels, stacklevel=5):
    """The warning host backends give, through their ``warn`` argument, before they change any
    running statistic (it may raise: then nothing has changed)."""
    warnings.warn(f"batch_norm_forward: batch statistics are not finite (in the running "
                  f"statistics' dtype) in channels {channels}; their running statistics were "
                  f"left unchanged", RuntimeWarning, stacklevel=stacklevel)
