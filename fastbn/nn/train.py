"""The training loop, evaluation, and exact checkpoints.

Data parallel over MPI (``comm``): every rank holds the whole data set and the same model, and
draws the same global batch from a sampler in the same state; it trains on its rows of that
batch (:func:`fastbn.distributed.shard`). Synchronized BatchNorm layers (``comm`` given) return
the global dgamma/dbeta, marked ``grad_is_global``; between backward and the SGD update,
``train_step`` sums every other gradient over the ranks, together with the loss, in one message.
Every rank then takes the same update, so the ranks' models stay identical bit for bit and equal
a single process on the whole batch up to the order of float additions.
"""
import contextlib
import json
import math
import os
import tempfile
import warnings
import zipfile
import zlib

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
        """Restore :meth:`state_dict`; everything is checked first, so on error nothing
        changes."""
        self._staged_load(state)()
        return self

    def _staged_load(self, state, prefix=""):
        """Check ``state`` whole; return the function that assigns it."""
        expected = ["order", "position", "rng"]
        missing = [prefix + k for k in expected if k not in state]
        unexpected = [prefix + k for k in state if k not in expected]
        if missing or unexpected:
            raise ValueError(f"state: expected the entries {[prefix + k for k in expected]}; "
                             f"missing {missing}, unexpected {unexpected}")
        order = np.asarray(state["order"])
        label = f"state[{prefix + 'order'!r}]"
        if order.ndim != 1 or (order.size and order.dtype.kind not in "iu"):
            raise ValueError(f"{label}: expected a 1-D integer array, got {order.dtype} of shape "
                             f"{order.shape}")
        if len(order) and not np.array_equal(np.sort(order), np.arange(self.num_examples)):
            raise ValueError(f"{label}: expected a permutation of the {self.num_examples} "
                             f"training examples (or nothing), got {len(order)} indices"
                             + ("" if len(order) != self.num_examples else
                                " that are not a permutation"))
        position = np.asarray(state["position"])
        if position.shape != () or position.dtype.kind not in "iu" or \
                not 0 <= position <= len(order):
            raise ValueError(f"state[{prefix + 'position'!r}]: expected an integer in "
                             f"0..{len(order)} (the length of the order), got "
                             f"{state['position']!r}")
        rng_text = str(state["rng"])
        probe = np.random.Generator(type(self.rng.bit_generator)())
        try:
            set_rng_state_json(probe, rng_text)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"state[{prefix + 'rng'!r}]: expected the JSON state of a "
                             f"{type(self.rng.bit_generator).__name__} generator, got "
                             f"{rng_text[:60]!r} ({err})") from None

        def assign():
            self.order = order.astype(np.int64)
            self.position = int(position)
            set_rng_state_json(self.rng, rng_text)
        return assign


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


def train_step(model, optimizer, x, labels, *, loss_fn=None, grad_hook=None, comm=None):
    """One SGD step on one mini-batch; returns the mini-batch loss (before the update).

    ``grad_hook(parameters)``, if given, runs after backward and before the update.

    Data parallel: with an MPI communicator ``comm``, ``x`` and ``labels`` are this rank's rows
    of the global batch, and ``loss_fn`` must divide by the global batch size
    (``SoftmaxCrossEntropy(total_batch_size=global_batch_size)``). After backward, the gradient
    of every parameter not marked ``grad_is_global`` and the loss are summed over the ranks in
    one message (:func:`fastbn.distributed.allreduce_sum_`), before ``grad_hook`` and the
    update: the step is that of the global batch, and the loss returned is the global batch's,
    the same on every rank. Every rank of ``comm`` must call this collectively.
    """
    if comm is not None:
        _check_data_parallel_step(loss_fn, grad_hook)
    loss_fn = SoftmaxCrossEntropy() if loss_fn is None else loss_fn
    model.train()
    optimizer.zero_grad()
    loss = loss_fn.forward(model.forward(x), labels)
    model.backward(loss_fn.backward())
    if comm is not None:
        loss = _sum_gradients_over_ranks(optimizer.params, comm, loss)
    if grad_hook is not None:
        grad_hook(optimizer.params)
    optimizer.step()
    return loss


def _check_data_parallel_step(loss_fn, grad_hook):
    if loss_fn is None or (isinstance(loss_fn, SoftmaxCrossEntropy)
                           and loss_fn.total_batch_size is None):
        raise ValueError("loss_fn: expected a loss divided by the global batch size in data-"
                         "parallel training, such as SoftmaxCrossEntropy(total_batch_size="
                         f"global_batch_size), got {loss_fn!r}")
    if getattr(grad_hook, "sums_gradients_over_ranks", False):
        raise ValueError("grad_hook: with comm the gradients are already summed over the "
                         "ranks; allreduce_gradients() would sum them a second time")


def _sum_gradients_over_ranks(params, comm, loss=None):
    """Sum (in place) the gradients not marked ``grad_is_global`` and, if given, the loss over
    the ranks of ``comm``, in one message; returns the summed loss."""
    from fastbn import distributed   # mpi4py is loaded only when a comm is used
    arrays = [p.grad for p in params if not p.grad_is_global]
    if loss is not None:
        total = np.array([loss], dtype=np.float64)
        arrays.append(total)
    if arrays:
        distributed.allreduce_sum_(arrays, comm)
    return None if loss is None else float(total[0])


def allreduce_gradients(comm=None):
    """A ``grad_hook`` for data-parallel training over the MPI communicator ``comm``.

    It sums over the ranks (:func:`fastbn.distributed.allreduce_sum_`) the gradient of every
    parameter except those marked ``grad_is_global`` (synchronized BN's gamma and beta, whose
    gradients are global sums already). For the sum to be the gradient of the global batch's
    mean loss, each rank normalizes its loss by the global batch size:
    ``SoftmaxCrossEntropy(total_batch_size=global_batch_size)``. ``train_step(..., comm=comm)``
    does the same and also sums the loss.
    """
    def hook(params):
        _sum_gradients_over_ranks(params, comm)
    hook.sums_gradients_over_ranks = True
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


def evaluate(model, x, labels, batch_size=2000, *, comm=None):
    """(accuracy, mean cross-entropy) of ``model`` in eval mode.

    With an MPI communicator ``comm`` (collective; every rank passes the whole ``x`` and the
    same model), each rank evaluates its share of the rows and the ranks sum the number correct
    and the summed loss: the same result on every rank, in 1/K of the time.
    """
    if comm is None:
        with np.errstate(all="ignore"):
            logits = predict(model, x, batch_size)
            loss = SoftmaxCrossEntropy().forward(logits, labels)
        accuracy = float(np.mean(logits.argmax(axis=1) == labels))
        return accuracy, loss
    from fastbn import distributed
    start, stop = distributed.shard(len(x), comm)
    totals = np.zeros(2)   # number correct (exact in float64), summed cross-entropy
    if stop > start:
        with np.errstate(all="ignore"):
            logits = predict(model, x[start:stop], batch_size)
            totals[1] = SoftmaxCrossEntropy(total_batch_size=1).forward(logits,
                                                                        labels[start:stop])
        totals[0] = np.count_nonzero(logits.argmax(axis=1) == labels[start:stop])
    distributed.allreduce_sum_(totals, comm)
    return float(totals[0] / len(x)), float(totals[1] / len(x))


class Trainer:
    """Model + optimizer + data order + step counter: everything a checkpoint restores.

    >>> trainer = Trainer(model, SGD(model.parameters(), lr=0.5), x, y, batch_size=60,
    ...                   rng=np.random.default_rng(0))        # doctest: +SKIP
    >>> loss = trainer.step()                                   # doctest: +SKIP
    >>> trainer.save("run.npz"); trainer.load("run.npz")        # doctest: +SKIP

    Data parallel over MPI: pass ``comm`` on every rank, with the whole data set, the same
    model (its BatchNorm layers built with the same ``comm``) and ``rng`` in the same state.
    ``batch_size`` is then the *global* batch: the sampler draws it identically on every rank
    and each rank trains on its rows (:func:`fastbn.distributed.shard`; uneven splits are
    fine), with the loss divided by ``batch_size`` (the default ``loss_fn``) and the gradients
    summed over the ranks (``train_step(..., comm=comm)``). ``step`` returns the global batch's
    loss on every rank. The constructor checks, collectively, that the ranks agree on the data
    size, the batch size and the sampler's state; ``save`` writes from rank 0 only and ``load``
    reads on rank 0 and broadcasts.
    """

    def __init__(self, model, optimizer, x, labels, *, batch_size, rng, loss_fn=None,
                 grad_hook=None, comm=None):
        self.model, self.optimizer = model, optimizer
        self.x, self.labels = x, labels
        self.grad_hook = grad_hook
        self.comm = comm
        self.steps_done = 0
        self.rows = slice(None)
        if comm is None:
            self.sampler = BatchSampler(len(x), batch_size, rng)
            self.loss_fn = SoftmaxCrossEntropy() if loss_fn is None else loss_fn
            return
        from fastbn import distributed
        error, fields = None, ()
        try:
            self.sampler = BatchSampler(len(x), batch_size, rng)
            self.loss_fn = (SoftmaxCrossEntropy(total_batch_size=batch_size) if loss_fn is None
                            else loss_fn)
            _check_data_parallel_step(self.loss_fn, grad_hook)
            _check_synchronized(model)
            start, stop = distributed.shard(batch_size, comm)
            self.rows = slice(start, stop)
            fields = (len(x), batch_size, zlib.crc32(rng_state_json(rng).encode()))
        except Exception as exc:
            error = exc
        # collective: an error on one rank is raised on every rank, naming it
        table = distributed.agree(comm, "Trainer", error, fields, 3)
        distributed.same_on_every_rank(
            table, "Trainer", (0, "training set sizes", int), (1, "batch sizes", int),
            (2, "random generator states (the global batches must be drawn alike)",
             lambda v: f"CRC-32 {int(v):08x}"))

    def step(self):
        index = self.sampler.next()[self.rows]   # this rank's rows of the global batch
        loss = train_step(self.model, self.optimizer, self.x[index], self.labels[index],
                          loss_fn=self.loss_fn, grad_hook=self.grad_hook, comm=self.comm)
        self.steps_done += 1
        return loss

    def run(self, steps, *, stop_on_divergence=True):
        """Take ``steps`` steps; returns the losses. A diverged loss (see :func:`diverged`)
        stops the run early when ``stop_on_divergence``: such a run does not recover. (Data
        parallel: the loss is the global batch's, so every rank stops at the same step.)"""
        losses = []
        for _ in range(steps):
            loss = self.step()
            losses.append(loss)
            if stop_on_divergence and diverged(loss):
                break
        return losses

    def save(self, path, extra=None):
        """Write a checkpoint (see :func:`save_checkpoint`). Data parallel: rank 0 writes it
        (every rank holds the same state) and an error there is raised on every rank."""
        if self.comm is None:
            save_checkpoint(path, self.model, self.optimizer, sampler=self.sampler,
                            step=self.steps_done, extra=extra)
            return
        from fastbn import distributed
        error = None
        if self.comm.Get_rank() == 0:
            try:
                save_checkpoint(path, self.model, self.optimizer, sampler=self.sampler,
                                step=self.steps_done, extra=extra)
            except Exception as exc:
                error = exc
        distributed.agree(self.comm, "Trainer.save", error, (), 0)

    def load(self, path):
        """Restore a checkpoint; returns its ``{"step", "extra"}``. Data parallel: rank 0
        reads the file (only it needs to see ``path``) and broadcasts its contents."""
        if self.comm is None:
            arrays = _read_checkpoint(path)
        else:
            from fastbn import distributed
            arrays, error = None, None
            if self.comm.Get_rank() == 0:
                try:
                    arrays = _read_checkpoint(path)
                except Exception as exc:
                    error = exc
            distributed.agree(self.comm, "Trainer.load", error, (), 0)
            arrays = self.comm.bcast(arrays, root=0)
        meta = _restore_checkpoint(arrays, self.model, self.optimizer, sampler=self.sampler,
                                   path=path)
        self.steps_done = meta["step"]
        return meta


def _check_synchronized(model):
    """Data parallel needs every BatchNorm synchronized: with local statistics each rank would
    normalize its shard alone, and K ranks would no longer train the single-process model."""
    from .layers import BatchNorm
    local = [name or "model" for name, module in model.named_modules()
             if isinstance(module, BatchNorm) and module.comm is None]
    if local:
        raise ValueError(f"model: expected every BatchNorm to be synchronized in data-parallel "
                         f"training (BatchNorm(..., comm=comm)), got comm=None in "
                         f"{', '.join(n.rstrip('.') for n in local)}")


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


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model, optimizer or sampler. The
    message names the file and the entry."""


def load_checkpoint(path, model, optimizer=None, *, sampler=None):
    """Restore what :func:`save_checkpoint` wrote; returns ``{"step": int, "extra": dict}``.

    All or nothing: every entry is checked (names, shapes, dtypes, values: a positive finite
    lr, a sampler order that permutes the data set and a position inside it, integer
    counters) before anything is assigned. Raises :class:`CheckpointError` naming the file and
    the entry; FileNotFoundError when ``path`` does not exist."""
    return _restore_checkpoint(_read_checkpoint(path), model, optimizer, sampler=sampler,
                               path=path)


def _read_checkpoint(path):
    """A checkpoint's arrays by name, its format checked."""
    path = os.fspath(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: not a fastbn checkpoint (.npz archive): "
                              f"{type(err).__name__}: {err}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path}: expected a fastbn checkpoint (.npz archive of named "
                              f"arrays), got a single .npy array")
    arrays = {}
    with data:
        for name in data.files:
            try:
                arrays[name] = data[name]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                raise CheckpointError(f"{path}: entry {name!r} cannot be read: "
                                      f"{type(err).__name__}: {err}") from None
    version = arrays.get("meta.format")
    if version is None or version.shape != () or version.dtype.kind not in "iu" or \
            int(version) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: entry 'meta.format': expected a fastbn checkpoint of "
                              f"format {CHECKPOINT_FORMAT}, got "
                              f"{'nothing' if version is None else version!r}")
    return arrays


def _restore_checkpoint(arrays, model, optimizer=None, *, sampler=None, path="checkpoint"):
    """Check every entry, then assign them all (nothing changes when a check fails)."""
    def part(prefix):
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    try:
        unknown = [k for k in arrays if not k.startswith(("meta.", "model.", "optimizer.",
                                                          "sampler."))]
        unknown += [k for k in arrays if k.startswith("meta.")
                    and k not in ("meta.format", "meta.step", "meta.extra")]
        if unknown:
            raise ValueError(f"unexpected entries {unknown}")
        assignments = [model._staged_load(part("model."), "model.")]
        if optimizer is not None:
            assignments.append(optimizer._staged_load(part("optimizer."), "optimizer."))
        if sampler is not None:
            assignments.append(sampler._staged_load(part("sampler."), "sampler."))
        step = arrays.get("meta.step")
        if step is None or step.shape != () or step.dtype.kind not in "iu" or step < 0:
            raise ValueError(f"entry 'meta.step': expected a non-negative integer, got "
                             f"{'nothing' if step is None else step!r}")
        try:
            extra = json.loads(str(arrays["meta.extra"]))
        except (KeyError, ValueError) as err:
            raise ValueError(f"entry 'meta.extra': expected a JSON object ({err})") from None
        if not isinstance(extra, dict):
            raise ValueError(f"entry 'meta.extra': expected a JSON object, got "
                             f"{type(extra).__name__}")
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{os.fspath(path)}: {err}") from None
    for assign in assignments:
        assign()
    return {"step": int(step), "extra": extra}


@contextlib.contextmanager
def quiet_divergence():
    """Silence the warnings a diverging run produces (overflow, non-finite BN statistics);
    divergence is detected from the loss instead."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
