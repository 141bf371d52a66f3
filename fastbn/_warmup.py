"""Compile (or load from Numba's cache) the kernels ahead of the first real call."""
import time

import numpy as np

# One small problem per path of the cpu backend (docs/perf_log.md), C-contiguous, channel axis 1:
# below CPU_PARALLEL_MIN_SIZE the serial kernels run, above it the parallel ones.
_SERIAL = ((7, 5), (3, 5, 7), (3, 5, 600), (100, 1))
_PARALLEL = ((400, 100), (6554, 5), (40, 40, 49), (6, 20, 600), (2, 3, 20000), (40000, 1))


def warmup(backend="cpu", dtypes=("float16", "float32", "float64")):
    """Compile every kernel of ``backend`` that C-contiguous (and NHWC) arrays of the given dtypes
    use, serial and parallel variants, training and eval, forward and backward. Returns the
    seconds it took. From a warm Numba cache this only loads the compiled code.

    Other memory layouts (Fortran order, strided views) compile their own variants on first
    use."""
    from . import _config
    from .api import batch_norm_backward, batch_norm_forward, moments
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    shapes = _SERIAL + tuple(s for s in _PARALLEL if np.prod(s) >= _config.CPU_PARALLEL_MIN_SIZE)
    for dtype in dtypes:
        for shape in shapes:
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
