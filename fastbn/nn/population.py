"""Algorithm 2 of the paper: population statistics for the inference network.

With the parameters frozen, run the training network (BN with batch statistics) over several
mini-batches B of size m and set each BN layer's inference statistics to

    E[x]   = E_B[mu_B]                      the mean of the batch means
    Var[x] = m / (m - 1) * E_B[sigma_B^2]   the mean of the (biased) batch variances, unbiased

This is *not* the variance of all the values pooled together: that would add the spread of the
batch means, Var_B[mu_B], which BN removes from every batch it normalizes.
"""
import numpy as np

from fastbn import RunningMoments

from .layers import BatchNorm


class _BatchMomentsAverage:
    """Per channel: the mean of the batch means and of the unbiased batch variances."""

    def __init__(self, num_channels):
        self.means = RunningMoments(num_channels)
        self.variances = RunningMoments(num_channels)

    def add(self, x, layer):
        batch = RunningMoments(layer.num_features).update(x, axis=layer.axis,
                                                          backend=layer.backend)
        if layer.comm is not None:
            # synchronized BN normalizes with the global batch: average its statistics
            from fastbn.distributed import allreduce_moments   # loads mpi4py only with a comm
            allreduce_moments(batch, layer.comm)
        if batch.count == 0 and x.size:
            return      # a non-finite batch: RunningMoments.update warned and skipped it
        if batch.count < 2:
            raise ValueError(f"batches: expected at least 2 values per channel in each batch, "
                             f"got {batch.count}")
        # m/(m-1) sigma_B^2, per batch, so batches of unequal sizes are each unbiased
        self.means.update(batch.mean[None, :])
        self.variances.update(batch.var(ddof=1)[None, :])


def recompute_population_stats(model, batches):
    """Set every BatchNorm's running statistics to Algorithm 2's population estimates.

    Parameters
    ----------
    model : Module
        Left unchanged apart from the BN running statistics (no parameter or gradient is
        touched, ``num_batches_tracked`` is kept, and each module's train/eval mode is
        restored).
    batches : iterable
        Training mini-batches: arrays, or (x, labels) tuples of which x is used.

    Returns
    -------
    int
        The number of batches used.
    """
    layers = [m for m in model.modules() if isinstance(m, BatchNorm)]
    modes = [(m, m.training) for m in model.modules()]
    for layer in layers:
        layer._population = _BatchMomentsAverage(layer.num_features)
    num_batches = 0
    try:
        model.train()
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model.forward(x)
            num_batches += 1
        averages = [layer._population for layer in layers]
    finally:
        for layer in layers:
            layer._population = None
        for module, mode in modes:
            module.training = mode
    if num_batches == 0:
        raise ValueError("batches: expected at least one mini-batch, got none")
    for layer, average in zip(layers, averages):
        np.copyto(layer.running_mean, average.means.mean)
        np.copyto(layer.running_var, average.variances.mean)
    return num_batches
