"""Compile (or load from Numba's cache) the kernels ahead of the first real call."""
import time

import numpy as np


def warmup(backend="cpu", dtypes=("float32", "float64")):
    """Compile every kernel of ``backend`` for the given dtypes, serial and parallel variants,
    in both memory regimes. Returns the seconds it took. From a warm Numba cache this only
    loads the compiled code."""
    from . import _config
    from .api import batch_norm_backward, batch_norm_forward, moments
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    big = _config.CPU_PARALLEL_MIN_SIZE
    for dtype in dtypes:
        for shape, axis in (((3, 5, 7), 1), ((7, 5), 1), ((2, 5, big // 10 + 1), 1),
                            ((big // 5 + 1, 5), 1)):
            x = rng.standard_normal(shape).astype(dtype)
            gamma = np.ones(5)
            y, mean, invstd = batch_norm_forward(x, gamma, gamma, axis=axis, backend=backend)
            batch_norm_forward(x, gamma, gamma, axis=axis, training=False,
                               running_mean=np.zeros(5), running_var=np.ones(5), backend=backend)
            batch_norm_backward(y, x, mean, invstd, gamma, axis=axis, backend=backend)
            batch_norm_backward(y, x, mean, invstd, gamma, axis=axis, training=False,
                                backend=backend)
            moments(x, axis=axis, backend=backend)
    return time.perf_counter() - start
