"""Array helpers shared by the host backends (reference and cpu): NumPy arrays in host memory."""
import numpy as np
from numpy.lib.stride_tricks import as_strided

ON_DEVICE = False


def asarray(a, name):
    from . import is_device_array
    if is_device_array(a):
        raise TypeError(f"{name}: got a CUDA device array, but this backend works on host (NumPy) "
                        f"arrays; use backend='cuda' for device arrays")
    return np.asarray(a)


def empty(shape, dtype):
    return np.empty(shape, dtype=dtype)


def empty_like(a):
    # keeps a's memory order (NCHW stays NCHW, channels-last stays channels-last)
    return np.empty_like(a, order="K")


def is_writeable(a):
    return bool(a.flags.writeable)


def view3(a, shape3, strides3):
    return as_strided(a, shape=shape3, strides=strides3)


def copy_contiguous(a):
    return np.ascontiguousarray(a)


def copyto(dst, src):
    np.copyto(dst, src, casting="unsafe")


def to_float64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


def to_host(a):
    return a


def may_share_memory(a, b):
    return np.may_share_memory(a, b)


def update_running_stats(running_mean, running_var, mean, var, count, momentum, eps):
    """r = (1-momentum) r + momentum * batch, with the unbiased variance; returns the channels
    left unchanged because their batch statistics are not finite."""
    finite = np.isfinite(mean) & np.isfinite(var)
    unbiased = var * (count / (count - 1))
    new_mean = (1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean
    new_var = (1.0 - momentum) * running_var.astype(np.float64) + momentum * unbiased
    np.copyto(running_mean, new_mean, casting="unsafe", where=finite)
    np.copyto(running_var, new_var, casting="unsafe", where=finite)
    return np.flatnonzero(~finite)


def invstd_from_var(var, eps):
    return 1.0 / np.sqrt(var + eps)


def var_from_m2(m2, count):
    """Biased variance from the sum of squared deviations."""
    return m2 / count


def gather3(a, perm, shape3):
    """Contiguous (outer, C, inner) copy of an array whose axes do not merge into a view."""
    return np.ascontiguousarray(a.transpose(perm)).reshape(shape3)


def scatter3(dst, src3, perm):
    """Write a contiguous (outer, C, inner) result back into dst (the inverse of gather3)."""
    view = dst.transpose(perm)
    view[...] = src3.reshape(view.shape)
