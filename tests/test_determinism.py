"""Bitwise determinism of the cpu backend (issue 13.1): the same input gives the same bits
whatever the process did before and wherever the outputs go.

* serial and parallel kernels (``CPU_PARALLEL_MIN_SIZE``);
* in place and out of place (``out=(dy, None, None)``, ``out=(x, None, None)``);
* any output buffer layout: C order, Fortran order, permuted and strided views as ``out=``;
* a process that compiles the kernels and a process that loads them from Numba's cache:
  ``test_cache_processes.py`` (its own file, so that CI runs it beside these).

The shapes are above the parallel threshold (32768 elements) and cover each work split:
channel-major with few channels (C = 1, 3, 5: channels split into segments), channel runs,
short runs as column blocks (7x7), and channels-last row blocks.
"""
import numpy as np
import pytest

import fastbn
from fastbn import _config

DTYPES = ["float16", "float32", "float64"]
# (shape, axis): every path of the cpu backend (serial_or_parallel sets CPU_PARALLEL_MIN_SIZE
# so that each runs both in the calling thread and on the pool)
CASES = [((2, 1, 20001), 1),        # C = 1: one channel split into segments
         ((3, 3, 4001), 1),         # C = 3: segments
         ((6, 5, 1201), 1),         # C = 5: segments
         ((2, 40, 601), 1),         # channel runs (a task per channel)
         ((48, 40, 7, 7), 1),       # short runs: column blocks (2 tasks)
         ((12001, 3), 1),           # channels-last, few channels: row blocks
         ((40, 7, 7, 24), -1)]      # NHWC
IDS = ["C1-segments", "C3-segments", "C5-segments", "runs", "7x7", "NC", "NHWC"]


def _bits(a):
    a = np.asarray(a.copy_to_host() if hasattr(a, "copy_to_host") else a)
    return np.ascontiguousarray(a).view(np.uint8)


def _assert_same_bits(got, want, what):
    for name in want:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        assert a.shape == b.shape and a.dtype == b.dtype, (what, name)
        if not np.array_equal(_bits(a), _bits(b)):
            differ = int(np.sum(_bits(a).reshape(a.size, -1) != _bits(b).reshape(b.size, -1),
                                axis=1).astype(bool).sum()) if a.size else 0
            raise AssertionError(f"{what}: {name} differs in {differ} of {a.size} elements")


def _problem(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    residual = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 2, channels).astype(np.float32)
    beta = rng.standard_normal(channels)
    return x, dy, residual, gamma, beta


def _core_outputs(x, dy, residual, gamma, beta, axis):
    """y, mean, invstd, the running statistics, dx, dgamma, dbeta of one training step."""
    channels = x.shape[axis]
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    fwd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, running_mean=rm, running_var=rv,
                                    backend="cpu")
    grads = fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                                       backend="cpu")
    return dict(fwd._asdict(), running_mean=rm, running_var=rv, **grads._asdict())


def _outputs(x, dy, residual, gamma, beta, axis, outs=None):
    """Every output of every cpu operation on one problem, by name. outs: optional callable
    giving a preallocated output for (name, shape, dtype)."""
    def out(name, shape, dtype):
        return None if outs is None else outs(name, shape, dtype)

    channels = x.shape[axis]
    sdtype = fastbn.stats_dtype(x.dtype)
    result = {}
    rm, rv = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    fwd = fastbn.batch_norm_forward(
        x, gamma, beta, axis=axis, running_mean=rm, running_var=rv, backend="cpu",
        out=(out("y", x.shape, x.dtype), out("mean", channels, sdtype),
             out("invstd", channels, sdtype)))
    result.update(y=fwd.y.copy(), mean=fwd.mean.copy(), invstd=fwd.invstd.copy(),
                  running_mean=rm, running_var=rv)
    ev = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=False, running_mean=rm,
                                   running_var=rv, out=(out("eval", x.shape, x.dtype), None, None),
                                   backend="cpu")
    result["eval"] = ev.y.copy()
    for training in (True, False):
        grads = fastbn.batch_norm_backward(
            dy, x, fwd.mean, fwd.invstd, gamma, axis=axis, training=training, backend="cpu",
            out=(out("dx", x.shape, x.dtype), out("dgamma", channels, sdtype),
                 out("dbeta", channels, sdtype)))
        for name in ("dx", "dgamma", "dbeta"):
            result[f"{name} training={training}"] = getattr(grads, name).copy()
    fused = fastbn.batch_norm_act_forward(x, gamma, beta, activation="relu", residual=residual,
                                          axis=axis, out=(out("fused y", x.shape, x.dtype),
                                                          None, None), backend="cpu")
    result["fused y"] = fused.y.copy()
    fused_grads = fastbn.batch_norm_act_backward(
        dy, fused.y, x, fused.mean, fused.invstd, gamma, activation="relu", residual=True,
        axis=axis, out=(out("fused dx", x.shape, x.dtype), None, None,
                        out("dresidual", x.shape, x.dtype)), backend="cpu")
    result.update({"fused dx": fused_grads.dx.copy(), "fused dgamma": fused_grads.dgamma.copy(),
                   "dresidual": fused_grads.dresidual.copy()})
    mean, var = fastbn.moments(x, axis=axis, backend="cpu")
    result.update({"moments mean": mean, "moments var": var})
    return result


@pytest.fixture
def serial_or_parallel(monkeypatch):
    def use(parallel):
        monkeypatch.setattr(_config, "CPU_PARALLEL_MIN_SIZE", 0 if parallel else 1 << 62)
    return use


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", CASES, ids=IDS)
def test_serial_and_parallel_kernels_give_the_same_bits(serial_or_parallel, shape, axis, dtype):
    problem = _problem(shape, axis, dtype)
    serial_or_parallel(False)
    serial = _outputs(*problem, axis)
    serial_or_parallel(True)
    parallel = _outputs(*problem, axis)
    _assert_same_bits(parallel, serial, "parallel vs serial")


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "serial"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", CASES, ids=IDS)
def test_in_place_and_out_of_place_give_the_same_bits(serial_or_parallel, shape, axis, dtype,
                                                      parallel):
    serial_or_parallel(parallel)
    x, dy, residual, gamma, beta = _problem(shape, axis, dtype)
    fwd = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, backend="cpu")
    for training in (True, False):
        want = fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                                          training=training, backend="cpu")
        in_place = dy.copy()
        got = fastbn.batch_norm_backward(in_place, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                                         training=training, out=(in_place, None, None),
                                         backend="cpu")
        assert got.dx is in_place
        _assert_same_bits(got._asdict(), want._asdict(), f"backward training={training} in place")
    x_in_place = x.copy()
    got = fastbn.batch_norm_forward(x_in_place, gamma, beta, axis=axis,
                                    out=(x_in_place, None, None), backend="cpu")
    assert got.y is x_in_place
    _assert_same_bits(got._asdict(), fwd._asdict(), "forward in place")
    fused = fastbn.batch_norm_act_forward(x, gamma, beta, residual=residual, axis=axis,
                                          backend="cpu")
    want = fastbn.batch_norm_act_backward(dy, fused.y, x, fused.mean, fused.invstd, gamma,
                                          residual=True, axis=axis, backend="cpu")
    in_place = dy.copy()
    got = fastbn.batch_norm_act_backward(in_place, fused.y, x, fused.mean, fused.invstd, gamma,
                                         residual=True, axis=axis,
                                         out=(in_place, None, None, None), backend="cpu")
    _assert_same_bits(got._asdict(), want._asdict(), "fused backward in place")


def _layout(kind, shape, dtype):
    """A NaN-filled output buffer of the given shape in one memory layout."""
    if kind == "C":
        return np.full(shape, np.nan, dtype)
    if kind == "F":
        return np.asfortranarray(np.full(shape, np.nan, dtype))
    if kind == "permuted":            # axes stored in reverse order
        return np.full(shape[::-1], np.nan, dtype).transpose()
    # strided: every other element of the last axis, in a buffer with room around it
    big = np.full(tuple(n + 1 for n in shape[:-1]) + (2 * shape[-1] + 1,), np.nan, dtype)
    return big[tuple(slice(1, None) for _ in shape[:-1]) + (slice(1, None, 2),)]


@pytest.mark.parametrize("kind", ["C", "F", "permuted", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", CASES, ids=IDS)
def test_output_buffer_layout_does_not_change_the_bits(shape, axis, dtype, kind):
    problem = _problem(shape, axis, dtype)
    want = _outputs(*problem, axis)

    def outs(name, shape, out_dtype):
        if isinstance(shape, int):         # per-channel outputs: contiguous or strided
            return _layout("strided" if kind in ("strided", "permuted") else "C", (shape,),
                           out_dtype)
        return _layout(kind, shape, out_dtype)

    got = _outputs(*problem, axis, outs=outs)
    _assert_same_bits(got, want, f"out= in {kind} layout")


def _vector_kinds(values):
    """The same per-channel values as every kind of vector a caller may pass: float16, float32
    and float64, read-only, strided (values exactly representable in float16)."""
    readonly = values.astype(np.float32)
    readonly.flags.writeable = False
    strided = np.repeat(values.astype(np.float64), 2)[::2]
    return {"float16": values.astype(np.float16), "float32": values.astype(np.float32),
            "float64": values.astype(np.float64), "read-only": readonly, "strided": strided}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((60, 100), 1), ((17, 40, 7, 7), 1), ((2, 40, 601), 1),
                                         ((40, 7, 7, 24), -1)],
                         ids=["60x100", "7x7", "runs", "NHWC"])
def test_vector_dtype_and_layout_do_not_change_the_bits(shape, axis, dtype):
    """The cpu backend hands its kernels the per-channel vectors in one dtype (as they are, or
    all as float64 copies): the values are the same, so the bits must be too."""
    x, dy, residual, _, _ = _problem(shape, axis, dtype)
    channels = shape[axis]
    rng = np.random.default_rng(1)
    gammas = _vector_kinds(rng.uniform(0.5, 2, channels).astype(np.float16))
    betas = _vector_kinds(rng.standard_normal(channels).astype(np.float16))
    results = {}
    for kind in gammas:
        for beta_kind in ("float32", kind):
            gamma, beta = gammas[kind], betas[beta_kind]
            fwd = fastbn.batch_norm_act_forward(x, gamma, beta, activation="relu",
                                                residual=residual, axis=axis, backend="cpu")
            ev = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=False,
                                           running_mean=fwd.mean, running_var=fwd.invstd,
                                           backend="cpu")
            grads = fastbn.batch_norm_backward(dy, x, fwd.mean, fwd.invstd, gamma, axis=axis,
                                               backend="cpu")
            results[kind, beta_kind] = dict(y=fwd.y, mean=fwd.mean, invstd=fwd.invstd,
                                            eval=ev.y, dx=grads.dx, dgamma=grads.dgamma,
                                            dbeta=grads.dbeta)
    want = results["float32", "float32"]
    for key, got in results.items():
        _assert_same_bits(got, want, f"gamma {key[0]}, beta {key[1]} vs float32")
