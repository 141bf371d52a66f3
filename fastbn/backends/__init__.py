"""Backend registry and selection.

Every backend module implements the contract in ``_contract.py`` (the operations on the
canonical ``(outer, C, inner)`` view, and the array helpers), with the same names and
parameters; ``tests/test_contract.py`` checks it. Which backend runs a call: the ``backend=``
argument, then the backend that owns the arrays passed (each device backend is asked, through
its ``owns`` predicate, which needs no GPU library), then ``use_backend``/``set_backend``.

A device backend (``ON_DEVICE = True``: cuda) also has ``to_device`` and may define
``check_available()``, which ``load`` calls once so a missing GPU is a clear error. Given only
host arrays, a device backend runs through ``HostRoundTrip`` (_roundtrip.py): host helpers,
device operations, results copied back; it works for any device backend from the contract.
"""
import contextlib
import contextvars
import importlib
import threading

import numpy as np

from . import _memory
from ._roundtrip import HostRoundTrip

BACKENDS = ("reference", "cpu", "cuda")
DEFAULT_BACKEND = "cpu"

_global_backend = DEFAULT_BACKEND
_context_backend = contextvars.ContextVar("fastbn_backend", default=None)
#: The ``stream=`` argument of the public call in progress (None: the backend's default rule).
#: Device backends read it when they launch; the contract's signatures stay the same for every
#: backend.
STREAM = contextvars.ContextVar("fastbn_stream", default=None)
_modules = {}
_round_trips = {}
_lock = threading.Lock()


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def load(name):
    """Import a backend module by name (the cuda module only when asked for).

    Raises ImportError when the backend's package is missing, and RuntimeError (from its
    ``check_available``) when it cannot run here, e.g. "cuda" without a GPU."""
    _check_name(name)
    module = _modules.get(name)
    if module is None:
        with _lock:
            module = _modules.get(name)
            if module is None:
                module = importlib.import_module(f"fastbn.backends.{name}")
                check = getattr(module, "check_available", None)
                if check is not None:
                    check()
                _modules[name] = module
    return module


def set_backend(name):
    """Set the process-wide default backend ("reference", "cpu" or "cuda")."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend():
    """The backend used when no ``backend=`` argument is given and no device array is passed."""
    return _context_backend.get() or _global_backend


@contextlib.contextmanager
def use_backend(name):
    """Context manager selecting a backend for the enclosed calls (thread- and task-local)."""
    token = _context_backend.set(_check_name(name))
    try:
        yield
    finally:
        _context_backend.reset(token)


#: The device backends, each with the predicate that its ``owns`` is (so that resolve can ask it
#: without importing the backend's GPU library).
DEVICE_OWNS = {"cuda": _memory.is_device_array}


def _round_trip(module):
    adapter = _round_trips.get(module.name)
    if adapter is None:
        adapter = _round_trips.setdefault(module.name, HostRoundTrip(module))
    return adapter


@contextlib.contextmanager
def launch_stream(be, stream):
    """Make ``stream`` the stream of the enclosed backend calls (device backends only)."""
    if stream is None:
        yield
        return
    if not getattr(be, "ON_DEVICE", False) and not isinstance(be, HostRoundTrip):
        raise TypeError(f"stream: expected None for the {be.name!r} backend (streams are for "
                        f"device backends), got {type(stream).__name__}")
    token = STREAM.set(stream)
    try:
        yield
    finally:
        STREAM.reset(token)


def resolve(backend, arrays):
    """Pick the backend: the ``backend=`` argument, then the device backend owning the arrays,
    then use_backend/set_backend.

    A device backend given only host arrays copies them to the device and back (HostRoundTrip);
    given a mix of host and device arrays, its ``asarray`` refuses the host ones by name."""
    owner = None
    for a in arrays:
        if a is None or type(a) is np.ndarray:
            continue
        for name, owns in DEVICE_OWNS.items():
            if owns(a):
                owner = name
                break
        if owner is not None:
            break
    if backend is not None:
        name = _check_name(backend)
    else:
        name = owner or get_backend()
    if owner is not None and owner != name:
        raise TypeError(f"backend: got {owner.upper()} device arrays but backend {name!r} works on "
                        f"{'host (NumPy)' if name not in DEVICE_OWNS else name} arrays; use "
                        f"backend={owner!r} or copy the arrays")
    module = load(name)
    if module.ON_DEVICE and owner is None:
        return _round_trip(module)
    return module
