"""One rank of the SyncBatchNorm test (tests/test_torch_sync.py starts WORLD of them).

usage: python sync_worker.py RANK WORLD PORT OUT_DIR ROWS   (ROWS: rows per rank, "4,0,3")

Each rank takes its rows of one global batch (global_batches below), runs fastbn.torch's
SyncBatchNorm over gloo on 127.0.0.1 for a few training steps and one eval step, and saves
what it saw (outputs, input and parameter gradients, buffers) to OUT_DIR/rank<RANK>.pt. Then
one rank passes a tensor with the wrong channel count and every rank must raise the same
DistributedError with its buffers unchanged.
"""
import os
import sys

import torch
import torch.distributed as dist

CHANNELS = 3
STEPS = ({"memory_format": None}, {"memory_format": torch.channels_last}, {"momentum": None})


def global_batches(total_rows, steps=len(STEPS) + 1):
    """(x, dy) per step, identical in every process: float32 with a large mean."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(steps):
        x = torch.randn(total_rows, CHANNELS, 3, 5, generator=generator) * 2 + 100
        dy = torch.randn(total_rows, CHANNELS, 3, 5, generator=generator)
        batches.append((x, dy))
    return batches


def initial_state():
    generator = torch.Generator().manual_seed(99)
    return {"weight": torch.rand(CHANNELS, generator=generator) + 0.5,
            "bias": torch.randn(CHANNELS, generator=generator)}


def main():
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    rows = [int(r) for r in sys.argv[5].split(",")]
    torch.set_num_threads(1)
    import fastbn
    import fastbn.torch as fbt
    from fastbn.distributed import DistributedError
    fastbn.set_backend(os.environ.get("FASTBN_TEST_BACKENDS", "cpu").split(",")[0])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    start, stop = sum(rows[:rank]), sum(rows[:rank + 1])
    module = fbt.SyncBatchNorm(CHANNELS)
    with torch.no_grad():
        for name, value in initial_state().items():
            getattr(module, name).copy_(value)
    saved = {"steps": []}
    batches = global_batches(sum(rows))
    for step, options in enumerate(STEPS):
        x, dy = (t[start:stop] for t in batches[step])
        if options.get("memory_format") is not None:
            x = x.contiguous(memory_format=options["memory_format"])
        module.momentum = options.get("momentum", 0.1)
        module.weight.grad = module.bias.grad = None
        x = x.clone().requires_grad_()
        y = module(x)
        y.backward(dy)
        saved["steps"].append({"y": y.detach(), "dx": x.grad, "weight_grad": module.weight.grad,
                               "bias_grad": module.bias.grad,
                               "buffers": {k: v.clone() for k, v in module.named_buffers()}})
    module.eval()
    x = batches[-1][0][start:stop]
    saved["eval_y"] = module(x).detach()
    module.train()

    before = {k: v.clone() for k, v in module.state_dict().items()}
    bad = torch.randn(2, CHANNELS + (rank == world - 1), 3, 5)
    try:
        module(bad)
        saved["error"] = None
    except DistributedError as exc:
        saved["error"] = str(exc)
    saved["unchanged_after_error"] = all(torch.equal(v, before[k])
                                         for k, v in module.state_dict().items())
    torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    # every rank done with its collectives before any tears gloo down (a rank whose peers
    # closed their connections first can abort: "terminate called without an active
    # exception", seen once in CI under load)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
