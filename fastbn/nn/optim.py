"""Stochastic gradient descent with momentum and weight decay (PyTorch's update rule)."""
import math

import numpy as np


class SGD:
    """For each parameter p with gradient g::

        g = g + weight_decay * p
        v = momentum * v + g          (v starts at 0, so the first step uses v = g)
        p = p - lr * v

    which is ``torch.optim.SGD(params, lr, momentum, weight_decay=weight_decay)`` (no
    dampening, no Nesterov).
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        self.params = list(params)
        if not (lr > 0):
            raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
        if not (0.0 <= momentum < 1.0):
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
        if not (weight_decay >= 0.0):
            raise ValueError(f"weight_decay: expected a number >= 0, got {weight_decay!r}")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.velocity = [np.zeros_like(p.data) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad.fill(0)

    def step(self):
        for p, v in zip(self.params, self.velocity):
            grad = p.grad
            if self.weight_decay:
                grad = grad + self.weight_decay * p.data
            if self.momentum:
                v *= self.momentum
                v += grad
                grad = v
            p.data -= self.lr * grad

    def state_dict(self):
        state = {"lr": np.float64(self.lr), "momentum": np.float64(self.momentum),
                 "weight_decay": np.float64(self.weight_decay)}
        state.update((f"velocity.{i}", v.copy()) for i, v in enumerate(self.velocity))
        return state

    def load_state_dict(self, state):
        """Restore :meth:`state_dict`; everything is checked first, so on error nothing
        changes."""
        self._staged_load(state)()
        return self

    def _staged_load(self, state, prefix=""):
        """Check ``state`` whole; return the function that assigns it."""
        expected = ["lr", "momentum", "weight_decay"] + \
                   [f"velocity.{i}" for i in range(len(self.velocity))]
        missing = [prefix + k for k in expected if k not in state]
        unexpected = [prefix + k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(f"state: expected the entries {[prefix + k for k in expected]}; "
                             f"missing {missing}, unexpected {unexpected}")

        def number(name, accept, what):
            value = np.asarray(state[name])
            if value.shape != () or value.dtype.kind not in "iuf" or not accept(float(value)):
                raise ValueError(f"state[{prefix + name!r}]: expected {what}, got "
                                 f"{state[name]!r}")
            return float(value)

        lr = number("lr", lambda v: math.isfinite(v) and v > 0, "a positive finite learning rate")
        momentum = number("momentum", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
        weight_decay = number("weight_decay", lambda v: math.isfinite(v) and v >= 0,
                              "a finite number >= 0")
        velocity = []
        for i, v in enumerate(self.velocity):
            label = f"state[{prefix + f'velocity.{i}'!r}]"
            value = np.asarray(state[f"velocity.{i}"])
            if value.dtype.kind not in "iuf" or value.shape != v.shape:
                raise ValueError(f"{label}: expected real numbers of shape {v.shape}, got "
                                 f"{value.dtype} of shape {value.shape}")
            if not np.isfinite(value).all():
                raise ValueError(f"{label}: expected finite values")
            velocity.append(value)

        def assign():
            self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
            for v, value in zip(self.velocity, velocity):
                np.copyto(v, value)
        return assign
