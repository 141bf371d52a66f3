"""Host (NumPy) arrays on a device backend: each operation copies its inputs to the device, runs
there, and copies its results back.

The API layer sees the host array helpers (``_host``), so validation, allocation, dtypes, the
errors and the untouched-state guarantee are exactly those of the host backends, and results
(and the running statistics, updated in place) are NumPy arrays. The operations are wrapped from
the contract's table of argument roles, so this works for any device backend. The cost per call:
x (and dy) host -> device, y (dx) device -> host, plus the per-channel vectors each way, all
synchronous; for tensors that live on the device, pass device arrays instead.
"""
import inspect

import numpy as np

from . import _host
from ._contract import OPERATIONS


class HostRoundTrip:
    """The operations of ``device`` (a device backend module) on host arrays."""

    ON_DEVICE = False

    def __init__(self, device):
        self.device = device
        self.name = device.name
        for op_name, op in OPERATIONS.items():
            setattr(self, op_name, self._wrap(op_name, op))

    def __repr__(self):
        return f"HostRoundTrip({self.name!r})"

    def __getattr__(self, attr):
        # asarray, empty, view3, shares_memory, ...: the host helpers
        return getattr(_host, attr)

    def _wrap(self, op_name, op):
        device = self.device
        run = getattr(device, op_name)

        def on_device(*args):
            call = dict(zip(op.params, args))
            back = []
            for param, value in call.items():
                if value is None or not isinstance(value, np.ndarray):
                    continue
                if param in op.outputs:
                    call[param] = device.empty(value.shape, value.dtype)
                    back.append((value, call[param]))
                elif param in op.inouts:
                    call[param] = device.to_device(np.ascontiguousarray(value))
                    back.append((value, call[param]))
                elif param in op.inputs:
                    call[param] = device.to_device(np.ascontiguousarray(value))
            result = run(**call)
            for host, on_dev in back:
                np.copyto(host, device.to_host(on_dev))
            if isinstance(result, tuple):
                return tuple(np.asarray(device.to_host(r)) for r in result)
            return None if result is None else np.asarray(device.to_host(result))

        on_device.__name__ = op_name
        on_device.__signature__ = inspect.signature(run)
        return on_device
