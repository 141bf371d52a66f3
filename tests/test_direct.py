"""The cpu backend's direct path (backends/cpu.py, "direct calls"): the common kind of call
skips the API's full validation, so it must give the bits of the full path for every call it
takes, take the calls it is for, and hand every other call (invalid ones included) to the full
path with nothing changed."""
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastbn
from fastbn import _config, _validate
from fastbn.backends import cpu
from _cases import DTYPES, bn_cases


def _run_forward(direct, x, gamma, beta, axis, training, running, activation, residual):
    rm = rv = None
    if running is not None:
        rm, rv = running[0].copy(), running[1].copy()
    saved = _config.CPU_DIRECT
    _config.CPU_DIRECT = direct
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")     # the direct path never warns on its own
            out = fastbn.batch_norm_act_forward(x, gamma, beta, activation=activation,
                                                residual=residual, axis=axis,
                                                training=training, running_mean=rm,
                                                running_var=rv, backend="cpu")
    finally:
        _config.CPU_DIRECT = saved
    return out, rm, rv


def _run_backward(direct, dy, y, x, mean, invstd, gamma, axis, training, activation, residual):
    saved = _config.CPU_DIRECT
    _config.CPU_DIRECT = direct
    try:
        return fastbn.batch_norm_act_backward(dy, y, x, mean, invstd, gamma,
                                              activation=activation, residual=residual,
                                              axis=axis, training=training, backend="cpu")
    finally:
        _config.CPU_DIRECT = saved


def _same_bits(a, b, what):
    if a is None or b is None:
        assert a is None and b is None, what
        return
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), what


@settings(max_examples=20)     # (each new mix of dtypes, activation and residual compiles)
@given(case=bn_cases(param_dtypes=DTYPES), training=st.booleans(),
       running_dtype=st.sampled_from(["float16", "float32", "float64", None]),
       activation=st.sampled_from([None, "relu", "sigmoid"]), with_residual=st.booleans(),
       want_dresidual=st.booleans())
def test_direct_path_gives_the_bits_of_the_full_path(case, training, running_dtype, activation,
                                                     with_residual, want_dresidual):
    x, gamma, beta, axis, dy = case
    channels = x.shape[axis]
    if running_dtype is None and not training:
        running_dtype = "float32"
    running = None
    if running_dtype is not None:
        running = (np.linspace(-1, 1, channels).astype(running_dtype),
                   np.linspace(0.5, 2, channels).astype(running_dtype))
    residual = np.ascontiguousarray(dy) if with_residual else None
    full = _run_forward(False, x, gamma, beta, axis, training, running, activation, residual)
    fast = _run_forward(True, x, gamma, beta, axis, training, running, activation, residual)
    for name, a, b in zip(("y", "mean", "invstd"), full[0], fast[0]):
        _same_bits(a, b, name)
    _same_bits(full[1], fast[1], "running_mean")
    _same_bits(full[2], fast[2], "running_var")
    y, mean, invstd = full[0]
    grads = [_run_backward(direct, dy, y, x, mean, invstd, gamma, axis, training, activation,
                           want_dresidual) for direct in (False, True)]
    for name, a, b in zip(("dx", "dgamma", "dbeta", "dresidual"), *grads):
        _same_bits(a, b, name)


def _problem(dtype=np.float32, shape=(60, 100)):
    rng = np.random.default_rng(0)
    channels = shape[1]
    return (rng.standard_normal(shape).astype(dtype), np.ones(channels, np.float32),
            np.zeros(channels, np.float32), np.zeros(channels, np.float32),
            np.ones(channels, np.float32))


@pytest.mark.parametrize("shape", [(60, 100), (4, 6, 5, 5), (3, 5, 4, 4096)])
def test_the_common_calls_take_the_direct_path(monkeypatch, shape):
    """Plain C-contiguous arrays, float32 vectors, no out=: the full validation never runs."""
    x, gamma, beta, rm, rv = _problem(shape=shape)

    def refuse(*args, **kwargs):
        raise AssertionError("the full path ran")

    monkeypatch.setattr(_validate, "forward", refuse)
    monkeypatch.setattr(_validate, "backward", refuse)
    out = fastbn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv)
    fastbn.batch_norm_forward(x, gamma, beta, training=False, running_mean=rm, running_var=rv)
    fastbn.batch_norm_forward(x)
    fastbn.batch_norm_backward(out.y, x, out.mean, out.invstd, gamma)
    fastbn.batch_norm_act_backward(out.y, out.y, x, out.mean, out.invstd, gamma, residual=True)
    with pytest.raises(AssertionError, match="the full path ran"):   # out=: the full path
        fastbn.batch_norm_forward(x, gamma, beta, out=(None, None, None))


@pytest.mark.parametrize("change", ["float64 eps", "bool axis", "read-only gamma",
                                    "float16 gamma", "F-order x", "mixed vector dtypes",
                                    "float64 running stats", "float16 running stats",
                                    "float64 x, float16 running stats", "one running stat",
                                    "running stat is x's row", "same running arrays"])
def test_other_calls_take_the_full_path_unchanged(change):
    """Each of these is refused by the direct path (forward_direct returns None, having changed
    nothing); the full path then gives its result or its error."""
    x, gamma, beta, rm, rv = _problem()
    kwargs = dict(eps=1e-5, axis=1, training=True, running_mean=rm, running_var=rv,
                  momentum=0.1)
    if change == "float64 eps":
        kwargs["eps"] = np.float64(1e-5)
    elif change == "bool axis":
        kwargs["axis"] = True
    elif change == "read-only gamma":
        gamma.flags.writeable = False
    elif change == "float16 gamma":
        gamma = gamma.astype(np.float16)
    elif change == "F-order x":
        x = np.asfortranarray(x)
    elif change == "mixed vector dtypes":
        beta = beta.astype(np.float64)
    elif change == "float64 running stats":
        kwargs["running_mean"], kwargs["running_var"] = rm.astype(np.float64), rv.astype(
            np.float64)
    elif change == "float16 running stats":
        kwargs["running_mean"], kwargs["running_var"] = rm.astype(np.float16), rv.astype(
            np.float16)
    elif change == "float64 x, float16 running stats":     # NumPy reads None as float64
        x = x.astype(np.float64)
        gamma, beta = gamma.astype(np.float64), beta.astype(np.float64)
        kwargs["running_mean"], kwargs["running_var"] = rm.astype(np.float16), rv.astype(
            np.float16)
    elif change == "one running stat":
        kwargs["running_var"] = None
    elif change == "running stat is x's row":
        kwargs["running_mean"] = x[0]
    elif change == "same running arrays":
        kwargs["running_var"] = rm
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
    x_before = x.copy()
    args = (x, gamma, beta, None, None, kwargs["axis"], kwargs["eps"], kwargs["training"],
            kwargs["running_mean"], kwargs["running_var"], kwargs["momentum"])
    assert cpu.forward_direct(*args) is None
    for k, v in before.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(kwargs[k], v), k
    assert np.array_equal(x, x_before)
    try:
        fastbn.batch_norm_forward(x, gamma, beta, **kwargs)
    except (TypeError, ValueError) as error:     # the full path's own error, naming the arg
        assert change in ("bool axis", "one running stat", "running stat is x's row",
                          "same running arrays"), error
        assert any(name in str(error) for name in ("axis", "running_mean", "running_var"))
    else:
        assert change not in ("bool axis", "one running stat", "running stat is x's row",
                              "same running arrays")


def test_non_finite_statistics_warn_and_leave_those_channels_unchanged():
    """The direct path hands a batch whose running statistics would not be finite to the full
    path, which warns before it changes anything (the warning as an error: nothing changed)."""
    x, gamma, beta, rm, rv = _problem()
    x[:, 3] = np.float32(3e38) * np.where(np.arange(60) % 2, 1, -1).astype(np.float32)
    with pytest.raises(RuntimeWarning, match=r"channels \[3\]"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fastbn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv)
    assert np.array_equal(rm, np.zeros(100, np.float32)) and np.array_equal(rv, np.ones(100))
    with pytest.warns(RuntimeWarning, match=r"channels \[3\]"):
        fastbn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv)
    assert rm[3] == 0 and rv[3] == 1 and rm[4] != 0
