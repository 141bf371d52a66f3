"""Run under ``mpiexec -n K python -m mpi4py tests/mpi/check_trainer.py DIR`` (K = 2 or 3).

The data-parallel ``fastbn.nn`` API against a single process, on a small float64 network whose
global batch of 25 rows splits unevenly (13/12, 9/8/8): ``Trainer(..., comm=comm)`` (the
sampler's global batches, the rows of each rank, the global loss, synchronized BatchNorm, the
gradient sum), ``evaluate(..., comm=comm)``, Algorithm 2 over shards, checkpoints written by
rank 0 into DIR and broadcast on load, and the errors raised alike on every rank. Each rank
collects failed checks instead of raising; rank 0 prints them all. Exit status 0 when every
check passed on every rank.
"""
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

from fastbn import distributed, nn

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
failures = []
F64 = np.float64
BATCH = 25

data = np.random.default_rng(0)
X = data.standard_normal((80, 6)) * 2 + 1
Y = data.integers(0, 3, 80)


def check(ok, what):
    if not ok:
        failures.append(f"rank {rank}: {what}")


def close(got, want, what, rtol=1e-9, atol=1e-12):
    got, want = np.asarray(got, dtype=F64), np.asarray(want, dtype=F64)
    err = np.abs(got - want)
    check(bool((err <= atol + rtol * np.abs(want)).all()),
          f"{what}: max error {err.max() if err.size else 0:.3g}")


def same_on_every_rank(value, what):
    value = np.asarray(value)
    blobs = comm.allgather((value.dtype.str, value.shape, value.tobytes()))
    check(all(b == blobs[0] for b in blobs), f"{what}: differs across ranks (bits)")


def build(comm, seed=1):
    r = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(6, 5, bias=False, rng=r, dtype=F64),
                         nn.BatchNorm(5, dtype=F64, comm=comm), nn.Sigmoid(),
                         nn.Linear(5, 3, rng=r, dtype=F64))


def trainer(comm, seed=1, rng_seed=7):
    model = build(comm, seed)
    optimizer = nn.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    return nn.Trainer(model, optimizer, X, Y, batch_size=BATCH,
                      rng=np.random.default_rng(rng_seed), comm=comm)


def raises_everywhere(fn, error, *fragments):
    """fn() must raise ``error`` on this rank (and so on every rank) with every fragment in
    its message."""
    try:
        fn()
    except error as exc:
        missing = [f for f in fragments if f not in str(exc)]
        check(not missing, f"{error.__name__} {exc!s} lacks {missing}")
    except Exception as exc:   # noqa: BLE001 - reported, not raised: the others must go on
        check(False, f"expected {error.__name__}, got {type(exc).__name__}: {exc}")
    else:
        check(False, f"expected {error.__name__}, nothing raised")


def check_training(directory):
    parallel, single = trainer(comm), trainer(None)
    start, stop = distributed.shard(BATCH, comm)
    check(parallel.rows == slice(start, stop), f"rows {parallel.rows}, shard {start, stop}")
    for step in range(6):
        loss_parallel, loss_single = parallel.step(), single.step()
        close(loss_parallel, loss_single, f"loss of step {step}", rtol=1e-12)
        same_on_every_rank(loss_parallel, f"loss of step {step}")
    for (name, a), b in zip(parallel.model.state_dict().items(),
                            single.model.state_dict().values()):
        close(a, b, f"after 6 steps: {name}")
        same_on_every_rank(a, f"after 6 steps: {name}")
    for i, (a, b) in enumerate(zip(parallel.optimizer.velocity, single.optimizer.velocity)):
        close(a, b, f"velocity {i}")

    accuracy, loss = nn.evaluate(parallel.model, X, Y, batch_size=7, comm=comm)
    want_accuracy, want_loss = nn.evaluate(single.model, X, Y)
    check(accuracy == want_accuracy, f"evaluate: accuracy {accuracy} != {want_accuracy}")
    close(loss, want_loss, "evaluate: loss", rtol=1e-12)
    same_on_every_rank([accuracy, loss], "evaluate")

    # checkpoints: rank 0 writes; every rank resumes from it exactly
    path = Path(directory) / "ckpt.npz"
    parallel.save(path, extra={"ranks": size})
    check(path.exists(), "the checkpoint is not there after save")
    resumed = trainer(comm, seed=99)
    meta = resumed.load(path)
    check(meta == {"step": 6, "extra": {"ranks": size}}, f"load returned {meta}")
    for _ in range(3):
        close(resumed.step(), parallel.step(), "resumed loss", rtol=0, atol=0)
        single.step()
    for (name, a), b in zip(resumed.model.state_dict().items(),
                            parallel.model.state_dict().values()):
        check(np.array_equal(a, b), f"resumed {name} differs")
    raises_everywhere(lambda: resumed.load(Path(directory) / "missing.npz"),
                      distributed.DistributedError, "Trainer.load failed on rank 0 of")
    raises_everywhere(lambda: parallel.save(Path(directory) / "no-dir" / "c.npz"),
                      distributed.DistributedError, "Trainer.save failed on rank 0 of")

    # Algorithm 2 over each rank's rows of every batch == over the whole batches
    batches = [X[i:i + BATCH] for i in range(0, len(X) - BATCH + 1, BATCH)]
    nn.recompute_population_stats(parallel.model, [b[start:stop] for b in batches])
    nn.recompute_population_stats(single.model, batches)
    for (name, a), b in zip(parallel.model.state_dict().items(),
                            single.model.state_dict().values()):
        if "running" in name:
            close(a, b, f"Algorithm 2: {name}")


def check_errors():
    # a model whose BatchNorm is not synchronized would silently train a different model
    raises_everywhere(lambda: nn.Trainer(build(None), nn.SGD(build(None).parameters(), lr=0.1),
                                         X, Y, batch_size=BATCH,
                                         rng=np.random.default_rng(7), comm=comm),
                      distributed.DistributedError, "Trainer failed on rank",
                      "BatchNorm(..., comm=comm)", "comm=None in 1")
    # one rank drawing different batches
    raises_everywhere(lambda: trainer(comm, rng_seed=7 + (rank == size - 1)),
                      distributed.DistributedError, "random generator states",
                      "differ across ranks")
    # one rank with a batch larger than its data: the error names it on every rank
    raises_everywhere(lambda: nn.Trainer(build(comm), nn.SGD(build(comm).parameters(), lr=0.1),
                                         X if rank else X[:20], Y if rank else Y[:20],
                                         batch_size=BATCH, rng=np.random.default_rng(7),
                                         comm=comm),
                      distributed.DistributedError, f"Trainer failed on rank 0 of {size}",
                      "batch_size")
    # a loss divided by the local batch size would scale the gradients by the wrong factor
    model = build(comm)
    raises_everywhere(lambda: nn.train_step(model, nn.SGD(model.parameters(), lr=0.1), X[:3],
                                            Y[:3], comm=comm),
                      ValueError, "total_batch_size")
    # allreduce_gradients() on top of comm would sum the gradients twice
    raises_everywhere(lambda: nn.train_step(model, nn.SGD(model.parameters(), lr=0.1), X[:3],
                                            Y[:3], loss_fn=nn.SoftmaxCrossEntropy(BATCH),
                                            grad_hook=nn.allreduce_gradients(comm), comm=comm),
                      ValueError, "summed over the ranks")
    # the communicator still works after all of these
    check(comm.allreduce(1) == size, "the communicator is broken after the errors")


def main():
    check_training(sys.argv[1])
    check_errors()
    everything = comm.gather(failures, root=0)
    if rank == 0:
        flat = [f for per_rank in everything for f in per_rank]
        for line in flat:
            print("FAIL", line)
        print(f"check_trainer: {size} ranks, {len(flat)} failures")
    return 1 if comm.allreduce(len(failures)) else 0


if __name__ == "__main__":
    sys.exit(main())
