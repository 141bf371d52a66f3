"""The public API surface: dispatch precedence, result types, the torch-style functional."""
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fastbn
from fastbn import backends


def test_backend_precedence(monkeypatch):
    seen = []
    real_load = backends.load

    def spy(name):
        seen.append(name)
        return real_load(name)

    monkeypatch.setattr(backends, "load", spy)
    x = np.random.default_rng(0).standard_normal((5, 3))
    assert fastbn.get_backend() == "cpu"                       # the default
    fastbn.moments(x)
    try:
        fastbn.set_backend("reference")
        fastbn.moments(x)
        with fastbn.use_backend("cpu"):
            fastbn.moments(x)                                 # use_backend beats set_backend
            fastbn.moments(x, backend="reference")            # the argument beats both
            with fastbn.use_backend("reference"):
                fastbn.moments(x)
            fastbn.moments(x)
        fastbn.moments(x)
    finally:
        fastbn.set_backend("cpu")
    assert seen == ["cpu", "reference", "cpu", "reference", "reference", "cpu", "reference"]


def test_use_backend_is_thread_local():
    inside = []
    with fastbn.use_backend("reference"):
        t = threading.Thread(target=lambda: inside.append(fastbn.get_backend()))
        t.start()
        t.join()
        assert fastbn.get_backend() == "reference"
    assert inside == ["cpu"]


def test_results_are_named_tuples():
    x = np.random.default_rng(1).standard_normal((6, 4, 3)).astype(np.float32)
    out = fastbn.batch_norm_forward(x)
    assert isinstance(out, fastbn.BatchNormOutput)
    y, mean, invstd = out
    assert y is out.y and mean is out.mean and invstd is out.invstd
    grads = fastbn.batch_norm_backward(x, x, mean, invstd)
    assert isinstance(grads, fastbn.BatchNormGrads)
    assert grads.dx.shape == x.shape and grads.dgamma.shape == (4,)


def test_batch_norm_has_torch_argument_order():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 3, 2))
    rm, rv = np.zeros(3), np.ones(3)
    g, b = rng.standard_normal(3), rng.standard_normal(3)
    y = fastbn.batch_norm(x, rm, rv, g, b, True, 0.5, 1e-3)
    ref = fastbn.batch_norm_forward(x, g, b, eps=1e-3, training=True, backend="reference").y
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert np.all(rm != 0)                                   # updated in place
    y_eval = fastbn.batch_norm(x, rm, rv, g, b)              # training=False by default
    np.testing.assert_allclose(y_eval, ((x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5))
                               * g[:, None] + b[:, None], rtol=1e-12)


def test_eval_forward_returns_running_statistics_as_saved_stats():
    x = np.ones((2, 3), np.float32)
    rm, rv = np.array([1.0, 2, 3]), np.array([4.0, 5, 6])
    out = fastbn.batch_norm_forward(x, training=False, running_mean=rm, running_var=rv, eps=0.5)
    assert out.mean.dtype == np.float32
    np.testing.assert_allclose(out.mean, rm)
    np.testing.assert_allclose(out.invstd, 1 / np.sqrt(rv + 0.5), rtol=1e-7)


def test_momentum_zero_and_one():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 2))
    rm, rv = np.zeros(2), np.ones(2)
    fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=0.0)
    np.testing.assert_array_equal(rm, 0.0)
    fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv, momentum=1.0)
    np.testing.assert_allclose(rm, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rv, x.var(0, ddof=1), rtol=1e-12)


def test_float32_running_stats_with_float64_input_and_float16_input():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 3))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    fastbn.batch_norm_forward(x, running_mean=rm, running_var=rv)
    np.testing.assert_allclose(rm, 0.1 * x.mean(0), rtol=1e-6)
    out = fastbn.batch_norm_forward(x.astype(np.float16))
    assert out.y.dtype == np.float16 and out.mean.dtype == np.float32


def test_importing_fastbn_touches_no_gpu_and_no_mpi():
    code = ("import sys, fastbn, numpy as np; fastbn.batch_norm_forward(np.ones((3, 2)) + "
            "np.arange(2)*np.ones((3,1)) + np.arange(3)[:, None]); "
            "bad = [m for m in ('numba.cuda', 'mpi4py', 'torch', 'cupy') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _compiled_signatures():
    from numba.core.dispatcher import Dispatcher
    from fastbn.backends import cpu
    count = 0
    for value in vars(cpu).values():
        for item in (value if isinstance(value, tuple) else (value,)):
            if isinstance(item, Dispatcher):
                count += len(item.signatures)
    return count


def test_warmup_compiles_and_reports_seconds():
    start = time.perf_counter()
    seconds = fastbn.warmup(dtypes=("float64",))
    assert 0 < seconds <= time.perf_counter() - start
    # the warmed paths need nothing more: a first call on them adds no compiled signature
    before = _compiled_signatures()
    assert before > 0
    x = np.random.default_rng(0).standard_normal((7, 5))
    rm, rv, ones = np.zeros(5), np.ones(5), np.ones(5)
    out = fastbn.batch_norm_forward(x, ones, ones, running_mean=rm, running_var=rv)
    fastbn.batch_norm_forward(x, ones, ones, training=False, running_mean=rm, running_var=rv)
    fastbn.batch_norm_backward(out.y, x, out.mean, out.invstd, ones)
    fastbn.moments(x)
    assert _compiled_signatures() == before


def test_running_moments_state_and_properties(rng):
    acc = fastbn.RunningMoments(2)
    assert acc.count == 0 and repr(acc) == "RunningMoments(num_channels=2, count=0)"
    acc.update(np.zeros((0, 2)))                               # nothing to add
    assert acc.count == 0
    x = rng.standard_normal((7, 2, 3)) * 100 + 1e6
    acc.update(x)
    exact = np.moveaxis(x, 1, 0).reshape(2, -1)
    np.testing.assert_allclose(acc.var(ddof=1), exact.var(axis=1, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(acc.std(), exact.std(axis=1), rtol=1e-9)
    copy = fastbn.RunningMoments(2).load_state_dict(acc.state_dict())
    assert copy.count == acc.count
    np.testing.assert_array_equal(copy.m2, acc.m2)
    empty = fastbn.RunningMoments(2)
    empty.merge(acc)
    np.testing.assert_array_equal(empty.mean, acc.mean)
    with pytest.raises(ValueError, match="num_channels"):
        fastbn.RunningMoments(-1)
