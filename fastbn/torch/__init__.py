"""fastbn for PyTorch: drop-in batch-norm modules, a model converter, and synchronized BN on
the CPU over torch.distributed.

>>> import fastbn.torch                                  # doctest: +SKIP
>>> model = fastbn.torch.convert(model)                   # every BatchNorm1d/2d/3d -> fastbn
>>> bn = fastbn.torch.BatchNorm2d(64)                     # or build the modules directly

``import fastbn`` never imports torch; this package is imported only when asked for.
docs/torch.md has the semantics, what is tested and the measured speed.
"""
try:
    import torch  # noqa: F401  (absolute import: PyTorch itself, not this package)
except ImportError as exc:
    raise ImportError('fastbn.torch needs PyTorch, which is not installed; install it with '
                      'pip install -e ".[torch]" (from a fastbn checkout) or pip install torch'
                      ) from exc

from . import _ops as ops
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormAct1d, BatchNormAct2d,
                      BatchNormAct3d)
from .sync import SyncBatchNorm
from .convert import convert

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d",
           "BatchNormAct3d", "SyncBatchNorm", "convert", "ops"]
