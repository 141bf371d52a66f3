"""fastbn.torch.SyncBatchNorm over gloo with 2 and 3 processes on 127.0.0.1: every rank's
results equal one process running torch.nn.BatchNorm2d on the whole batch, and the running
statistics are the same bits on every rank (tests/torch_dist/sync_worker.py is one rank)."""
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

WORKER = Path(__file__).parent / "torch_dist" / "sync_worker.py"
TIMEOUT_S = 120


def _load_worker():
    spec = importlib.util.spec_from_file_location("sync_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(rows, out_dir):
    world = len(rows)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1")
    port = str(_free_port())
    processes = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), port,
                                   str(out_dir), ",".join(map(str, rows))], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in range(world)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{output}"
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]


def assert_close(actual, expected, what, rtol=1e-5):
    atol = rtol * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("rows", [(5, 3), (4, 0, 3)], ids=["2-ranks", "3-ranks-one-empty"])
def test_sync_batch_norm_equals_one_process(rows, tmp_path):
    results = run_ranks(rows, tmp_path)
    reference = nn.BatchNorm2d(worker.CHANNELS)
    with torch.no_grad():
        for name, value in worker.initial_state().items():
            getattr(reference, name).copy_(value)
    batches = worker.global_batches(sum(rows))
    for step, options in enumerate(worker.STEPS):
        x, dy = batches[step]
        reference.momentum = options.get("momentum", 0.1)
        reference.zero_grad()
        x = x.clone().requires_grad_()
        y = reference(x)
        y.backward(dy)
        what = f"step {step}"
        assert_close(torch.cat([r["steps"][step]["y"] for r in results]), y.detach(),
                     f"{what}: y")
        assert_close(torch.cat([r["steps"][step]["dx"] for r in results]), x.grad,
                     f"{what}: dx")
        # each rank's parameter gradients are its own sums (DDP reduces them)
        for name, grad in (("weight_grad", reference.weight.grad),
                           ("bias_grad", reference.bias.grad)):
            assert_close(sum(r["steps"][step][name] for r in results), grad, f"{what}: {name}")
        for name, buffer in reference.named_buffers():
            for rank, result in enumerate(results):
                got = result["steps"][step]["buffers"][name]
                assert torch.equal(got, results[0]["steps"][step]["buffers"][name]), \
                    f"{what}: {name} differs between rank 0 and rank {rank}"
            if buffer.is_floating_point():
                assert_close(results[0]["steps"][step]["buffers"][name], buffer,
                             f"{what}: {name}")
            else:
                assert torch.equal(results[0]["steps"][step]["buffers"][name], buffer)
    reference.eval()
    assert_close(torch.cat([r["eval_y"] for r in results]), reference(batches[-1][0]).detach(),
                 "eval y")
    world = len(rows)
    for rank, result in enumerate(results):
        assert result["error"] is not None and f"rank {world - 1} of {world}" in result["error"]
        assert result["unchanged_after_error"], f"rank {rank}: buffers changed on error"
