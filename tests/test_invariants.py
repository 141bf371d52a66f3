"""Properties that need no oracle (STYLE.md, Tests), on every dtype the kernels take.

Per channel: the output's mean is beta and its variance gamma^2 var/(var + eps); dx sums to zero
and is orthogonal to xhat; y is invariant to x -> a x + b and dx scales by 1/a (paper, section
3.3); permuting the batch permutes y; Welford over split batches merged equals one pass. Each
runs on float16/float32/float64 data with gamma/beta in any float dtype, plus the inputs that
break float32 accumulators: means 1e4-1e6 times the spread, magnitudes near 1e19, and outliers
first.

Tolerances are the arithmetic's: a few units of the data dtype's roundoff times the natural size
of the quantity, and times 1 + |mean|/std where centring cancels (``values_scale``).

Runs on the backends in FASTBN_TEST_BACKENDS (see conftest.py).
"""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastbn
from _cases import (DTYPES, bn_cases, channel_rows, make_array, tolerance, unit_roundoff,
                    values_scale)


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _float(a):
    return np.asarray(_host(a), np.float64)


def _assert_below(error, bound, what):
    """Every error within its (broadcast) bound; the message gives the worst ratio."""
    error, bound = np.broadcast_arrays(np.asarray(error, np.float64),
                                       np.asarray(bound, np.float64))
    bad = ~(error <= bound)
    if bad.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            worst = np.nanmax(np.where(bad, error / bound, 0.0))
        raise AssertionError(f"{what}: {int(bad.sum())} of {error.size} values exceed the bound "
                             f"(worst: {worst:.3g} times it; first error "
                             f"{error[bad][0]:.3g} > {bound[bad][0]:.3g})")


def _gamma_beta(gamma, beta, channels):
    g = np.ones(channels) if gamma is None else gamma.astype(np.float64)
    b = np.zeros(channels) if beta is None else beta.astype(np.float64)
    return g, b


def _check_output_moments(x, gamma, beta, axis, eps, y, slack=1.0):
    """mean(y) = beta and var(y) = gamma^2 var/(var + eps) per channel, to the rounding of y
    (x's dtype) and of the float32 arithmetic used for float16/float32 data."""
    channels = x.shape[axis]
    g, b = _gamma_beta(gamma, beta, channels)
    var = channel_rows(x, axis).var(axis=1)
    rows = channel_rows(y, axis)
    unit = unit_roundoff(x.dtype)
    # y_i = gamma xhat_i + beta with relative error ~unit in |gamma xhat_i| and in |y_i|
    size = np.abs(rows).max(axis=1) + np.abs(g)
    _assert_below(np.abs(rows.mean(axis=1) - b), 8 * unit * slack * size, "mean(y) - beta")
    want = g**2 * var / (var + eps)
    _assert_below(np.abs(rows.var(axis=1) - want), 16 * unit * slack * (want + np.abs(g) * size),
                  "var(y) - gamma^2 var/(var + eps)")


@given(case=bn_cases(param_dtypes=DTYPES))
def test_output_moments_are_beta_and_scaled_gamma(backend, case):
    x, gamma, beta, axis, _ = case
    channels = x.shape[axis]
    if gamma is None:
        gamma = np.linspace(0.5, 2, channels).astype(np.float32)
        beta = np.linspace(-1, 1, channels)
    eps = 1e-5
    y = np.full(x.shape, np.nan, x.dtype)
    fastbn.batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, out=(y, None, None),
                              backend=backend)
    assert not np.isnan(y).any()
    _check_output_moments(x, gamma, beta, axis, eps, y, slack=values_scale(x, axis).max())


def _check_dx_invariants(x, dy, gamma, axis, invstd, dx, conditioning):
    """sum(dx) = 0 and sum(dx * xhat) = 0 per channel (eps negligible against the variance),
    each to 16 roundoffs of dx's dtype times its natural size gamma invstd |dy|_2, times the
    cancellation in centring x."""
    rows = channel_rows(x, axis)
    xhat = (rows - rows.mean(axis=1, keepdims=True)) * _float(invstd)[:, None]
    dx_rows = channel_rows(dx, axis)
    g = 1.0 if gamma is None else np.abs(gamma.astype(np.float64))
    natural = g * _float(invstd) * np.sqrt((channel_rows(dy, axis) ** 2).sum(axis=1))
    bound = 16 * unit_roundoff(x.dtype) * natural * conditioning
    _assert_below(np.abs(dx_rows.sum(axis=1)), bound, "sum(dx)")
    _assert_below(np.abs((dx_rows * xhat).sum(axis=1)), bound * np.abs(xhat).max(axis=1),
                  "sum(dx * xhat)")


@given(case=bn_cases(param_dtypes=DTYPES))
def test_dx_sums_to_zero_and_is_orthogonal_to_xhat(backend, case):
    x, gamma, beta, axis, dy = case
    conditioning = values_scale(x, axis)
    # the identities need var(xhat) = 1 (eps negligible) and a channel that is not constant
    assume(np.all(conditioning < 1e3))
    fwd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, eps=1e-30, backend=backend)
    dx = np.full(x.shape, np.nan, x.dtype)
    fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                               out=(dx, None, None), backend=backend)
    assert not np.isnan(dx).any()
    _check_dx_invariants(x, dy, gamma, axis, fwd.invstd, dx, conditioning)


@given(case=bn_cases(param_dtypes=DTYPES), a=st.sampled_from([0.25, 3.0, 1e3]),
       b=st.sampled_from([-7.0, 0.5, 1e3]))
def test_affine_transform_of_input_leaves_y_and_scales_dx(backend, case, a, b):
    """Paper section 3.3: BN(a x + b) = BN(x), and the gradient wrt x scales by 1/a. In float16
    and float32, a x + b is rounded to the dtype: the bound includes that rounding relative to
    the channel's spread."""
    x, gamma, beta, axis, dy = case
    with np.errstate(over="ignore"):
        x2 = (a * x.astype(np.float64) + b).astype(x.dtype)
    assume(np.all(np.isfinite(x2)))
    conditioning = np.maximum(values_scale(x, axis), values_scale(x2, axis))
    assume(np.all(conditioning < 1e3))
    eps = 1e-30          # so that eps does not break the scale invariance
    fwd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, backend=backend)
    fwd2 = fastbn.batch_norm_forward(x2, gamma, beta, axis=axis, eps=eps, backend=backend)
    unit = unit_roundoff(x.dtype)
    g, b_ = _gamma_beta(gamma, beta, x.shape[axis])
    shape = [1] * x.ndim
    shape[axis] = -1
    # xhat moves by ~unit * conditioning (the inputs' rounding against their spread)
    size = (np.abs(g) * conditioning + np.abs(b_)).reshape(shape)
    _assert_below(np.abs(_float(fwd2.y) - _float(fwd.y)), 8 * unit * size, "BN(a x + b) - BN(x)")
    dx = fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                                    backend=backend).dx
    dx2 = fastbn.batch_norm_backward(dy, x2, fwd2.mean, fwd2.invstd, gamma, axis=axis,
                                     backend=backend).dx
    natural = (np.abs(g) * _float(fwd.invstd) * conditioning).reshape(shape) * np.abs(
        _float(dy)).max()
    _assert_below(np.abs(_float(dx2) * a - _float(dx)), 16 * unit * (natural + np.abs(_float(dx))),
                  "a dx(a x + b) - dx(x)")


@given(case=bn_cases(param_dtypes=DTYPES), data=st.data())
def test_permuting_the_batch_permutes_y(backend, case, data):
    x, gamma, beta, axis, _ = case
    batch_axis = 0 if axis % x.ndim != 0 else 1
    perm = np.array(data.draw(st.permutations(range(x.shape[batch_axis]))))
    y = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, backend=backend).y
    y_perm = fastbn.batch_norm_forward(np.take(x, perm, axis=batch_axis), gamma, beta,
                                       axis=axis, backend=backend).y
    np.testing.assert_allclose(_float(y_perm), np.take(_float(y), perm, axis=batch_axis),
                               **tolerance(x.dtype, _float(y)))


@given(case=bn_cases(min_count=1), split=st.integers(1, 6))
def test_running_moments_split_merge_equals_one_pass(backend, case, split):
    x, _, _, axis, _ = case
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
    rows = channel_rows(x, axis)           # the exact float64 values of x, in any dtype
    for acc in (whole, merged, streamed):
        assert acc.count == rows.shape[1]
        np.testing.assert_allclose(acc.mean, rows.mean(axis=1), rtol=1e-12,
                                   atol=1e-12 * np.abs(rows).max())
        np.testing.assert_allclose(acc.var(), rows.var(axis=1), rtol=1e-9,
                                   atol=1e-12 * np.abs(rows).max() ** 2)


# ----------------------------------------------------------------------------------------------
# the inputs that break float32 accumulators: the invariants must still hold to float32 rounding
# of the normalized values (the statistics are exact), not to rounding of the data's magnitude

HARD_SHAPES = [((40, 3, 9), 1), ((300, 5), 1), ((6, 5, 7, 3), -1)]


def _hard_input(kind, shape, axis, dtype, rng):
    if kind.startswith("offset"):
        ratio = float(kind.split()[1])
        return (ratio + rng.standard_normal(shape)).astype(dtype)
    if kind == "1e19":
        return (rng.standard_normal(shape) * 5e18 + 1e19).astype(dtype)
    # outliers first: the first row/run (what a shifted sum would take as its shift) is far
    # from the rest
    x = rng.standard_normal(shape) * 2.0 + 10.0
    first = [slice(None)] * len(shape)
    first[0 if axis % len(shape) != 0 else 1] = slice(0, 1)
    x[tuple(first)] += 1e9 if dtype == "float64" else 3e4
    return x.astype(dtype)


HARD = [("offset 1e4", "float32"), ("offset 1e5", "float32"), ("offset 1e6", "float32"),
        ("offset 1e6", "float64"), ("1e19", "float32"), ("outliers first", "float32"),
        ("outliers first", "float64"), ("offset 1e3", "float16")]


@pytest.mark.parametrize("kind, dtype", HARD, ids=[f"{k}-{d}" for k, d in HARD])
@pytest.mark.parametrize("shape, axis", HARD_SHAPES)
def test_invariants_hold_where_float32_accumulators_break(backend, kind, dtype, shape, axis):
    rng = np.random.default_rng(17)
    x = _hard_input(kind, shape, axis, dtype, rng)
    channels = shape[axis]
    gamma = np.linspace(0.5, 2, channels).astype(np.float32)
    beta = np.linspace(-1, 1, channels).astype(np.float16)
    rows = channel_rows(x, axis)
    var = rows.var(axis=1)
    assert np.all(var > 0)
    eps = 1e-20 * float(var.min())           # negligible against every channel's variance
    y = np.full(x.shape, np.nan, x.dtype)
    fwd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, eps=eps, out=(y, None, None),
                                    backend=backend)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(_host(fwd.invstd)))
    # exact statistics: the saved mean to its own rounding, the variance to float32 rounding
    # (plus float64 rounding of the sums for float64 data)
    stats_unit = unit_roundoff(fastbn.stats_dtype(x.dtype))
    f64 = unit_roundoff(np.float64)
    np.testing.assert_allclose(_float(fwd.mean), rows.mean(axis=1), rtol=4 * stats_unit,
                               atol=8 * f64 * np.abs(rows).max())
    np.testing.assert_allclose(1 / _float(fwd.invstd) ** 2 - eps, var,
                               rtol=8 * stats_unit + 64 * f64)
    # y to the rounding of the normalized values in x's dtype; the float64 centring's own
    # cancellation (|mean|/std float64 roundoffs) matters only for float64 data
    slack = np.maximum(4.0, values_scale(x, axis).max() * f64 / unit_roundoff(x.dtype))
    _check_output_moments(x, gamma, beta, axis, eps, y, slack=slack)
    dy = rng.standard_normal(shape).astype(dtype)
    dx = np.full(x.shape, np.nan, x.dtype)
    fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                               out=(dx, None, None), backend=backend)
    assert np.all(np.isfinite(dx))
    _check_dx_invariants(x, dy, gamma, axis, fwd.invstd, dx, conditioning=slack)


@pytest.mark.parametrize("layout", ["C", "F", "permuted", "strided"])
@pytest.mark.parametrize("stats", ["float16", "float32", "float64"])
def test_running_statistics_in_any_dtype_follow_the_batch(backend, layout, stats):
    """r = (1 - m) r + m batch (unbiased variance) in the running statistics' own dtype; float16
    running statistics included."""
    rng = np.random.default_rng(23)
    x = make_array(rng, (9, 4, 5), "float32", layout, scale=2.0, offset=3.0)
    rm = np.linspace(-1, 1, 4).astype(stats)
    rv = np.linspace(0.5, 2, 4).astype(stats)
    want_mean = 0.7 * rm.astype(np.float64) + 0.3 * channel_rows(x, 1).mean(axis=1)
    want_var = 0.7 * rv.astype(np.float64) + 0.3 * channel_rows(x, 1).var(axis=1, ddof=1)
    fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=0.3, backend=backend)
    assert rm.dtype == stats and rv.dtype == stats
    # the update is computed in float64 and rounded once to the running statistics' dtype
    unit = unit_roundoff(stats)
    np.testing.assert_allclose(rm, want_mean, rtol=2 * unit,
                               atol=2 * unit * np.abs(want_mean).max())
    np.testing.assert_allclose(rv, want_var, rtol=2 * unit)
