"""Backend registry and selection.

Every backend module exposes the same operations on the canonical ``(outer, C, inner)`` view:

``channel_moments(x3) -> (mean, m2)``
    float64 per-channel mean and sum of squared deviations.
``forward_train(x3, weight, bias, eps, y3) -> (mean, var)``
    fused statistics + normalization; float64 mean and biased variance.
``forward_eval(x3, mean, invstd, weight, bias, y3)``
    normalization with given float64 statistics.
``backward(dy3, x3, mean, invstd, weight, training, dx3) -> (sum_dy, sum_dy_xhat)``
    writes dx; returns the float64 per-channel reductions (dbeta, dgamma).

plus the array helpers the API layer uses (``asarray``, ``empty``, ``view3``, ``copyto``,
``to_float64``, ``invstd_from_var``, ``var_from_m2``, ``update_running_stats``, ``to_host``, ...)
and ``ON_DEVICE``. ``weight``/``bias`` are float64 contiguous (C,) arrays or None (identity).

A device backend (``ON_DEVICE = True``: cuda) also has ``to_device`` and may define
``check_available()``, which ``load`` calls once so a missing GPU is a clear error. Given only
host arrays, a device backend runs through ``HostRoundTrip`` (see _roundtrip.py): host helpers,
device operations, results copied back.
"""
import contextlib
import contextvars
import importlib
import threading

BACKENDS = ("reference", "cpu", "cuda")
DEFAULT_BACKEND = "cpu"

_global_backend = DEFAULT_BACKEND
_context_backend = contextvars.ContextVar("fastbn_backend", default=None)
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


def is_device_array(a):
    """CUDA device memory: numba device arrays (also the simulator's), or anything exporting
    ``__cuda_array_interface__`` (CuPy arrays, PyTorch CUDA tensors) but no host interface."""
    if a is None:
        return False
    if getattr(type(a), "__cuda_ndarray__", False):
        return True
    return hasattr(a, "__cuda_array_interface__") and not hasattr(a, "__array_interface__")


def _round_trip(module):
    adapter = _round_trips.get(module.name)
    if adapter is None:
        from ._roundtrip import HostRoundTrip
        adapter = _round_trips.setdefault(module.name, HostRoundTrip(module))
    return adapter


def resolve(backend, arrays):
    """Pick the backend: the ``backend=`` argument, then device arrays, then
    use_backend/set_backend.

    A device backend given only host arrays copies them to the device and back (HostRoundTrip);
    given a mix of host and device arrays, its ``asarray`` refuses the host ones by name."""
    on_device = [a for a in arrays if is_device_array(a)]
    if backend is not None:
        name = _check_name(backend)
    elif on_device:
        name = "cuda"
    else:
        name = get_backend()
    if on_device and name != "cuda":
        raise TypeError(f"backend: got CUDA device arrays but backend {name!r} works on host "
                        f"(NumPy) arrays; use backend='cuda' or copy the arrays to the host")
    module = load(name)
    if getattr(module, "ON_DEVICE", False) and not on_device:
        return _round_trip(module)
    return module
