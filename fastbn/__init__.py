"""fastbn: batch-normalization kernels behind one NumPy-style API.

Backends: ``"reference"`` (NumPy float64, readable), ``"cpu"`` (Numba, parallel) and ``"cuda"``
(numba-cuda). Importing fastbn never touches a GPU.
"""
from .api import (BatchNormActGrads, BatchNormGrads, BatchNormOutput, batch_norm,
                  batch_norm_act_backward, batch_norm_act_forward, batch_norm_backward,
                  batch_norm_forward, moments, stats_dtype)
from .backends import BACKENDS, get_backend, set_backend, use_backend
from ._pool import output_pool_stats, set_output_pool
from .stats import RunningMoments
from ._warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "batch_norm_forward", "batch_norm_backward", "batch_norm_act_forward",
    "batch_norm_act_backward", "batch_norm", "moments", "RunningMoments",
    "BatchNormOutput", "BatchNormGrads", "BatchNormActGrads", "set_backend", "get_backend", "use_backend",
    "BACKENDS", "stats_dtype", "warmup", "set_output_pool", "output_pool_stats", "__version__",
]
