"""Layers of the minimal trainer. Each layer's forward and backward sit next to each other.

A layer's ``forward(x)`` remembers what its ``backward(dy)`` needs; ``backward`` returns the
gradient with respect to the layer's input and *adds* the parameter gradients into
``Parameter.grad`` (cleared by ``zero_grad``), as in PyTorch.
"""
import numpy as np

import fastbn


class Parameter:
    """A trainable array and its gradient.

    ``grad_is_global`` marks gradients that are already summed over every process: a
    synchronized BatchNorm (``comm`` given) returns the global dgamma/dbeta, so a data-parallel
    step must all-reduce every gradient *except* those.
    """
    __slots__ = ("data", "grad", "grad_is_global")

    def __init__(self, data):
        self.data = data
        self.grad = np.zeros_like(data)
        self.grad_is_global = False

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Module:
    """Base class: parameters, buffers, children, train/eval mode and state dicts."""
    training = True
    _parameter_names = ()   # attributes holding a Parameter (or None)
    _buffer_names = ()      # attributes holding state that is saved but not trained

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def children(self):
        """(name, module) pairs of the direct sub-modules."""
        return []

    def named_modules(self, prefix=""):
        """(dotted name prefix, module) for this module and every sub-module, depth first."""
        yield prefix, self
        for name, child in self.children():
            yield from child.named_modules(f"{prefix}{name}.")

    def modules(self):
        return [module for _, module in self.named_modules()]

    def named_parameters(self):
        for prefix, module in self.named_modules():
            for name in module._parameter_names:
                param = getattr(module, name)
                if param is not None:
                    yield prefix + name, param

    def parameters(self):
        return [param for _, param in self.named_parameters()]

    def named_buffers(self):
        for prefix, module in self.named_modules():
            for name in module._buffer_names:
                yield prefix + name, getattr(module, name)

    def train(self, mode=True):
        for module in self.modules():
            module.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for param in self.parameters():
            param.grad.fill(0)

    def state_dict(self):
        """Copies of every parameter and buffer, by dotted name."""
        state = {name: param.data.copy() for name, param in self.named_parameters()}
        state.update((name, np.array(value)) for name, value in self.named_buffers())
        return state

    def load_state_dict(self, state):
        """Copy values into the existing arrays. Every entry is checked first (all names
        present, shapes, real finite values, non-negative counters and variances): on error
        nothing is changed."""
        self._staged_load(state)()
        return self

    def _staged_load(self, state, prefix=""):
        """Check ``state`` whole; return the function that assigns it. Errors name the entry
        as ``state[prefix + name]``."""
        expected = [name for name, _ in self.named_parameters()] + \
                   [name for name, _ in self.named_buffers()]
        missing = [prefix + name for name in expected if name not in state]
        unexpected = [prefix + name for name in state if name not in expected]
        if missing or unexpected:
            raise ValueError(f"state: expected the entries {[prefix + n for n in expected]}; "
                             f"missing {missing}, unexpected {unexpected}")
        assignments = []
        for name, param in self.named_parameters():
            value = _checked_array(state[name], param.data.shape, f"state[{prefix + name!r}]")
            assignments.append(lambda a=param.data, v=value: np.copyto(a, v))
        for module_prefix, module in self.named_modules():
            for name in module._buffer_names:
                current = getattr(module, name)
                label = f"state[{prefix + module_prefix + name!r}]"
                value = state[module_prefix + name]
                if isinstance(current, np.ndarray):
                    value = _checked_array(value, current.shape, label)
                    module._check_buffer(name, value, label)
                    assignments.append(lambda a=current, v=value: np.copyto(a, v))
                else:
                    value = _checked_count(value, label)
                    assignments.append(lambda m=module, n=name, v=value: setattr(m, n, v))

        def assign():
            for assignment in assignments:
                assignment()
        return assign

    def _check_buffer(self, name, value, label):
        """A layer's extra checks of a loaded buffer (raise ValueError naming ``label``)."""


def _checked_array(value, shape, label):
    value = np.asarray(value)
    if value.dtype.kind not in "iuf":
        raise TypeError(f"{label}: expected real numbers, got dtype {value.dtype}")
    if value.shape != shape:
        raise ValueError(f"{label}: expected shape {shape}, got {value.shape}")
    if not np.isfinite(value).all():
        raise ValueError(f"{label}: expected finite values, got "
                         f"{value.ravel()[~np.isfinite(value.ravel())][0]}")
    return value


def _checked_count(value, label):
    """A non-negative integer stored as a Python int or a 0-d integer array."""
    array = np.asarray(value)
    if array.shape != () or array.dtype.kind not in "iu" or array < 0:
        raise ValueError(f"{label}: expected a non-negative integer, got {value!r}")
    return int(array)


def normal(shape, std, rng, dtype=np.float32):
    """Gaussian initialization N(0, std^2)."""
    return (rng.standard_normal(shape) * std).astype(dtype)


# ----------------------------------------------------------------------------------------------

class Linear(Module):
    """y = x W^T + b, with x of shape (batch, in_features). W is (out, in) as in PyTorch.

    Weights are drawn from N(0, std^2) (default std = 1/sqrt(in_features)); biases start at 0.
    """
    _parameter_names = ("weight", "bias")

    def __init__(self, in_features, out_features, bias=True, *, std=None, rng=None,
                 dtype=np.float32):
        rng = np.random.default_rng() if rng is None else rng
        std = 1.0 / np.sqrt(in_features) if std is None else std
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(normal((out_features, in_features), std, rng, dtype))
        self.bias = Parameter(np.zeros(out_features, dtype)) if bias else None

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias is not None})"

    def forward(self, x):
        self._x = x
        y = x @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        return y

    def backward(self, dy):
        self.weight.grad += dy.T @ self._x
        if self.bias is not None:
            self.bias.grad += dy.sum(axis=0)
        return dy @ self.weight.data


class BatchNorm(Module):
    """Batch normalization over every axis but ``axis`` (the paper's BN transform).

    Training mode normalizes with the batch statistics and updates ``running_mean`` /
    ``running_var`` in place (unbiased variance, PyTorch's convention); ``momentum=None``
    makes them a cumulative average over the batches counted in ``num_batches_tracked``. A
    batch is counted only once the forward accepted it and its statistics were finite in every
    channel: a rejected input, or a batch with NaN/inf (whose running statistics the forward
    leaves unchanged, with a RuntimeWarning), does not count. (In a batch that is non-finite in
    only some channels, the finite channels are still updated, with the momentum of the
    uncounted batch.) Eval mode normalizes with the running statistics. The arithmetic is
    fastbn's: :func:`fastbn.batch_norm_forward` and :func:`fastbn.batch_norm_backward` on
    ``backend``. With an MPI communicator ``comm``,
    training mode calls their synchronized versions in :mod:`fastbn.distributed` (statistics of
    the global batch; dgamma/dbeta come back summed over the ranks, so these parameters are
    marked ``grad_is_global``); ``comm=None`` means no synchronization.

    See Also
    --------
    torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, recompute_population_stats
    """
    _parameter_names = ("weight", "bias")
    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")
    activation = None   # BatchNormActivation fuses one

    def __init__(self, num_features, *, axis=1, eps=1e-5, momentum=0.1, affine=True,
                 dtype=np.float32, backend=None, comm=None):
        self.num_features, self.axis, self.eps = num_features, axis, eps
        self.momentum, self.backend, self.comm = momentum, backend, comm
        self.weight = Parameter(np.ones(num_features, dtype)) if affine else None
        self.bias = Parameter(np.zeros(num_features, dtype)) if affine else None
        if affine and comm is not None:
            self.weight.grad_is_global = self.bias.grad_is_global = True
        self.running_mean = np.zeros(num_features, dtype)
        self.running_var = np.ones(num_features, dtype)
        self.num_batches_tracked = 0
        self._population = None   # set by recompute_population_stats while it runs

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, backend={self.backend!r}"
                + (", comm=..." if self.comm is not None else "") + ")")

    def _check_buffer(self, name, value, label):
        if name == "running_var" and (value < 0).any():
            raise ValueError(f"{label}: expected non-negative variances, got "
                             f"{value[value < 0][0]}")

    def _synchronized(self, training):
        """Synchronized BN (global batch statistics) in training mode with a communicator; the
        eval transform needs no communication, so it always runs locally."""
        return self.comm is not None and training

    def forward(self, x):
        gamma = None if self.weight is None else self.weight.data
        beta = None if self.bias is None else self.bias.data
        running = {}
        updates_running = self.training and self._population is None
        if updates_running:
            momentum = (1.0 / (self.num_batches_tracked + 1) if self.momentum is None
                        else self.momentum)
            running = dict(running_mean=self.running_mean, running_var=self.running_var,
                           momentum=momentum)
        elif self.training:
            self._population.add(x, self)     # Algorithm 2: record, do not update
        else:
            running = dict(running_mean=self.running_mean, running_var=self.running_var)
        synchronized = self._synchronized(self.training)
        if synchronized:
            from fastbn import distributed    # mpi4py is loaded only when a comm is used
            forward, options = distributed.batch_norm_forward, {"comm": self.comm}
        elif self.activation is None:
            forward, options = fastbn.batch_norm_forward, {}
        else:
            forward, options = fastbn.batch_norm_act_forward, {"activation": self.activation}
        y, mean, invstd = forward(x, gamma, beta, axis=self.axis, eps=self.eps,
                                  training=self.training, backend=self.backend, **running,
                                  **options)
        if synchronized and self.activation is not None:
            # fastbn.distributed has no fused op: synchronized BN, then the activation here
            y = ACTIVATIONS[self.activation](_to_host(y))
        self._saved = (x, y, mean, invstd, self.training)
        if updates_running and _all_finite(mean, invstd):
            self.num_batches_tracked += 1   # only batches that updated the running stats
        return _to_host(y)

    def backward(self, dy):
        x, y, mean, invstd, training = self._saved
        gamma = None if self.weight is None else self.weight.data
        if self._synchronized(training):
            from fastbn import distributed
            if self.activation is not None:
                dy = ACTIVATION_GRADS[self.activation](dy, y)
            dx, dgamma, dbeta = distributed.batch_norm_backward(
                dy, x, mean, invstd, gamma, comm=self.comm, axis=self.axis, backend=self.backend)
        elif self.activation is None:
            dx, dgamma, dbeta = fastbn.batch_norm_backward(
                dy, x, mean, invstd, gamma, axis=self.axis, training=training,
                backend=self.backend)
        else:
            dx, dgamma, dbeta, _ = fastbn.batch_norm_act_backward(
                dy, y, x, mean, invstd, gamma, activation=self.activation, axis=self.axis,
                training=training, backend=self.backend)
        if self.weight is not None:
            self.weight.grad += _to_host(dgamma)
            self.bias.grad += _to_host(dbeta)
        return _to_host(dx)


class BatchNormActivation(BatchNorm):
    """BatchNorm followed by an activation, as one fused layer: y = act(BN(x)) with
    ``activation`` "sigmoid" (the paper's network) or "relu".

    Forward and backward are single calls of :func:`fastbn.batch_norm_act_forward` and
    :func:`fastbn.batch_norm_act_backward` (the backward recovers the activation's derivative
    from y), in the passes of BN alone. Everything else (running statistics, modes, state
    dicts, ``comm``) is :class:`BatchNorm`'s; with ``comm``, training mode runs the
    synchronized BN and then the activation separately, as fastbn.distributed has no fused op.

    See Also
    --------
    BatchNorm, Sigmoid, ReLU
    """

    def __init__(self, num_features, activation="sigmoid", **kwargs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got "
                             f"{activation!r}")
        super().__init__(num_features, **kwargs)
        self.activation = activation

    def __repr__(self):
        return super().__repr__().replace("BatchNorm(", "BatchNormActivation(", 1)[:-1] + \
            f", activation={self.activation!r})"

    def normalize(self, x):
        """BN alone (the activation's input) in eval mode, from the running statistics."""
        gamma = None if self.weight is None else self.weight.data
        beta = None if self.bias is None else self.bias.data
        return _to_host(fastbn.batch_norm_forward(
            x, gamma, beta, axis=self.axis, eps=self.eps, training=False,
            running_mean=self.running_mean, running_var=self.running_var,
            backend=self.backend).y)


def _all_finite(*arrays):
    """True when every per-channel statistic is finite (a non-finite channel's running
    statistics were left unchanged by the forward)."""
    return all(np.isfinite(_to_host(a)).all() for a in arrays)


def _to_host(array):
    """The trainer's other layers are NumPy: bring a device result (cuda backend) back."""
    return array.copy_to_host() if hasattr(array, "copy_to_host") else array


def sigmoid(x):
    """1 / (1 + exp(-x)), computed as (1 + tanh(x/2)) / 2, which cannot overflow."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def relu(x):
    return np.where(x > 0, x, 0).astype(x.dtype, copy=False)


#: The activations, and their gradients recovered from the output y (as the fused ops do).
ACTIVATIONS = {"sigmoid": sigmoid, "relu": relu}
ACTIVATION_GRADS = {"sigmoid": lambda dy, y: dy * y * (1.0 - y),
                    "relu": lambda dy, y: np.where(y > 0, dy, 0).astype(dy.dtype, copy=False)}


class Sigmoid(Module):
    """y = 1 / (1 + exp(-x)), computed as (1 + tanh(x/2)) / 2, which cannot overflow."""

    def forward(self, x):
        self._y = y = sigmoid(x)
        return y

    def backward(self, dy):
        return ACTIVATION_GRADS["sigmoid"](dy, self._y)


class ReLU(Module):
    """y = max(x, 0)."""

    def forward(self, x):
        self._y = y = relu(x)
        return y

    def backward(self, dy):
        return ACTIVATION_GRADS["relu"](dy, self._y)


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, *layers):
        self.layers = list(layers)

    def __repr__(self):
        return "Sequential(\n" + "".join(f"  ({i}) {layer!r}\n"
                                          for i, layer in enumerate(self.layers)) + ")"

    def __getitem__(self, index):
        return self.layers[index]

    def __len__(self):
        return len(self.layers)

    def children(self):
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def forward(self, x):
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy
