"""The canonical ``(outer, C, inner)`` view of an array with a channel axis.

The non-channel axes are ordered by memory stride; those with a larger stride than the channel
axis form ``outer`` and the rest form ``inner``. For any array that is a permutation of a dense
array (C order, Fortran order, NHWC data viewed as NCHW, ...) both groups merge into one
dimension each, so the view costs no copy. Kernels then see one of two memory regimes.
"""
from functools import lru_cache
from math import prod

from numpy.lib.array_utils import normalize_axis_index

#: The two memory regimes of a canonical view, named once for every backend's plan.
CHANNEL_MAJOR = "channel_major"    #: inner > 1: long contiguous runs per channel (NCHW)
CHANNELS_LAST = "channels_last"    #: inner == 1: channels contiguous across rows (NHWC, (N, C))


def regime(shape3):
    """The memory regime of an (outer, C, inner) view."""
    return CHANNELS_LAST if shape3[2] == 1 else CHANNEL_MAJOR


class Layout:
    """How to view arrays of one shape as (outer, C, inner) for a given channel axis."""

    __slots__ = ("shape", "axis", "outer_axes", "inner_axes", "shape3", "perm", "regime")

    def __init__(self, shape, strides, axis):
        ndim = len(shape)
        self.shape = tuple(shape)
        self.axis = axis
        others = sorted((d for d in range(ndim) if d != axis and shape[d] != 1),
                        key=lambda d: -abs(strides[d]))
        if shape[axis] == 1:
            outer, inner = others, []
        else:
            outer = [d for d in others if abs(strides[d]) > abs(strides[axis])]
            inner = [d for d in others if abs(strides[d]) <= abs(strides[axis])]
        self.outer_axes = tuple(outer)
        self.inner_axes = tuple(inner)
        self.shape3 = (prod(shape[d] for d in outer), shape[axis], prod(shape[d] for d in inner))
        ones = [d for d in range(ndim) if d != axis and shape[d] == 1]
        self.perm = tuple(outer + ones + [axis] + inner)
        self.regime = regime(self.shape3)

    def strides3(self, strides):
        """Strides of the (outer, C, inner) view of an array with these strides, or None when
        its axes do not merge without a copy."""
        return _strides3(self, tuple(strides))


@lru_cache(maxsize=4096)
def _strides3(layout, strides):
    merged = []
    for group in (layout.outer_axes, layout.inner_axes):
        for a, b in zip(group, group[1:]):
            if strides[a] != strides[b] * layout.shape[b]:
                return None
        merged.append(strides[group[-1]] if group else 0)
    return (merged[0], strides[layout.axis], merged[1])


@lru_cache(maxsize=4096)
def layout_of(shape, strides, axis):
    """The (cached) Layout of arrays of this shape whose strides order the axes like these."""
    return Layout(shape, strides, axis)


def normalize_axis(axis, ndim, shape):
    if isinstance(axis, bool) or not hasattr(axis, "__index__"):
        raise TypeError(f"axis: expected an integer, got {type(axis).__name__} {axis!r}")
    try:
        return normalize_axis_index(int(axis), ndim)
    except Exception:
        raise ValueError(f"axis: expected an integer in [{-ndim}, {ndim}) for x of shape "
                         f"{tuple(shape)}, got {axis}") from None
