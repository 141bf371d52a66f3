"""Exact streaming per-channel statistics: Welford's update and Chan's merge, in float64.

``RunningMoments`` holds per channel (count, mean, M2 = sum of squared deviations). Merging two
accumulators is exact up to float64 rounding and independent of how the data was split, which
makes it the building block for population statistics (the paper's Algorithm 2) and for
synchronizing statistics across processes.
"""
import numpy as np

from . import backends
from ._layout import normalize_axis


def chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge two (count, mean, M2) summaries (Chan, Golub & LeVeque 1979)."""
    count = count_a + count_b
    if count_b == 0:
        return count_a, mean_a.copy(), m2_a.copy()
    if count_a == 0:
        return count_b, mean_b.copy(), m2_b.copy()
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / count)
    return count, mean, m2


class RunningMoments:
    """Streaming per-channel count, mean and M2, mergeable across accumulators.

    >>> acc = RunningMoments(3)
    >>> acc.update(batch_a).update(batch_b)        # doctest: +SKIP
    >>> acc.mean, acc.var(ddof=1)                  # doctest: +SKIP
    """

    def __init__(self, num_channels):
        if isinstance(num_channels, bool) or not isinstance(num_channels, (int, np.integer)) \
                or num_channels < 0:
            raise ValueError(f"num_channels: expected a non-negative integer, got {num_channels!r}")
        self.num_channels = int(num_channels)
        self.count = 0
        self.mean = np.zeros(self.num_channels)
        self.m2 = np.zeros(self.num_channels)

    def __repr__(self):
        return f"RunningMoments(num_channels={self.num_channels}, count={self.count})"

    def update(self, x, axis=1, *, backend=None):
        """Add every value of ``x`` (channel axis ``axis``) to the statistics. Returns self."""
        from .api import _Canonical, _check_data, values_per_channel
        be = backends.resolve(backend, (x,))
        x = be.asarray(x, "x")
        _check_data(x)
        axis = normalize_axis(axis, x.ndim, x.shape)
        if x.shape[axis] != self.num_channels:
            raise ValueError(f"x: expected {self.num_channels} channels on axis {axis}, got "
                             f"shape {tuple(x.shape)}")
        count = values_per_channel(x.shape, axis)
        if count == 0 or self.num_channels == 0:
            return self
        mean, m2 = be.channel_moments(_Canonical(be, x, axis).view(x))
        self._absorb(count, np.asarray(be.to_host(mean)), np.asarray(be.to_host(m2)))
        return self

    def merge(self, other):
        """Fold another accumulator's statistics into this one. Returns self."""
        if not isinstance(other, RunningMoments):
            raise TypeError(f"other: expected a RunningMoments, got {type(other).__name__}")
        if other.num_channels != self.num_channels:
            raise ValueError(f"other: expected {self.num_channels} channels, got "
                             f"{other.num_channels}")
        self._absorb(other.count, other.mean, other.m2)
        return self

    def _absorb(self, count, mean, m2):
        self.count, self.mean, self.m2 = chan_merge(self.count, self.mean, self.m2,
                                                    int(count), mean, m2)

    def var(self, ddof=0):
        """Per-channel variance M2 / (count - ddof); ddof=1 gives the unbiased estimate."""
        if self.count - ddof <= 0:
            raise ValueError(f"ddof: expected less than count ({self.count}), got {ddof}")
        return self.m2 / (self.count - ddof)

    def std(self, ddof=0):
        return np.sqrt(self.var(ddof))

    def allreduce(self, comm=None):
        """Merge the statistics of every rank of an MPI communicator (see fastbn.distributed)."""
        from .distributed import allreduce_moments
        return allreduce_moments(self, comm)

    def state_dict(self):
        return {"count": np.int64(self.count), "mean": self.mean.copy(), "m2": self.m2.copy()}

    def load_state_dict(self, state):
        mean = np.asarray(state["mean"], dtype=np.float64)
        m2 = np.asarray(state["m2"], dtype=np.float64)
        if mean.shape != (self.num_channels,) or m2.shape != (self.num_channels,):
            raise ValueError(f"state: expected mean and m2 of shape ({self.num_channels},), got "
                             f"{mean.shape} and {m2.shape}")
        self.count, self.mean, self.m2 = int(state["count"]), mean.copy(), m2.copy()
        return self
