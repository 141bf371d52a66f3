"""The cuda backend: the contract's operations on device arrays against the reference, launch and
copy budgets, streams, array types, determinism, real compilation.

Three ways this file runs:

* simulator lane: ``FASTBN_TEST_BACKENDS=cuda NUMBA_ENABLE_CUDASIM=1 pytest tests/test_cuda.py``
  (the variable set before Python starts). The kernels run on numba's simulator; ``gpu`` tests
  skip.
* real-GPU lane: the same command without NUMBA_ENABLE_CUDASIM, on a machine with a GPU.
* default lane (no GPU, no simulator): the device tests skip, the PTX test compiles every kernel
  signature the launchers use (recorded by running them under the simulator in a subprocess) with
  the real CUDA compiler (NVVM) and assembles it with ptxas, and the missing-GPU error is checked
  for real.
"""
import contextlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import fastbn
from fastbn import _config, backends
from fastbn.backends import reference

numba_cuda_installed = importlib.util.find_spec("numba_cuda") is not None
if not numba_cuda_installed:
    pytest.skip('numba-cuda is not installed (pip install "fastbn[cuda]")', allow_module_level=True)

from numba import cuda  # noqa: E402

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() not in ("", "0")
REAL_GPU = not SIMULATOR and cuda.is_available()
HAS_DEVICE = SIMULATOR or REAL_GPU

needs_device = pytest.mark.skipif(not HAS_DEVICE,
                                  reason="no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set")
needs_gpu = pytest.mark.skipif(not REAL_GPU, reason="needs a real CUDA GPU (simulator off)")
needs_simulator = pytest.mark.skipif(not SIMULATOR, reason="counts launches through numba's "
                                                           "simulator (NUMBA_ENABLE_CUDASIM=1)")

# small_launch grids are far below numba-cuda's 128-block performance hint on a real GPU
pytestmark = pytest.mark.filterwarnings("ignore:Grid size .* under-utilization")

RTOL = {"float16": 4e-3, "float32": 2e-5, "float64": 1e-10}
# the launch budget per public operation (issue 11)
LAUNCHES = {"fwd-train": 2, "eval": 1, "backward": 2, "moments": 2}


def _cuda_backend():
    return backends.load("cuda")


def _host(a):
    a = getattr(a, "_fastbn_source", a)
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if hasattr(a, "host_values"):
        return a.host_values
    return np.asarray(a)


def _close(actual, reference_values, dtype, what=""):
    reference_values = np.asarray(reference_values, np.float64)
    rtol = RTOL[np.dtype(dtype).name]
    scale = max(float(np.max(np.abs(reference_values))) if reference_values.size else 1.0, 1.0)
    np.testing.assert_allclose(np.asarray(_host(actual), np.float64), reference_values,
                               rtol=rtol, atol=rtol * scale, err_msg=what)


def _problem(shape, axis, dtype, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2.0 + offset).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.standard_normal(channels)
    return x, dy, gamma, beta


def _check_grads(grads, ref_grads, x, dy, gamma, invstd, dtype):
    """dx to the data dtype's precision; dgamma/dbeta with a bound that grows like sqrt(count)
    (the rounding of count float64-accumulated terms of the rounded inputs), not like count."""
    rtol = RTOL[np.dtype(dtype).name]
    natural = float(np.abs(dy).max() * np.max(np.abs(invstd)) * np.max(np.abs(gamma)))
    np.testing.assert_allclose(np.asarray(_host(grads.dx), float),
                               np.asarray(ref_grads.dx, float), rtol=rtol,
                               atol=4 * rtol * natural, err_msg="dx")
    count = x.size // len(np.atleast_1d(ref_grads.dbeta))
    stats_rtol = RTOL["float32"] if np.dtype(dtype) != np.float64 else RTOL["float64"]
    for name in ("dgamma", "dbeta"):
        want = np.asarray(getattr(ref_grads, name), float)
        bound = 4 * stats_rtol * float(np.abs(dy).max()) * np.sqrt(count) * 4
        np.testing.assert_allclose(np.asarray(_host(getattr(grads, name)), float), want,
                                   rtol=stats_rtol, atol=bound, err_msg=name)


def _check_all_ops(x, dy, gamma, beta, axis, to_device=True):
    """Forward (train, eval), backward (train, eval), moments on cuda against the reference.
    Inputs go to the device unless to_device is False (then the host round trip runs)."""
    dtype = x.dtype
    channels = x.shape[axis]
    sdtype = fastbn.stats_dtype(dtype)
    put = cuda.to_device if to_device else (lambda a: a)
    rm, rv = np.linspace(-1, 1, channels), np.linspace(0.5, 2, channels)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    d_rm, d_rv = put(rm.copy()), put(rv.copy())
    got = fastbn.batch_norm_forward(put(x), put(gamma), put(beta), axis=axis,
                                    running_mean=d_rm, running_var=d_rv, momentum=0.3,
                                    backend="cuda")
    ref = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm_ref,
                                    running_var=rv_ref, momentum=0.3, backend="reference")
    assert _host(got.y).dtype == dtype and _host(got.mean).dtype == sdtype
    _close(got.y, ref.y, dtype, "y")
    _close(got.mean, ref.mean, sdtype, "mean")
    _close(got.invstd, ref.invstd, sdtype, "invstd")
    np.testing.assert_allclose(_host(d_rm), rm_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_host(d_rv), rv_ref, rtol=1e-9)
    y_eval = fastbn.batch_norm_forward(put(x), put(gamma), put(beta), axis=axis, training=False,
                                       running_mean=put(rm), running_var=put(rv),
                                       backend="cuda").y
    ref_eval = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=False,
                                         running_mean=rm, running_var=rv, backend="reference").y
    _close(y_eval, ref_eval, dtype, "eval y")
    for training in (True, False):
        grads = fastbn.batch_norm_backward(put(dy), put(x), put(ref.mean), put(ref.invstd),
                                           put(gamma), axis=axis, training=training,
                                           backend="cuda")
        ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, gamma, axis=axis,
                                               training=training, backend="reference")
        _check_grads(grads, ref_grads, x, dy, gamma, ref.invstd, dtype)
    mean, var = fastbn.moments(put(x), axis=axis, backend="cuda")
    ref_mean, ref_var = fastbn.moments(x, axis=axis, backend="reference")
    _close(mean, ref_mean, sdtype, "moments mean")
    _close(var, ref_var, sdtype, "moments var")
    return got


@pytest.fixture
def small_launch(monkeypatch):
    """Tiny blocks and grids: every size below is several blocks, with partial ones."""
    monkeypatch.setattr(_config, "CUDA_THREADS_PER_BLOCK", 4)
    monkeypatch.setattr(_config, "CUDA_MAX_BLOCKS", 3)
    monkeypatch.setattr(_config, "CUDA_MIN_BLOCKS", 1)
    monkeypatch.setattr(_config, "CUDA_MIN_ITEMS_PER_THREAD", 1)
    monkeypatch.setattr(_config, "CUDA_CHANNEL_TILE", 2)
    monkeypatch.setattr(_config, "CUDA_UNROLL", 2)
    return _config


# ----------------------------------------------------------------------------------------------
# the contract's operations on device arrays (no host round trip): strided views in and out,
# NaN-poisoned outputs, per-channel vectors in every dtype, against reference.py

def _device_view(values, stride, poison=False):
    """values as a device (outer, C, inner) view with every ``stride``-th element of a larger
    buffer along the last axis (stride 1: contiguous); poison: the buffer is all NaN and the
    view is left unwritten (an output)."""
    outer, channels, inner = values.shape
    buffer = np.full((outer, channels, inner * stride), np.nan, values.dtype)
    if not poison:
        buffer[:, :, ::stride] = values
    device_buffer = cuda.to_device(buffer)
    return device_buffer[:, :, ::stride] if stride > 1 else device_buffer, device_buffer


def _poisoned(shape, dtype, stride=1):
    return _device_view(np.empty(shape, dtype), stride, poison=True)


def _vector(values, dtype):
    return None if values is None else cuda.to_device(np.asarray(values).astype(dtype))


def _assert_written(buffer, stride, what):
    """Every element of the view was written (no NaN left where the reference has none is
    checked by the comparison); every gap of the buffer is still NaN (no stray writes)."""
    host = _host(buffer).astype(np.float64)
    if stride > 1:
        gaps = np.delete(host, np.arange(0, host.shape[2], stride), axis=2)
        assert np.isnan(gaps).all(), f"{what}: wrote outside its view"


VECTOR_DTYPES = st.sampled_from(["float16", "float32", "float64"])


@st.composite
def device_cases(draw):
    outer = draw(st.sampled_from([1, 2, 3, 5]))
    channels = draw(st.sampled_from([1, 2, 3, 5]))
    inner = draw(st.sampled_from([1, 1, 3, 7, 13]))
    assume(outer * inner >= 2)
    return SimpleNamespace(
        shape=(outer, channels, inner), dtype=draw(st.sampled_from(["float16", "float32",
                                                                   "float64"])),
        weight_dtype=draw(VECTOR_DTYPES), running_dtype=draw(VECTOR_DTYPES),
        affine=draw(st.booleans()), activation=draw(st.sampled_from([None, "relu", "sigmoid"])),
        residual=draw(st.booleans()), stride=draw(st.sampled_from([1, 2])),
        offset=draw(st.sampled_from([0.0, 3.0, -40.0])), seed=draw(st.integers(0, 2**31 - 1)))


@needs_device
@given(case=device_cases())
def test_contract_operations_on_device_views_match_the_reference(case):
    be = _cuda_backend()
    with _small_settings():
        _run_contract_case(be, case)


@contextlib.contextmanager
def _small_settings():
    """small_launch for hypothesis tests (a fixture would not be reset between examples)."""
    saved = {k: getattr(_config, k) for k in ("CUDA_THREADS_PER_BLOCK", "CUDA_MAX_BLOCKS",
                                              "CUDA_MIN_BLOCKS", "CUDA_MIN_ITEMS_PER_THREAD",
                                              "CUDA_CHANNEL_TILE", "CUDA_UNROLL")}
    _config.CUDA_THREADS_PER_BLOCK, _config.CUDA_MAX_BLOCKS, _config.CUDA_MIN_BLOCKS = 4, 3, 1
    _config.CUDA_MIN_ITEMS_PER_THREAD, _config.CUDA_CHANNEL_TILE, _config.CUDA_UNROLL = 1, 2, 2
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(_config, k, v)


def _run_contract_case(be, case):
    rng = np.random.default_rng(case.seed)
    shape, dtype, stride = case.shape, np.dtype(case.dtype), case.stride
    channels = shape[1]
    sdtype = fastbn.stats_dtype(dtype)
    x = (rng.standard_normal(shape) * 2 + case.offset).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    residual = rng.standard_normal(shape).astype(dtype) if case.residual else None
    weight = rng.uniform(0.5, 1.5, channels).astype(case.weight_dtype) if case.affine else None
    bias = rng.standard_normal(channels).astype(case.weight_dtype) if case.affine else None
    running_mean = rng.standard_normal(channels).astype(case.running_dtype)
    running_var = rng.uniform(0.5, 2, channels).astype(case.running_dtype)
    d_x, _ = _device_view(x, stride)
    d_residual = None if residual is None else _device_view(residual, stride)[0]
    d_weight, d_bias = _vector(weight, weight.dtype if weight is not None else None), \
        _vector(bias, bias.dtype if bias is not None else None)

    # forward_train
    y, mean, invstd = np.empty(shape, dtype), np.empty(channels, sdtype), np.empty(channels, sdtype)
    rm_ref, rv_ref = running_mean.copy(), running_var.copy()
    reference.forward_train(x, weight, bias, 1e-5, 0.2, rm_ref, rv_ref, case.activation,
                            residual, None, y, mean, invstd)
    (d_y, y_buffer), d_mean, d_invstd = _poisoned(shape, dtype, stride), \
        _vector(np.full(channels, np.nan), sdtype), _vector(np.full(channels, np.nan), sdtype)
    d_rm, d_rv = _vector(running_mean, running_mean.dtype), _vector(running_var, running_var.dtype)
    be.forward_train(d_x, d_weight, d_bias, 1e-5, 0.2, d_rm, d_rv, case.activation, d_residual,
                     None, d_y, d_mean, d_invstd)
    _close(d_y, y, dtype, "forward_train y")
    _assert_written(y_buffer, stride, "forward_train y")
    _close(d_mean, mean, sdtype, "forward_train mean")
    _close(d_invstd, invstd, sdtype, "forward_train invstd")
    running_rtol = max(RTOL[np.dtype(case.running_dtype).name], 1e-9)
    np.testing.assert_allclose(_host(d_rm).astype(float), rm_ref.astype(float),
                               rtol=running_rtol, atol=running_rtol)
    np.testing.assert_allclose(_host(d_rv).astype(float), rv_ref.astype(float),
                               rtol=running_rtol, atol=running_rtol)

    # forward_eval
    y_eval, mean_eval, invstd_eval = np.empty_like(y), np.empty_like(mean), np.empty_like(invstd)
    reference.forward_eval(x, weight, bias, running_mean, running_var, 1e-5, case.activation,
                           residual, y_eval, mean_eval, invstd_eval)
    (d_y_eval, y_eval_buffer) = _poisoned(shape, dtype, stride)
    d_mean_eval = _vector(np.full(channels, np.nan), sdtype)
    d_invstd_eval = _vector(np.full(channels, np.nan), sdtype)
    be.forward_eval(d_x, d_weight, d_bias, _vector(running_mean, running_mean.dtype),
                    _vector(running_var, running_var.dtype), 1e-5, case.activation, d_residual,
                    d_y_eval, d_mean_eval, d_invstd_eval)
    _close(d_y_eval, y_eval, dtype, "forward_eval y")
    _assert_written(y_eval_buffer, stride, "forward_eval y")
    _close(d_mean_eval, mean_eval, sdtype, "forward_eval mean")
    _close(d_invstd_eval, invstd_eval, sdtype, "forward_eval invstd")

    # backward, from the forward's own outputs
    d_dy, _ = _device_view(dy, stride)
    d_y_in, _ = _device_view(y, stride)
    for training in (True, False):
        dx, dgamma, dbeta = np.empty_like(x), np.empty_like(mean), np.empty_like(mean)
        dresidual = np.empty_like(x) if case.residual else None
        reference.backward(dy, x, mean, invstd, weight, training, case.activation, y, dx,
                           dgamma, dbeta, dresidual)
        d_dx, dx_buffer = _poisoned(shape, dtype, stride)
        d_dgamma = _vector(np.full(channels, np.nan), sdtype)
        d_dbeta = _vector(np.full(channels, np.nan), sdtype)
        d_dresidual, dresidual_buffer = _poisoned(shape, dtype, stride) if case.residual \
            else (None, None)
        be.backward(d_dy, d_x, _vector(mean, sdtype), _vector(invstd, sdtype), d_weight,
                    training, case.activation, d_y_in, d_dx, d_dgamma, d_dbeta, d_dresidual)
        grads = SimpleNamespace(dx=d_dx, dgamma=d_dgamma, dbeta=d_dbeta)
        _check_grads(grads, SimpleNamespace(dx=dx, dgamma=dgamma, dbeta=dbeta), x, dy,
                     np.ones(channels) if weight is None else weight, invstd, dtype)
        _assert_written(dx_buffer, stride, "backward dx")
        if case.residual:
            _close(d_dresidual, dresidual, dtype, "dresidual")
            _assert_written(dresidual_buffer, stride, "backward dresidual")

    # moments and channel_moments
    mean_m, var_m = np.empty(channels, sdtype), np.empty(channels, sdtype)
    reference.moments(x, mean_m, var_m)
    d_mean_m = _vector(np.full(channels, np.nan), sdtype)
    d_var_m = _vector(np.full(channels, np.nan), sdtype)
    be.moments(d_x, d_mean_m, d_var_m)
    _close(d_mean_m, mean_m, sdtype, "moments mean")
    _close(d_var_m, var_m, sdtype, "moments var")
    exact_mean, exact_m2 = reference.channel_moments(x)
    got_mean, got_m2 = be.channel_moments(d_x)
    np.testing.assert_allclose(_host(got_mean), exact_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_host(got_m2), exact_m2, rtol=1e-9, atol=1e-9 * exact_m2.max())


@needs_device
@pytest.mark.parametrize("shape", [(3, 2, 11), (23, 2, 1), (2, 1, 9)])
def test_backward_reduce_apply_and_update_running_stats_match_the_reference(small_launch, shape):
    be = _cuda_backend()
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(np.float32) + 5
    dy = rng.standard_normal(shape).astype(np.float32)
    channels = shape[1]
    mean = x.astype(float).mean(axis=(0, 2)).astype(np.float32)
    np.testing.assert_allclose(be.backward_reduce(cuda.to_device(dy), cuda.to_device(x),
                                                  cuda.to_device(mean)),
                               reference.backward_reduce(dy, x, mean), rtol=1e-10, atol=1e-9)
    coefficients = [rng.standard_normal(channels) for _ in range(4)]
    dx = np.empty_like(x)
    reference.backward_apply(dy, x, *coefficients, dx)
    d_dx, _ = _poisoned(shape, np.float32)
    be.backward_apply(cuda.to_device(dy), cuda.to_device(x),
                      *(cuda.to_device(c) for c in coefficients), d_dx)
    _close(d_dx, dx, np.float32)
    for dtype in ("float16", "float32", "float64"):
        running = [np.linspace(-1, 1, channels).astype(dtype), np.ones(channels, dtype)]
        batch = [rng.standard_normal(channels) * 10, rng.uniform(1, 2, channels)]
        want = [r.copy() for r in running]
        reference.update_running_stats(*want, *batch, 9, 0.3, None)
        got = [cuda.to_device(r) for r in running]
        be.update_running_stats(*got, *(cuda.to_device(b) for b in batch), 9, 0.3, None)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(_host(g), w)       # one rounding of the same float64


# ----------------------------------------------------------------------------------------------
# statistics that float32 (or naive) accumulation gets wrong; documented edge cases

@needs_device
@pytest.mark.parametrize("shape", [(3, 1, 41), (61, 1, 1), (4, 3, 9), (40, 3, 1)])
@pytest.mark.parametrize("kind", ["offset 1e4", "offset 1e7", "outlier first"])
def test_statistics_with_a_huge_offset_or_an_outlier_first(small_launch, shape, kind):
    rng = np.random.default_rng(11)
    dtype = np.float64 if kind == "offset 1e7" else np.float32
    x = rng.standard_normal(shape)
    if kind == "outlier first":
        x[0, :, 0] = 1e4          # the first value each thread shifts by, far from the rest
    else:
        x += float(kind.split()[1])
    x = x.astype(dtype)
    exact = x.astype(np.float64)
    mean, var = fastbn.moments(cuda.to_device(x))
    np.testing.assert_allclose(_host(mean), exact.mean(axis=(0, 2)), rtol=1e-7)
    np.testing.assert_allclose(_host(var), exact.var(axis=(0, 2)), rtol=2e-6)
    got_mean, got_m2 = _cuda_backend().channel_moments(cuda.to_device(x))
    f64 = np.finfo(np.float64).eps
    np.testing.assert_allclose(_host(got_mean), exact.mean(axis=(0, 2)), rtol=4 * f64,
                               atol=8 * f64 * float(np.abs(exact).max()))
    np.testing.assert_allclose(_host(got_m2), ((exact - exact.mean(axis=(0, 2))[None, :, None])
                                               ** 2).sum(axis=(0, 2)), rtol=64 * f64)
    out = fastbn.batch_norm_forward(cuda.to_device(x))
    ref = fastbn.batch_norm_forward(x, backend="reference")
    # y's conditioning: an ulp of the data's magnitude, over the spread
    ulp = np.finfo(dtype).eps * float(np.abs(exact).max()) * float(np.max(ref.invstd))
    np.testing.assert_allclose(_host(out.y).astype(float), ref.y.astype(float),
                               rtol=RTOL[np.dtype(dtype).name], atol=4 * ulp)


@needs_device
@pytest.mark.parametrize("shape", [(3, 2, 13), (17, 2, 1), (2, 1, 40)])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_tiny_eps_on_a_constant_channel_gives_beta_exactly(small_launch, shape, dtype):
    x = np.full(shape, 3.25, dtype)
    beta = np.array([0.5, -2.0][:shape[1]], dtype=fastbn.stats_dtype(dtype))
    gamma = np.ones_like(beta) * 2
    out = fastbn.batch_norm_forward(cuda.to_device(x), cuda.to_device(gamma),
                                    cuda.to_device(beta), eps=1e-80)
    ref = fastbn.batch_norm_forward(x, gamma, beta, eps=1e-80, backend="reference")
    expected = np.broadcast_to(beta[None, :, None], shape).astype(dtype)
    np.testing.assert_array_equal(_host(out.y), expected)
    np.testing.assert_array_equal(ref.y, expected)
    np.testing.assert_array_equal(_host(out.invstd), ref.invstd)     # inf in float32


@needs_device
def test_nonfinite_running_statistics_are_skipped_and_recorded_on_the_device(small_launch):
    import fastbn.cuda as fastbn_cuda
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4, 5))
    x[0, 2, 0] = np.nan
    x[:, 3] *= 1e20                        # its variance overflows float32, not float64
    d_rm, d_rv = cuda.to_device(np.arange(4.0)), cuda.to_device(np.ones(4, np.float32))
    with warnings.catch_warnings():        # the device path records instead of warning
        warnings.filterwarnings("error", message=".*not finite")
        fastbn.batch_norm_forward(cuda.to_device(x), running_mean=d_rm, running_var=d_rv)
    np.testing.assert_array_equal(fastbn_cuda.nonfinite_channels(), [2, 3])
    rm, rv = _host(d_rm), _host(d_rv)
    np.testing.assert_array_equal(rm[[2, 3]], [2.0, 3.0])
    np.testing.assert_array_equal(rv[[2, 3]], [1.0, 1.0])
    kept = x[:, :2].astype(np.float64)
    np.testing.assert_allclose(rm[:2], 0.9 * np.arange(2.0) + 0.1 * kept.mean(axis=(0, 2)),
                               rtol=1e-12)
    np.testing.assert_allclose(rv[:2], 0.9 + 0.1 * kept.var(axis=(0, 2), ddof=1), rtol=1e-6)
    # float16 running statistics overflow from float32 data; the record follows the last update
    y = (rng.standard_normal((5, 3, 4)) * np.array([1, 300, 1])[None, :, None]).astype(np.float32)
    d_rm16, d_rv16 = cuda.to_device(np.zeros(3, np.float16)), cuda.to_device(np.ones(3, np.float16))
    fastbn.batch_norm_forward(cuda.to_device(y), running_mean=d_rm16, running_var=d_rv16,
                              momentum=1.0)
    np.testing.assert_array_equal(fastbn_cuda.nonfinite_channels(), [1])
    assert _host(d_rv16)[1] == 1.0 and np.isfinite(_host(d_rv16)).all()
    fastbn.batch_norm_forward(cuda.to_device(np.ascontiguousarray(x[:, :2])),
                              running_mean=cuda.to_device(np.zeros(2)),
                              running_var=cuda.to_device(np.ones(2)))
    assert fastbn_cuda.nonfinite_channels().size == 0


# ----------------------------------------------------------------------------------------------
# launches, device-to-host copies and host waits per public operation (issue 11)

class _Recorder:
    """Counts kernel launches (and their streams), device-to-host copies and host waits, by
    patching numba's simulator."""

    def __init__(self, monkeypatch):
        from numba.cuda.simulator import api as sim_api
        from numba.cuda.simulator import kernel as sim_kernel
        from numba.cuda.simulator.cudadrv import devicearray as sim_devicearray
        self.launches, self.copies, self.waits = [], 0, 0
        recorder = self
        original_getitem = sim_kernel.FakeCUDAKernel.__getitem__
        original_copy = sim_devicearray.FakeCUDAArray.copy_to_host

        def getitem(kernel, configuration):
            recorder.launches.append((kernel.fn.__name__, configuration[2]
                                      if len(configuration) > 2 else None))
            return original_getitem(kernel, configuration)

        def copy_to_host(array, *args, **kwargs):
            recorder.copies += 1
            return original_copy(array, *args, **kwargs)

        def wait(*args, **kwargs):
            recorder.waits += 1

        monkeypatch.setattr(sim_kernel.FakeCUDAKernel, "__getitem__", getitem)
        monkeypatch.setattr(sim_devicearray.FakeCUDAArray, "copy_to_host", copy_to_host)
        monkeypatch.setattr(sim_api.stream, "synchronize", wait)
        monkeypatch.setattr(sim_api.Event, "synchronize", wait)
        monkeypatch.setattr(cuda, "synchronize", wait)

    def reset(self):
        self.launches, self.copies, self.waits = [], 0, 0


def _public_calls(layout, dtype="float32"):
    """Every public operation once, on numba device arrays (vectors in the stats dtype)."""
    shape, axis = ((4, 3, 5), 1) if layout == "NCHW" else ((4, 5, 3), -1)
    x, dy, gamma, beta = _problem(shape, axis, dtype)
    sdtype = fastbn.stats_dtype(dtype)
    d = SimpleNamespace(x=cuda.to_device(x), dy=cuda.to_device(dy),
                        gamma=cuda.to_device(gamma.astype(sdtype)),
                        beta=cuda.to_device(beta.astype(sdtype)),
                        rm=cuda.to_device(np.zeros(3, sdtype)),
                        rv=cuda.to_device(np.ones(3, sdtype)),
                        residual=cuda.to_device(x.copy()))
    saved = fastbn.batch_norm_forward(d.x, d.gamma, d.beta, axis=axis)
    act = fastbn.batch_norm_act_forward(d.x, d.gamma, d.beta, activation="relu", axis=axis)
    return {
        "fwd-train": lambda **kw: fastbn.batch_norm_forward(
            d.x, d.gamma, d.beta, axis=axis, running_mean=d.rm, running_var=d.rv, **kw),
        "fwd-train without running stats": lambda **kw: fastbn.batch_norm_forward(
            d.x, d.gamma, d.beta, axis=axis, **kw),
        "fwd-train relu + residual": lambda **kw: fastbn.batch_norm_act_forward(
            d.x, d.gamma, d.beta, activation="relu", residual=d.residual, axis=axis,
            running_mean=d.rm, running_var=d.rv, **kw),
        "eval": lambda **kw: fastbn.batch_norm_forward(
            d.x, d.gamma, d.beta, axis=axis, training=False, running_mean=d.rm,
            running_var=d.rv, **kw),
        "eval sigmoid": lambda **kw: fastbn.batch_norm_act_forward(
            d.x, d.gamma, d.beta, activation="sigmoid", axis=axis, training=False,
            running_mean=d.rm, running_var=d.rv, **kw),
        "backward": lambda **kw: fastbn.batch_norm_backward(
            d.dy, d.x, saved.mean, saved.invstd, d.gamma, axis=axis, **kw),
        "backward eval": lambda **kw: fastbn.batch_norm_backward(
            d.dy, d.x, saved.mean, saved.invstd, d.gamma, axis=axis, training=False, **kw),
        "backward relu + residual": lambda **kw: fastbn.batch_norm_act_backward(
            d.dy, act.y, d.x, act.mean, act.invstd, d.gamma, activation="relu", residual=True,
            axis=axis, **kw),
        "moments": lambda **kw: fastbn.moments(d.x, axis=axis, **kw),
    }


def _budget(operation):
    return LAUNCHES[next(k for k in ("fwd-train", "eval", "backward", "moments")
                         if operation.startswith(k))]


@needs_simulator
def test_simulator_shared_arrays_are_shared(monkeypatch, small_launch):
    """conftest's fix of the simulator's shared-array race (tests/_simulator.py): with a pause
    between the lookup and the store, where the unpatched simulator gives each thread its own
    array (y 0.59 everywhere instead of the reference's values), a block's threads still meet."""
    import time
    from numba.cuda.simulator import kernelapi

    class SlowEmpty:                 # numpy, with a pause in every allocation of a shared array
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(*args, **kwargs):
            time.sleep(2e-4)
            return np.empty(*args, **kwargs)

    monkeypatch.setattr(kernelapi, "np", SlowEmpty())
    x = (np.random.default_rng(11).standard_normal((3, 1, 41)) + 1e4).astype(np.float32)
    ref = fastbn.batch_norm_forward(x, backend="reference")
    for _ in range(3):
        out = fastbn.batch_norm_forward(cuda.to_device(x))
        np.testing.assert_allclose(_host(out.y), ref.y, rtol=2e-5, atol=5e-3)


@needs_simulator
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_launches_copies_and_waits_per_public_operation(monkeypatch, layout):
    calls = _public_calls(layout)
    recorder = _Recorder(monkeypatch)
    for operation, call in calls.items():
        call()                             # scratch buffers are created on first use
        recorder.reset()
        call()
        kernels = [name for name, _ in recorder.launches]
        assert len(kernels) <= _budget(operation), f"{operation}: launches {kernels}"
        assert recorder.copies == 0, f"{operation}: {recorder.copies} device-to-host copies"
        assert recorder.waits == 0, f"{operation}: {recorder.waits} host waits"


@needs_simulator
@pytest.mark.parametrize("make_stream", ["numba stream", "integer handle"])
def test_every_launch_goes_to_the_stream_argument(monkeypatch, make_stream):
    be = _cuda_backend()
    calls = _public_calls("NCHW")
    recorder = _Recorder(monkeypatch)
    stream = cuda.stream() if make_stream == "numba stream" else 12345
    expected = be._as_stream(stream)
    for operation, call in calls.items():
        recorder.reset()
        call(stream=stream)
        assert recorder.launches, operation
        for name, launched_on in recorder.launches:
            assert launched_on is expected, f"{operation}: {name} on {launched_on}"


# ----------------------------------------------------------------------------------------------
# the caller's array library and the stream its arrays name

class StandIn:
    """A foreign device array (CuPy, PyTorch) in miniature: only ``__cuda_array_interface__``,
    over simulator memory (which is host memory)."""

    def __init__(self, values, stream=None):
        self.host_values = values
        self.stream = stream

    @property
    def __cuda_array_interface__(self):
        iface = dict(shape=self.host_values.shape, typestr=self.host_values.dtype.str,
                     data=(self.host_values.__array_interface__["data"][0], False),
                     strides=self.host_values.strides, version=3)
        if self.stream is not None:
            iface["stream"] = self.stream
        return iface


StandIn.__module__ = "standin"


class OtherStandIn(StandIn):
    pass


OtherStandIn.__module__ = "otherlib"


def _stand_in_empty(shape, dtype, strides, like):
    if strides is None:
        return StandIn(np.empty(shape, dtype))
    itemsize = np.dtype(dtype).itemsize
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + itemsize
    base = np.empty(span // itemsize, dtype)
    return StandIn(np.lib.stride_tricks.as_strided(base, shape, strides))


@pytest.fixture
def stand_in_library(monkeypatch):
    be = _cuda_backend()
    monkeypatch.setitem(be.ALLOCATORS, "standin", _stand_in_empty)
    return be


@needs_simulator
def test_foreign_arrays_in_give_foreign_arrays_out(stand_in_library):
    be = stand_in_library
    x, dy, gamma, beta = _problem((4, 3, 5), 1, "float32")
    with be.call_scope():
        out = fastbn.batch_norm_forward(StandIn(x), StandIn(gamma), StandIn(beta))
    results = [be.result(a) for a in out]
    assert all(type(r) is StandIn for r in results)
    ref = fastbn.batch_norm_forward(x, gamma, beta, backend="reference")
    for got, want in zip(results, ref):
        _close(got.host_values, want, "float32")
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)
    with be.call_scope():
        grads = fastbn.batch_norm_backward(StandIn(nhwc), StandIn(nhwc), results[1],
                                           results[2])
    dx = be.result(grads.dx)
    assert type(dx) is StandIn and dx.host_values.strides == nhwc.strides   # memory order kept
    with be.call_scope():       # numba arrays in: numba arrays out
        assert type(be.result(fastbn.batch_norm_forward(cuda.to_device(x)).y)) \
            is type(cuda.to_device(x))


@needs_simulator
def test_mixing_two_array_libraries_is_an_error_naming_both(stand_in_library):
    be = stand_in_library
    x, _, gamma, beta = _problem((4, 3, 5), 1, "float32")
    rm, rv = np.zeros(3), np.ones(3)
    with be.call_scope(), pytest.raises(TypeError, match=r"beta: got a otherlib array while x "
                                                         r"is a standin array"):
        fastbn.batch_norm_forward(StandIn(x), StandIn(gamma), OtherStandIn(beta),
                                  running_mean=StandIn(rm), running_var=StandIn(rv))
    np.testing.assert_array_equal(rm, 0.0)
    with be.call_scope():       # numba device arrays mix with any library
        fastbn.batch_norm_forward(StandIn(x), cuda.to_device(gamma), StandIn(beta))


@needs_simulator
def test_launches_follow_the_stream_the_inputs_name(monkeypatch, stand_in_library):
    be = stand_in_library
    x, _, _, _ = _problem((4, 3, 5), 1, "float32")
    recorder = _Recorder(monkeypatch)
    with be.call_scope():
        fastbn.batch_norm_forward(StandIn(x, stream=777))
    assert recorder.launches and all(s is be._as_stream(777) for _, s in recorder.launches)
    recorder.reset()
    with be.call_scope(stream=5):                        # stream= wins over the named one
        fastbn.batch_norm_forward(StandIn(x, stream=777))
    assert all(s is be._as_stream(5) for _, s in recorder.launches)
    assert be.current_stream() is not be._as_stream(777)      # outside the call: the default


@needs_simulator
def test_without_a_call_scope_a_public_call_still_follows_its_inputs(monkeypatch,
                                                                     stand_in_library):
    """asarray(x, "x") starts an implicit call: the named stream and the library hold for that
    call's launches and outputs, and for nothing after it (a host round trip, say)."""
    be = stand_in_library
    x, _, _, _ = _problem((4, 3, 5), 1, "float32")
    recorder = _Recorder(monkeypatch)
    out = fastbn.batch_norm_forward(StandIn(x, stream=4242))
    assert type(be.result(out.y)) is StandIn and type(be.result(out.mean)) is StandIn
    assert recorder.launches and all(s is be._as_stream(4242) for _, s in recorder.launches)
    recorder.reset()
    x4 = np.concatenate([x.reshape(4, 3, 5, 1), x.reshape(4, 3, 5, 1) * 2], axis=3)
    strided = np.zeros((4, 3, 5, 4), np.float32)[..., :2]    # H, W do not merge: a gather copy
    strided[...] = x4
    y4 = np.full((4, 3, 5, 4), np.nan, np.float32)[..., :2]  # nor into the output: a scatter
    fastbn.batch_norm_forward(StandIn(strided, stream=99), out=(StandIn(y4), None, None))
    names = [name for name, _ in recorder.launches]
    assert names.count("strided_copy") == 2, names
    np.testing.assert_allclose(y4, fastbn.batch_norm_forward(x4, backend="reference").y,
                               rtol=1e-5, atol=1e-5)
    assert all(s is be._as_stream(99) for _, s in recorder.launches)
    recorder.reset()
    host = fastbn.batch_norm_forward(x, backend="cuda")      # the round trip: its own call
    assert type(host.y) is np.ndarray
    assert all(s is not be._as_stream(99) for _, s in recorder.launches)
    assert type(be.empty((3,), np.float32)) is not StandIn


def test_importing_fastbn_does_not_import_the_cuda_helpers():
    code = ("import sys, fastbn; bad = [m for m in ('fastbn.cuda', 'fastbn.backends.cuda', "
            "'numba.cuda') if m in sys.modules]; sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# dispatch

@needs_device
def test_device_arrays_select_cuda_and_results_stay_on_device():
    x, _, gamma, beta = _problem((5, 3, 7), 1, "float32")
    out = fastbn.batch_norm_forward(cuda.to_device(x), cuda.to_device(gamma),
                                    cuda.to_device(beta))          # no backend named
    assert all(backends._memory.is_device_array(a) for a in out)
    ref = fastbn.batch_norm_forward(x, gamma, beta, backend="reference")
    _close(out.y, ref.y, "float32")
    mean, var = fastbn.moments(cuda.to_device(x))
    assert backends._memory.is_device_array(mean) and backends._memory.is_device_array(var)
    _close(var, x.astype(float).var(axis=(0, 2)), "float32")


@needs_device
def test_numpy_with_backend_cuda_round_trips_and_updates_running_stats_in_place():
    x, dy, gamma, beta = _problem((6, 4, 5), 1, "float64")
    be = backends.resolve("cuda", (x,))
    assert be.name == "cuda" and not be.ON_DEVICE       # the host round trip
    rm, rv = np.zeros(4), np.ones(4)
    out = fastbn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                    backend="cuda")
    assert all(type(a) is np.ndarray for a in out)
    assert np.all(rm != 0) and np.all(rv != 1)
    with fastbn.use_backend("cuda"):                     # the default backend, no argument
        grads = fastbn.batch_norm_backward(dy, x, out.mean, out.invstd, gamma)
    assert all(type(a) is np.ndarray for a in grads)
    _check_all_ops(x, dy, gamma, beta, 1, to_device=False)


@needs_device
def test_mixing_host_and_device_arrays_is_a_clear_error_and_changes_nothing():
    x, dy, gamma, beta = _problem((4, 3, 5), 1, "float32")
    d_x = cuda.to_device(x)
    d_rm, d_rv = cuda.to_device(np.full(3, 7.0)), cuda.to_device(np.full(3, 9.0))
    with pytest.raises(TypeError, match=r"gamma: got a host array .* CUDA device arrays"):
        fastbn.batch_norm_forward(d_x, gamma, cuda.to_device(beta), running_mean=d_rm,
                                  running_var=d_rv)
    with pytest.raises(TypeError, match=r"dy: got a host array"):
        fastbn.batch_norm_backward(dy, d_x, cuda.to_device(np.zeros(3, np.float32)),
                                   cuda.to_device(np.ones(3, np.float32)))
    with pytest.raises(TypeError, match="backend: got CUDA device arrays but backend 'cpu'"):
        fastbn.batch_norm_forward(d_x, backend="cpu")
    np.testing.assert_array_equal(_host(d_rm), 7.0)
    np.testing.assert_array_equal(_host(d_rv), 9.0)


# ----------------------------------------------------------------------------------------------
# zero copy, layouts

@needs_device
def test_outputs_are_written_in_place_without_copies():
    x, dy, _, _ = _problem((4, 3, 5), 1, "float32")
    d_x, d_dy = cuda.to_device(x), cuda.to_device(dy)
    y, mean, invstd = (cuda.device_array_like(x), cuda.device_array(3, np.float32),
                       cuda.device_array(3, np.float32))
    out = fastbn.batch_norm_forward(d_x, out=(y, mean, invstd))
    assert _cuda_backend().byte_bounds(out.y) == _cuda_backend().byte_bounds(y)
    grads = fastbn.batch_norm_backward(d_dy, d_x, mean, invstd, out=(d_dy, None, None))
    assert _cuda_backend().byte_bounds(grads.dx) == _cuda_backend().byte_bounds(d_dy)
    ref = fastbn.batch_norm_forward(x, backend="reference")
    ref_dx = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, backend="reference").dx
    _close(y, ref.y, "float32")
    np.testing.assert_allclose(_host(d_dy), ref_dx, rtol=1e-4, atol=1e-4)


@needs_device
def test_canonical_view_shares_the_input_memory():
    be = _cuda_backend()
    x = cuda.to_device(np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5))
    x3 = be.view3(x, (2, 3, 20), (240, 80, 4))
    assert be.shares_memory(x3, x)
    assert not be.shares_memory(x3, cuda.to_device(np.zeros(3)))
    np.testing.assert_array_equal(_host(x3), _host(x).reshape(2, 3, 20))


@needs_device
def test_output_keeps_the_memory_order_of_channels_last_input():
    x, _, _, _ = _problem((3, 4, 5, 6), 1, "float32")
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    d_nhwc = cuda.to_device(nhwc)
    be = _cuda_backend()
    d_x = be._view(d_nhwc, x.shape, tuple(nhwc.strides[d] for d in (0, 3, 1, 2)))
    out = fastbn.batch_norm_forward(d_x)
    assert tuple(out.y.strides) == tuple(d_x.strides)
    _close(out.y, fastbn.batch_norm_forward(x, backend="reference").y, "float32")


@needs_device
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_layouts_that_need_a_gather_copy(small_launch, dtype):
    """Device arrays whose axes do not merge into an (outer, C, inner) view, as x and as out."""
    x, dy, gamma, beta = _problem((5, 3, 7), 1, dtype)
    d_x = cuda.to_device(np.repeat(x, 2, axis=2))[:, :, ::2]        # strided inner axis
    d_y = cuda.to_device(np.full((5, 3, 14), np.nan, dtype))[:, :, 1::2]
    d_gamma, d_beta = cuda.to_device(gamma), cuda.to_device(beta)
    out = fastbn.batch_norm_forward(d_x, d_gamma, d_beta, out=(d_y, None, None))
    ref = fastbn.batch_norm_forward(x, gamma, beta, backend="reference")
    _close(d_y, ref.y, dtype)
    d_dy = cuda.to_device(np.repeat(dy, 2, axis=2))[:, :, ::2]
    d_dx = cuda.to_device(np.full((5, 3, 14), np.nan, dtype))[:, :, ::2]
    grads = fastbn.batch_norm_backward(d_dy, d_x, out.mean, out.invstd, d_gamma,
                                       out=(d_dx, None, None))
    ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, gamma,
                                           backend="reference")
    _check_grads(SimpleNamespace(dx=d_dx, dgamma=grads.dgamma, dbeta=grads.dbeta), ref_grads,
                 x, dy, gamma, ref.invstd, dtype)


# ----------------------------------------------------------------------------------------------
# launch configurations: partial blocks, C larger than the grid, one channel over many blocks

@needs_device
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape, axis", [
    ((3, 5, 13), 1),          # channel-major, 13 = 3*tpb + 1
    ((13, 5), 1),             # channels-last, odd channel count across tiles of 2
    ((2, 3, 3, 5), -1),       # NHWC
    ((13, 2, 1), 1),          # inner == 1, fewer channels than blocks: split rows
])
def test_small_launch_configuration_matches_reference(small_launch, shape, axis, dtype):
    x, dy, gamma, beta = _problem(shape, axis, dtype)
    _check_all_ops(x, dy, gamma, beta, axis)


@needs_device
@pytest.mark.parametrize("channels_last", [False, True])
def test_more_channels_than_blocks(small_launch, channels_last):
    be = _cuda_backend()
    settings = be._settings()
    if channels_last:
        shape = (5, 11)
        tile, splits, _, blocks = be.plan_channels_last(5, 11, settings)
        assert -(-11 // tile) * splits > blocks        # channel tiles loop over the grid
    else:
        shape = (2, 11, 3)
        splits, _, blocks = be.plan_channel_major(2, 11, 3, settings)
        assert 11 * splits > blocks                    # channels loop over the grid
    x, dy, gamma, beta = _problem(shape, 1, "float32")
    _check_all_ops(x, dy, gamma, beta, 1)


@needs_device
@pytest.mark.parametrize("shape", [(3, 1, 41), (61, 1)])
def test_one_channel_split_across_blocks(small_launch, shape):
    be = _cuda_backend()
    settings = be._settings()
    if len(shape) == 3:
        splits, chunk, blocks = be.plan_channel_major(3, 1, 41, settings)
        per_thread = chunk / settings.tpb
    else:
        tile, splits, rows_per_split, blocks = be.plan_channels_last(61, 1, settings)
        per_thread = rows_per_split / (settings.tpb // tile)
    # the channel is spread over the whole grid (the last block merges), and each thread
    # still loops over its values
    assert splits == blocks == settings.max_blocks
    assert per_thread > settings.unroll
    x, dy, gamma, beta = _problem(shape, 1, "float32", offset=1e4)
    _check_all_ops(x, dy, gamma, beta, 1)


@needs_device
def test_bitwise_deterministic_with_many_partials(small_launch):
    x, dy, _, _ = _problem((4, 2, 29), 1, "float32")
    d_x, d_dy = cuda.to_device(x), cuda.to_device(dy)
    runs = []
    for _ in range(2):
        out = fastbn.batch_norm_forward(d_x)
        grads = fastbn.batch_norm_backward(d_dy, d_x, out.mean, out.invstd)
        runs.append([_host(a) for a in (*out, *grads)])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@needs_device
def test_float16_statistics_are_float32_and_accumulate_in_float64(small_launch):
    # float16 values near 1000 are 0.5 apart; a float16 sum of 189 of them would be off by far
    x = (np.random.default_rng(1).standard_normal((7, 3, 9)) * 4 + 1000).astype(np.float16)
    out = fastbn.batch_norm_forward(cuda.to_device(x))
    assert _host(out.y).dtype == np.float16 and _host(out.mean).dtype == np.float32
    exact = x.astype(np.float64)
    np.testing.assert_allclose(_host(out.mean), exact.mean(axis=(0, 2)), rtol=1e-7)
    np.testing.assert_allclose(1 / _host(out.invstd).astype(float) ** 2 - 1e-5,
                               exact.var(axis=(0, 2)), rtol=1e-4)


@needs_device
def test_running_moments_from_device_arrays(small_launch):
    x = np.random.default_rng(3).standard_normal((9, 4, 3)) + 50
    acc = fastbn.RunningMoments(4).update(cuda.to_device(x[:4])).update(cuda.to_device(x[4:]))
    assert acc.count == 27
    np.testing.assert_allclose(acc.mean, x.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(acc.var(), x.var(axis=(0, 2)), rtol=1e-10)


@needs_device
def test_empty_tensors():
    out = fastbn.batch_norm_forward(cuda.to_device(np.zeros((4, 0, 3), np.float32)))
    assert out.y.shape == (4, 0, 3) and out.mean.shape == (0,)
    y = fastbn.batch_norm_forward(cuda.to_device(np.zeros((0, 3), np.float32)), training=False,
                                  running_mean=cuda.to_device(np.zeros(3)),
                                  running_var=cuda.to_device(np.ones(3))).y
    assert y.shape == (0, 3)


@needs_device
@pytest.mark.parametrize("setting, value", [("CUDA_THREADS_PER_BLOCK", 6),
                                            ("CUDA_CHANNEL_TILE", 0), ("CUDA_MAX_BLOCKS", 0)])
def test_invalid_launch_settings_are_named(monkeypatch, setting, value):
    monkeypatch.setattr(_config, setting, value)
    with pytest.raises(ValueError, match=f"fastbn._config.{setting}: expected"):
        fastbn.batch_norm_forward(cuda.to_device(np.ones((3, 2), np.float32)))


@needs_device
def test_precompile_runs_every_kernel_of_the_common_signatures():
    import fastbn.cuda as fastbn_cuda
    assert fastbn_cuda.precompile(dtypes=("float32",), activations=(None,)) >= 10


# ----------------------------------------------------------------------------------------------
# a missing GPU, a missing package

def test_missing_gpu_error_says_what_is_missing(monkeypatch):
    import fastbn.backends.cuda as cuda_backend
    monkeypatch.setattr(cuda_backend, "SIMULATOR", False)
    monkeypatch.setattr(cuda_backend, "_driver_problem", lambda: (
        "the CUDA driver could not be initialized: CUDA driver library cannot be found"))
    monkeypatch.delitem(backends._modules, "cuda", raising=False)
    with pytest.raises(RuntimeError) as info:
        fastbn.batch_norm_forward(np.ones((3, 2)), backend="cuda")
    message = str(info.value)
    for words in ('backend "cuda"', "no usable CUDA GPU", "driver library cannot be found",
                  'pip install "fastbn[cuda]"', 'backend="cpu"', "NUMBA_ENABLE_CUDASIM=1"):
        assert words in message, message


@pytest.mark.skipif(HAS_DEVICE, reason="a GPU or the simulator is available here")
def test_missing_gpu_is_a_clear_error_on_this_machine():
    x = np.ones((3, 2))
    with pytest.raises(RuntimeError, match='backend "cuda": no usable CUDA GPU'):
        fastbn.batch_norm_forward(x, backend="cuda")
    fastbn.batch_norm_forward(x, backend="cpu")                   # nothing else is affected


def test_missing_numba_cuda_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "numba_cuda"
                        else real_find_spec(name, *args))
    monkeypatch.delitem(sys.modules, "fastbn.backends.cuda", raising=False)
    monkeypatch.delitem(backends._modules, "cuda", raising=False)
    with pytest.raises(ImportError, match=r'numba-cuda.*pip install "fastbn\[cuda\]"'):
        backends.load("cuda")


def test_importing_the_cuda_module_touches_no_gpu():
    code = ("import sys, fastbn.backends.cuda as c; from numba.cuda.cudadrv import driver; "
            "sys.exit(0 if c.SIMULATOR or driver.driver.pid is None else 1)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# real compilation: the simulator runs code that a GPU compiler may refuse. The signatures are
# the launchers' own: `python tests/test_cuda.py --record-signatures` runs every operation under
# the simulator (dtype mixes, both regimes, with and without optional arguments) and prints the
# argument types of every launch.

def _record_signatures():
    from fastbn.backends import cuda as cuda_backend
    seen = {}

    def typ(a):
        if hasattr(a, "_numba_type_"):
            t = a._numba_type_
            return ["array", str(t.dtype), t.ndim, t.layout]
        if isinstance(a, (bool, np.bool_)):
            return ["boolean"]
        if isinstance(a, (int, np.integer)):
            return ["int64"]
        if isinstance(a, (float, np.floating)):
            return ["float64"]
        raise TypeError(f"a launch argument of type {type(a).__name__}")

    cuda_backend._launch_hooks.append(
        lambda name, blocks, stream, args: seen.setdefault(name, set()).add(
            json.dumps([typ(a) for a in args])))
    put = cuda.to_device
    for dtype in ("float16", "float32", "float64"):
        sdtype = np.float64 if dtype == "float64" else np.float32
        for shape in [(3, 2, 5), (5, 2, 1)]:
            channels = shape[1]
            x, y = put(np.random.rand(*shape).astype(dtype)), put(np.zeros(shape, dtype))
            for vdtype in (sdtype, np.float16, np.float64):
                v = put(np.ones(channels, vdtype))
                mean, invstd = put(np.zeros(channels, sdtype)), put(np.ones(channels, sdtype))
                dgamma, dbeta = put(np.zeros(channels, sdtype)), put(np.zeros(channels, sdtype))
                cuda_backend.forward_train(x, v, v, 1e-5, 0.1, put(np.zeros(channels, vdtype)),
                                           put(np.ones(channels, vdtype)), "relu", x, None, y,
                                           mean, invstd)
                cuda_backend.forward_eval(x, v, v, v, v, 1e-5, None, None, y, mean, invstd)
                cuda_backend.backward(x, x, mean, invstd, v, True, "relu", y, y, dgamma, dbeta,
                                      y)
                cuda_backend.update_running_stats(put(np.zeros(channels, vdtype)),
                                                  put(np.ones(channels, vdtype)),
                                                  put(np.zeros(channels)), put(np.ones(channels)),
                                                  10, 0.1, None)
            cuda_backend.forward_train(x, None, None, 1e-5, 0.1, None, None, None, None, None, y,
                                       mean, invstd)
            cuda_backend.forward_eval(x, None, None, mean, invstd, 1e-5, "sigmoid", x, y, mean,
                                      invstd)
            cuda_backend.backward(x, x, mean, invstd, None, False, None, None, y, dgamma, dbeta,
                                  None)
            cuda_backend.moments(x, put(np.zeros(channels, sdtype)),
                                 put(np.zeros(channels, sdtype)))
            cuda_backend.channel_moments(x)
            cuda_backend.backward_reduce(x, x, mean)
            cuda_backend.backward_apply(x, x, *(np.ones(channels) for _ in range(4)), y)
        cuda_backend.gather3(put(np.random.rand(3, 2, 10).astype(dtype))[:, :, ::2], (0, 1, 2),
                             (3, 2, 5))
    return {name: sorted(signatures) for name, signatures in seen.items()}


def _compiler_problem():
    """Why numba-cuda cannot compile PTX here (None when it can)."""
    try:
        from numba.cuda.cudadrv import nvrtc, nvvm
        if not nvvm.is_available():
            return "libNVVM not found (pip install \"numba-cuda[cu13]\" or a CUDA toolkit)"
        nvrtc.get_supported_ccs()
    except Exception as exc:  # noqa: BLE001 - any failure to find the toolkit
        return f"the CUDA compiler libraries are not usable here: {exc}"
    return None


def _ptxas():
    candidates = [shutil.which("ptxas")]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        candidates += [str(p) for p in Path(root).glob("cu*/bin/ptxas")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "ptxas"))
    return [c for c in dict.fromkeys(candidates) if c and os.access(c, os.X_OK)]


@pytest.mark.slow
@pytest.mark.skipif(SIMULATOR, reason="the simulator replaces numba.cuda; run without "
                                      "NUMBA_ENABLE_CUDASIM to compile for a real GPU")
def test_every_launched_signature_compiles_to_ptx_and_assembles_for_sm90(tmp_path, monkeypatch):
    problem = _compiler_problem()
    if problem:
        pytest.skip(problem)
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    recorded = subprocess.run([sys.executable, __file__, "--record-signatures"], env=env,
                              capture_output=True, text=True, timeout=600,
                              cwd=root)
    assert recorded.returncode == 0, recorded.stderr
    signatures = json.loads(recorded.stdout.strip().splitlines()[-1])
    # numba-cuda compiles the device functions a kernel calls for the current device's compute
    # capability, even inside compile_ptx; with no GPU here, name the one compile_ptx targets
    import numba.cuda.dispatcher
    from numba.cuda import types
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=(9, 0)))
    cuda_backend = importlib.import_module("fastbn.backends.cuda")
    functions = cuda_backend.kernel_functions(256, 4)
    assert set(signatures) == set(functions), "a kernel no operation launches, or vice versa"

    def build(t):
        return types.Array(getattr(types, t[1]), t[2], t[3]) if t[0] == "array" \
            else getattr(types, t[0])

    ptx_files = []
    for name, function in functions.items():
        for i, signature in enumerate(signatures[name]):
            ptx, _ = cuda.compile_ptx(function, tuple(build(t) for t in json.loads(signature)),
                                      cc=(9, 0))
            assert ".target sm_90" in ptx and ".entry" in ptx, name
            path = tmp_path / f"{name}_{i}.ptx"
            path.write_text(ptx)
            ptx_files.append(path)
    # assemble with ptxas (register allocation, shared-memory limits: what the driver's JIT will
    # do on a GPU). A ptxas older than the NVVM that wrote the PTX refuses its .version line; the
    # sm_90 instructions are the same, so the files are then assembled with the version ptxas
    # names (said in the output). No usable ptxas at all: say so loudly.
    tried = []
    for ptxas in _ptxas():
        probe = subprocess.run([ptxas, "-arch=sm_90", str(ptx_files[0]), "-o",
                                str(tmp_path / "probe.cubin")], capture_output=True, text=True)
        rewrite = None
        if probe.returncode != 0:
            found = re.search(r"Unsupported \.version (\S+); current version is '(\S+)'",
                              probe.stderr)
            if not found:
                tried.append(f"{ptxas}: {probe.stderr.strip().splitlines()[:1]}")
                continue
            rewrite = (f".version {found.group(1)}", f".version {found.group(2)}")
        registers = {}
        for path in ptx_files:
            source = path
            if rewrite:
                source = path.with_suffix(".for_ptxas.ptx")
                source.write_text(path.read_text().replace(*rewrite, 1))
            result = subprocess.run([ptxas, "-arch=sm_90", "-v", str(source), "-o",
                                     str(path.with_suffix(".cubin"))],
                                    capture_output=True, text=True)
            assert result.returncode == 0, f"{path.name}: {result.stderr}"
            assert " 0 bytes spill stores" in result.stderr, f"{path.name} spills: {result.stderr}"
            used = re.search(r"Used (\d+) registers", result.stderr)
            registers[path.stem.rsplit("_", 1)[0]] = max(
                registers.get(path.stem.rsplit("_", 1)[0], 0), int(used.group(1)) if used else 0)
        print(f"assembled {len(ptx_files)} kernels with {ptxas} for sm_90"
              + (f" (PTX {rewrite[0]} rewritten as {rewrite[1]})" if rewrite else "")
              + f"; most registers per thread: {registers}")
        return
    where = tried or ["no ptxas on PATH, CUDA_HOME or in the nvidia wheels"]
    message = (f"PTX NOT ASSEMBLED: {len(ptx_files)} kernels compiled to PTX, but no ptxas that "
               f"reads this PTX version was found ({where}); pip install "
               '"nvidia-cuda-nvcc==13.*" to run this step')
    print(message)
    warnings.warn(message)


# ----------------------------------------------------------------------------------------------
# real GPU only

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape, axis", [((1, 1, 3_000_001), 1), ((3_000_001, 1), 1)])
def test_gpu_one_channel_with_millions_of_values(shape, axis):
    x = (np.random.default_rng(4).standard_normal(shape) + 1e3).astype(np.float32)
    out = fastbn.batch_norm_forward(cuda.to_device(x), axis=axis)
    exact = x.astype(np.float64)
    np.testing.assert_allclose(_host(out.mean), [exact.mean()], rtol=1e-7)
    np.testing.assert_allclose(1 / _host(out.invstd).astype(float) ** 2 - 1e-5, [exact.var()],
                               rtol=1e-5)
    ref = fastbn.batch_norm_forward(x, axis=axis, backend="reference")
    _close(out.y, ref.y, "float32")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape, axis", [((16, 64, 28, 28), 1), ((16, 28, 28, 64), -1),
                                         ((60, 100), 1), ((8, 2048, 7, 7), 1)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gpu_default_launch_configuration_matches_reference(shape, axis, dtype):
    x, dy, gamma, beta = _problem(shape, axis, dtype)
    _check_all_ops(x, dy, gamma, beta, axis)


@pytest.mark.gpu
@needs_gpu
def test_gpu_torch_tensors_in_torch_tensors_out_on_the_current_stream():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    be = _cuda_backend()
    x, _, _, _ = _problem((4, 3, 5), 1, "float32")
    ref = fastbn.batch_norm_forward(x, backend="reference").y
    t = torch.from_numpy(x).cuda()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side), be.call_scope():
        assert int(be.current_stream()) == side.cuda_stream
        out = fastbn.batch_norm_forward(t)
        y = be.result(out.y)
    side.synchronize()
    assert isinstance(y, torch.Tensor) and y.device == t.device
    _close(y.cpu().numpy(), ref, "float32")


@pytest.mark.gpu
@needs_gpu
def test_gpu_forward_and_backward_capture_in_a_cuda_graph():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    x, dy, _, _ = _problem((8, 16, 9, 9), 1, "float32")
    t_x, t_dy = torch.from_numpy(x).cuda(), torch.from_numpy(dy).cuda()
    y, mean, invstd = (torch.empty_like(t_x), torch.empty(16, device="cuda"),
                       torch.empty(16, device="cuda"))
    # every output preallocated: nothing may allocate inside the capture
    dx, dgamma, dbeta = torch.empty_like(t_x), torch.empty(16, device="cuda"), \
        torch.empty(16, device="cuda")
    stream = torch.cuda.Stream()

    def step():
        fastbn.batch_norm_forward(t_x, out=(y, mean, invstd), stream=stream.cuda_stream)
        fastbn.batch_norm_backward(t_dy, t_x, mean, invstd, out=(dx, dgamma, dbeta),
                                   stream=stream.cuda_stream)

    with torch.cuda.stream(stream):
        step()                                   # compile and create scratch before capture
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step()
    y.zero_()
    dx.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref = fastbn.batch_norm_forward(x, backend="reference")
    _close(y.cpu().numpy(), ref.y, "float32")
    ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, backend="reference")
    _check_grads(SimpleNamespace(dx=dx.cpu().numpy(), dgamma=dgamma.cpu().numpy(),
                                 dbeta=dbeta.cpu().numpy()), ref_grads, x, dy, np.ones(16),
                 ref.invstd, "float32")


# ----------------------------------------------------------------------------------------------
# the GPU benchmark's own path: validation, timing, JSON, table (on a tiny case)

@needs_device
def test_gpu_benchmark_validates_times_and_reports(tmp_path):
    from benchmarks import bench_gpu
    out, table = tmp_path / "gpu.json", tmp_path / "gpu.md"
    assert bench_gpu.main(["--shape", "2,3,2,3", "--dtype", "float32", "--reps", "1",
                           "--warmup", "0", "--out", str(out), "--md", str(table)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["gpu"]
    assert [(r["layout"], r["op"]) for r in result["rows"]] == [
        (layout, op) for layout in ("NCHW", "NHWC") for op in bench_gpu.OPS]
    for row in result["rows"]:
        assert row["variants"]["fastbn"]["valid"] and row["variants"]["copy"]["valid"]
    assert "| 2x3x2x3 NCHW float32 | fwd-train |" in table.read_text()
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--shape", "2,x"])


if __name__ == "__main__" and "--record-signatures" in sys.argv:
    print(json.dumps(_record_signatures()))
