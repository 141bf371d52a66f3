"""Fused batch norm + residual + activation (issue 9, item 5) on every backend:

* against the composition of the plain reference ops (``batch_norm_forward`` with
  ``backend="reference"``, then the residual and the activation in NumPy float64; the backward
  through the activation's derivative, then the plain reference ``batch_norm_backward``), as
  hypothesis properties over shapes, axes, layouts, dtypes, activations, train and eval;
* against float64 PyTorch autograd of ``act(batch_norm(x) + z)``;
* NaN-poisoned outputs (every element written), in place over x and over dy;
* the errors, raised before anything is written.

Runs on the backends in FASTBN_TEST_BACKENDS (see conftest.py), the simulator lane included.
"""
import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastbn
from _cases import (DTYPES, bn_cases, channel_rows, make_array, sum_tolerance, tolerance,
                    unit_roundoff)

ACTIVATIONS = [None, "relu", "sigmoid"]


def _host(a):
    return None if a is None else (a.copy_to_host() if hasattr(a, "copy_to_host")
                                   else np.asarray(a))


def _float(a):
    return np.asarray(_host(a), np.float64)


def _act(z, activation):
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    return z


def _act_grad(dy, y, activation):
    """dL/dz from dL/dy, the derivative recovered from the output y (as the fused op does)."""
    if activation == "relu":
        return np.where(y > 0, dy, 0.0)
    if activation == "sigmoid":
        return dy * y * (1.0 - y)
    return dy


def _poisoned(shape, dtype):
    return np.full(shape, np.nan, dtype)


def _assert_close(actual, reference, dtype, what):
    np.testing.assert_allclose(_float(actual), np.asarray(reference, np.float64),
                               **tolerance(dtype, reference), err_msg=what)


def _running(channels, dtype):
    return (np.linspace(-1, 1, channels).astype(dtype),
            np.linspace(0.5, 2, channels).astype(dtype))


# ----------------------------------------------------------------------------------------------
# against the composition of the plain reference ops

@given(case=bn_cases(), activation=st.sampled_from(ACTIVATIONS),
       with_residual=st.booleans(), training=st.booleans())
def test_forward_matches_the_composition_of_plain_reference_ops(backend, case, activation,
                                                                with_residual, training):
    x, gamma, beta, axis, dy = case
    # float32 running statistics for every data dtype (the plain-op tests cover their dtypes;
    # each dtype combination is another kernel variant to compile)
    running_dtype = np.float32
    channels = x.shape[axis]
    sdtype = fastbn.stats_dtype(x.dtype)
    residual = dy if with_residual else None          # any x-shaped array of x's dtype
    rm, rv = _running(channels, running_dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    # the composition: plain BN (float64, on the same values), then residual and activation
    plain = fastbn.batch_norm_forward(x.astype(np.float64), gamma, beta, axis=axis,
                                      training=training, running_mean=rm_ref,
                                      running_var=rv_ref, momentum=0.3, backend="reference")
    z = plain.y + (0.0 if residual is None else residual.astype(np.float64))
    want_y = _act(z, activation)
    stats = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=training,
                                      running_mean=rm.copy(), running_var=rv.copy(),
                                      backend="reference")

    out = (_poisoned(x.shape, x.dtype), _poisoned(channels, sdtype), _poisoned(channels, sdtype))
    got = fastbn.batch_norm_act_forward(x, gamma, beta, activation=activation, residual=residual,
                                        axis=axis, training=training, running_mean=rm,
                                        running_var=rv, momentum=0.3, out=out, backend=backend)
    y, mean, invstd = (_host(a) for a in got)
    assert y.dtype == x.dtype and mean.dtype == sdtype and invstd.dtype == sdtype
    assert not np.isnan(y).any(), "an element of y was never written"
    assert not np.isnan(mean).any() and not np.isnan(invstd).any()
    _assert_close(y, want_y, x.dtype, "y")
    _assert_close(mean, stats.mean, sdtype, "mean")
    _assert_close(invstd, stats.invstd, sdtype, "invstd")
    unit = max(unit_roundoff(running_dtype), 1e-9)
    np.testing.assert_allclose(rm, rm_ref, rtol=unit, atol=unit * np.abs(rm_ref).max())
    np.testing.assert_allclose(rv, rv_ref, rtol=unit)
    if not training:
        np.testing.assert_array_equal(rm, _running(channels, running_dtype)[0])


@given(case=bn_cases(), activation=st.sampled_from(ACTIVATIONS),
       with_residual=st.booleans(), training=st.booleans())
def test_backward_matches_the_composition_of_plain_reference_ops(backend, case, activation,
                                                                 with_residual, training):
    x, gamma, beta, axis, dy = case
    channels = x.shape[axis]
    rng = np.random.default_rng(int(abs(x.astype(np.float64)).sum() * 1e3) % 2**32)
    residual = make_array(rng, x.shape, x.dtype, "C") if with_residual else None
    rm, rv = _running(channels, np.float64)
    fwd = fastbn.batch_norm_act_forward(x, gamma, beta, activation=activation, residual=residual,
                                        axis=axis, training=training, running_mean=rm,
                                        running_var=rv, backend="reference")
    y = _host(fwd.y)
    # the composition: through the activation's derivative (from the same y), then plain BN
    dz = _act_grad(dy.astype(np.float64), y.astype(np.float64), activation)
    plain = fastbn.batch_norm_backward(dz, x.astype(np.float64), fwd.mean.astype(np.float64),
                                       fwd.invstd.astype(np.float64), gamma, axis=axis,
                                       training=training, backend="reference")
    sdtype = fwd.mean.dtype
    out = (_poisoned(x.shape, x.dtype), _poisoned(channels, sdtype), _poisoned(channels, sdtype),
           _poisoned(x.shape, x.dtype) if with_residual else None)
    got = fastbn.batch_norm_act_backward(dy, y, x, fwd.mean, fwd.invstd, gamma,
                                         activation=activation, residual=with_residual,
                                         axis=axis, training=training, out=out, backend=backend)
    dx, dgamma, dbeta, dresidual = (_host(a) for a in got)
    assert dx.dtype == x.dtype and dgamma.dtype == sdtype and dbeta.dtype == sdtype
    assert not np.isnan(dx).any() and not np.isnan(dgamma).any() and not np.isnan(dbeta).any()
    # dx is a difference of O(1) terms: compare on the scale of dz * gamma * invstd
    g = 1.0 if gamma is None else np.abs(gamma.astype(np.float64)).max()
    scale = np.abs(plain.dx).max() + np.abs(dz).max() * np.max(fwd.invstd) * g
    rtol = tolerance(x.dtype, plain.dx)["rtol"]
    np.testing.assert_allclose(dx.astype(np.float64), plain.dx, rtol=rtol, atol=4 * rtol * scale)
    x_rows, dz_rows = channel_rows(x, axis), channel_rows(dz, axis)
    centred = x_rows - (x_rows.mean(axis=1, keepdims=True) if training
                        else fwd.mean.astype(np.float64)[:, None])
    xhat = centred * fwd.invstd.astype(np.float64)[:, None]
    for name, value, want, terms in (("dgamma", dgamma, plain.dgamma, dz_rows * xhat),
                                     ("dbeta", dbeta, plain.dbeta, dz_rows)):
        error = np.abs(value.astype(np.float64) - want)
        assert np.all(error <= sum_tolerance(terms, want, sdtype)), (name, error)
    if with_residual:
        assert dresidual is not None and dresidual.dtype == x.dtype
        assert not np.isnan(dresidual).any()
        _assert_close(dresidual, dz, x.dtype, "dresidual")
    else:
        assert dresidual is None


# ----------------------------------------------------------------------------------------------
# against float64 PyTorch autograd

TORCH_LAYOUTS = [((5, 3), 1), ((4, 3, 5), 1), ((3, 4, 2, 3), 1), ((3, 2, 3, 4), -1)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape, axis", TORCH_LAYOUTS)
def test_matches_float64_torch_autograd(backend, shape, axis, activation, training):
    import torch        # the oracle: missing torch is a failure here, not a skip

    rng = np.random.default_rng(41)
    channels = shape[axis]
    x = rng.standard_normal(shape) * 2.0 + 0.5
    residual = rng.standard_normal(shape)
    gamma, beta = rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels)
    probe = rng.standard_normal(shape)                   # loss = sum(y * probe)
    rm, rv = rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels)
    t_rm, t_rv = torch.tensor(rm), torch.tensor(rv)

    fwd = fastbn.batch_norm_act_forward(x, gamma, beta, activation=activation, residual=residual,
                                        axis=axis, eps=1e-3, training=training, running_mean=rm,
                                        running_var=rv, momentum=0.3, backend=backend)
    grads = fastbn.batch_norm_act_backward(probe, fwd.y, x, fwd.mean, fwd.invstd, gamma,
                                           activation=activation, residual=True, axis=axis,
                                           training=training, backend=backend)

    def moved(a):
        return torch.tensor(np.moveaxis(a, axis, 1), requires_grad=True)

    tx, tz = moved(x), moved(residual)
    tg, tb = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
    t = torch.nn.functional.batch_norm(tx, t_rm, t_rv, tg, tb, training=training, momentum=0.3,
                                       eps=1e-3) + tz
    if activation == "relu":
        t = torch.relu(t)
    elif activation == "sigmoid":
        t = torch.sigmoid(t)
    (t * torch.tensor(np.moveaxis(probe, axis, 1))).sum().backward()

    def back(tensor):
        return np.moveaxis(tensor.detach().numpy(), 1, axis)

    np.testing.assert_allclose(_float(fwd.y), back(t), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, t_rm.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv, t_rv.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_float(grads.dx), back(tx.grad), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(_float(grads.dgamma), tg.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(_float(grads.dbeta), tb.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(_float(grads.dresidual), back(tz.grad), rtol=1e-10, atol=1e-11)


# ----------------------------------------------------------------------------------------------
# in place

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape, axis", [((5, 4, 6), 1), ((4, 5, 4), -1)])
def test_in_place_y_over_x_and_dx_over_dy(backend, shape, axis, activation, dtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal(shape).astype(dtype)
    residual = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = np.linspace(0.5, 2, shape[axis]), np.linspace(-1, 1, shape[axis])
    want = fastbn.batch_norm_act_forward(x, gamma, beta, activation=activation,
                                         residual=residual, axis=axis, backend=backend)
    want_y = _host(want.y)
    x_in_place = x.copy()
    got = fastbn.batch_norm_act_forward(x_in_place, gamma, beta, activation=activation,
                                        residual=residual, axis=axis,
                                        out=(x_in_place, None, None), backend=backend)
    assert got.y is x_in_place
    np.testing.assert_array_equal(x_in_place, want_y)
    grads = fastbn.batch_norm_act_backward(dy, want_y, x, want.mean, want.invstd, gamma,
                                           activation=activation, residual=True, axis=axis,
                                           backend=backend)
    dy_in_place = dy.copy()
    got = fastbn.batch_norm_act_backward(dy_in_place, want_y, x, want.mean, want.invstd, gamma,
                                         activation=activation, residual=True, axis=axis,
                                         out=(dy_in_place, None, None, None), backend=backend)
    assert got.dx is dy_in_place
    np.testing.assert_array_equal(dy_in_place, _host(grads.dx))
    np.testing.assert_array_equal(_host(got.dresidual), _host(grads.dresidual))
    np.testing.assert_array_equal(_host(got.dgamma), _host(grads.dgamma))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_no_activation_and_no_residual_is_plain_batch_norm(backend, activation):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((7, 3, 5)).astype(np.float32)
    dy = rng.standard_normal((7, 3, 5)).astype(np.float32)
    gamma, beta = np.linspace(0.5, 2, 3), np.linspace(-1, 1, 3)
    plain = fastbn.batch_norm_forward(x, gamma, beta, backend=backend)
    fused = fastbn.batch_norm_act_forward(x, gamma, beta, activation=None, backend=backend)
    for a, b in zip(plain, fused):
        np.testing.assert_array_equal(_host(a), _host(b))
    grads = fastbn.batch_norm_backward(dy, x, plain.mean, plain.invstd, gamma, backend=backend)
    fused_grads = fastbn.batch_norm_act_backward(dy, _host(fused.y), x, plain.mean, plain.invstd,
                                                 gamma, activation=None, backend=backend)
    assert fused_grads.dresidual is None
    for a, b in zip(grads, fused_grads[:3]):
        np.testing.assert_array_equal(_host(a), _host(b))


# ----------------------------------------------------------------------------------------------
# errors: before anything is written, naming the argument

SHAPE, C = (4, 3, 5), 3


def _mentions(message, name):
    return re.search(rf"(?<![\w\[]){re.escape(name)}(?![\w\]])", message) is not None


def _forward_args():
    rng = np.random.default_rng(3)
    return dict(x=rng.standard_normal(SHAPE).astype(np.float32), gamma=np.linspace(0.5, 1.5, C),
                beta=np.linspace(-1, 1, C), activation="relu",
                residual=rng.standard_normal(SHAPE).astype(np.float32),
                running_mean=np.full(C, 7.0, np.float32), running_var=np.full(C, 9.0, np.float32),
                out=(np.full(SHAPE, 42.0, np.float32), np.full(C, 42.0, np.float32),
                     np.full(C, 42.0, np.float32)))


def _forward_defect(kind):
    args = _forward_args()
    y = args["out"][0]
    if kind == "unknown activation":
        args["activation"] = "tanh"
        return args, ValueError, ["activation", "tanh"]
    if kind == "activation not a string":
        args["activation"] = np.maximum
        return args, (TypeError, ValueError), ["activation"]
    if kind == "residual shape":
        args["residual"] = np.ones((4, 3, 6), np.float32)
        return args, ValueError, ["residual", "(4, 3, 5)", "(4, 3, 6)"]
    if kind == "residual dtype":
        args["residual"] = np.ones(SHAPE, np.float64)
        return args, TypeError, ["residual", "float32", "float64"]
    if kind == "residual integer":
        args["residual"] = np.ones(SHAPE, np.int32)
        return args, TypeError, ["residual", "int32"]
    if kind == "y overlaps residual":
        args["residual"] = y
        return args, ValueError, ["out[0] (y)", "residual"]
    if kind == "residual overlaps running_mean":
        args["running_mean"] = args["residual"][0, :, 0]
        return args, ValueError, ["running_mean", "residual"]
    raise AssertionError(kind)


FORWARD_DEFECTS = ["unknown activation", "activation not a string", "residual shape",
                   "residual dtype", "residual integer", "y overlaps residual",
                   "residual overlaps running_mean"]


@pytest.mark.parametrize("kind", FORWARD_DEFECTS)
def test_forward_errors_name_the_argument_and_change_nothing(backend, kind):
    args, error, words = _forward_defect(kind)
    arrays = [args[k] for k in ("x", "gamma", "beta", "residual", "running_mean",
                                "running_var")] + list(args["out"])
    before = [np.array(a, copy=True) for a in arrays]
    x, gamma, beta = args.pop("x"), args.pop("gamma"), args.pop("beta")
    with pytest.raises(error) as info:
        fastbn.batch_norm_act_forward(x, gamma, beta, backend=backend, **args)
    for word in words:
        assert _mentions(str(info.value), word) or word in str(info.value), \
            f"{word!r} missing from: {info.value}"
    for old, new in zip(before, arrays):
        np.testing.assert_array_equal(old, new)


def _backward_args():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    fwd = fastbn.batch_norm_act_forward(x, np.ones(C), np.zeros(C), backend="reference")
    return dict(dy=rng.standard_normal(SHAPE).astype(np.float32), y=fwd.y, x=x, mean=fwd.mean,
                invstd=fwd.invstd, gamma=np.ones(C), activation="relu", residual=True,
                out=(np.full(SHAPE, 42.0, np.float32), np.full(C, 42.0, np.float32),
                     np.full(C, 42.0, np.float32), np.full(SHAPE, 42.0, np.float32)))


def _backward_defect(kind):
    args = _backward_args()
    dx, dgamma, dbeta, dresidual = args["out"]
    if kind == "unknown activation":
        args["activation"] = "gelu"
        return args, ValueError, ["activation", "gelu"]
    if kind == "y shape":
        args["y"] = np.ones((4, 3, 6), np.float32)
        return args, ValueError, ["y", "(4, 3, 5)", "(4, 3, 6)"]
    if kind == "y dtype":
        args["y"] = args["y"].astype(np.float64)
        return args, TypeError, ["y", "float32", "float64"]
    if kind == "dresidual is dx":
        args["out"] = (dx, dgamma, dbeta, dx)
        return args, ValueError, ["out[0] (dx)", "out[3] (dresidual)"]
    if kind == "dresidual is dy":
        args["out"] = (dx, dgamma, dbeta, args["dy"])
        return args, ValueError, ["out[3] (dresidual)", "dy"]
    if kind == "dresidual overlaps y":
        args["out"] = (dx, dgamma, dbeta, args["y"])
        return args, ValueError, ["out[3] (dresidual)", "y"]
    if kind == "dx is y":
        args["out"] = (args["y"], dgamma, dbeta, dresidual)
        return args, ValueError, ["out[0] (dx)", "y"]
    if kind == "dgamma overlaps dresidual":
        args["out"] = (dx, dresidual[0, :, 0], dbeta, dresidual)
        return args, ValueError, ["out[1] (dgamma)", "out[3] (dresidual)"]
    if kind == "dresidual shape":
        args["out"] = (dx, dgamma, dbeta, np.zeros((4, 3), np.float32))
        return args, ValueError, ["out[3] (dresidual)", "(4, 3, 5)"]
    raise AssertionError(kind)


BACKWARD_DEFECTS = ["unknown activation", "y shape", "y dtype", "dresidual is dx",
                    "dresidual is dy", "dresidual overlaps y", "dx is y",
                    "dgamma overlaps dresidual", "dresidual shape"]


@pytest.mark.parametrize("kind", BACKWARD_DEFECTS)
def test_backward_errors_name_the_argument_and_change_nothing(backend, kind):
    args, error, words = _backward_defect(kind)
    arrays = [args[k] for k in ("dy", "y", "x", "mean", "invstd", "gamma")] + list(args["out"])
    before = [np.array(a, copy=True) for a in arrays]
    dy, y, x = args.pop("dy"), args.pop("y"), args.pop("x")
    mean, invstd, gamma = args.pop("mean"), args.pop("invstd"), args.pop("gamma")
    with pytest.raises(error) as info:
        fastbn.batch_norm_act_backward(dy, y, x, mean, invstd, gamma, backend=backend, **args)
    for word in words:
        assert _mentions(str(info.value), word) or word in str(info.value), \
            f"{word!r} missing from: {info.value}"
    for old, new in zip(before, arrays):
        np.testing.assert_array_equal(old, new)


def test_nonfinite_channel_warns_before_any_running_statistic_changes(backend):
    args = _forward_args()
    x = args["x"]
    x[1, 2, 3] = np.nan
    rm, rv = args["running_mean"], args["running_var"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match=r"channels \[2\]"):
            fastbn.batch_norm_act_forward(x, args["gamma"], args["beta"], activation="sigmoid",
                                          residual=args["residual"], running_mean=rm,
                                          running_var=rv, backend=backend)
    np.testing.assert_array_equal(rm, 7.0)
    np.testing.assert_array_equal(rv, 9.0)
