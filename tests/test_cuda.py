"""The cuda backend: dispatch, zero-copy, launch configurations, determinism, real compilation.

Three ways this file runs:

* simulator lane: ``FASTBN_TEST_BACKENDS=cuda NUMBA_ENABLE_CUDASIM=1 pytest tests/test_backends.py
  tests/test_errors.py tests/test_cuda.py`` (the variable set before Python starts). The kernels
  run on numba's simulator; ``gpu`` tests skip.
* real-GPU lane: the same command without NUMBA_ENABLE_CUDASIM, on a machine with a GPU.
* default lane (no GPU, no simulator): the device tests skip, the PTX compilation test compiles
  every kernel with the real CUDA compiler (NVVM), and the missing-GPU error is checked for real.
"""
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import fastbn
from fastbn import _config, backends

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


# small_launch grids are far below numba-cuda's 128-block performance hint on a real GPU
pytestmark = pytest.mark.filterwarnings("ignore:Grid size .* under-utilization")

RTOL = {"float16": 4e-3, "float32": 2e-5, "float64": 1e-10}


def _cuda_backend():
    return backends.load("cuda")


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def _is_device(a):
    return backends.is_device_array(a)


def _close(actual, reference, dtype):
    reference = np.asarray(reference, np.float64)
    rtol = RTOL[np.dtype(dtype).name]
    scale = max(float(np.max(np.abs(reference))) if reference.size else 1.0, 1.0)
    np.testing.assert_allclose(np.asarray(_host(actual), np.float64), reference, rtol=rtol,
                               atol=rtol * scale)


def _problem(shape, axis, dtype, seed=0, offset=3.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2.0 + offset).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.standard_normal(channels)
    return x, dy, gamma, beta


def _check_all_ops(x, dy, gamma, beta, axis, to_device=True):
    """Forward (train, eval), backward (train, eval), moments on cuda against the reference.
    Inputs go to the device unless to_device is False (then the host round trip runs)."""
    dtype = x.dtype
    channels = x.shape[axis]
    sdtype = fastbn.stats_dtype(dtype)
    put = cuda.to_device if to_device else (lambda a: a)
    rm, rv = np.linspace(-1, 1, channels), np.linspace(0.5, 2, channels)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    d_rm, d_rv = put(rm), put(rv)
    got = fastbn.batch_norm_forward(put(x), put(gamma), put(beta), axis=axis,
                                    running_mean=d_rm, running_var=d_rv, momentum=0.3,
                                    backend="cuda")
    ref = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm_ref,
                                    running_var=rv_ref, momentum=0.3, backend="reference")
    assert _host(got.y).dtype == dtype and _host(got.mean).dtype == sdtype
    _close(got.y, ref.y, dtype)
    _close(got.mean, ref.mean, sdtype)
    _close(got.invstd, ref.invstd, sdtype)
    np.testing.assert_allclose(_host(d_rm), rm_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(_host(d_rv), rv_ref, rtol=1e-9)
    y_eval = fastbn.batch_norm_forward(put(x), put(gamma), put(beta), axis=axis, training=False,
                                       running_mean=put(rm), running_var=put(rv),
                                       backend="cuda").y
    ref_eval = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=False,
                                         running_mean=rm, running_var=rv, backend="reference").y
    _close(y_eval, ref_eval, dtype)
    for training in (True, False):
        grads = fastbn.batch_norm_backward(put(dy), put(x), put(ref.mean), put(ref.invstd),
                                           put(gamma), axis=axis, training=training,
                                           backend="cuda")
        ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, gamma, axis=axis,
                                               training=training, backend="reference")
        natural = float(np.abs(dy).max() * np.max(ref.invstd) * gamma.max())
        rtol = RTOL[np.dtype(dtype).name]
        np.testing.assert_allclose(np.asarray(_host(grads.dx), float), ref_grads.dx.astype(float),
                                   rtol=rtol, atol=4 * rtol * natural)
        count = x.size // channels
        for name in ("dgamma", "dbeta"):
            np.testing.assert_allclose(_host(getattr(grads, name)), getattr(ref_grads, name),
                                       rtol=rtol, atol=rtol * np.abs(dy).max() * count)
    mean, var = fastbn.moments(put(x), axis=axis, backend="cuda")
    ref_mean, ref_var = fastbn.moments(x, axis=axis, backend="reference")
    _close(mean, ref_mean, sdtype)
    _close(var, ref_var, sdtype)
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
# dispatch

@needs_device
def test_device_arrays_select_cuda_and_results_stay_on_device():
    x, _, gamma, beta = _problem((5, 3, 7), 1, "float32")
    out = fastbn.batch_norm_forward(cuda.to_device(x), cuda.to_device(gamma),
                                    cuda.to_device(beta))          # no backend named
    assert all(_is_device(a) for a in out)
    ref = fastbn.batch_norm_forward(x, gamma, beta, backend="reference")
    _close(out.y, ref.y, "float32")
    mean, var = fastbn.moments(cuda.to_device(x))
    assert _is_device(mean) and _is_device(var)
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
    with pytest.raises(TypeError, match=r"x: got a host array"):
        fastbn.batch_norm_forward(x, running_mean=d_rm, running_var=d_rv)
    with pytest.raises(TypeError, match=r"out\[0\] \(y\): got a host array"):
        fastbn.batch_norm_forward(d_x, running_mean=d_rm, running_var=d_rv,
                                  out=(np.empty_like(x), None, None))
    with pytest.raises(TypeError, match=r"dy: got a host array"):
        fastbn.batch_norm_backward(dy, d_x, cuda.to_device(np.zeros(3, np.float32)),
                                   cuda.to_device(np.ones(3, np.float32)))
    with pytest.raises(TypeError, match="backend: got CUDA device arrays but backend 'cpu'"):
        fastbn.batch_norm_forward(d_x, backend="cpu")
    np.testing.assert_array_equal(_host(d_rm), 7.0)
    np.testing.assert_array_equal(_host(d_rv), 9.0)


@needs_device
def test_validation_errors_on_device_arrays_change_nothing():
    x = cuda.to_device(np.ones((4, 3, 5), np.float32))
    d_rm, d_rv = cuda.to_device(np.full(3, 7.0)), cuda.to_device(np.full(3, 9.0))
    y = cuda.to_device(np.full((4, 3, 5), 42.0, np.float32))
    with pytest.raises(ValueError, match=r"gamma: expected shape \(3,\)"):
        fastbn.batch_norm_forward(x, cuda.to_device(np.ones(4)), running_mean=d_rm,
                                  running_var=d_rv, out=(y, None, None))
    with pytest.raises(TypeError, match="x: expected a floating-point array"):
        fastbn.batch_norm_forward(cuda.to_device(np.ones((4, 3), np.int32)))
    with pytest.raises(ValueError, match=r"out\[0\] \(y\): overlaps an input"):
        base = cuda.to_device(np.ones((4, 3, 6), np.float32))
        fastbn.batch_norm_forward(base[:, :, 1:], out=(base[:, :, :-1], None, None))
    np.testing.assert_array_equal(_host(d_rm), 7.0)
    np.testing.assert_array_equal(_host(y), 42.0)


# ----------------------------------------------------------------------------------------------
# zero copy

@needs_device
def test_outputs_are_written_in_place_without_copies():
    x, dy, gamma, beta = _problem((4, 3, 5), 1, "float32")
    d_x, d_dy = cuda.to_device(x), cuda.to_device(dy)
    y, mean, invstd = (cuda.device_array_like(x), cuda.device_array(3, np.float32),
                       cuda.device_array(3, np.float32))
    out = fastbn.batch_norm_forward(d_x, out=(y, mean, invstd))
    assert out.y is y and out.mean is mean and out.invstd is invstd
    grads = fastbn.batch_norm_backward(d_dy, d_x, mean, invstd, out=(d_dy, None, None))
    assert grads.dx is d_dy                                      # in place over dy
    ref = fastbn.batch_norm_forward(x, backend="reference")
    ref_dx = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, backend="reference").dx
    _close(y, ref.y, "float32")
    np.testing.assert_allclose(_host(d_dy), ref_dx, rtol=1e-4, atol=1e-4)


@needs_device
def test_canonical_view_shares_the_input_memory():
    be = _cuda_backend()
    x = cuda.to_device(np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5))
    x3 = be.view3(x, (2, 3, 20), (240, 80, 4))
    assert be.may_share_memory(x3, x)
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
    d_big = cuda.to_device(np.repeat(x, 2, axis=2))
    d_x = d_big[:, :, ::2]                                        # strided inner axis
    d_y = cuda.to_device(np.full((5, 3, 14), np.nan, dtype))[:, :, 1::2]
    d_gamma, d_beta = cuda.to_device(gamma), cuda.to_device(beta)
    out = fastbn.batch_norm_forward(d_x, d_gamma, d_beta, out=(d_y, None, None))
    assert out.y is d_y
    ref = fastbn.batch_norm_forward(x, gamma, beta, backend="reference")
    _close(out.y, ref.y, dtype)
    d_dy = cuda.to_device(np.repeat(dy, 2, axis=2))[:, :, ::2]
    grads = fastbn.batch_norm_backward(d_dy, d_x, out.mean, out.invstd, d_gamma)
    ref_grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, gamma,
                                           backend="reference")
    _close(grads.dgamma, ref_grads.dgamma, "float32")
    assert not np.isnan(_host(grads.dx).astype(float)).any()


# ----------------------------------------------------------------------------------------------
# launch configurations: partial blocks, C larger than the grid, one channel over many blocks

@needs_device
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape, axis", [
    ((3, 5, 13), 1),          # channel-major, 13 = 3*tpb + 1
    ((13, 5), 1),             # channels-last, odd channel count across tiles of 2
    ((2, 3, 3, 5), -1),       # NHWC
    ((13, 4, 1), 1),          # inner == 1 through a trailing unit axis
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
    # the channel is spread over the whole grid, and each thread still loops over its values
    assert splits == blocks == settings.max_blocks
    assert per_thread > settings.unroll
    x, dy, gamma, beta = _problem(shape, 1, "float32", offset=1e4)
    _check_all_ops(x, dy, gamma, beta, 1)


@needs_device
def test_bitwise_deterministic_with_many_partials(small_launch):
    x, dy, _, _ = _problem((4, 3, 29), 1, "float32")
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
def test_running_statistics_on_the_device_skip_nonfinite_channels():
    x = np.random.default_rng(2).standard_normal((6, 4, 5))
    x[0, 2, 0] = np.nan
    d_rm, d_rv = cuda.to_device(np.arange(4.0)), cuda.to_device(np.ones(4, np.float32))
    with pytest.warns(RuntimeWarning, match=r"channels \[2\]"):
        fastbn.batch_norm_forward(cuda.to_device(x), running_mean=d_rm, running_var=d_rv)
    rm, rv = _host(d_rm), _host(d_rv)
    assert rm[2] == 2.0 and rv[2] == 1.0
    exact = np.delete(x, 2, axis=1)
    np.testing.assert_allclose(rm[[0, 1, 3]], 0.9 * np.array([0, 1, 3.0])
                               + 0.1 * exact.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(rv[[0, 1, 3]], 0.9 + 0.1 * exact.var(axis=(0, 2), ddof=1),
                               rtol=1e-6)


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
# real compilation: the simulator runs code that a GPU compiler may refuse

def _kernel_signatures(dtype):
    """Argument types of every kernel as the launchers call them, for one data dtype."""
    from numba.cuda import types
    data = {"float16": types.float16, "float32": types.float32, "float64": types.float64}[dtype]
    stats = types.float64 if dtype == "float64" else types.float32
    x3 = types.Array(data, 3, "A")
    vec = types.Array(types.float64, 1, "C")
    part = types.Array(types.float64, 2, "C")
    i64, f64, flag = types.int64, types.float64, types.boolean
    return {
        "moments_partials_channel_major": [(x3, i64, i64, part)],
        "moments_partials_channels_last": [(x3, i64, i64, i64, part)],
        "finalize_moments": [(part, i64, f64, f64, flag, vec, vec, vec, vec)],
        "normalize": [(x3, vec, vec, vec, flag, vec, flag, x3)],
        "backward_partials_channel_major": [(x3, x3, vec, i64, i64, part)],
        "backward_partials_channels_last": [(x3, x3, vec, i64, i64, i64, part)],
        "finalize_backward": [(part, i64, f64, vec, vec, vec, flag, flag, vec, vec, part)],
        "backward_apply": [(x3, x3, part, flag, x3)],
        "cast_copy": [(types.Array(data, 1, "A"), vec),                 # to_float64
                      (vec, types.Array(stats, 1, "A"))],               # copyto
        "invstd_from_var": [(vec, f64, vec)],
        "var_from_m2": [(vec, f64, vec)],
        "update_running_stats": [(types.Array(stats, 1, "A"), types.Array(stats, 1, "A"), vec,
                                  vec, f64, f64, types.Array(types.uint8, 1, "C"))],
        "strided_copy": [(types.Array(data, 8, "A"), types.Array(data, 8, "A"))],
    }


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
    return [c for c in candidates if c and os.access(c, os.X_OK)]


@pytest.mark.skipif(SIMULATOR, reason="the simulator replaces numba.cuda; run without "
                                      "NUMBA_ENABLE_CUDASIM to compile for a real GPU")
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_every_kernel_compiles_to_ptx_for_sm90(dtype, tmp_path, monkeypatch):
    problem = _compiler_problem()
    if problem:
        pytest.skip(problem)
    # numba-cuda compiles the device functions a kernel calls for the current device's compute
    # capability, even inside compile_ptx; with no GPU here, name the one compile_ptx targets
    import numba.cuda.dispatcher
    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=(9, 0)))
    cuda_backend = importlib.import_module("fastbn.backends.cuda")
    functions = cuda_backend.kernel_functions(256, 4)
    signatures = _kernel_signatures(dtype)
    assert set(signatures) == set(functions), "a kernel without a signature here"
    ptx_files = []
    for name, function in functions.items():
        for i, signature in enumerate(signatures[name]):
            ptx, _ = cuda.compile_ptx(function, signature, cc=(9, 0))
            assert ".target sm_90" in ptx and ".entry" in ptx, name
            path = tmp_path / f"{name}_{i}.ptx"
            path.write_text(ptx)
            ptx_files.append(path)
    # assemble with ptxas when one that reads this PTX version is at hand (register allocation,
    # shared-memory limits: what the driver's JIT will do on a GPU)
    for ptxas in _ptxas():
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True)
        probe = subprocess.run([ptxas, "-arch=sm_90", str(ptx_files[0]), "-o",
                                str(tmp_path / "probe.cubin")], capture_output=True, text=True)
        if "Unsupported .version" in probe.stderr:
            continue              # an older toolkit than the NVVM that wrote the PTX
        for path in ptx_files:
            result = subprocess.run([ptxas, "-arch=sm_90", "-v", str(path), "-o",
                                     str(path.with_suffix(".cubin"))],
                                    capture_output=True, text=True)
            assert result.returncode == 0, f"{path.name}: {result.stderr}"
        print(f"assembled {len(ptx_files)} kernels with {ptxas}: "
              f"{version.stdout.splitlines()[-1:]}")
        break


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
def test_gpu_foreign_cuda_array_interface_is_used_without_a_copy():
    class Foreign:
        """Only the CUDA array interface, like a CuPy array or a PyTorch CUDA tensor."""

        def __init__(self, device_array):
            self._array = device_array

        @property
        def __cuda_array_interface__(self):
            return self._array.__cuda_array_interface__

    x, _, _, _ = _problem((4, 3, 5), 1, "float32")
    d_x, d_y = cuda.to_device(x), cuda.device_array_like(x)
    out = fastbn.batch_norm_forward(Foreign(d_x), out=(Foreign(d_y), None, None))
    assert out.y.__cuda_array_interface__["data"][0] == d_y.__cuda_array_interface__["data"][0]
    _close(d_y, fastbn.batch_norm_forward(x, backend="reference").y, "float32")


@pytest.mark.gpu
@needs_gpu
def test_gpu_torch_and_cupy_tensors_without_a_copy():
    x, _, _, _ = _problem((4, 3, 5), 1, "float32")
    ref = fastbn.batch_norm_forward(x, backend="reference").y
    tried = 0
    try:
        import torch
        if torch.cuda.is_available():
            t = torch.from_numpy(x).cuda()
            y = torch.empty_like(t)
            out = fastbn.batch_norm_forward(t, out=(y, None, None))
            assert torch.as_tensor(out.y, device="cuda").data_ptr() == y.data_ptr()
            _close(y.cpu().numpy(), ref, "float32")
            tried += 1
    except ImportError:
        pass
    try:
        import cupy
        c = cupy.asarray(x)
        out = fastbn.batch_norm_forward(c)
        _close(cupy.asnumpy(cupy.asarray(out.y)), ref, "float32")
        tried += 1
    except ImportError:
        pass
    if not tried:
        pytest.skip("neither PyTorch with CUDA nor CuPy is installed")



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
        assert row["variants"]["fastbn"]["median_ms"] > 0
    assert "| 2x3x2x3 NCHW float32 | fwd-train |" in table.read_text()
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(["--shape", "2,x"])
