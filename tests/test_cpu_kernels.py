"""The cpu backend's work splits (docs/perf_log.md): every path against the reference, results
independent of the thread count, and accuracy where the shifted sums could cancel.

Each case names the path it takes (asserted through the dispatch helpers, so that a change of
policy cannot silently leave a path untested).
"""
import numba
import numpy as np
import pytest

import fastbn
from fastbn import _config
from fastbn.api import _Canonical
from fastbn.backends import cpu

from _cases import tolerance

# (shape, axis, memory layout, path): canonical views (outer, C, inner) of each regime
CASES = [
    ((6, 5, 900), 1, "C", "runs"),                  # channel runs, one task per channel
    ((3, 2, 20001), 1, "C", "segments"),            # few channels: each split into segments
    ((40000, 1), 1, "C", "one run"),                # C == 1 channels-last: one long run
    ((16, 40, 7, 7), 1, "C", "column blocks"),      # short runs (7x7) as column blocks
    ((40, 7, 7, 24), -1, "C", "row blocks"),        # channels-last, rows grouped (C < 1024)
    ((3000, 7), 1, "C", "row blocks"),              # few channels-last channels, grouped rows
    ((1100, 33, 5), 1, "F", "runs"),                # Fortran order: canonical (5, 33, 1100)
    ((5, 33, 1100), 1, "F", "column blocks"),       # Fortran order: canonical (1100, 33, 5)
    ((3, 1031), 1, "C", "row blocks"),              # many channels, one row each
]


def _path(x, axis):
    x3 = _Canonical(cpu, x, axis % x.ndim).view(x)
    if x3.shape[1] == 1 and x3.shape[2] == 1:
        return "one run"
    plan = cpu._matrix_plan(x3, (), 1)
    if plan is None:
        return "runs" if cpu._segments(x3) == 1 else "segments"
    return "column blocks" if plan[1] else "row blocks"


def _make(rng, shape, dtype, layout, offset=0.0):
    x = rng.standard_normal(shape) * 2.0 + offset
    x = np.asfortranarray(x) if layout == "F" else np.ascontiguousarray(x)
    return x.astype(dtype, order="K")


def _all_outputs(x, dy, axis, gamma, beta):
    fwd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, backend="cpu")
    ev = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=False,
                                   running_mean=fwd.mean.astype(np.float64),
                                   running_var=np.full(x.shape[axis], 1.5), backend="cpu")
    bwd = fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                                     backend="cpu")
    return {"y": fwd.y, "mean": fwd.mean, "invstd": fwd.invstd, "eval": ev.y, "dx": bwd.dx,
            "dgamma": bwd.dgamma, "dbeta": bwd.dbeta,
            "moments": np.stack(fastbn.moments(x, axis=axis, backend="cpu"))}


def _reference_outputs(x, dy, axis, gamma, beta, mean, invstd):
    ref = "reference"
    fwd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, backend=ref)
    ev = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=False,
                                   running_mean=mean.astype(np.float64),
                                   running_var=np.full(x.shape[axis], 1.5), backend=ref)
    bwd = fastbn.batch_norm_backward(dy, x, mean, invstd, gamma, axis=axis, backend=ref)
    return {"y": fwd.y, "mean": fwd.mean, "invstd": fwd.invstd, "eval": ev.y, "dx": bwd.dx,
            "dgamma": bwd.dgamma, "dbeta": bwd.dbeta,
            "moments": np.stack(fastbn.moments(x, axis=axis, backend=ref))}


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape, axis, layout, path", CASES)
def test_every_path_matches_reference_and_ignores_thread_count(shape, axis, layout, path, dtype):
    rng = np.random.default_rng(3)
    x = _make(rng, shape, dtype, layout, offset=3.0)
    dy = _make(rng, shape, dtype, layout)
    assert _path(x, axis) == path
    channels = shape[axis]
    gamma, beta = rng.uniform(0.5, 2, channels), rng.standard_normal(channels)
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _all_outputs(x, dy, axis, gamma, beta)
        numba.set_num_threads(saved)
        many = _all_outputs(x, dy, axis, gamma, beta)
    finally:
        numba.set_num_threads(saved)
    for name in one:
        np.testing.assert_array_equal(one[name], many[name], err_msg=name)
    ref = _reference_outputs(x, dy, axis, gamma, beta, many["mean"], many["invstd"])
    count = x.size // channels
    for name, got in many.items():
        want = ref[name]
        if name in ("dgamma", "dbeta"):     # sums of `count` terms of size |dy|
            rtol = tolerance(dtype, want)["rtol"]
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.sqrt(count) * 4,
                                       err_msg=name)
        else:
            np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64),
                                       **tolerance(dtype if name in ("y", "eval", "dx") else
                                                   fastbn.stats_dtype(dtype), want),
                                       err_msg=name)


@pytest.mark.parametrize("shape, axis, layout, path", CASES)
def test_shifted_sums_stay_accurate_when_the_first_values_are_outliers(shape, axis, layout, path):
    """The shift K is a mean of the first values seen; make those far from the rest (the
    worst case of the S2 - S1^2/n cancellation) and compare with exact float64 statistics."""
    rng = np.random.default_rng(5)
    x = _make(rng, shape, "float64", layout, offset=1e6)
    first = [slice(None)] * x.ndim
    first[0 if axis % x.ndim != 0 else 1] = slice(0, 1)
    x[tuple(first)] += 1e9                      # the first rows/run: 1e9 away from the rest
    channels = shape[axis]
    rows = np.moveaxis(x, axis, 0).reshape(channels, -1)
    mean, var = fastbn.moments(x, axis=axis, backend="cpu")
    np.testing.assert_allclose(mean, rows.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(var, rows.var(axis=1), rtol=1e-9)


def test_small_chunks_split_every_path(monkeypatch):
    """The same results and reference agreement with tiny work units (many blocks, segments,
    Chan merges and re-centred shifts)."""
    monkeypatch.setattr(_config, "CPU_CHUNK_ELEMENTS", 5)
    monkeypatch.setattr(_config, "CPU_PARALLEL_MIN_SIZE", 0)
    monkeypatch.setattr(_config, "CPU_FUSED_BYTES", 4096)
    rng = np.random.default_rng(11)
    for shape, axis in (((4, 3, 300), 1), ((9, 6, 7, 5), 1), ((300, 9), 1), ((7, 6, 5, 4), -1)):
        x = _make(rng, shape, "float32", "C", offset=10.0)
        dy = _make(rng, shape, "float32", "C")
        got = _all_outputs(x, dy, axis, None, None)
        ref = _reference_outputs(x, dy, axis, None, None, got["mean"], got["invstd"])
        for name in ("y", "eval", "dx", "mean", "moments"):
            np.testing.assert_allclose(np.asarray(got[name], np.float64), ref[name],
                                       **tolerance("float32", ref[name]), err_msg=name)
