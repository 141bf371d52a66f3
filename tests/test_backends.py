"""Every backend against the NumPy float64 reference; accuracy where float32 accumulators break;
non-finite and overflowing statistics; determinism, threads, in-place calls. The properties that
need no oracle are in test_invariants.py, bitwise determinism across processes and buffer
layouts in test_determinism.py.

Runs on the backends in FASTBN_TEST_BACKENDS (see conftest.py).
"""
import threading
import warnings

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastbn
from conftest import TEST_BACKENDS
from fastbn import _config
from _cases import DTYPES, bn_cases, channel_rows, make_array, sum_tolerance, tolerance


@pytest.fixture(autouse=True, scope="module",
                params=["default-config", "parallel-tiny-chunks"] if "cpu" in TEST_BACKENDS
                else ["default-config"])
def cpu_config(request):
    """Run the suite twice on the cpu backend: as configured, and with every call taking the
    parallel kernels and channels-last rows split into many small chunks (Chan merges)."""
    if request.param == "default-config":
        yield request.param
        return
    saved = _config.CPU_PARALLEL_MIN_SIZE, _config.CPU_CHUNK_ELEMENTS
    _config.CPU_PARALLEL_MIN_SIZE, _config.CPU_CHUNK_ELEMENTS = 0, 7
    try:
        yield request.param
    finally:
        _config.CPU_PARALLEL_MIN_SIZE, _config.CPU_CHUNK_ELEMENTS = saved


def _poisoned_like(a, dtype=None):
    return np.full(a.shape, np.nan, dtype or a.dtype)


def _assert_close(actual, reference, dtype):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(reference, np.float64),
                               **tolerance(dtype, reference))


def _to_host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


# ----------------------------------------------------------------------------------------------
# against the reference

@given(case=bn_cases(param_dtypes=DTYPES), running_dtype=st.sampled_from(DTYPES))
def test_forward_train_matches_reference(backend, case, running_dtype):
    x, gamma, beta, axis, _ = case
    channels = x.shape[axis]
    sdtype = fastbn.stats_dtype(x.dtype)
    rm_ref = np.linspace(-1, 1, channels).astype(running_dtype)
    rv_ref = np.linspace(0.5, 2, channels).astype(running_dtype)
    rm, rv = rm_ref.copy(), rv_ref.copy()
    ref = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm_ref,
                                    running_var=rv_ref, momentum=0.3, backend="reference")
    out = (_poisoned_like(x), _poisoned_like(rm, sdtype), _poisoned_like(rm, sdtype))
    got = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv,
                                    momentum=0.3, out=out, backend=backend)
    assert got.y is out[0] and got.mean is out[1] and got.invstd is out[2]
    assert got.y.dtype == x.dtype and got.mean.dtype == sdtype and got.invstd.dtype == sdtype
    assert not np.isnan(got.y).any(), "an output element was never written"
    _assert_close(got.y, ref.y, x.dtype)
    _assert_close(got.mean, ref.mean, sdtype)
    _assert_close(got.invstd, ref.invstd, sdtype)
    # both round one float64 update to the running statistics' dtype: at most one unit apart
    unit = np.finfo(np.dtype(running_dtype)).eps
    assert rm.dtype == running_dtype and rv.dtype == running_dtype
    np.testing.assert_allclose(rm, rm_ref, rtol=max(unit, 1e-9),
                               atol=max(unit, 1e-9) * np.abs(rm_ref.astype(float)).max())
    np.testing.assert_allclose(rv, rv_ref, rtol=max(unit, 1e-9))


@given(case=bn_cases(min_count=1, param_dtypes=DTYPES), running_dtype=st.sampled_from(DTYPES))
def test_forward_eval_matches_reference(backend, case, running_dtype):
    x, gamma, beta, axis, _ = case
    channels = x.shape[axis]
    rm = np.linspace(-1, 1, channels).astype(running_dtype)
    rv = np.linspace(0.5, 2, channels).astype(running_dtype)
    rm_before, rv_before = rm.copy(), rv.copy()
    ref = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=False, running_mean=rm,
                                    running_var=rv, backend="reference")
    y = _poisoned_like(x)
    got = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=False, running_mean=rm,
                                    running_var=rv, out=(y, None, None), backend=backend)
    assert got.y is y and not np.isnan(y).any()
    _assert_close(got.y, ref.y, x.dtype)
    _assert_close(got.invstd, ref.invstd, fastbn.stats_dtype(x.dtype))
    np.testing.assert_array_equal(rm, rm_before)       # eval never touches running stats
    np.testing.assert_array_equal(rv, rv_before)
    y2 = fastbn.batch_norm(x, rm, rv, gamma, beta, axis=axis, backend=backend)
    np.testing.assert_array_equal(_to_host(y2), got.y)


@given(case=bn_cases(param_dtypes=DTYPES), training=st.booleans())
def test_backward_matches_reference(backend, case, training):
    x, gamma, beta, axis, dy = case
    fwd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, backend="reference")
    ref = fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                                     training=training, backend="reference")
    sdtype = fwd.mean.dtype
    out = (_poisoned_like(x), _poisoned_like(fwd.mean), _poisoned_like(fwd.mean))
    got = fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                                     training=training, out=out, backend=backend)
    assert got.dx is out[0] and got.dgamma is out[1] and got.dbeta is out[2]
    assert got.dx.dtype == x.dtype and got.dgamma.dtype == sdtype
    assert not np.isnan(got.dx).any()
    # dx is a difference of O(1) terms: compare on the scale of dy * gamma * invstd
    scale = np.abs(ref.dx).max() + np.abs(dy).max() * np.max(fwd.invstd) * (
        1 if gamma is None else gamma.max())
    rtol = tolerance(x.dtype, ref.dx)["rtol"]
    np.testing.assert_allclose(got.dx.astype(float), ref.dx.astype(float), rtol=rtol,
                               atol=4 * rtol * scale)
    # dgamma/dbeta: float64 sums of `count` terms, rounded to the stats dtype; the bound grows
    # like sqrt(count) times the terms' size (a bound linear in count lets 60% pass in float16)
    dy_rows = channel_rows(dy, axis)
    x_rows = channel_rows(x, axis)
    xhat = (x_rows - x_rows.mean(axis=1, keepdims=True)) * np.asarray(fwd.invstd, float)[:, None]
    for name, terms in (("dgamma", dy_rows * xhat), ("dbeta", dy_rows)):
        want = np.asarray(getattr(ref, name), np.float64)
        error = np.abs(np.asarray(getattr(got, name), np.float64) - want)
        bound = sum_tolerance(terms, want, sdtype)
        assert np.all(error <= bound), (name, error, bound)


@given(case=bn_cases(min_count=1))
def test_moments_matches_reference(backend, case):
    x, _, _, axis, _ = case
    mean, var = fastbn.moments(x, axis=axis, backend=backend)
    ref_mean, ref_var = fastbn.moments(x, axis=axis, backend="reference")
    sdtype = fastbn.stats_dtype(x.dtype)
    assert _to_host(mean).dtype == sdtype
    _assert_close(_to_host(mean), ref_mean, sdtype)
    _assert_close(_to_host(var), ref_var, sdtype)


# ----------------------------------------------------------------------------------------------
# accuracy where the anchors break (PyTorch #5410, #162489)

@pytest.mark.parametrize("ratio", [1e4, 1e5, 1e6])
@pytest.mark.parametrize("shape, axis", [((64, 3, 9, 7), 1), ((600, 5), 1), ((8, 9, 7, 3), -1)])
def test_large_mean_relative_to_std_float32(backend, ratio, shape, axis, rng):
    std = 1.0
    x = (ratio * std + std * rng.standard_normal(shape)).astype(np.float32)
    exact = np.moveaxis(x.astype(np.float64), axis, 0).reshape(shape[axis], -1)
    mean, var = fastbn.moments(x, axis=axis, backend=backend)
    np.testing.assert_allclose(_to_host(var), exact.var(axis=1), rtol=1e-5)
    out = fastbn.batch_norm_forward(x, axis=axis, backend=backend)
    ref = fastbn.batch_norm_forward(x, axis=axis, backend="reference")
    np.testing.assert_allclose(out.y, ref.y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(1 / out.invstd.astype(float) ** 2 - 1e-5, exact.var(axis=1),
                               rtol=1e-5)
    dy = rng.standard_normal(shape).astype(np.float32)
    got = fastbn.batch_norm_backward(dy, x, out.mean, out.invstd, axis=axis, backend=backend)
    # the float64 truth: the same float32 inputs, exact statistics
    truth = fastbn.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64),
                                       exact.mean(axis=1), 1 / np.sqrt(exact.var(axis=1) + 1e-5),
                                       axis=axis, backend="reference")
    np.testing.assert_allclose(got.dx, truth.dx, rtol=1e-4, atol=1e-4 * np.abs(truth.dx).max())
    np.testing.assert_allclose(got.dgamma, truth.dgamma, rtol=1e-4,
                               atol=1e-4 * np.abs(truth.dgamma).max())


@pytest.mark.parametrize("shape, axis", [((50, 4, 6), 1), ((300, 3), 1), ((5, 6, 7, 2), -1)])
def test_huge_magnitude_float32_does_not_overflow(backend, shape, axis, rng):
    """Values near 1e19: a float32 sum of squares (1e38 * n) overflows; ours must not."""
    x = (rng.standard_normal(shape) * 5e18 + 1e19).astype(np.float32)
    exact = np.moveaxis(x.astype(np.float64), axis, 0).reshape(shape[axis], -1)
    rm, rv = np.zeros(shape[axis], np.float32), np.ones(shape[axis], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no overflow warnings, no skipped channels
        out = fastbn.batch_norm_forward(x, axis=axis, running_mean=rm, running_var=rv,
                                        backend=backend)
    assert np.all(np.isfinite(out.y)) and np.all(np.isfinite(out.invstd))
    np.testing.assert_allclose(out.mean, exact.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(1 / out.invstd.astype(float) ** 2, exact.var(axis=1), rtol=1e-5)
    ref = fastbn.batch_norm_forward(x, axis=axis, backend="reference")
    np.testing.assert_allclose(out.y, ref.y, rtol=1e-5, atol=1e-5)
    n = exact.shape[1]
    np.testing.assert_allclose(rv, 0.9 + 0.1 * exact.var(axis=1) * n / (n - 1), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# non-finite values, determinism, threads, aliasing

@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("shape, axis", [((6, 4, 5), 1), ((9, 4), 1), ((3, 5, 4), -1)])
def test_nonfinite_input_propagates_and_running_stats_skip_channel(backend, bad, shape, axis,
                                                                   rng):
    x = rng.standard_normal(shape)
    index = [0] * len(shape)
    index[axis % len(shape)] = 2
    x[tuple(index)] = bad
    channels = shape[axis]
    rm, rv = np.arange(channels, dtype=float), np.ones(channels)
    with pytest.warns(RuntimeWarning, match=r"channels \[2\]"):
        out = fastbn.batch_norm_forward(x, axis=axis, running_mean=rm, running_var=rv,
                                        backend=backend)
    y = np.moveaxis(out.y, axis, 0)
    assert np.all(np.isnan(y[2]))
    others = np.delete(y, 2, axis=0)
    assert np.all(np.isfinite(others))
    assert rm[2] == 2.0 and rv[2] == 1.0
    assert np.all(rm[[0, 1, 3]] != np.arange(channels)[[0, 1, 3]])


def _channel_input(shape, axis, channel, values, dtype, rng):
    """Standard-normal data with one channel replaced by `values` (broadcast over it)."""
    x = rng.standard_normal(shape)
    moved = np.moveaxis(x, axis, 0)
    moved[channel] = np.resize(np.asarray(values, np.float64), moved[channel].shape)
    return x.astype(dtype)


@pytest.mark.parametrize("running_dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape, axis", [((6, 4, 5), 1), ((9, 4), 1), ((3, 5, 4), -1)])
def test_warning_raised_as_error_leaves_every_running_statistic_unchanged(
        backend, shape, axis, running_dtype, rng):
    """Issue 13.4: the warning comes before any running statistic changes, so that a warning
    filter that raises leaves all of them (every channel) as they were."""
    x = _channel_input(shape, axis, 2, [np.nan, 1.0, 2.0], np.float32, rng)
    channels = shape[axis]
    rm = np.arange(channels).astype(running_dtype)
    rv = np.ones(channels, running_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match=r"channels \[2\]"):
            fastbn.batch_norm_forward(x, axis=axis, running_mean=rm, running_var=rv,
                                      backend=backend)
    np.testing.assert_array_equal(rm, np.arange(channels).astype(running_dtype))
    np.testing.assert_array_equal(rv, 1.0)
    # without the filter: the warning names the channel and the others are updated
    with pytest.warns(RuntimeWarning, match=r"channels \[2\]"):
        fastbn.batch_norm_forward(x, axis=axis, running_mean=rm, running_var=rv,
                                  backend=backend)
    assert rm[2] == 2 and rv[2] == 1
    others = [c for c in range(channels) if c != 2]
    assert np.all(rm[others] != np.arange(channels)[others]) and np.all(rv[others] != 1)


def _overflow_cases():
    # (data dtype, running stats dtype, values of the bad channel, which statistic overflows)
    return [
        ("float32", "float32", [3e38, -3e38], "var"),        # var 9e76: finite in float64 only
        ("float32", "float32", [1.5e38, -1.5e38, 1e38], "var"),
        ("float32", "float16", [1000.0, -1000.0], "var"),    # 0.1 * 1e6 > 65504
        ("float16", "float16", [1000.0, -1000.0], "var"),
        ("float32", "float16", [1e6, 1e6 + 2], "mean"),      # 0.1 * 1e6 > 65504
        ("float64", "float16", [-7e5, -7e5 + 3], "mean"),
        ("float64", "float32", [3e38, -3e38], "var"),
    ]


@pytest.mark.parametrize("dtype, running_dtype, values, what", _overflow_cases())
@pytest.mark.parametrize("shape, axis", [((6, 4, 5), 1), ((3, 5, 4), -1)])
def test_running_statistics_that_would_overflow_their_dtype_are_left_unchanged(
        backend, dtype, running_dtype, values, what, shape, axis, rng):
    """Issue 13.5: finite data whose new running statistic is not finite in the running
    statistics' dtype: treated like a non-finite batch (channel unchanged, with the warning)."""
    x = _channel_input(shape, axis, 1, values, dtype, rng)
    assert np.all(np.isfinite(x))
    channels = shape[axis]
    rm = np.linspace(-1, 1, channels).astype(running_dtype)
    rv = np.linspace(1, 2, channels).astype(running_dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    with pytest.warns(RuntimeWarning, match=r"channels \[1\]"):
        out = fastbn.batch_norm_forward(x, axis=axis, running_mean=rm, running_var=rv,
                                        backend=backend)
    assert np.all(np.isfinite(rm)) and np.all(np.isfinite(rv)), (rm, rv)
    assert rm[1] == rm0[1] and rv[1] == rv0[1]
    others = [c for c in range(channels) if c != 1]
    assert np.all(rm[others] != rm0[others]) and np.all(rv[others] != rv0[others])
    assert np.all(np.isfinite(np.delete(np.moveaxis(_to_host(out.y), axis, 0), 1, axis=0)))
    with warnings.catch_warnings():            # and as an error: nothing changes at all
        warnings.simplefilter("error")
        rm1, rv1 = rm.copy(), rv.copy()
        with pytest.raises(RuntimeWarning):
            fastbn.batch_norm_forward(x, axis=axis, running_mean=rm, running_var=rv,
                                      backend=backend)
        np.testing.assert_array_equal(rm, rm1)
        np.testing.assert_array_equal(rv, rv1)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape, axis", [((6, 3, 5), 1), ((40, 3), 1), ((3, 5, 3), -1),
                                         ((2, 3, 6001), 1)])
def test_constant_channel_with_tiny_eps_gives_beta_exactly(backend, dtype, affine, shape, axis,
                                                           rng):
    """Issue 13.6: var = 0 and eps = 1e-80 (invstd overflows float32): y = beta exactly on that
    channel (0 without beta), on every backend as in the reference; the other channels are
    normalized as usual."""
    x = _channel_input(shape, axis, 1, [3.0], dtype, rng)
    channels = shape[axis]
    gamma = np.linspace(0.5, 2, channels) if affine else None
    beta = np.array([0.25, -1.5, 2.0]) if affine else None
    results = {}
    for name in ("reference", backend):
        y = np.full(x.shape, np.nan, x.dtype)
        out = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, eps=1e-80,
                                        out=(y, None, None), backend=name)
        y = np.moveaxis(_to_host(out.y), axis, 0)
        want = beta[1] if affine else 0.0
        np.testing.assert_array_equal(y[1], np.asarray(want, x.dtype), err_msg=name)
        assert np.all(np.isfinite(y)), name
        results[name] = y
    _assert_close(results[backend], results["reference"], dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape, axis", [((7, 5, 33), 1), ((2000, 5), 1), ((3, 9, 11, 13), -1),
                                         ((1, 3, 40001), 1)])
def test_bitwise_deterministic(backend, dtype, shape, axis, rng):
    if backend == "cuda" and shape[2:] == (40001,):
        # every simulated GPU thread is a Python thread: a channel still spread over every
        # block and grid-stride loop of the simulator's small launches, in a tenth of the time
        shape = (1, 3, 4001)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    first = fastbn.batch_norm_forward(x, axis=axis, backend=backend)
    again = fastbn.batch_norm_forward(x, axis=axis, backend=backend)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(_to_host(a), _to_host(b))
    g1 = fastbn.batch_norm_backward(dy, x, first.mean, first.invstd, axis=axis, backend=backend)
    g2 = fastbn.batch_norm_backward(dy, x, first.mean, first.invstd, axis=axis, backend=backend)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(_to_host(a), _to_host(b))


@pytest.mark.parametrize("shape, axis", [((8, 6, 900), 1), ((9000, 7), 1)])
def test_concurrent_calls_match_serial_calls(backend, shape, axis):
    if backend == "cuda":      # every simulated GPU thread is a Python thread: keep it small
        shape = (3, 6, 25) if axis == 1 and len(shape) == 3 else (50, 7)
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
    serial = [fastbn.batch_norm_forward(x, axis=axis, backend=backend).y for x in inputs]
    serial_dx = [fastbn.batch_norm_backward(x, x, *fastbn.batch_norm_forward(
        x, axis=axis, backend=backend)[1:], axis=axis, backend=backend).dx for x in inputs]
    results = [None] * 4
    errors = []
    barrier = threading.Barrier(4)

    def work(i):
        try:
            barrier.wait()
            for _ in range(5):
                out = fastbn.batch_norm_forward(inputs[i], axis=axis, backend=backend)
                dx = fastbn.batch_norm_backward(inputs[i], inputs[i], out.mean, out.invstd,
                                                axis=axis, backend=backend).dx
            results[i] = (out.y, dx)
        except Exception as exc:      # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(4):
        np.testing.assert_array_equal(results[i][0], serial[i])
        np.testing.assert_array_equal(results[i][1], serial_dx[i])


@pytest.mark.parametrize("shape, axis", [((5, 4, 6), 1), ((30, 4), 1), ((4, 5, 4), -1)])
def test_in_place_output_and_gradient(backend, shape, axis, rng):
    x = rng.standard_normal(shape)
    expected = fastbn.batch_norm_forward(x, axis=axis, backend=backend)
    dy = rng.standard_normal(shape)
    expected_dx = fastbn.batch_norm_backward(dy, x, expected.mean, expected.invstd, axis=axis,
                                             backend=backend).dx
    dy_in_place = dy.copy()
    got_dx = fastbn.batch_norm_backward(dy_in_place, x, expected.mean, expected.invstd,
                                        axis=axis, out=(dy_in_place, None, None),
                                        backend=backend).dx
    assert got_dx is dy_in_place
    np.testing.assert_array_equal(got_dx, expected_dx)
    x_in_place = x.copy()
    got = fastbn.batch_norm_forward(x_in_place, axis=axis, out=(x_in_place, None, None),
                                    backend=backend)
    np.testing.assert_array_equal(got.y, expected.y)


@pytest.mark.parametrize("layout", ["C", "F", "permuted", "strided"])
def test_out_with_other_layout_than_x(backend, layout, rng):
    x = make_array(rng, (5, 3, 4, 6), "float32", "permuted")
    y = make_array(rng, (5, 3, 4, 6), "float32", layout)
    y[...] = np.nan
    got = fastbn.batch_norm_forward(x, axis=1, out=(y, None, None), backend=backend)
    ref = fastbn.batch_norm_forward(np.ascontiguousarray(x), axis=1, backend="reference")
    assert got.y is y
    _assert_close(y, ref.y, "float32")


def test_single_channel_many_values_and_zero_channels(backend, rng):
    x = rng.standard_normal((3, 1, 70001)).astype(np.float32) + 5
    out = fastbn.batch_norm_forward(x, backend=backend)
    ref = fastbn.batch_norm_forward(x, backend="reference")
    _assert_close(out.y, ref.y, "float32")
    _assert_close(out.mean, ref.mean, "float32")
    empty = np.zeros((4, 0, 3), np.float32)
    out = fastbn.batch_norm_forward(empty, backend=backend)
    assert out.y.shape == (4, 0, 3) and out.mean.shape == (0,)
