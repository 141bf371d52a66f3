"""Reuse of freed output memory, so that a call with fresh outputs costs what a call with
``out=`` costs.

A fresh large NumPy array is new virtual memory: the OS zero-fills every page the first time the
kernel writes it, which costs more than a memory-bound kernel itself (64x64x56x56 float32:
10.9 ms fresh against 3.1 ms into ``out=``). The pool keeps the blocks of large outputs and
hands a block out again once no caller can reach it any more.

* A block is a 64-byte aligned ``uint8`` array; outputs are views of it. NumPy views (and views
  of views, ``memoryview``, ``np.frombuffer``, ``torch.from_numpy`` ...) all hold a reference to
  the block that owns the memory, so a block whose reference count is back to the pool's own
  reference is unreachable from Python, and only then is it handed out again.
* Bounded: the blocks the pool tracks, in use or free, total at most ``max_bytes``. Over the
  bound it drops free blocks first, least recently used first, then blocks in use (those are
  only forgotten: they stay valid and are freed when their last view goes). Sizes
  are rounded up to one of 8 classes per power of two (at most 12.5% larger).
* Requests below ``min_bytes`` (256 KiB) or above ``max_bytes`` get a plain ``np.empty``
  (small arrays come from malloc's own free lists; they are not counted as bypassed).
* Thread safe (one lock around the pool's bookkeeping).
* Off switch: ``set_output_pool(max_bytes=0)``, or ``FASTBN_OUTPUT_POOL_BYTES=0`` in the
  environment before fastbn is imported.
"""
import os
import sys
import threading
from collections import OrderedDict
from math import prod

import numpy as np

ALIGNMENT = 64
MIN_BYTES = 256 << 10
CLASSES_PER_OCTAVE = 8
ENV_MAX_BYTES = "FASTBN_OUTPUT_POOL_BYTES"

_DTYPES = {t: np.dtype(t) for t in (np.float16, np.float32, np.float64)}



def default_max_bytes():
    """1 GiB, or an eighth of the machine's memory if that is less."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        physical = 8 << 30
    return int(min(1 << 30, physical // 8))


def _env_max_bytes():
    text = os.environ.get(ENV_MAX_BYTES, "").strip()
    if not text:
        return default_max_bytes()
    try:
        value = int(float(text))
    except ValueError:
        raise ValueError(f"{ENV_MAX_BYTES}: expected a number of bytes (0 turns the output pool "
                         f"off), got {text!r}") from None
    return max(value, 0)


def size_class(nbytes):
    """nbytes rounded up to the next of CLASSES_PER_OCTAVE sizes per power of two."""
    step = 1 << max(nbytes.bit_length() - 1 - CLASSES_PER_OCTAVE.bit_length() + 1, 0)
    return -(-nbytes // step) * step


class _Block:
    __slots__ = ("buffer", "offset", "capacity")

    def __init__(self, capacity):
        self.buffer = np.empty(capacity + ALIGNMENT, np.uint8)
        self.offset = -self.buffer.ctypes.data % ALIGNMENT
        self.capacity = capacity

    def references(self):
        return sys.getrefcount(self.buffer)

    def is_free(self):
        return self.references() == _FREE_REFCOUNT

    def view(self, nbytes, dtype, shape):
        return self.buffer[self.offset:self.offset + nbytes].view(dtype).reshape(shape)


# sys.getrefcount of a block's buffer that nobody but the pool references (the block's own
# reference plus getrefcount's argument), measured rather than assumed
_probe = _Block(0)
_FREE_REFCOUNT = _probe.references()
del _probe


class OutputPool:
    """A bounded cache of output blocks (see the module docstring). ``max_bytes=0`` is off."""

    def __init__(self, max_bytes=None, min_bytes=MIN_BYTES):
        self._lock = threading.Lock()
        self._blocks = OrderedDict()      # id(block) -> block, least recently used first
        self._by_capacity = {}            # capacity -> [block, ...]
        self._held = 0                    # bytes of the tracked blocks
        self._counts = dict.fromkeys(("hits", "misses", "bypassed", "evicted"), 0)
        self.min_bytes = int(min_bytes)
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        self._check(self.max_bytes, "max_bytes")
        self._check(self.min_bytes, "min_bytes")

    @staticmethod
    def _check(value, name):
        if value < 0:
            raise ValueError(f"{name}: expected a number of bytes >= 0 (0 turns the output pool "
                             f"off), got {value}")

    # -- configuration ------------------------------------------------------------------------

    def configure(self, max_bytes=None, min_bytes=None):
        """Set the bounds (None keeps one as it is); tracked blocks over the new bound are
        dropped."""
        with self._lock:
            if max_bytes is not None:
                self._check(int(max_bytes), "max_bytes")
                self.max_bytes = int(max_bytes)
            if min_bytes is not None:
                self._check(int(min_bytes), "min_bytes")
                self.min_bytes = int(min_bytes)
            self._shrink_to(self.max_bytes)

    def clear(self):
        """Drop every tracked block (blocks still in use stay valid; they are only forgotten)."""
        with self._lock:
            self._shrink_to(0)

    def stats(self):
        """Bounds, bytes and blocks tracked (in use and free), and counters since creation."""
        with self._lock:
            free = [b for b in self._blocks.values() if b.is_free()]
            return {"enabled": self.max_bytes > 0, "max_bytes": self.max_bytes,
                    "min_bytes": self.min_bytes, "bytes_held": self._held,
                    "blocks": len(self._blocks), "free_blocks": len(free),
                    "free_bytes": sum(b.capacity for b in free), **self._counts}

    # -- allocation ---------------------------------------------------------------------------

    def empty(self, shape, dtype):
        """An uninitialized C-contiguous array, like ``np.empty(shape, dtype)``."""
        # the common small case costs one np.empty and a multiplication
        if type(shape) is not tuple:
            shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        dtype = _DTYPES.get(dtype) or np.dtype(dtype)
        nbytes = prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes or dtype.hasobject:
            return np.empty(shape, dtype)
        out = self._acquire(nbytes, dtype, shape)
        return np.empty(shape, dtype) if out is None else out

    def empty_like(self, a):
        """An uninitialized array of a's shape and dtype in a's memory order, like
        ``np.empty_like(a, order="K")`` (same strides: channels-last stays channels-last)."""
        if type(a) is not np.ndarray or a.nbytes < self.min_bytes:
            return np.empty_like(a, order="K")
        if a.ndim <= 1 or a.flags.c_contiguous:
            return self.empty(a.shape, a.dtype)
        # NumPy's rule for order="K": F order if F-contiguous, else the axes by |stride|,
        # largest first (a stable sort)
        ndim = a.ndim
        if a.flags.f_contiguous:
            perm = range(ndim - 1, -1, -1)
        else:
            strides = a.strides
            perm = sorted(range(ndim), key=lambda i: -abs(strides[i]))
        shape = a.shape
        inverse = [0] * ndim
        for position, axis in enumerate(perm):
            inverse[axis] = position
        return self.empty(tuple(shape[i] for i in perm), a.dtype).transpose(inverse)

    def _acquire(self, nbytes, dtype, shape):
        """A view of a free block, or of a new tracked one, or None (use a plain np.empty).
        The view is made under the lock: until it exists the block still looks free."""
        capacity = size_class(nbytes)
        with self._lock:
            if capacity > self.max_bytes or nbytes <= 0:
                self._counts["bypassed"] += 1
                return None
            for block in self._by_capacity.get(capacity, ()):
                if block.is_free():
                    self._blocks.move_to_end(id(block))
                    self._counts["hits"] += 1
                    return block.view(nbytes, dtype, shape)
            self._counts["misses"] += 1
            self._shrink_to(self.max_bytes - capacity)
            block = _Block(capacity)
            self._blocks[id(block)] = block
            self._by_capacity.setdefault(capacity, []).append(block)
            self._held += capacity
            return block.view(nbytes, dtype, shape)

    def _shrink_to(self, limit):
        """Drop tracked blocks until at most limit bytes are held: free ones first, least
        recently used first. Called with the lock held."""
        if self._held <= limit:
            return
        for only_free in (True, False):
            for key, block in list(self._blocks.items()):
                if self._held <= limit:
                    return
                if only_free and not block.is_free():
                    continue
                del self._blocks[key]
                same = self._by_capacity[block.capacity]
                same.remove(block)
                if not same:
                    del self._by_capacity[block.capacity]
                self._held -= block.capacity
                self._counts["evicted"] += 1

    def _after_fork(self):
        self._lock = threading.Lock()


_POOL = OutputPool(_env_max_bytes())
if hasattr(os, "register_at_fork"):
    # a lock held by another thread at fork time would stay held forever in the child
    os.register_at_fork(after_in_child=_POOL._after_fork)


def empty(shape, dtype):
    """``np.empty(shape, dtype)``, from the output pool when large."""
    return _POOL.empty(shape, dtype)


def min_bytes():
    """Outputs smaller than this many bytes are plain ``np.empty`` arrays."""
    return _POOL.min_bytes


def empty_like(a):
    """``np.empty_like(a, order="K")``, from the output pool when large."""
    return _POOL.empty_like(a)


def set_output_pool(max_bytes=None, *, min_bytes=None):
    """Bound (or turn off) the reuse of freed output memory.

    Parameters
    ----------
    max_bytes : int or None
        Most bytes of output blocks kept for reuse, in use or free. ``0`` turns the pool off and
        releases its free blocks; None restores the default (1 GiB, or an eighth of the
        machine's memory if that is less). The environment variable
        ``FASTBN_OUTPUT_POOL_BYTES`` sets the value at import.
    min_bytes : int or None
        Outputs smaller than this (default 256 KiB) are plain ``np.empty`` arrays.

    Returns
    -------
    dict
        ``output_pool_stats()`` after the change.

    See Also
    --------
    output_pool_stats
    """
    _POOL.configure(default_max_bytes() if max_bytes is None else max_bytes, min_bytes)
    return _POOL.stats()


def output_pool_stats():
    """The output pool's bounds, the bytes and blocks it holds (in use and free), and its hit,
    miss, bypass and eviction counts."""
    return _POOL.stats()
