"""The training loop, evaluation, and exact checkpoints.

``train_step`` is the one place a data-parallel version hooks in: after backward and before the
SGD update it calls ``grad_hook(parameters)``, where an MPI version all-reduces (averages) the
gradients of every parameter whose ``grad_is_global`` is False. Synchronized BatchNorm layers
already return global dgamma/dbeta, marked ``grad_is_global``, and must not be summed again.
"""
import contextlib
import json
import math
import os
import tempfile
import warnings

import numpy as np

from .loss import SoftmaxCrossEntropy

CHECKPOINT_FORMAT = 1

#: A mini-batch loss above this counts as divergence (the initial loss of a 10-class softmax
#: is ln 10 = 2.3; a loss of 1000 means the network is confidently wrong by a factor e^1000).
DIVERGENCE_LOSS = 1e3


def diverged(loss, limit=DIVERGENCE_LOSS):
    """True for a loss that is NaN, infinite, or above ``limit``."""
    return not math.isfinite(loss) or loss > limit


class BatchSampler:
    """Random mini-batches: a fresh permutation of the training set every epoch, consumed
    ``batch_size`` indices at a time (the last incomplete batch of an epoch is dropped)."""

    def __init__(self, num_examples, batch_size, rng):
        if not 0 < batch_size <= num_examples:
            raise ValueError(f"batch_size: expected 1..{num_examples} (the number of training "
                             f"examples), got {batch_size}")
        self.num_examples, self.batch_size, self.rng = num_examples, batch_size, rng
        self.order = np.empty(0, dtype=np.int64)
        self.position = 0

    def next(self):
        if self.position + self.batch_size > len(self.order):
            self.order = self.rng.permutation(self.num_examples)
            self.position = 0
        index = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return index

    def state_dict(self):
        return {"order": self.order.copy(), "position": np.int64(self.position),
                "rng": np.array(rng_state_json(self.rng))}

    def load_state_dict(self, state):
        self.order = np.asarray(state["order"], dtype=np.int64).copy()
        self.position = int(state["position"])
        set_rng_state_json(self.rng, str(state["rng"]))
        return self


def rng_state_json(rng):
    """A NumPy Generator's exact state as JSON (its 128-bit integers are kept exactly)."""
    return json.dumps(rng.bit_generator.state,
                      default=lambda v: v.tolist() if isinstance(v, np.ndarray) else int(v))


def set_rng_state_json(rng, text):
    state = json.loads(text)
    if state.get("bit_generator") != type(rng.bit_generator).__name__:
        raise ValueError(f"rng: the checkpoint holds a {state.get('bit_generator')} state, "
                         f"got a {type(rng.bit_generator).__name__} generator")
    rng.bit_generator.state = state


def train_step(model, optimizer, x, labels, *, loss_fn=None, grad_hook=None):
    """One SGD step on one mini-batch; returns the mini-batch loss (before the update)."""
    loss_fn = SoftmaxCrossEntropy() if loss_fn is None else loss_fn
    model.train()
    optimizer.zero_grad()
    loss = loss_fn.forward(model.forward(x), labels)
    model.backward(loss_fn.backward())
    if grad_hook is not None:
        grad_hook(optimizer.params)   # data-parallel: all-reduce the local gradients here
    optimizer.step()
    return loss


def allreduce_gradients(comm=None):
    """A ``grad_hook`` for data-parallel training over the MPI communicator ``comm``.

    It sums over the ranks (:func:`fastbn.distributed.allreduce_sum_`) the gradient of every
    parameter except those marked ``grad_is_global`` (synchronized BN's gamma and beta, whose
    gradients are global sums already). For the sum to be the gradient of the global batch's
    mean loss, each rank normalizes its loss by the global batch size:
    ``SoftmaxCrossEntropy(total_batch_size=global_batch_size)``.
    """
    def hook(params):
        from fastbn import distributed
        local = [p.grad for p in params if not p.grad_is_global]
        if local:
            distributed.allreduce_sum_(local, comm)
    return hook


def predict(model, x, batch_size=2000):
    """Logits of ``model`` in eval mode (the mode is restored afterwards)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return np.concatenate([model.forward(x[i:i + batch_size])
                               for i in range(0, len(x), batch_size)])
    finally:
        for module, mode in modes:
            module.training = mode


def evaluate(model, x, labels, batch_size=2000):
    """(accuracy, mean cross-entropy) of ``model`` in eval mode."""
    with np.errstate(all="ignore"):
        logits = predict(model, x, batch_size)
        loss = SoftmaxCrossEntropy().forward(logits, labels)
    accuracy = float(np.mean(logits.argmax(axis=1) == labels))
    return accuracy, loss


class Trainer:
    """Model + optimizer + data order + step counter: everything a checkpoint restores.

    >>> trainer = Trainer(model, SGD(model.parameters(), lr=0.5), x, y, batch_size=60,
    ...                   rng=np.random.default_rng(0))        # doctest: +SKIP
    >>> loss = trainer.step()                                   # doctest: +SKIP
    >>> trainer.save("run.npz"); trainer.load("run.npz")        # doctest: +SKIP
    """

    def __init__(self, model, optimizer, x, labels, *, batch_size, rng, loss_fn=None,
                 grad_hook=None):
        self.model, self.optimizer = model, optimizer
        self.x, self.labels = x, labels
        self.sampler = BatchSampler(len(x), batch_size, rng)
        self.loss_fn = SoftmaxCrossEntropy() if loss_fn is None else loss_fn
        self.grad_hook = grad_hook
        self.steps_done = 0

    def step(self):
        index = self.sampler.next()
        loss = train_step(self.model, self.optimizer, self.x[index], self.labels[index],
                          loss_fn=self.loss_fn, grad_hook=self.grad_hook)
        self.steps_done += 1
        return loss

    def run(self, steps, *, stop_on_divergence=True):
        """Take ``steps`` steps; returns the losses. A diverged loss (see :func:`diverged`)
        stops the run early when ``stop_on_divergence``: such a run does not recover."""
        losses = []
        for _ in range(steps):
            loss = self.step()
            losses.append(loss)
            if stop_on_divergence and diverged(loss):
                break
        return losses

    def save(self, path, extra=None):
        save_checkpoint(path, self.model, self.optimizer, sampler=self.sampler,
                        step=self.steps_done, extra=extra)

    def load(self, path):
        meta = load_checkpoint(path, self.model, self.optimizer, sampler=self.sampler)
        self.steps_done = meta["step"]
        return meta


def save_checkpoint(path, model, optimizer=None, *, sampler=None, step=0, extra=None):
    """Write model (parameters and BN running statistics), optimizer (momentum buffers),
    sampler (data order and RNG state) and step counter to one ``.npz`` file, atomically: a
    temporary file in the same directory is renamed over ``path`` only once it is complete."""
    arrays = {"meta.format": np.int64(CHECKPOINT_FORMAT), "meta.step": np.int64(step),
              "meta.extra": np.array(json.dumps(extra or {}))}
    arrays.update((f"model.{k}", v) for k, v in model.state_dict().items())
    if optimizer is not None:
        arrays.update((f"optimizer.{k}", v) for k, v in optimizer.state_dict().items())
    if sampler is not None:
        arrays.update((f"sampler.{k}", v) for k, v in sampler.state_dict().items())
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".checkpoint-", suffix=".npz.part")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise
    return path


def load_checkpoint(path, model, optimizer=None, *, sampler=None):
    """Restore what :func:`save_checkpoint` wrote; returns ``{"step": int, "extra": dict}``."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    version = int(arrays.get("meta.format", -1))
    if version != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: expected a fastbn checkpoint of format {CHECKPOINT_FORMAT}, "
                         f"got format {version}")

    def part(prefix):
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    if optimizer is not None:
        optimizer.load_state_dict(part("optimizer."))
    if sampler is not None:
        sampler.load_state_dict(part("sampler."))
    return {"step": int(arrays["meta.step"]), "extra": json.loads(str(arrays["meta.extra"]))}


@contextlib.contextmanager
def quiet_divergence():
    """Silence the warnings a diverging run produces (overflow, non-finite BN statistics);
    divergence is detected from the loss instead."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
