"""Exact streaming per-channel statistics: Welford's update and Chan's merge, in float64.

``RunningMoments`` holds per channel (count, mean, M2 = sum of squared deviations). Merging two
accumulators is exact up to float64 rounding and independent of how the data was split, which
makes it the building block for population statistics (the paper's Algorithm 2) and for
synchronizing statistics across processes (:func:`fastbn.distributed.allreduce_moments`).
"""
import numbers
import warnings

import numpy as np

from . import api

STATE_KEYS = ("count", "mean", "m2")


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


def _is_integer(value):
    """A Python or NumPy integer (a 0-d integer array included), not a bool."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    return isinstance(value, (numbers.Integral, np.integer)) and \
        not isinstance(value, (bool, np.bool_))


class RunningMoments:
    """Streaming per-channel count, mean and M2, mergeable across accumulators.

    >>> acc = RunningMoments(3)
    >>> acc.update(batch_a).update(batch_b)        # doctest: +SKIP
    >>> acc.mean, acc.var(ddof=1)                  # doctest: +SKIP

    ``count`` is shared by every channel. A batch with a NaN or inf in any channel (or whose
    statistics overflow float64) is therefore skipped as a whole: ``update`` warns with a
    RuntimeWarning naming the channels and leaves every statistic unchanged, also when the
    warning is turned into an error. Merge the accumulators of several MPI ranks with
    :func:`fastbn.distributed.allreduce_moments`.
    """

    def __init__(self, num_channels):
        if not _is_integer(num_channels) or num_channels < 0:
            raise ValueError(f"num_channels: expected a non-negative integer, got {num_channels!r}")
        self.num_channels = int(num_channels)
        self.count = 0
        self.mean = np.zeros(self.num_channels)
        self.m2 = np.zeros(self.num_channels)

    def __repr__(self):
        return f"RunningMoments(num_channels={self.num_channels}, count={self.count})"

    def update(self, x, axis=1, *, backend=None):
        """Add every value of ``x`` (channel axis ``axis``) to the statistics. Returns self.

        A batch with non-finite statistics in some channel is skipped whole, with a
        RuntimeWarning naming those channels (see the class docstring)."""
        with np.errstate(invalid="ignore", over="ignore"):   # non-finite data: warned below
            count, mean, m2 = api.moments_summary(x, axis=axis, channels=self.num_channels,
                                                  backend=backend)
        if count == 0 or self.num_channels == 0:
            return self
        bad = np.flatnonzero(~(np.isfinite(mean) & np.isfinite(m2)))
        if len(bad):
            shown = ", ".join(str(c) for c in bad[:10]) + (", ..." if len(bad) > 10 else "")
            warnings.warn(f"x: non-finite values (NaN or inf) in channel(s) {shown} of "
                          f"{self.num_channels}: the batch is skipped and the statistics of "
                          f"every channel are left unchanged", RuntimeWarning, stacklevel=2)
            return self
        self._absorb(count, mean, m2)
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
        if not _is_integer(ddof) or ddof < 0:
            raise ValueError(f"ddof: expected a non-negative integer, got {ddof!r}")
        if self.count - ddof <= 0:
            raise ValueError(f"ddof: expected less than count ({self.count}), got {ddof}")
        return self.m2 / (self.count - int(ddof))

    def std(self, ddof=0):
        return np.sqrt(self.var(ddof))

    def state_dict(self):
        return {"count": np.int64(self.count), "mean": self.mean.copy(), "m2": self.m2.copy()}

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`'s output. Everything is checked before anything is
        assigned: on error the accumulator is unchanged."""
        if not hasattr(state, "keys"):
            raise TypeError(f"state: expected a mapping with the entries {list(STATE_KEYS)}, "
                            f"got {type(state).__name__}")
        missing = [k for k in STATE_KEYS if k not in state]
        unexpected = [k for k in state.keys() if k not in STATE_KEYS]
        if missing or unexpected:
            raise ValueError(f"state: expected the entries {list(STATE_KEYS)}; missing "
                             f"{missing}, unexpected {unexpected}")
        count = state["count"]
        if not _is_integer(count) or count < 0:
            raise ValueError(f"state['count']: expected a non-negative integer, got {count!r}")
        arrays = {}
        for name in ("mean", "m2"):
            value = np.asarray(state[name])
            if value.dtype.kind not in "iuf":
                raise TypeError(f"state[{name!r}]: expected real numbers, got dtype "
                                f"{value.dtype}")
            if value.shape != (self.num_channels,):
                raise ValueError(f"state[{name!r}]: expected shape ({self.num_channels},), got "
                                 f"{value.shape}")
            value = value.astype(np.float64)
            if not np.isfinite(value).all():
                raise ValueError(f"state[{name!r}]: expected finite values, got "
                                 f"{value[~np.isfinite(value)][0]} in channel "
                                 f"{np.flatnonzero(~np.isfinite(value))[0]}")
            arrays[name] = value
        if (arrays["m2"] < 0).any():
            channel = np.flatnonzero(arrays["m2"] < 0)[0]
            raise ValueError(f"state['m2']: expected non-negative sums of squared deviations, "
                             f"got {arrays['m2'][channel]} in channel {channel}")
        self.count, self.mean, self.m2 = int(count), arrays["mean"], arrays["m2"]
        return self
