"""Which kind of memory an array lives in, decided without importing any GPU library.

A device backend's ``owns`` is one of these predicates, so that ``backends.resolve`` can ask
each backend about an array without loading (or initializing) the device.
"""


def is_device_array(a):
    """CUDA device memory: numba device arrays (also the simulator's), or anything exporting
    ``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors) but no host interface."""
    if a is None:
        return False
    if getattr(type(a), "__cuda_ndarray__", False):
        return True
    return hasattr(a, "__cuda_array_interface__") and not hasattr(a, "__array_interface__")
