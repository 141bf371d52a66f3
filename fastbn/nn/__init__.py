"""A minimal, readable network trainer on top of fastbn's batch-norm kernels.

Layers (forward and backward side by side): :class:`Linear`, :class:`BatchNorm`,
:class:`BatchNormActivation` (BN fused with a sigmoid or ReLU), :class:`Sigmoid`, :class:`ReLU`,
:class:`Sequential`; the loss :class:`SoftmaxCrossEntropy`;
the optimizer :class:`SGD`; Algorithm 2's :func:`recompute_population_stats`; the loop
:class:`Trainer` with exact ``.npz`` checkpoints.
"""
from .layers import (BatchNorm, BatchNormActivation, Linear, Module, Parameter, ReLU, Sequential,
                     Sigmoid, normal)
from .loss import SoftmaxCrossEntropy, log_softmax, softmax_cross_entropy
from .optim import SGD
from .population import recompute_population_stats
from .train import (BatchSampler, CheckpointError, Trainer, allreduce_gradients, evaluate,
                    load_checkpoint, predict, save_checkpoint, train_step)

__all__ = ["Module", "Parameter", "Linear", "BatchNorm", "BatchNormActivation", "Sigmoid",
           "ReLU", "Sequential", "normal", "SoftmaxCrossEntropy", "softmax_cross_entropy", "log_softmax", "SGD",
           "recompute_population_stats", "BatchSampler", "Trainer", "train_step", "evaluate",
           "predict", "save_checkpoint", "load_checkpoint", "CheckpointError",
           "allreduce_gradients"]
