"""Bad input gets a clear error (argument, expected, got) and leaves every buffer untouched.

Runs on the backends in FASTBN_TEST_BACKENDS (see conftest.py), and on the reference.
"""
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


def test_output_overlapping_an_input_is_refused(backend):
    x = np.random.default_rng(0).standard_normal((4, 3, 6)).astype(np.float32)
    shifted = x[:, :, 1:]
    overlapping = x[:, :, :-1]
    before = x.copy()
    with pytest.raises(ValueError, match=r"out\[0\] \(y\): overlaps an input"):
        fastbn.batch_norm_forward(shifted, out=(overlapping, None, None), backend=backend)
    np.testing.assert_array_equal(x, before)


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
