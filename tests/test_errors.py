"""Bad input gets a clear error (argument, expected, got) and leaves every buffer untouched.

Runs on the backends in FASTBN_TEST_BACKENDS (see conftest.py), and on the reference.
"""
import re

import numpy as np
import pytest

import fastbn

SHAPE = (4, 3, 5)
C = 3


def _state(dtype="float32"):
    """Valid arguments with sentinel-filled outputs and running statistics."""
    rng = np.random.default_rng(3)
    sdtype = fastbn.stats_dtype(dtype)
    return dict(
        x=rng.standard_normal(SHAPE).astype(dtype),
        gamma=np.linspace(0.5, 1.5, C), beta=np.linspace(-1, 1, C),
        running_mean=np.full(C, 7.0), running_var=np.full(C, 9.0),
        out=(np.full(SHAPE, 42.0, dtype), np.full(C, 42.0, sdtype), np.full(C, 42.0, sdtype)),
    )


def _snapshot(args):
    arrays = [args["running_mean"], args["running_var"], *args["out"]]
    return [None if a is None else np.array(a, copy=True) for a in arrays], arrays


def _assert_untouched(snapshot):
    before, arrays = snapshot
    for old, new in zip(before, arrays):
        if old is not None:
            np.testing.assert_array_equal(old, new)


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


FORWARD_ERRORS = [
    # (what changes, exception, words the message must contain)
    (dict(x=np.ones(SHAPE, np.int64)), TypeError, ["x:", "floating", "int64", "astype"]),
    (dict(x=np.ones(SHAPE, np.complex128)), TypeError, ["x:", "complex128"]),
    (dict(x=np.ones(SHAPE, bool)), TypeError, ["x:", "bool"]),
    (dict(x=np.ones(5, np.float32)), ValueError, ["x:", "2 dimensions", "(5,)"]),
    (dict(gamma=np.ones(4)), ValueError, ["gamma:", "(3,)", "(4,)"]),
    (dict(gamma=np.ones((3, 1))), ValueError, ["gamma:", "(3,)", "(3, 1)"]),
    (dict(gamma=np.ones(3, np.int32)), TypeError, ["gamma:", "int32"]),
    (dict(beta=np.ones(2)), ValueError, ["beta:", "(3,)", "(2,)"]),
    (dict(running_mean=np.ones(4)), ValueError, ["running_mean:", "(3,)", "(4,)"]),
    (dict(running_var=np.ones(3, np.int64)), TypeError, ["running_var:", "int64"]),
    (dict(running_var=_read_only(np.ones(3))), ValueError, ["running_var:", "read-only"]),
    (dict(running_mean=_read_only(np.ones(3))), ValueError, ["running_mean:", "read-only"]),
    (dict(running_var=None), ValueError, ["running_mean, running_var", "both or neither"]),
    (dict(out=(np.zeros((4, 3, 6), np.float32), None, None)), ValueError,
     ["out[0] (y)", "(4, 3, 5)", "(4, 3, 6)"]),
    (dict(out=(np.zeros(SHAPE, np.float64), None, None)), TypeError,
     ["out[0] (y)", "float32", "float64"]),
    (dict(out=(_read_only(np.zeros(SHAPE, np.float32)), None, None)), ValueError,
     ["out[0] (y)", "read-only"]),
    (dict(out=(None, np.zeros(C, np.float64), None)), TypeError,
     ["out[1] (mean)", "float32", "float64"]),
    (dict(out=(None, None, np.zeros(4, np.float32))), ValueError,
     ["out[2] (invstd)", "(3,)", "(4,)"]),
    (dict(out=(None, None)), TypeError, ["out:", "3 arrays"]),
    (dict(axis=3), ValueError, ["axis:", "[-3, 3)", "got 3"]),
    (dict(axis=-4), ValueError, ["axis:", "got -4"]),
    (dict(axis=1.0), TypeError, ["axis:", "integer", "float"]),
    (dict(eps=0.0), ValueError, ["eps:", "positive", "0.0"]),
    (dict(eps=-1e-5), ValueError, ["eps:", "positive", "-1e-05"]),
    (dict(eps=float("nan")), ValueError, ["eps:", "nan"]),
    (dict(momentum=-0.1), ValueError, ["momentum:", "[0, 1]", "-0.1"]),
    (dict(momentum=1.5), ValueError, ["momentum:", "[0, 1]", "1.5"]),
    (dict(momentum=float("nan")), ValueError, ["momentum:", "nan"]),
    (dict(x=np.ones((1, 3), np.float32)), ValueError, ["x:", "more than 1 value per channel",
                                                       "got 1", "(1, 3)"]),
    (dict(x=np.ones((1, 3, 1), np.float32)), ValueError, ["x:", "got 1"]),
]


@pytest.mark.parametrize("change, error, words", FORWARD_ERRORS)
def test_forward_errors_are_clear_and_change_nothing(backend, change, error, words):
    args = _state()
    args.update(change)
    snapshot = _snapshot(args)
    x = args.pop("x")
    gamma, beta = args.pop("gamma"), args.pop("beta")
    with pytest.raises(error) as info:
        fastbn.batch_norm_forward(x, gamma, beta, backend=backend, **args)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"
    _assert_untouched(snapshot)


def test_eval_requires_running_statistics(backend):
    x = np.ones(SHAPE, np.float32)
    with pytest.raises(ValueError, match="running_mean, running_var: required when training=False"):
        fastbn.batch_norm_forward(x, training=False, backend=backend)
    # eval mode accepts read-only running statistics and a single value per channel
    ro = _read_only(np.ones(C))
    y = fastbn.batch_norm_forward(np.ones((1, 3), np.float32), training=False, running_mean=ro,
                                  running_var=ro, backend=backend).y
    np.testing.assert_allclose(y, 0.0)


def _backward_args(dtype="float32"):
    rng = np.random.default_rng(5)
    x = rng.standard_normal(SHAPE).astype(dtype)
    fwd = fastbn.batch_norm_forward(x, backend="reference")
    sdtype = fwd.mean.dtype
    return dict(dy=rng.standard_normal(SHAPE).astype(dtype), x=x, mean=fwd.mean,
                invstd=fwd.invstd, gamma=np.ones(C),
                out=(np.full(SHAPE, 42.0, dtype), np.full(C, 42.0, sdtype),
                     np.full(C, 42.0, sdtype)))


BACKWARD_ERRORS = [
    (dict(dy=np.ones((4, 3, 6), np.float32)), ValueError, ["dy:", "(4, 3, 5)", "(4, 3, 6)"]),
    (dict(dy=np.ones(SHAPE, np.float64)), TypeError, ["dy:", "float32", "float64"]),
    (dict(x=np.ones(SHAPE, np.int32)), TypeError, ["x:", "int32"]),
    (dict(mean=np.ones(4, np.float32)), ValueError, ["mean:", "(3,)", "(4,)"]),
    (dict(invstd=np.ones(2, np.float32)), ValueError, ["invstd:", "(3,)", "(2,)"]),
    (dict(invstd=np.ones(3, np.float64)), TypeError, ["invstd:", "float32", "float64"]),
    (dict(mean=np.ones(3, np.int64)), TypeError, ["mean:", "int64"]),
    (dict(mean=None), ValueError, ["mean, invstd", "None"]),
    (dict(gamma=np.ones(5)), ValueError, ["gamma:", "(3,)", "(5,)"]),
    (dict(axis=5), ValueError, ["axis:", "got 5"]),
    (dict(out=(np.zeros((4, 3), np.float32), None, None)), ValueError, ["out[0] (dx)", "(4, 3)"]),
    (dict(out=(None, np.zeros(C, np.float64), None)), TypeError, ["out[1] (dgamma)", "float64"]),
    (dict(out=(None, None, _read_only(np.zeros(C, np.float32)))), ValueError,
     ["out[2] (dbeta)", "read-only"]),
]


@pytest.mark.parametrize("change, error, words", BACKWARD_ERRORS)
def test_backward_errors_are_clear_and_change_nothing(backend, change, error, words):
    args = _backward_args()
    args.update(change)
    before = [None if a is None else a.copy() for a in args["out"]]
    dy, x, mean, invstd = args.pop("dy"), args.pop("x"), args.pop("mean"), args.pop("invstd")
    gamma = args.pop("gamma")
    with pytest.raises(error) as info:
        fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, backend=backend, **args)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"
    for old, new in zip(before, args["out"]):
        if old is not None:
            np.testing.assert_array_equal(old, new)


def test_moments_and_running_moments_errors(backend):
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        fastbn.moments(np.ones((3, 2), np.int8), backend=backend)
    with pytest.raises(ValueError, match="x: expected at least 1 value per channel"):
        fastbn.moments(np.ones((0, 2)), backend=backend)
    acc = fastbn.RunningMoments(3)
    acc.update(np.ones((4, 3)), backend=backend)
    state = acc.state_dict()
    with pytest.raises(ValueError, match="x: expected 3 channels on axis 1"):
        acc.update(np.ones((4, 2)), backend=backend)
    with pytest.raises(ValueError, match="other: expected 3 channels, got 2"):
        acc.merge(fastbn.RunningMoments(2))
    with pytest.raises(TypeError, match="other: expected a RunningMoments"):
        acc.merge(np.ones(3))
    with pytest.raises(ValueError, match="ddof: expected less than count"):
        acc.var(ddof=4)
    assert acc.count == state["count"]
    np.testing.assert_array_equal(acc.mean, state["mean"])


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match=r"backend: expected one of .*got 'gpu'"):
        fastbn.batch_norm_forward(np.ones((3, 2)), backend="gpu")
    with pytest.raises(ValueError, match="backend:"):
        fastbn.set_backend("tpu")


# ----------------------------------------------------------------------------------------------
# aliasing (issue 13.2): a buffer that is written must overlap no other argument, except the
# documented in-place calls (forward out[0] the same view as x, backward out[0] the same view
# as dy). The error names both arguments; nothing is changed.

def _mentions(message, name):
    """Whether `name` appears in message as an argument name (not inside a longer word)."""
    return re.search(rf"(?<![\w\[]){re.escape(name)}(?![\w\]])", message) is not None


def _float32_state():
    """_state() with float32 running statistics and gamma/beta, so that they can alias the
    float32 outputs without failing a dtype check first."""
    args = _state()
    args.update(gamma=args["gamma"].astype(np.float32), beta=args["beta"].astype(np.float32),
                running_mean=args["running_mean"].astype(np.float32),
                running_var=args["running_var"].astype(np.float32))
    return args


def _alias_forward(kind):
    """Arguments of a training forward with one aliasing defect; returns (args, names)."""
    args = _float32_state()
    y, mean, invstd = args["out"]
    rm, rv = args["running_mean"], args["running_var"]
    channels = np.full(2 * C, 5.0, np.float32)           # one buffer for two overlapping views
    x_buffer = args["x"]
    if kind == "running_mean is running_var":
        args.update(running_var=rm)
        return args, ("running_mean", "running_var")
    if kind == "running stats overlap":
        args.update(running_mean=channels[:C], running_var=channels[C - 1:2 * C - 1])
        return args, ("running_mean", "running_var")
    if kind == "mean is running_mean":
        args.update(out=(y, rm, invstd))
        return args, ("out[1] (mean)", "running_mean")
    if kind == "invstd is running_var":
        args.update(out=(y, mean, rv))
        return args, ("out[2] (invstd)", "running_var")
    if kind == "invstd is running_mean":
        args.update(out=(y, mean, rm))
        return args, ("out[2] (invstd)", "running_mean")
    if kind == "mean is invstd":
        args.update(out=(y, mean, mean))
        return args, ("out[1] (mean)", "out[2] (invstd)")
    if kind == "mean overlaps invstd":
        args.update(out=(y, channels[:C], channels[1:C + 1]))
        return args, ("out[1] (mean)", "out[2] (invstd)")
    if kind == "y overlaps running_mean":
        args.update(running_mean=y[1, :, 2])
        return args, ("out[0] (y)", "running_mean")
    if kind == "y overlaps running_var":
        args.update(running_var=y[0, :, 0])
        return args, ("out[0] (y)", "running_var")
    if kind == "y overlaps x":
        big = np.random.default_rng(0).standard_normal((4, 3, 6)).astype(np.float32)
        args.update(x=big[:, :, 1:], out=(big[:, :, :-1], mean, invstd))
        return args, ("out[0] (y)", "x")
    if kind == "y is a reversed view of x":
        args.update(out=(x_buffer[::-1], mean, invstd))
        return args, ("out[0] (y)", "x")
    if kind == "y overlaps gamma":
        args.update(gamma=y[0, :, 1])
        return args, ("out[0] (y)", "gamma")
    if kind == "mean is gamma":
        args.update(out=(y, args["gamma"], invstd))
        return args, ("out[1] (mean)", "gamma")
    if kind == "invstd is beta":
        args.update(out=(y, mean, args["beta"]))
        return args, ("out[2] (invstd)", "beta")
    if kind == "mean overlaps x":
        args.update(out=(y, x_buffer[0, :, 0], invstd))
        return args, ("out[1] (mean)", "x")
    if kind == "running_mean overlaps x":
        args.update(running_mean=x_buffer[2, :, 3])
        return args, ("running_mean", "x")
    if kind == "running_var is gamma":
        args.update(running_var=args["gamma"])
        return args, ("running_var", "gamma")
    if kind == "running_mean is beta":
        args.update(running_mean=args["beta"])
        return args, ("running_mean", "beta")
    raise AssertionError(kind)


FORWARD_ALIASES = ["running_mean is running_var", "running stats overlap", "mean is running_mean",
                   "invstd is running_var", "invstd is running_mean", "mean is invstd",
                   "mean overlaps invstd", "y overlaps running_mean", "y overlaps running_var",
                   "y overlaps x", "y is a reversed view of x", "y overlaps gamma",
                   "mean is gamma", "invstd is beta", "mean overlaps x",
                   "running_mean overlaps x", "running_var is gamma", "running_mean is beta"]


def _every_array(args):
    arrays = [args[k] for k in ("x", "gamma", "beta", "running_mean", "running_var")]
    return [a for a in arrays + list(args["out"]) if a is not None]


@pytest.mark.parametrize("kind", FORWARD_ALIASES)
def test_forward_refuses_aliased_buffers_and_changes_nothing(backend, kind):
    args, names = _alias_forward(kind)
    arrays = _every_array(args)
    before = [a.copy() for a in arrays]
    x, gamma, beta = args.pop("x"), args.pop("gamma"), args.pop("beta")
    with pytest.raises(ValueError) as info:
        fastbn.batch_norm_forward(x, gamma, beta, backend=backend, **args)
    for name in names:
        assert _mentions(str(info.value), name), f"{name!r} missing from: {info.value}"
    for old, new in zip(before, arrays):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("kind", ["mean is running_mean", "invstd is running_var",
                                  "y overlaps running_mean"])
def test_eval_refuses_outputs_over_its_running_statistics(backend, kind):
    """In eval mode the running statistics are inputs, and out[...] is still written."""
    args, names = _alias_forward(kind)
    arrays = _every_array(args)
    before = [a.copy() for a in arrays]
    x, gamma, beta = args.pop("x"), args.pop("gamma"), args.pop("beta")
    with pytest.raises(ValueError) as info:
        fastbn.batch_norm_forward(x, gamma, beta, training=False, backend=backend, **args)
    for name in names:
        assert _mentions(str(info.value), name), f"{name!r} missing from: {info.value}"
    for old, new in zip(before, arrays):
        np.testing.assert_array_equal(old, new)


def test_eval_accepts_overlapping_read_only_inputs(backend):
    """Running statistics are only read in eval mode: one buffer for both is fine."""
    args = _float32_state()
    stats = np.full(C, 2.0, np.float32)
    x = args["x"]
    got = fastbn.batch_norm_forward(x, training=False, running_mean=stats, running_var=stats,
                                    backend=backend)
    want = fastbn.batch_norm_forward(x, training=False, running_mean=stats.copy(),
                                     running_var=stats.copy(), backend="reference")
    np.testing.assert_allclose(np.asarray(got.y), want.y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(stats, 2.0)


def test_forward_in_place_over_x_is_allowed(backend):
    args = _float32_state()
    x = args["x"]
    want = fastbn.batch_norm_forward(x.copy(), args["gamma"], args["beta"], backend="reference")
    got = fastbn.batch_norm_forward(x, args["gamma"], args["beta"], out=(x, None, None),
                                    backend=backend)
    assert got.y is x
    np.testing.assert_allclose(x, want.y, rtol=2e-5, atol=2e-5)


def _alias_backward(kind):
    args = _backward_args()
    args["gamma"] = args["gamma"].astype(np.float32)
    dx, dgamma, dbeta = args["out"]
    channels = np.full(2 * C, 5.0, np.float32)
    if kind == "dgamma is dbeta":
        args.update(out=(dx, dgamma, dgamma))
        return args, ("out[1] (dgamma)", "out[2] (dbeta)")
    if kind == "dgamma overlaps dbeta":
        args.update(out=(dx, channels[:C], channels[1:C + 1]))
        return args, ("out[1] (dgamma)", "out[2] (dbeta)")
    if kind == "dx is x":
        args.update(out=(args["x"], dgamma, dbeta))
        return args, ("out[0] (dx)", "x")
    if kind == "dx overlaps dy":
        big = np.random.default_rng(1).standard_normal((4, 3, 6)).astype(np.float32)
        args.update(dy=big[:, :, 1:], out=(big[:, :, :-1], dgamma, dbeta))
        return args, ("out[0] (dx)", "dy")
    if kind == "dgamma overlaps dx":
        args.update(out=(dx, dx[0, :, 0], dbeta))
        return args, ("out[0] (dx)", "out[1] (dgamma)")
    if kind == "dgamma is mean":
        args.update(out=(dx, args["mean"], dbeta))
        return args, ("out[1] (dgamma)", "mean")
    if kind == "dbeta is invstd":
        args.update(out=(dx, dgamma, args["invstd"]))
        return args, ("out[2] (dbeta)", "invstd")
    if kind == "dbeta is gamma":
        args.update(out=(dx, dgamma, args["gamma"]))
        return args, ("out[2] (dbeta)", "gamma")
    if kind == "dgamma overlaps dy":
        args.update(out=(dx, args["dy"][1, :, 1], dbeta))
        return args, ("out[1] (dgamma)", "dy")
    if kind == "dx overlaps gamma":
        args.update(gamma=dx[0, :, 4])
        return args, ("out[0] (dx)", "gamma")
    raise AssertionError(kind)


BACKWARD_ALIASES = ["dgamma is dbeta", "dgamma overlaps dbeta", "dx is x", "dx overlaps dy",
                    "dgamma overlaps dx", "dgamma is mean", "dbeta is invstd", "dbeta is gamma",
                    "dgamma overlaps dy", "dx overlaps gamma"]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("kind", BACKWARD_ALIASES)
def test_backward_refuses_aliased_buffers_and_changes_nothing(backend, kind, training):
    args, names = _alias_backward(kind)
    arrays = [args[k] for k in ("dy", "x", "mean", "invstd", "gamma")] + list(args["out"])
    before = [a.copy() for a in arrays]
    dy, x, mean, invstd = args.pop("dy"), args.pop("x"), args.pop("mean"), args.pop("invstd")
    gamma = args.pop("gamma")
    with pytest.raises(ValueError) as info:
        fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, training=training,
                                   backend=backend, **args)
    for name in names:
        assert _mentions(str(info.value), name), f"{name!r} missing from: {info.value}"
    for old, new in zip(before, arrays):
        np.testing.assert_array_equal(old, new)


def test_backward_in_place_over_dy_is_allowed(backend):
    args = _backward_args()
    dy = args["dy"]
    want = fastbn.batch_norm_backward(dy.copy(), args["x"], args["mean"], args["invstd"],
                                      args["gamma"], backend="reference")
    got = fastbn.batch_norm_backward(dy, args["x"], args["mean"], args["invstd"], args["gamma"],
                                     out=(dy, None, None), backend=backend)
    assert got.dx is dy
    np.testing.assert_allclose(dy, want.dx, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# running statistics that cannot be updated in place (issue 13.3)

@pytest.mark.parametrize("which", ["running_mean", "running_var", "both"])
@pytest.mark.parametrize("container", [list, tuple])
def test_training_refuses_running_statistics_that_are_not_arrays(backend, which, container):
    args = _state()
    rm, rv = [7.0] * C, [9.0] * C
    running_mean = container(rm) if which in ("running_mean", "both") else args["running_mean"]
    running_var = container(rv) if which in ("running_var", "both") else args["running_var"]
    snapshot = _snapshot(args)
    with pytest.raises(TypeError) as info:
        fastbn.batch_norm_forward(args["x"], args["gamma"], args["beta"],
                                  running_mean=running_mean, running_var=running_var,
                                  out=args["out"], backend=backend)
    named = "running_mean" if which in ("running_mean", "both") else "running_var"
    assert _mentions(str(info.value), named), str(info.value)
    assert re.search("in[ -]place", str(info.value)), str(info.value)
    _assert_untouched(snapshot)
    assert rm == [7.0] * C and rv == [9.0] * C


def test_eval_accepts_running_statistics_as_lists(backend):
    x = _state()["x"]
    got = fastbn.batch_norm_forward(x, training=False, running_mean=[0.5] * C,
                                    running_var=[2.0] * C, backend=backend)
    want = fastbn.batch_norm_forward(x, training=False, running_mean=np.full(C, 0.5),
                                     running_var=np.full(C, 2.0), backend="reference")
    np.testing.assert_allclose(np.asarray(got.y), want.y, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# training= (issue 13.7), eps (13.11), byte order (13.11), masked arrays (13.11)

BAD_TRAINING = ["False", "True", None, 0, 1, 1.0, np.array(True), np.array([True]),
                np.int64(1)]


@pytest.mark.parametrize("training", BAD_TRAINING, ids=repr)
def test_forward_training_must_be_a_bool(backend, training):
    args = _state()
    snapshot = _snapshot(args)
    x, gamma, beta = args.pop("x"), args.pop("gamma"), args.pop("beta")
    with pytest.raises(TypeError) as info:
        fastbn.batch_norm_forward(x, gamma, beta, training=training, backend=backend, **args)
    assert _mentions(str(info.value), "training"), str(info.value)
    assert "bool" in str(info.value), str(info.value)
    _assert_untouched(snapshot)


@pytest.mark.parametrize("training", BAD_TRAINING, ids=repr)
def test_backward_training_must_be_a_bool(backend, training):
    args = _backward_args()
    before = [a.copy() for a in args["out"]]
    with pytest.raises(TypeError) as info:
        fastbn.batch_norm_backward(args["dy"], args["x"], args["mean"], args["invstd"],
                                   args["gamma"], training=training, out=args["out"],
                                   backend=backend)
    assert _mentions(str(info.value), "training"), str(info.value)
    for old, new in zip(before, args["out"]):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("training", [np.bool_(True), np.bool_(False), True, False], ids=repr)
def test_numpy_bools_are_accepted_for_training(backend, training):
    args = _state()
    rm, rv = args["running_mean"], args["running_var"]
    out = fastbn.batch_norm_forward(args["x"], training=training, running_mean=rm,
                                    running_var=rv, backend=backend)
    assert np.all(rm != 7.0) == bool(training) and np.all(rm == 7.0) != bool(training)
    fastbn.batch_norm_backward(args["x"], args["x"], out.mean, out.invstd, training=training,
                               backend=backend)


@pytest.mark.parametrize("eps, error", [(10**400, ValueError), (-10**400, ValueError),
                                        (float("inf"), ValueError), (np.float64("inf"), ValueError),
                                        ("1e-5", (TypeError, ValueError)),
                                        (None, (TypeError, ValueError)),
                                        (1e-5j, (TypeError, ValueError))],
                         ids=["10**400", "-10**400", "inf", "np.inf", "str", "None", "complex"])
def test_eps_out_of_range_is_a_clear_error(backend, eps, error):
    args = _state()
    snapshot = _snapshot(args)
    x, gamma, beta = args.pop("x"), args.pop("gamma"), args.pop("beta")
    with pytest.raises(error) as info:
        fastbn.batch_norm_forward(x, gamma, beta, eps=eps, backend=backend, **args)
    assert not isinstance(info.value, OverflowError), repr(info.value)
    assert _mentions(str(info.value), "eps"), str(info.value)
    _assert_untouched(snapshot)


def _big_endian(a):
    return a.astype(a.dtype.newbyteorder(">" if np.little_endian else "<"))


@pytest.mark.parametrize("name", ["x", "gamma", "beta", "running_mean", "running_var", "out[0]",
                                  "out[1]"])
def test_forward_refuses_non_native_byte_order(backend, name):
    args = _state()
    if name.startswith("out"):
        out = list(args["out"])
        index = int(name[4])
        out[index] = _big_endian(out[index])
        args["out"] = tuple(out)
    else:
        args[name] = _big_endian(args[name])
    snapshot = _snapshot(args)
    x, gamma, beta = args.pop("x"), args.pop("gamma"), args.pop("beta")
    with pytest.raises((TypeError, ValueError)) as info:
        fastbn.batch_norm_forward(x, gamma, beta, backend=backend, **args)
    assert "native byte order" in str(info.value), str(info.value)
    assert name in str(info.value), str(info.value)
    _assert_untouched(snapshot)


@pytest.mark.parametrize("name", ["dy", "x", "mean", "invstd", "gamma"])
def test_backward_refuses_non_native_byte_order(backend, name):
    args = _backward_args()
    args[name] = _big_endian(args[name])
    before = [a.copy() for a in args["out"]]
    with pytest.raises((TypeError, ValueError)) as info:
        fastbn.batch_norm_backward(args["dy"], args["x"], args["mean"], args["invstd"],
                                   args["gamma"], out=args["out"], backend=backend)
    assert "native byte order" in str(info.value), str(info.value)
    assert _mentions(str(info.value), name), str(info.value)
    for old, new in zip(before, args["out"]):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("name", ["x", "gamma", "running_mean", "running_var"])
def test_forward_refuses_masked_arrays(backend, name):
    args = _state()
    mask = np.zeros(np.shape(args[name]), bool)
    mask.flat[0] = True
    args[name] = np.ma.array(args[name], mask=mask)
    snapshot = _snapshot(args)
    x, gamma, beta = args.pop("x"), args.pop("gamma"), args.pop("beta")
    with pytest.raises(TypeError) as info:
        fastbn.batch_norm_forward(x, gamma, beta, backend=backend, **args)
    assert _mentions(str(info.value), name), str(info.value)
    assert "mask" in str(info.value), str(info.value)
    _assert_untouched(snapshot)


def test_backward_and_moments_refuse_masked_arrays(backend):
    args = _backward_args()
    masked = np.ma.array(args["dy"], mask=np.zeros(SHAPE, bool))
    with pytest.raises(TypeError, match="dy"):
        fastbn.batch_norm_backward(masked, args["x"], args["mean"], args["invstd"],
                                   backend=backend)
    with pytest.raises(TypeError, match="x"):
        fastbn.moments(np.ma.array(args["x"]), backend=backend)
