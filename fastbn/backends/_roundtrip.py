"""Host (NumPy) arrays on a device backend: each operation copies its inputs to the device, runs
there, and copies its results back.

The API layer sees the host array helpers (``_host``), so validation, allocation, dtypes, the
errors and the untouched-state guarantee are exactly those of the host backends, and results
(and the running statistics, updated in place) are NumPy arrays. Only the operations below go
through the device. The cost per call: x (and dy) host -> device, y (dx) device -> host, plus a
few per-channel vectors each way, all synchronous; for tensors that live on the device, pass
device arrays instead.
"""
import numpy as np

from . import _host


class HostRoundTrip:
    """The operations of ``device`` (a device backend module) on host arrays."""

    ON_DEVICE = False

    def __init__(self, device):
        self.device = device
        self.name = device.name

    def __repr__(self):
        return f"HostRoundTrip({self.name!r})"

    def __getattr__(self, attr):
        # asarray, empty, view3, copyto, invstd_from_var, ...: the host helpers
        return getattr(_host, attr)

    def _up(self, a):
        return None if a is None else self.device.to_device(a)

    def _down(self, a):
        return self.device.to_host(a)

    def channel_moments(self, x3):
        mean, m2 = self.device.channel_moments(self._up(x3))
        return self._down(mean), self._down(m2)

    def forward_train(self, x3, weight, bias, eps, y3):
        y = self.device.empty(y3.shape, y3.dtype)
        mean, var = self.device.forward_train(self._up(x3), self._up(weight), self._up(bias),
                                              eps, y)
        np.copyto(y3, self._down(y))
        return self._down(mean), self._down(var)

    def forward_eval(self, x3, mean, invstd, weight, bias, y3):
        y = self.device.empty(y3.shape, y3.dtype)
        self.device.forward_eval(self._up(x3), self._up(mean), self._up(invstd),
                                 self._up(weight), self._up(bias), y)
        np.copyto(y3, self._down(y))

    def backward(self, dy3, x3, mean, invstd, weight, training, dx3):
        dx = self.device.empty(dx3.shape, dx3.dtype)
        sum_dy, sum_dy_xhat = self.device.backward(
            self._up(dy3), self._up(x3), self._up(mean), self._up(invstd), self._up(weight),
            training, dx)
        np.copyto(dx3, self._down(dx))
        return self._down(sum_dy), self._down(sum_dy_xhat)

    def update_running_stats(self, running_mean, running_var, mean, var, count, momentum, eps):
        device_mean, device_var = self._up(running_mean), self._up(running_var)
        skipped = self.device.update_running_stats(device_mean, device_var, self._up(mean),
                                                   self._up(var), count, momentum, eps)
        np.copyto(running_mean, self._down(device_mean))
        np.copyto(running_var, self._down(device_var))
        return skipped

    def backward_reduce(self, dy3, x3, mean):
        return self.device.backward_reduce(self._up(dy3), self._up(x3), self._up(mean))

    def backward_apply(self, dy3, x3, mean, scale, mean_dy, coef, dx3):
        dx = self.device.empty(dx3.shape, dx3.dtype)
        self.device.backward_apply(self._up(dy3), self._up(x3), self._up(mean), self._up(scale),
                                   self._up(mean_dy), self._up(coef), dx)
        np.copyto(dx3, self._down(dx))
