"""A fix for a race in numba's CUDA simulator, installed by conftest.py under the simulator.

The simulator runs every GPU thread of a block as a Python thread, and ``cuda.shared.array``
hands each of them the block's array for the calling source line from a dict. The lookup and
the store are not under a lock (numba-cuda 0.30): two threads that meet between them each
allocate an array of their own, so the block's threads no longer share memory and a reduction
merges uninitialised slots. It is rare (CI once: fastbn.batch_norm_forward returned 0.568
everywhere for data centred at 1e4), and any pause in that window makes it certain
(tests/test_cuda.py::test_simulator_shared_arrays_are_shared widens it).

``install()`` replaces ``FakeCUDAShared.array`` with the same lookup under a lock, keyed by the
caller's (file, line) as before (a frame lookup instead of a whole extracted stack). Dynamic
shared memory (shape 0) and alignment keep the simulator's own code."""
import sys
import threading

_lock = threading.Lock()
_installed = []


def install():
    """Patch the simulator in this process (idempotent); returns the patched class."""
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    cls = kernelapi.FakeCUDAShared
    if _installed:
        return cls
    original = cls.array

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with _lock:
            found = self._allocations.get(key)
            if found is None:
                found = kernelapi.np.empty(shape, dtype)
                self._allocations[key] = found
        return found

    cls.array = array
    _installed.append(original)
    return cls
