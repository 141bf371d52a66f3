"""Compile (or load from Numba's cache) the kernels ahead of the first real call."""
import time

import numpy as np

# One small problem per plan of the cpu backend (fastbn/backends/cpu.py), C-contiguous
# canonical (outer, C, inner) views. A plan's kernels are the same compiled code for serial and
# parallel calls, so one shape per plan is enough.
_SHAPES = (
    (60, 100, 1),        # channels-last, one row block (a small batch)
    (5000, 40, 1),       # channels-last, grouped rows in row blocks
    (100, 1031, 1),      # channels-last, many channels in row blocks
    (6, 20, 600),        # channel runs, a task per channel
    (2, 3, 20000),       # channel runs cut into segments (few channels)
    (40000, 1, 1),       # one channels-last channel: one long run
    (40, 40, 49),        # short runs (NCHW 7x7) as column blocks
)


def warmup(backend="cpu", dtypes=("float16", "float32", "float64")):
    """Compile every kernel of ``backend`` that contiguous NCHW-like and NHWC-like arrays of the
    given dtypes use: training and eval forward, backward, moments, the synchronized backward's
    halves. Returns the seconds it took. From a warm Numba cache this only loads the compiled
    code. Fused activations and residuals, and other memory layouts (Fortran order, strided
    views), compile their own variants on first use."""
    from . import backends
    start = time.perf_counter()
    module = backends.load(backend)
    if getattr(module, "ON_DEVICE", False):
        return _warmup_through_api(backend, dtypes, start)
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        stats = np.float64 if dtype == "float64" else np.float32
        for shape3 in _SHAPES:
            channels = shape3[1]
            x3 = (rng.standard_normal(shape3) + 1.0).astype(dtype)
            y3 = np.empty_like(x3)
            mean, invstd = np.empty(channels, stats), np.empty(channels, stats)
            running_mean, running_var = np.zeros(channels, stats), np.ones(channels, stats)
            gamma = np.ones(channels, stats)
            module.forward_train(x3, gamma, gamma, 1e-5, 0.1, running_mean, running_var, None,
                                 None, None, y3, mean, invstd)
            module.forward_eval(x3, gamma, gamma, running_mean, running_var, 1e-5, None, None,
                                y3, mean, invstd)
            dx3 = np.empty_like(x3)
            dgamma, dbeta = np.empty(channels, stats), np.empty(channels, stats)
            for training in (True, False):
                module.backward(y3, x3, mean, invstd, gamma, training, None, None, dx3, dgamma,
                                dbeta, None)
            module.moments(x3, mean, invstd)
            sums = module.backward_reduce(y3, x3, mean)
            module.backward_apply(y3, x3, mean, sums[0], sums[0], sums[1], dx3)
    return time.perf_counter() - start


def _warmup_through_api(backend, dtypes, start):
    from .api import batch_norm_backward, batch_norm_forward, moments
    rng = np.random.default_rng(0)
    for dtype in dtypes:
        for shape in ((60, 100), (6, 20, 600), (40, 7, 7, 24)):
            x = (rng.standard_normal(shape) + 1.0).astype(dtype)
            channels = shape[1]
            gamma = np.ones(channels)
            stats = np.float64 if dtype == "float64" else np.float32
            running_mean, running_var = np.zeros(channels, stats), np.ones(channels, stats)
            y, mean, invstd = batch_norm_forward(x, gamma, gamma, running_mean=running_mean,
                                                 running_var=running_var, backend=backend)
            batch_norm_forward(x, gamma, gamma, training=False, running_mean=running_mean,
                               running_var=running_var, backend=backend)
            batch_norm_backward(y, x, mean, invstd, gamma, backend=backend)
            batch_norm_backward(y, x, mean, invstd, gamma, training=False, backend=backend)
            moments(x, backend=backend)
    return time.perf_counter() - start
