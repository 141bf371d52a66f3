"""The public operations: validate -> canonical view -> allocate outputs -> one backend call.

The common kind of call (no ``out=``, no ``stream=``) first offers its raw arguments to the
backend's ``forward_direct``/``backward_direct``, which the cpu backend runs at the cost of a
few attribute reads when they are plain C-contiguous NumPy arrays (the same passes, the same
bits); any other call, and every call that is not valid, takes the path below.

Validation (``_validate.py``) happens first, once: on any error no output buffer and no running
statistic has been touched. Then each operation is a single call of the backend's operation of
the same name (``backends/_contract.py``), which writes every output and updates the running
statistics itself. Nothing per channel is computed here.
"""
from typing import NamedTuple

import numpy as np

from . import _validate, backends
from ._layout import layout_of, normalize_axis
from ._validate import FLOAT_DTYPES, stats_dtype, values_per_channel  # noqa: F401 (re-exported)


class BatchNormOutput(NamedTuple):
    """Result of :func:`batch_norm_forward` and :func:`batch_norm_act_forward`."""
    y: object        #: normalized output, x's dtype
    mean: object     #: per-channel mean used (batch mean in training, running mean in eval)
    invstd: object   #: per-channel 1/sqrt(var + eps)


class BatchNormGrads(NamedTuple):
    """Result of :func:`batch_norm_backward`."""
    dx: object
    dgamma: object
    dbeta: object


class BatchNormActGrads(NamedTuple):
    """Result of :func:`batch_norm_act_backward`."""
    dx: object
    dgamma: object
    dbeta: object
    dresidual: object    #: None unless residual=True


# ----------------------------------------------------------------------------------------------
# canonical views

class Canonical:
    """The (outer, C, inner) views of x-shaped arrays, with copies only where axes won't merge."""

    __slots__ = ("be", "layout")

    def __init__(self, be, x, axis):
        self.be = be
        self.layout = layout_of(tuple(x.shape), tuple(x.strides), axis)

    def view(self, a):
        """A no-copy view, or a contiguous copy when a's axes do not merge."""
        if a is None:
            return None
        layout = self.layout
        strides3 = layout.strides3(a.strides)
        if strides3 is None:
            return self.be.gather3(a, layout.perm, layout.shape3)
        return self.be.view3(a, layout.shape3, strides3)

    def output(self, a):
        """(view to write for output a, whether it is a separate copy that finish() must write
        back into a)."""
        strides3 = self.layout.strides3(a.strides)
        if strides3 is None:
            return self.be.empty(self.layout.shape3, a.dtype), True
        return self.be.view3(a, self.layout.shape3, strides3), False

    def finish(self, view3, copied, target):
        if copied:
            self.be.scatter3(target, view3, self.layout.perm)


# ----------------------------------------------------------------------------------------------
# public operations

def _forward(x, gamma, beta, activation, residual, axis, eps, training, running_mean,
             running_var, momentum, out, backend, stream):
    if out is None and stream is None:
        be = backends.resolve(backend, (x, gamma, beta, residual, running_mean, running_var))
        done = be.forward_direct(x, gamma, beta, activation, residual, axis, eps, training,
                                 running_mean, running_var, momentum)
        if done is not None:
            return BatchNormOutput(*done)
        return _forward_on(be, x, gamma, beta, activation, residual, axis, eps, training,
                           running_mean, running_var, momentum, out)
    outs = () if out is None else tuple(out) if isinstance(out, (tuple, list)) else (out,)
    be = backends.resolve(backend, (x, gamma, beta, residual, running_mean, running_var) + outs)
    if stream is not None:
        with backends.launch_stream(be, stream):
            return _forward_on(be, x, gamma, beta, activation, residual, axis, eps, training,
                               running_mean, running_var, momentum, out)
    return _forward_on(be, x, gamma, beta, activation, residual, axis, eps, training,
                       running_mean, running_var, momentum, out)


def _forward_on(be, x, gamma, beta, activation, residual, axis, eps, training, running_mean,
                running_var, momentum, out):
    a = _validate.forward(be, x, gamma, beta, axis=axis, eps_value=eps, training=training,
                          running_mean=running_mean, running_var=running_var,
                          momentum_value=momentum, activation_value=activation,
                          residual=residual, out=out)
    # ---- everything is valid: from here on, nothing raises for the caller's input ----
    canon = Canonical(be, a.x, a.axis)
    channels = a.x.shape[a.axis]
    y = be.empty_like(a.x) if a.y is None else a.y
    mean = be.empty((channels,), a.stats_dtype) if a.mean is None else a.mean
    invstd = be.empty((channels,), a.stats_dtype) if a.invstd is None else a.invstd
    x3 = canon.view(a.x)
    y3, y_copied = canon.output(y)
    if a.training:
        be.forward_train(x3, a.gamma, a.beta, a.eps, a.momentum, a.running_mean, a.running_var,
                         a.activation, canon.view(a.residual), _validate.warn_nonfinite, y3,
                         mean, invstd)
    else:
        be.forward_eval(x3, a.gamma, a.beta, a.running_mean, a.running_var, a.eps, a.activation,
                        canon.view(a.residual), y3, mean, invstd)
    canon.finish(y3, y_copied, y)
    return BatchNormOutput(be.result(y), be.result(mean), be.result(invstd))


def _backward(dy, y, x, mean, invstd, gamma, activation, residual, axis, training, out,
              backend, fused, stream):
    if out is None and stream is None:
        be = backends.resolve(backend, (dy, x, y, mean, invstd, gamma))
        done = be.backward_direct(dy, x, mean, invstd, gamma, activation, y, residual, axis,
                                  training)
        if done is not None:
            return done
        return _backward_on(be, dy, y, x, mean, invstd, gamma, activation, residual, axis,
                            training, out, fused)
    outs = () if out is None else tuple(out) if isinstance(out, (tuple, list)) else (out,)
    be = backends.resolve(backend, (dy, x, y, mean, invstd, gamma) + outs)
    if stream is not None:
        with backends.launch_stream(be, stream):
            return _backward_on(be, dy, y, x, mean, invstd, gamma, activation, residual, axis,
                                training, out, fused)
    return _backward_on(be, dy, y, x, mean, invstd, gamma, activation, residual, axis, training,
                        out, fused)


def _backward_on(be, dy, y, x, mean, invstd, gamma, activation, residual, axis, training, out,
                 fused):
    a = _validate.backward(be, dy, x, mean, invstd, gamma, axis=axis, training=training,
                           activation_value=activation, y=y, residual=residual, out=out,
                           fused=fused)
    # ---- everything is valid ----
    canon = Canonical(be, a.x, a.axis)
    channels = a.x.shape[a.axis]
    dx = be.empty_like(a.x) if a.dx is None else a.dx
    dgamma = be.empty((channels,), a.mean.dtype) if a.dgamma is None else a.dgamma
    dbeta = be.empty((channels,), a.mean.dtype) if a.dbeta is None else a.dbeta
    dresidual = None
    if a.residual:
        dresidual = be.empty_like(a.x) if a.dresidual is None else a.dresidual
    dx3, dx_copied = canon.output(dx)
    dresidual3, dresidual_copied = (None, False) if dresidual is None \
        else canon.output(dresidual)
    be.backward(canon.view(a.dy), canon.view(a.x), a.mean, a.invstd, a.gamma, a.training,
                a.activation, canon.view(a.y) if a.activation is not None else None, dx3, dgamma,
                dbeta, dresidual3)
    canon.finish(dx3, dx_copied, dx)
    canon.finish(dresidual3, dresidual_copied, dresidual)
    return (be.result(dx), be.result(dgamma), be.result(dbeta),
            None if dresidual is None else be.result(dresidual))


def batch_norm_forward(x, gamma=None, beta=None, *, axis=1, eps=1e-5, training=True,
                       running_mean=None, running_var=None, momentum=0.1, out=None,
                       backend=None, stream=None):
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
        channels whose new statistics would not be finite (in the running statistics' dtype)
        are left unchanged, with a RuntimeWarning issued before any of them changes.
    out : tuple (y, mean, invstd), optional
        Preallocated outputs; any entry may be None. ``y`` may be ``x`` itself (in place).
    backend : {"reference", "cpu", "cuda"}, optional
    stream : numba stream or int handle, optional
        cuda only: the stream to launch on. Default: the stream the inputs name in
        ``__cuda_array_interface__`` (PyTorch: ``torch.cuda.current_stream()``), see
        docs/cuda.md.

    Returns
    -------
    BatchNormOutput(y, mean, invstd)
        ``mean``/``invstd`` are float32 for float16/float32 ``x`` and float64 for float64.

    See Also
    --------
    torch.nn.functional.batch_norm, torch.native_batch_norm
    """
    return _forward(x, gamma, beta, None, None, axis, eps, training, running_mean, running_var,
                    momentum, out, backend, stream)


def batch_norm_act_forward(x, gamma, beta, *, activation="relu", residual=None, axis=1, eps=1e-5,
                           training=True, running_mean=None, running_var=None, momentum=0.1,
                           out=None, backend=None, stream=None):
    """Batch norm, plus a residual, then an activation, in the passes of batch norm alone:
    ``y = act(gamma * xhat + beta + residual)``.

    Parameters
    ----------
    activation : {None, "relu", "sigmoid"}
    residual : array or None
        x-shaped, x's dtype; added before the activation (ResNet's ``relu(bn(x) + identity)``).

    Every other argument is that of :func:`batch_norm_forward`.

    Returns
    -------
    BatchNormOutput(y, mean, invstd)

    See Also
    --------
    batch_norm_act_backward, torch.nn.functional.batch_norm, torch.nn.functional.relu
    """
    return _forward(x, gamma, beta, activation, residual, axis, eps, training, running_mean,
                    running_var, momentum, out, backend, stream)


def batch_norm_backward(dy, x, mean, invstd, gamma=None, *, axis=1, training=True, out=None,
                        backend=None, stream=None):
    """Gradients of :func:`batch_norm_forward` with respect to x, gamma and beta.

    ``mean``/``invstd`` are the values returned by the forward call. With ``training=True``
    this is backpropagation through Algorithm 1 (the batch statistics depend on x); with
    ``training=False`` the statistics are constants and ``dx = dy * gamma * invstd``.

    Returns
    -------
    BatchNormGrads(dx, dgamma, dbeta)
        ``dx`` has x's dtype; ``dgamma``/``dbeta`` have the dtype of ``mean``/``invstd``.
        ``out=(dy, None, None)`` computes dx in place.

    See Also
    --------
    torch.ops.aten.native_batch_norm_backward
    """
    dx, dgamma, dbeta, _ = _backward(dy, None, x, mean, invstd, gamma, None, False, axis,
                                     training, out, backend, False, stream)
    return BatchNormGrads(dx, dgamma, dbeta)


def batch_norm_act_backward(dy, y, x, mean, invstd, gamma, *, activation="relu", residual=False,
                            axis=1, training=True, out=None, backend=None, stream=None):
    """Gradients of :func:`batch_norm_act_forward` with respect to x, gamma, beta and the residual.

    The activation's derivative is recovered from the forward's output ``y`` (relu: y > 0;
    sigmoid: y (1 - y)), so nothing else needs saving. ``residual=True`` also returns the
    residual's gradient (dy through the activation).

    Returns
    -------
    BatchNormActGrads(dx, dgamma, dbeta, dresidual)
        ``dresidual`` is None unless ``residual=True``. ``out`` is (dx, dgamma, dbeta) or
        (dx, dgamma, dbeta, dresidual), any entry None.
    """
    return BatchNormActGrads(*_backward(dy, y, x, mean, invstd, gamma, activation, residual,
                                        axis, training, out, backend, True, stream))


def batch_norm(x, running_mean, running_var, gamma=None, beta=None, training=False,
               momentum=0.1, eps=1e-5, axis=1, backend=None, stream=None):
    """Same argument order and meaning as ``torch.nn.functional.batch_norm``; returns y.

    See Also
    --------
    torch.nn.functional.batch_norm
    """
    return batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, training=training,
                              running_mean=running_mean, running_var=running_var,
                              momentum=momentum, backend=backend, stream=stream).y


def _moments_input(be, x, axis, channels=None):
    x = _validate.data(be, x)
    axis = normalize_axis(axis, x.ndim, x.shape)
    if channels is not None and x.shape[axis] != channels:
        raise ValueError(f"x: expected {channels} channels on axis {axis}, got shape "
                         f"{tuple(x.shape)}")
    return x, axis, values_per_channel(x.shape, axis)


def moments(x, *, axis=1, backend=None, stream=None):
    """Per-channel mean and biased variance over every axis but ``axis``.

    Returns float32 statistics for float16/float32 x and float64 for float64 x.
    """
    be = backends.resolve(backend, (x,))
    with backends.launch_stream(be, stream):
        return _moments_on(be, x, axis)


def _moments_on(be, x, axis):
    x, axis, count = _moments_input(be, x, axis)
    if count < 1:
        raise ValueError(f"x: expected at least 1 value per channel, got 0 for x of shape "
                         f"{tuple(x.shape)} with channel axis {axis}")
    sdtype = stats_dtype(x.dtype)
    mean = be.empty((x.shape[axis],), sdtype)
    var = be.empty((x.shape[axis],), sdtype)
    be.moments(Canonical(be, x, axis).view(x), mean, var)
    return be.result(mean), be.result(var)


def moments_summary(x, *, axis=1, channels=None, backend=None):
    """(count, mean, M2) of every channel of x, exact in float64, as NumPy arrays: the summary
    that Chan's merge combines (``fastbn.RunningMoments``). ``channels``: the channel count x
    must have on ``axis``."""
    be = backends.resolve(backend, (x,))
    x, axis, count = _moments_input(be, x, axis, channels)
    if count == 0 or x.shape[axis] == 0:
        return count, np.zeros(x.shape[axis]), np.zeros(x.shape[axis])
    mean, m2 = be.channel_moments(Canonical(be, x, axis).view(x))
    return count, be.to_host(mean), be.to_host(m2)
