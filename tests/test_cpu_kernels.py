"""The cpu backend at the contract level (``_contract.py``): every plan against the reference
backend on canonical (outer, C, inner) views, bitwise determinism, and the edge cases of the
kernels' arithmetic.

Each case names the plan it takes (asserted through ``cpu._plan``, so that a change of policy
cannot silently leave a path untested). Outputs are NaN-poisoned before every call, so an
element a kernel forgets to write fails the comparison.
"""

import numba
import numpy as np
import pytest

from fastbn import _config
from fastbn.backends import cpu, reference

from _cases import tolerance

# (canonical shape, plan of the fused operations, plan of the elementwise ones)
CASES = [
    ((6, 5, 900), "runs", "runs"),                # channel runs, one task per channel
    ((3, 2, 20001), "runs/segments", "runs"),     # few channels: each split into segments
    ((40000, 1, 1), "runs/one run", "runs"),      # C == 1 channels-last: one long run
    ((16, 40, 49), "blocks", "rows/by run"),      # short runs (7x7) as column blocks
    ((30, 40, 9), "blocks", "rows"),              # shorter runs (3x3): per-column coefficients
    ((60, 100, 1), "rows", "rows"),               # a small channels-last batch: one row block
    ((5000, 40, 1), "rows/blocks", "rows"),       # channels-last, grouped rows, row blocks
    ((100, 1031, 1), "rows/blocks", "rows"),      # many channels, row blocks
]
IDS = [f"{shape}-{path}" for shape, path, _ in CASES]
DTYPES = ["float16", "float32", "float64"]


def _plan_name(op, x3):
    plan = cpu._plan(op, x3, 1)
    name = plan.kind
    if plan.one_run:
        return name + "/one run"
    if plan.kind == "runs" and plan.segments > 1:
        return name + "/segments"
    if plan.kind == "rows" and plan.blocks > 1:
        return name + "/blocks"
    return name


def _elementwise_name(x3):
    """The plan kind of the elementwise operations; "rows/by run" for channel runs that rows
    compute run by run with per-channel coefficients (CPU_MIN_SCALAR_RUN)."""
    plan = cpu._plan("forward_eval", x3, 1)
    if plan.kind == "rows" and plan.inner >= _config.CPU_MIN_SCALAR_RUN:
        return "rows/by run"
    return plan.kind


def _data(rng, shape3, dtype, offset=3.0):
    return (rng.standard_normal(shape3) * 2.0 + offset).astype(dtype)


def _stats_dtype(dtype):
    return np.float64 if dtype == "float64" else np.float32


def _poison(shape, dtype):
    return np.full(shape, np.nan, dtype)


def _fused_outputs(be, x3, dy3, weight, bias, activation=None, residual3=None):
    """Every operation of the contract on one input, into NaN-poisoned outputs."""
    channels = x3.shape[1]
    sdtype = _stats_dtype(x3.dtype.name)
    out = {}
    y3, mean, invstd = _poison(x3.shape, x3.dtype), _poison(channels, sdtype), \
        _poison(channels, sdtype)
    running_mean = np.linspace(-1, 1, channels).astype(np.float32)
    running_var = np.linspace(0.5, 2, channels).astype(np.float32)
    be.forward_train(x3, weight, bias, 1e-5, 0.3, running_mean, running_var, activation,
                     residual3, None, y3, mean, invstd)
    out.update(y=y3, mean=mean, invstd=invstd, running_mean=running_mean,
               running_var=running_var)
    y_eval, mean_eval, invstd_eval = _poison(x3.shape, x3.dtype), _poison(channels, sdtype), \
        _poison(channels, sdtype)
    be.forward_eval(x3, weight, bias, running_mean, running_var, 1e-5, activation, residual3,
                    y_eval, mean_eval, invstd_eval)
    out.update(y_eval=y_eval, mean_eval=mean_eval, invstd_eval=invstd_eval)
    for training in (True, False):
        dx3, dgamma, dbeta = _poison(x3.shape, x3.dtype), _poison(channels, sdtype), \
            _poison(channels, sdtype)
        dres = None if residual3 is None else _poison(x3.shape, x3.dtype)
        be.backward(dy3, x3, mean, invstd, weight, training, activation, y3, dx3, dgamma, dbeta,
                    dres)
        out.update({f"dx_{training}": dx3, f"dgamma_{training}": dgamma,
                    f"dbeta_{training}": dbeta})
        if dres is not None:
            out[f"dresidual_{training}"] = dres
    if activation is None and residual3 is None:
        m, v = _poison(channels, sdtype), _poison(channels, sdtype)
        be.moments(x3, m, v)
        out.update(moments_mean=m, moments_var=v)
        out["channel_moments"] = np.stack(be.channel_moments(x3))
        sums = be.backward_reduce(dy3, x3, mean)
        out["backward_reduce"] = sums
        count = x3.shape[0] * x3.shape[2]
        inv = invstd.astype(np.float64)
        scale = inv * (1.0 if weight is None else weight.astype(np.float64))
        coef = inv * inv * sums[1] / count
        dx_apply = _poison(x3.shape, x3.dtype)
        be.backward_apply(dy3, x3, mean, scale, sums[0] / count, coef, dx_apply)
        out["dx_apply"] = dx_apply
    return out


def _compare(got, want, dtype, count):
    assert set(got) == set(want)
    for name in want:
        g, w = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
        assert not np.isnan(g).any(), f"{name}: an element was not written"
        if name.startswith(("dgamma", "dbeta")) or name == "backward_reduce":
            # sums of `count` terms: the error grows like sqrt(count)
            rtol = tolerance(dtype, w)["rtol"]
            scale = max(1.0, float(np.abs(w).max()) / np.sqrt(count))
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.sqrt(count) * 8 * scale,
                                       err_msg=name)
        else:
            element_dtype = dtype if name.startswith(("y", "dx", "dres")) else \
                _stats_dtype(dtype)
            np.testing.assert_allclose(g, w, **tolerance(element_dtype, w), err_msg=name)


@pytest.fixture
def parallel_everywhere(monkeypatch):
    """Every call on the thread pool."""
    monkeypatch.setattr(_config, "CPU_PARALLEL_MIN_SIZE", 0)


def _thread_counts():
    return sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape3, fused_path, elementwise_path", CASES, ids=IDS)
def test_every_plan_matches_reference_and_ignores_thread_count(shape3, fused_path,
                                                               elementwise_path, dtype):
    rng = np.random.default_rng(3)
    x3 = _data(rng, shape3, dtype)
    dy3 = _data(rng, shape3, dtype, offset=0.0)
    assert _plan_name("forward_train", x3) == fused_path
    assert _elementwise_name(x3) == elementwise_path
    channels = shape3[1]
    weight = rng.uniform(0.5, 2, channels).astype(np.float32)     # the caller's dtype
    bias = rng.standard_normal(channels)
    saved = numba.get_num_threads(), _config.CPU_PARALLEL_MIN_SIZE
    results = []
    try:
        _config.CPU_PARALLEL_MIN_SIZE = 0
        for threads in _thread_counts():
            numba.set_num_threads(threads)
            results.append(_fused_outputs(cpu, x3, dy3, weight, bias))
    finally:
        numba.set_num_threads(saved[0])
        _config.CPU_PARALLEL_MIN_SIZE = saved[1]
    results.append(_fused_outputs(cpu, x3, dy3, weight, bias))   # the default config
    for other in results[1:]:
        for name in results[0]:
            np.testing.assert_array_equal(results[0][name], other[name], err_msg=name)
    want = _fused_outputs(reference, x3, dy3, weight, bias)
    _compare(results[0], want, dtype, shape3[0] * shape3[2])


@pytest.mark.parametrize("activation, residual", [("relu", True), ("sigmoid", False)])
@pytest.mark.parametrize("shape3, fused_path, elementwise_path", CASES, ids=IDS)
def test_fused_activation_and_residual_match_reference(shape3, fused_path, elementwise_path,
                                                       activation, residual):
    rng = np.random.default_rng(7)
    dtype = "float32"
    x3 = _data(rng, shape3, dtype)
    dy3 = _data(rng, shape3, dtype, offset=0.0)
    residual3 = _data(rng, shape3, dtype, offset=-0.5) if residual else None
    channels = shape3[1]
    weight = rng.uniform(0.5, 2, channels)
    bias = None
    got = _fused_outputs(cpu, x3, dy3, weight, bias, activation, residual3)
    want = _fused_outputs(reference, x3, dy3, weight, bias, activation, residual3)
    _compare(got, want, dtype, shape3[0] * shape3[2])


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_fused_activation_other_dtypes(dtype):
    rng = np.random.default_rng(8)
    for shape3 in ((6, 5, 900), (60, 100, 1)):
        x3 = _data(rng, shape3, dtype, offset=0.2)
        dy3 = _data(rng, shape3, dtype, offset=0.0)
        residual3 = _data(rng, shape3, dtype, offset=0.0)
        got = _fused_outputs(cpu, x3, dy3, None, None, "relu", residual3)
        want = _fused_outputs(reference, x3, dy3, None, None, "relu", residual3)
        _compare(got, want, dtype, shape3[0] * shape3[2])


# ----------------------------------------------------------------------------------------------
# bitwise determinism (issue 13.1): in place, output layouts, threads

def _strided_like(a3, kind):
    """An uninitialized array of a3's shape and dtype in another memory layout."""
    if kind == "C":
        return np.empty(a3.shape, a3.dtype)
    if kind == "F":
        return np.asfortranarray(np.empty(a3.shape, a3.dtype))
    big = np.empty((a3.shape[0], a3.shape[1], a3.shape[2] * 2 + 1), a3.dtype)
    return big[:, :, 1::2]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape3, fused_path, elementwise_path", CASES, ids=IDS)
def test_bits_do_not_depend_on_in_place_or_output_layout(shape3, fused_path, elementwise_path,
                                                         dtype, parallel_everywhere):
    rng = np.random.default_rng(13)
    x3 = _data(rng, shape3, dtype)
    dy3 = _data(rng, shape3, dtype, offset=0.0)
    channels = shape3[1]
    weight = rng.uniform(0.5, 2, channels)
    sdtype = _stats_dtype(dtype)

    def train(y3, x=x3):
        mean, invstd = np.empty(channels, sdtype), np.empty(channels, sdtype)
        cpu.forward_train(x, weight, None, 1e-5, 0.1, None, None, None, None, None, y3, mean,
                          invstd)
        return y3, mean, invstd

    y_ref, mean, invstd = train(np.empty_like(x3))
    for kind in ("F", "strided"):
        y = train(_strided_like(x3, kind))[0]
        np.testing.assert_array_equal(y, y_ref, err_msg=f"y into a {kind} buffer")
    x_copy = x3.copy()
    np.testing.assert_array_equal(train(x_copy, x=x_copy)[0], y_ref, err_msg="y in place")

    def grad(dx3, dy=dy3, x=x3):
        dgamma, dbeta = np.empty(channels, sdtype), np.empty(channels, sdtype)
        cpu.backward(dy, x, mean, invstd, weight, True, None, None, dx3, dgamma, dbeta, None)
        return dx3, dgamma, dbeta

    dx_ref, dgamma_ref, dbeta_ref = grad(np.empty_like(x3))
    cases = {kind: grad(_strided_like(x3, kind)) for kind in ("F", "strided")}
    for kind in ("F", "strided"):          # the inputs in other layouts (y from out=, say)
        dy_other, x_other = _strided_like(x3, kind), _strided_like(x3, kind)
        dy_other[...] = dy3
        x_other[...] = x3
        cases[f"dy and x {kind}"] = grad(np.empty_like(x3), dy=dy_other, x=x_other)
    dy_copy = dy3.copy()
    cases["in place over dy"] = grad(dy_copy, dy=dy_copy)
    x_copy = x3.copy()
    cases["in place over x"] = grad(x_copy, x=x_copy)
    for kind, (dx, dgamma, dbeta) in cases.items():
        np.testing.assert_array_equal(dx, dx_ref, err_msg=f"dx: {kind}")
        np.testing.assert_array_equal(dgamma, dgamma_ref, err_msg=f"dgamma: {kind}")
        np.testing.assert_array_equal(dbeta, dbeta_ref, err_msg=f"dbeta: {kind}")


def test_plans_offer_enough_tasks_for_64_cores():
    """The benchmark shapes (and a single huge channel) offer at least 64 tasks; channel-major
    tensors with 16..63 channels offer one task per channel (the fused pass needs a whole
    channel), and tiny channel segments are not made shorter than CPU_CHUNK_ELEMENTS."""
    for shape3 in ((64, 64, 3136), (200704, 64, 1), (64, 2048, 49), (1, 1, 1 << 22),
                   (64, 1024, 196), (8192, 512, 1), (64, 2, 1 << 16)):
        for op in ("forward_train", "backward", "moments", "forward_eval", "backward_reduce",
                   "backward_apply"):
            assert cpu.plan_tasks(shape3, 4, op) >= 64, (shape3, op)
    assert cpu.plan_tasks((64, 32, 3136), 4, "forward_train") == 32


# ----------------------------------------------------------------------------------------------
# edge cases of the arithmetic

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape3", [(6, 3, 900), (60, 3, 1), (16, 3, 49)])
def test_constant_channel_with_tiny_eps_gives_beta(shape3, dtype):
    """var = 0 and eps = 1e-80: invstd = 1e40 overflows float32, and the scale saturates so that
    y = beta exactly (0 without beta), as in the float64 reference (issue 13.6)."""
    x3 = np.full(shape3, 1.25, dtype)
    x3[:, 1] = np.linspace(-1, 1, shape3[0] * shape3[2]).reshape(shape3[0], shape3[2])
    bias = np.array([0.5, -1.0, 2.0])
    for be in (cpu, reference):
        y3 = _poison(shape3, dtype)
        mean, invstd = _poison(3, _stats_dtype(dtype)), _poison(3, _stats_dtype(dtype))
        be.forward_train(x3, None, bias, 1e-80, 0.1, None, None, None, None, None, y3, mean,
                         invstd)
        assert np.all(y3[:, 0] == np.asarray(0.5, dtype)), be.name
        assert np.all(y3[:, 2] == np.asarray(2.0, dtype)), be.name
        y3 = _poison(shape3, dtype)
        be.forward_train(x3, None, None, 1e-80, 0.1, None, None, None, None, None, y3, mean,
                         invstd)
        assert np.all(y3[:, 0] == 0) and np.all(y3[:, 2] == 0), be.name


@pytest.mark.parametrize("running_dtype", ["float16", "float32", "float64"])
def test_running_statistics_warn_before_change_and_skip_non_finite(running_dtype):
    x3 = np.random.default_rng(1).standard_normal((40, 3, 5))
    x3[:, 1] *= 1e30                           # var ~ 1e60: overflows float16/float32 storage
    x3[0, 2, 0] = np.nan
    for be in (cpu, reference):
        running_mean = np.zeros(3, running_dtype)
        running_var = np.ones(3, running_dtype)
        seen = []

        def warn(channels):
            seen.append((list(channels), running_mean.copy(), running_var.copy()))
            raise RuntimeError("stop")

        y3, mean, invstd = np.empty_like(x3), np.empty(3), np.empty(3)
        with pytest.raises(RuntimeError):
            be.forward_train(x3, None, None, 1e-5, 0.5, running_mean, running_var, None, None,
                             warn, y3, mean, invstd)
        expected_bad = [2] if running_dtype == "float64" else [1, 2]
        assert seen[0][0] == expected_bad, be.name
        assert np.all(running_mean == 0) and np.all(running_var == 1), be.name
        results = []
        for_warn = []
        be.forward_train(x3, None, None, 1e-5, 0.5, running_mean, running_var, None, None,
                         for_warn.append, y3, mean, invstd)
        results.append((running_mean.copy(), running_var.copy()))
        assert for_warn == [expected_bad]
        assert running_mean[expected_bad[0]] == 0
        assert running_mean[0] != 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_running_statistics_update_matches_reference_bitwise(dtype):
    """The compiled update does NumPy's arithmetic: the same bits as the reference's."""
    rng = np.random.default_rng(2)
    mean, var = rng.standard_normal(5), rng.uniform(0.1, 3, 5)
    got, want = [], []
    for be, into in ((cpu, got), (reference, want)):
        running_mean = np.linspace(-1, 1, 5).astype(dtype)
        running_var = np.linspace(0.5, 2, 5).astype(dtype)
        be.update_running_stats(running_mean, running_var, mean, var, 37, 0.3, None)
        into += [running_mean, running_var]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("shape3, fused_path, elementwise_path", CASES, ids=IDS)
def test_shifted_sums_stay_accurate_when_the_first_values_are_outliers(shape3, fused_path,
                                                                       elementwise_path):
    """The shift K is a mean of the first values seen; make those far from the rest (the
    worst case of the S2 - S1^2/n cancellation) and compare with exact float64 statistics."""
    rng = np.random.default_rng(5)
    x3 = rng.standard_normal(shape3) * 2.0 + 1e6
    if shape3[1] == 1 and shape3[2] == 1:
        x3[:100] += 1e9
    elif shape3[2] == 1:
        x3[0] += 1e9
    else:
        x3[0, :, :min(shape3[2], 100)] += 1e9
    mean, m2 = cpu.channel_moments(x3)
    want_mean, want_m2 = reference.channel_moments(x3)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-13)
    np.testing.assert_allclose(m2, want_m2, rtol=1e-9)


def test_small_chunks_split_every_path(monkeypatch):
    """The same agreement with tiny work units (many blocks, segments, Chan merges and
    re-centred shifts)."""
    monkeypatch.setattr(_config, "CPU_CHUNK_ELEMENTS", 5)
    monkeypatch.setattr(_config, "CPU_PARALLEL_MIN_SIZE", 0)
    monkeypatch.setattr(_config, "CPU_FUSED_BYTES", 4096)
    rng = np.random.default_rng(11)
    for shape3 in ((4, 3, 300), (9, 6, 35), (300, 9, 1), (7, 4, 30), (210, 5, 1)):
        x3 = _data(rng, shape3, "float32", offset=10.0)
        dy3 = _data(rng, shape3, "float32", offset=0.0)
        got = _fused_outputs(cpu, x3, dy3, None, None)
        want = _fused_outputs(reference, x3, dy3, None, None)
        _compare(got, want, "float32", shape3[0] * shape3[2])


@numba.njit(error_model="numpy", boundscheck=False)
def _exp_all(t, out):
    for i in range(t.shape[0]):
        out[i] = cpu._exp(t[i])


@pytest.mark.parametrize("dtype, lo, hi, ulps", [("float32", -87.0, 88.0, 1.0),
                                                 ("float64", -708.0, 709.0, 1.5)])
def test_exp_is_within_an_ulp_or_so_and_keeps_nan(dtype, lo, hi, ulps):
    """The kernels' exp (the fused sigmoid's): relative error against exp in long double, in
    units of the dtype's epsilon, over its whole clamped range and densely near 0; NaN stays
    NaN; beyond the range it saturates (exp(88) / exp(709) for overflow, exp(-87) / exp(-708)
    for underflow), so the sigmoid still goes to 0 and 1."""
    t = np.concatenate([np.linspace(lo, hi, 200001), np.linspace(-2, 2, 200001),
                        np.random.default_rng(0).uniform(lo, hi, 100000)]).astype(dtype)
    out = np.empty_like(t)
    _exp_all(t, out)
    exact = np.exp(t.astype(np.longdouble))
    error = np.abs(out.astype(np.longdouble) - exact) / exact / np.finfo(dtype).eps
    assert float(error.max()) <= ulps, float(error.max())
    special = np.array([np.nan, np.inf, -np.inf, 1e4, -1e4, 0.0], dtype)
    out = np.empty_like(special)
    _exp_all(special, out)
    assert np.isnan(out[0]) and out[5] == 1.0
    eps = float(np.finfo(dtype).eps)
    assert out[1] == out[3] and abs(out[1] / np.exp(np.longdouble(hi)) - 1) < 2 * eps
    assert out[2] == out[4] and abs(out[2] / np.exp(np.longdouble(lo)) - 1) < 2 * eps
    sigmoid = 1 / (1 + out[1:3])
    assert sigmoid[0] < 1e-37 and sigmoid[1] == 1.0
