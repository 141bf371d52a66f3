"""Stochastic gradient descent with momentum and weight decay (PyTorch's update rule)."""
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
        if int(sum(k.startswith("velocity.") for k in state)) != len(self.velocity):
            raise ValueError(f"state: expected {len(self.velocity)} velocity buffers, got "
                             f"{sum(k.startswith('velocity.') for k in state)}")
        self.lr = float(state["lr"])
        self.momentum = float(state["momentum"])
        self.weight_decay = float(state["weight_decay"])
        for i, v in enumerate(self.velocity):
            value = np.asarray(state[f"velocity.{i}"])
            if value.shape != v.shape:
                raise ValueError(f"state['velocity.{i}']: expected shape {v.shape}, got "
                                 f"{value.shape}")
            np.copyto(v, value)
        return self
