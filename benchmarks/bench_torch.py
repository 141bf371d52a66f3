"""fastbn.torch against PyTorch's own batch norm on the CPU, same threads.

Two parts, each timed in interleaved rounds (every variant once per round, so load on a shared
machine hits them alike) after warm-up, reported as medians:

* model: a ResNet-style CNN (``resnet_cnn``: stem + 4 BasicBlocks, 64x3x32x32 batches). One
  training step = forward, cross-entropy, backward, SGD update; one inference step = eval-mode
  forward under ``torch.inference_mode``. PyTorch's BN against ``fastbn.torch.convert(model)``
  (BN->ReLU and BN->add->ReLU fused), in NCHW and channels_last.
* layers: one BatchNorm2d, forward (training mode) and backward, ``torch.nn.BatchNorm2d`` against
  ``fastbn.torch.BatchNorm2d``, on the feature maps of that model; and a BatchNorm1d on an MLP
  batch of 60x100, where the per-call overhead (dispatch, validation) dominates.

Ratios are PyTorch time / fastbn time: 1.00x = equal, higher = fastbn faster.

    python -m benchmarks.bench_torch [--threads N] [--rounds 30] [--batch 64] [--quick]
                                     [--json benchmarks/results/torch.json]
    python -m benchmarks.bench_torch --table benchmarks/results/torch.json   # Markdown
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# the machine

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads):
    import numba
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
            "numba_threading_layer": _threading_layer(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "threads_requested": threads,
            "load_average_at_start": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git("rev-parse", "HEAD")}


def _threading_layer():
    import numba
    try:
        return numba.threading_layer()
    except ValueError:
        return None  # no parallel kernel has run yet


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        return None


def set_threads(threads):
    import numba
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


# ----------------------------------------------------------------------------------------------
# the model

class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock."""

    def __init__(self, channels_in, channels_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.downsample = None
        if stride != 1 or channels_in != channels_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet_cnn(width=16, classes=10):
    """A CIFAR-sized ResNet: 32x32 maps with `width` channels, then 2x and 4x at 16x16, 8x8."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        BasicBlock(width, width), BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 4 * width, 2), BasicBlock(4 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(variants, rounds, warmup):
    """{name: median seconds} of each zero-argument callable, run once per round in turn."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(s) for name, s in samples.items()}, samples


def model_variants(batch, width, memory_format):
    import fastbn.torch as fbt
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=generator).to(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    torch.manual_seed(0)
    reference = resnet_cnn(width)
    converted = resnet_cnn(width)
    converted.load_state_dict(reference.state_dict())
    converted = fbt.convert(converted)
    variants = {}
    for name, model in (("torch", reference), ("fastbn", converted)):
        model = model.to(memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def train_step(model=model, optimizer=optimizer):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()

        def inference_step(model=model):
            model.eval()
            with torch.inference_mode():
                model(x)
        variants[f"train/{name}"] = train_step
        variants[f"inference/{name}"] = inference_step
    return variants


def layer_variants(shape, memory_format):
    import fastbn.torch as fbt
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator).to(memory_format=memory_format)
    dy = torch.randn(shape, generator=generator).to(memory_format=memory_format)
    torch_cls, fast_cls = ((nn.BatchNorm2d, fbt.BatchNorm2d) if len(shape) == 4
                           else (nn.BatchNorm1d, fbt.BatchNorm1d))
    variants = {}
    for name, module in (("torch", torch_cls(shape[1])), ("fastbn", fast_cls(shape[1]))):
        x_grad = x.clone().requires_grad_()
        graph = {"y": module(x_grad)}

        def forward(module=module, x_grad=x_grad, graph=graph):
            graph["y"] = module(x_grad)

        def backward(module=module, x_grad=x_grad, graph=graph):
            torch.autograd.grad(graph["y"], (x_grad, module.weight, module.bias), dy,
                                retain_graph=True)
        variants[f"forward/{name}"] = forward
        variants[f"backward/{name}"] = backward
    return variants


def ratio(medians, kind):
    return medians[f"{kind}/torch"] / medians[f"{kind}/fastbn"]


FORMATS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def table(results):
    """The results as the Markdown tables of docs/torch.md."""
    m = results["machine"]
    lines = [f"Machine: {m['cpu']} ({m['usable_cpus']} CPUs), {m['torch_threads']} torch threads, "
             f"{m['numba_threads']} numba threads ({m['numba_threading_layer']}), torch "
             f"{m['torch']}, numba {m['numba']}, {m['date']}. Batch "
             f"{'x'.join(map(str, results['method']['input']))}, medians of "
             f"{results['method']['rounds']} interleaved rounds. × = PyTorch time / fastbn "
             f"time (higher = fastbn faster).", "",
             "| ResNet-style CNN | PyTorch BN | `convert` | × | inference PyTorch | "
             "inference `convert` | × |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["model"]:
        lines.append(f"| train step, {row['layout']} | {row['train/torch_ms']:.1f} ms | "
                     f"{row['train/fastbn_ms']:.1f} ms | **{row['train_speedup']:.2f}x** | "
                     f"{row['inference/torch_ms']:.1f} ms | {row['inference/fastbn_ms']:.1f} ms | "
                     f"{row['inference_speedup']:.2f}x |")
    lines += ["", "| one BN layer | fwd PyTorch | fwd fastbn | × | bwd PyTorch | bwd fastbn | × |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["layers"]:
        lines.append(f"| {'×'.join(map(str, row['shape']))} {row['layout']} | "
                     f"{row['forward/torch_us']:.0f} µs | {row['forward/fastbn_us']:.0f} µs | "
                     f"{row['forward_speedup']:.2f}x | {row['backward/torch_us']:.0f} µs | "
                     f"{row['backward/fastbn_us']:.0f} µs | {row['backward_speedup']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and 2 rounds: a smoke test, not a measurement")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--table", metavar="JSON", default=None,
                        help="print the Markdown tables of a results file, run nothing")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return None
    if args.quick:
        args.rounds, args.warmup, args.batch, args.width = 2, 1, 4, 4
    set_threads(args.threads)
    if not args.quick:
        import fastbn
        fastbn.warmup()  # load (or compile) every kernel now; the warm-up rounds do the rest
    results = {"method": {"rounds": args.rounds, "warmup": args.warmup, "batch": args.batch,
                          "width": args.width, "input": [args.batch, 3, 32, 32],
                          "statistic": "median of interleaved rounds",
                          "ratio": "torch time / fastbn time (higher = fastbn faster)"},
               "model": [], "layers": []}
    for format_name, memory_format in FORMATS.items():
        medians, _ = interleaved(model_variants(args.batch, args.width, memory_format),
                                 args.rounds, args.warmup)
        row = {"layout": format_name, **{f"{k}_ms": 1e3 * v for k, v in medians.items()},
               "train_speedup": ratio(medians, "train"),
               "inference_speedup": ratio(medians, "inference")}
        results["model"].append(row)
        print(f"model {format_name:13s} train {row['train/torch_ms']:8.2f} ms torch "
              f"{row['train/fastbn_ms']:8.2f} ms fastbn {row['train_speedup']:.2f}x | inference "
              f"{row['inference/torch_ms']:7.2f} / {row['inference/fastbn_ms']:7.2f} ms "
              f"{row['inference_speedup']:.2f}x", flush=True)
    width = args.width
    shapes = [(args.batch, width, 32, 32), (args.batch, 2 * width, 16, 16),
              (args.batch, 4 * width, 8, 8), (60, 100)]
    for shape in shapes:
        formats = FORMATS if len(shape) == 4 else {"NC": torch.contiguous_format}
        for format_name, memory_format in formats.items():
            medians, _ = interleaved(layer_variants(shape, memory_format), 3 * args.rounds,
                                     args.warmup)
            row = {"shape": list(shape), "layout": format_name,
                   **{f"{k}_us": 1e6 * v for k, v in medians.items()},
                   "forward_speedup": ratio(medians, "forward"),
                   "backward_speedup": ratio(medians, "backward")}
            results["layers"].append(row)
            print(f"layer {'x'.join(map(str, shape)):14s} {format_name:13s} fwd "
                  f"{row['forward/torch_us']:8.1f} / {row['forward/fastbn_us']:8.1f} us "
                  f"{row['forward_speedup']:.2f}x | bwd {row['backward/torch_us']:8.1f} / "
                  f"{row['backward/fastbn_us']:8.1f} us {row['backward_speedup']:.2f}x",
                  flush=True)
    results["machine"] = machine(args.threads)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    return results


if __name__ == "__main__":
    main()
