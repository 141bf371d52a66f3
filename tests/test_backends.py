"""Every backend against the NumPy float64 reference, plus invariants that need no oracle.

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
from _cases import bn_cases, make_array, tolerance


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

@given(case=bn_cases())
def test_forward_train_matches_reference(backend, case):
    x, gamma, beta, axis, _ = case
    channels = x.shape[axis]
    sdtype = fastbn.stats_dtype(x.dtype)
    rm_ref, rv_ref = np.linspace(-1, 1, channels), np.linspace(0.5, 2, channels)
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
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-9, atol=1e-9 * np.abs(rm_ref).max())
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-9)


@given(case=bn_cases(min_count=1))
def test_forward_eval_matches_reference(backend, case):
    x, gamma, beta, axis, _ = case
    channels = x.shape[axis]
    rm, rv = np.linspace(-1, 1, channels), np.linspace(0.5, 2, channels)
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


@given(case=bn_cases(), training=st.booleans())
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
    count = x.size // x.shape[axis]
    for name in ("dgamma", "dbeta"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=rtol,
                                   atol=rtol * np.abs(dy).max() * count)


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
# invariants: no oracle needed

def _channel_view(a, axis):
    a = np.moveaxis(np.asarray(a, np.float64), axis, 0)
    return a.reshape(a.shape[0], -1)


@given(case=bn_cases())
def test_output_moments_are_beta_and_scaled_gamma(backend, case):
    x, gamma, beta, axis, _ = case
    x = x.astype(np.float64)
    channels = x.shape[axis]
    gamma = np.linspace(0.5, 2, channels) if gamma is None else gamma
    beta = np.zeros(channels) if beta is None else beta
    eps = 1e-5
    y = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, backend=backend).y
    var = _channel_view(x, axis).var(axis=1)
    rows = _channel_view(y, axis)
    np.testing.assert_allclose(rows.mean(axis=1), beta, atol=1e-9 * (1 + np.abs(gamma).max()))
    np.testing.assert_allclose(rows.var(axis=1), gamma**2 * var / (var + eps), rtol=1e-8,
                               atol=1e-12)


@given(case=bn_cases())
def test_dx_sums_to_zero_and_is_orthogonal_to_xhat(backend, case):
    x, gamma, beta, axis, dy = case
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    # sum(dx * xhat) = 0 needs var(xhat) = 1, i.e. eps negligible against the variance
    assume(np.all(_channel_view(x, axis).var(axis=1) > 1e-6))
    fwd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, eps=1e-30, backend=backend)
    dx = fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                                    backend=backend).dx
    rows = _channel_view(x, axis)
    xhat = (rows - rows.mean(axis=1, keepdims=True)) * fwd.invstd[:, None]
    dx_rows = _channel_view(dx, axis)
    gamma = 1.0 if gamma is None else gamma
    # the natural size of each term: gamma * invstd * sum|dy|
    scale = gamma * fwd.invstd * np.abs(_channel_view(dy, axis)).sum(axis=1)
    assert np.all(np.abs(dx_rows.sum(axis=1)) <= 1e-10 * scale)
    # exactly: sum(dx * xhat) = gamma*invstd*sum(dy*xhat) * eps/(var+eps), and eps/var < 1e-6
    assert np.all(np.abs((dx_rows * xhat).sum(axis=1)) <= 2e-6 * scale * np.abs(xhat).max())


@given(case=bn_cases(), a=st.sampled_from([0.25, 3.0, 1e3]), b=st.sampled_from([-7.0, 0.5, 1e3]))
def test_affine_transform_of_input_leaves_y_and_scales_dx(backend, case, a, b):
    """Paper section 3.3: BN(a x + b) = BN(x), and the gradient wrt x scales by 1/a."""
    x, gamma, beta, axis, dy = case
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    eps = 1e-30          # so that eps does not break the scale invariance
    fwd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, backend=backend)
    x2 = a * x + b
    fwd2 = fastbn.batch_norm_forward(x2, gamma, beta, axis=axis, eps=eps, backend=backend)
    assume(np.all(_channel_view(x, axis).var(axis=1) > 1e-6))   # eps must stay negligible
    np.testing.assert_allclose(fwd2.y, fwd.y, rtol=1e-7, atol=1e-7)
    dx = fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                                    backend=backend).dx
    dx2 = fastbn.batch_norm_backward(dy, x2, fwd2.mean, fwd2.invstd, gamma, axis=axis,
                                     backend=backend).dx
    natural = np.max(fwd.invstd) * np.abs(dy).max() * (1.0 if gamma is None else gamma.max())
    np.testing.assert_allclose(dx2 * a, dx, rtol=1e-6, atol=1e-8 * natural)


@given(case=bn_cases(), data=st.data())
def test_permuting_the_batch_permutes_y(backend, case, data):
    x, gamma, beta, axis, _ = case
    batch_axis = 0 if axis % x.ndim != 0 else 1
    perm = np.array(data.draw(st.permutations(range(x.shape[batch_axis]))))
    y = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, backend=backend).y
    y_perm = fastbn.batch_norm_forward(np.take(x, perm, axis=batch_axis), gamma, beta,
                                       axis=axis, backend=backend).y
    _assert_close(y_perm, np.take(y, perm, axis=batch_axis), x.dtype)


@given(case=bn_cases(min_count=1), split=st.integers(1, 6))
def test_running_moments_split_merge_equals_one_pass(backend, case, split):
    x, _, _, axis, _ = case
    x = x.astype(np.float64)
    batch_axis = 0 if axis % x.ndim != 0 else 1
    pieces = np.array_split(x, min(split, x.shape[batch_axis]), axis=batch_axis)
    channels = x.shape[axis]
    whole = fastbn.RunningMoments(channels).update(x, axis=axis, backend=backend)
    parts = [fastbn.RunningMoments(channels).update(p, axis=axis, backend=backend)
             for p in pieces]
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(p)
    streamed = fastbn.RunningMoments(channels)
    for p in pieces:
        streamed.update(p, axis=axis, backend=backend)
    rows = _channel_view(x, axis)
    for acc in (whole, merged, streamed):
        assert acc.count == rows.shape[1]
        np.testing.assert_allclose(acc.mean, rows.mean(axis=1), rtol=1e-12,
                                   atol=1e-12 * np.abs(rows).max())
        np.testing.assert_allclose(acc.var(), rows.var(axis=1), rtol=1e-9,
                                   atol=1e-12 * np.abs(rows).max() ** 2)


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


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape, axis", [((7, 5, 33), 1), ((2000, 5), 1), ((3, 9, 11, 13), -1),
                                         ((1, 3, 40001), 1)])
def test_bitwise_deterministic(backend, dtype, shape, axis, rng):
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
