"""Array helpers shared by the host backends (reference and cpu): NumPy arrays in host memory."""
import numpy as np
from numpy.lib.stride_tricks import as_strided

from .. import _pool
from ._memory import is_device_array

ON_DEVICE = False


def owns(a):
    """Host backends own everything that is not device memory (NumPy arrays, lists, ...)."""
    return not is_device_array(a)


def asarray(a, name):
    if type(a) is np.ndarray:
        return a
    if is_device_array(a):
        raise TypeError(f"{name}: got a CUDA device array, but this backend works on host (NumPy) "
                        f"arrays; use backend='cuda' for device arrays")
    return np.asarray(a)


def forward_direct(x, gamma, beta, activation, residual, axis, eps, training, running_mean,
                   running_var, momentum):
    """No direct path (the cpu backend has one): the API validates and runs the operation."""
    return None


def backward_direct(dy, x, mean, invstd, gamma, activation, y, residual, axis, training):
    return None


def empty(shape, dtype):
    # large outputs reuse freed blocks (fastbn._pool): new pages cost more than the kernels;
    # per-channel vectors are small (checked first: it is most calls)
    if len(shape) == 1 and shape[0] * 8 < _pool.min_bytes():
        return np.empty(shape, dtype)
    return _pool.empty(shape, dtype)


def empty_like(a):
    # keeps a's memory order (NCHW stays NCHW, channels-last stays channels-last)
    return _pool.empty_like(a)


def is_writeable(a):
    return bool(a.flags.writeable)


def view3(a, shape3, strides3):
    if a.flags.c_contiguous:
        # a C-contiguous array's canonical view is usually its C-order reshape (cheaper than
        # as_strided); strides of length-1 dimensions do not matter
        view = a.reshape(shape3)
        vs = view.strides
        if ((vs[0] == strides3[0] or shape3[0] <= 1) and (vs[1] == strides3[1] or shape3[1] <= 1)
                and (vs[2] == strides3[2] or shape3[2] <= 1)):
            return view
    return as_strided(a, shape=shape3, strides=strides3)


def gather3(a, perm, shape3):
    """Contiguous (outer, C, inner) copy of an array whose axes do not merge into a view."""
    return np.ascontiguousarray(a.transpose(perm)).reshape(shape3)


def scatter3(dst, src3, perm):
    """Write a contiguous (outer, C, inner) result back into dst (the inverse of gather3)."""
    view = dst.transpose(perm)
    view[...] = src3.reshape(view.shape)


def byte_bounds(a):
    """(low, high) addresses that a may touch (high exclusive)."""
    low, high = np.lib.array_utils.byte_bounds(a)
    return low, high


def shares_memory(a, b):
    """Whether a and b overlap: two arrays that each own their memory never do (the common case,
    checked first because it is cheap); otherwise bounds, then NumPy's exact test."""
    if a is not b and a.base is None and b.base is None and a.flags.owndata \
            and b.flags.owndata:
        return False
    return bool(np.may_share_memory(a, b)) and bool(np.shares_memory(a, b, max_work=10**6))


def to_host(a):
    return a


def to_device(a):
    return a


def result(a):
    return a
