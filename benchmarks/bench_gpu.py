"""GPU benchmark: fastbn's cuda backend against PyTorch on the same GPU and a device-to-device copy.

    python -m benchmarks.bench_gpu --out benchmarks/results/gpu.json --md docs/cuda_benchmark.md
    python -m benchmarks.bench_gpu --quick --out /tmp/gpu_quick.json        # a fast sanity run
    python -m benchmarks.bench_gpu --render benchmarks/results/gpu.json    # JSON -> markdown
    NUMBA_ENABLE_CUDASIM=1 python -m benchmarks.bench_gpu --shape 2,3,4,5 --reps 1 --out /tmp/s.json

Method (docs/cuda.md):

* Cases: the batch-norm shapes of ResNet-50 (N=256) in NCHW and NHWC memory, float32 and float16,
  and an MLP batch (60, 100) whose cost is launch overhead. Operations: fwd-train (batch
  statistics, normalization, running-statistics update), eval, backward (dx, dgamma, dbeta).
* Variants: ``fastbn`` (the public API on numba device arrays viewing the same memory as the
  PyTorch tensors, outputs preallocated, gamma/beta/running statistics in float32 as PyTorch
  keeps them), ``fastbn-torch`` (the call users make: PyTorch tensors in, fresh outputs),
  ``fastbn-graph`` (the ``fastbn`` calls captured once in a CUDA graph with
  ``torch.cuda.graph`` and replayed: the capture test, and the time without host launch cost),
  ``torch`` (``torch.nn.functional.batch_norm``, and its autograd backward: cuDNN or ATen, as
  PyTorch picks) and ``copy`` (a device-to-device copy of x, the memory floor).
* Every variant is validated against the NumPy float64 reference before it is timed (on three
  channels of the case: every channel is computed independently, so this checks the launch
  configuration the full case uses without a float64 copy of 800 MB tensors).
* Timing: CUDA events on the stream the variant launches on, around one call, after warm-up
  (compilation, cuDNN autotuning), repeated; the median is reported. ``host_us`` is the median
  host time of the call itself (launching, not waiting): the launch overhead, which bounds small
  tensors such as the MLP batch.
* Bytes: ``gbps`` counts the bytes an operation must move (fwd-train and eval: read x, write y;
  backward: read x and dy, write dx); ``copy_fraction`` is that rate over the copy's rate
  (2 * nbytes(x) / t_copy) measured in the same run. ``torch_ratio`` = t_torch / t_fastbn
  (above 1: fastbn is faster).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fastbn  # noqa: E402

OPS = ("fwd-train", "eval", "backward")
EPS, MOMENTUM = 1e-5, 0.1
RTOL = {"float16": 4e-3, "float32": 2e-5, "float64": 1e-10}
RESNET50 = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 1024, 14, 14), (256, 2048, 7, 7)]
MLP = (60, 100)
QUICK = [(32, 64, 56, 56), (32, 512, 7, 7)]
# bytes each operation must move, in units of nbytes(x)
MUST_MOVE = {"fwd-train": 2, "eval": 2, "backward": 3}


class Case:
    """One tensor shape in one memory layout and dtype (axis 1 is always the channel axis)."""

    def __init__(self, shape, layout, dtype):
        self.shape = tuple(int(s) for s in shape)
        self.layout = layout              # "NCHW", "NHWC" (channels-last memory) or "NC"
        self.dtype = dtype

    @property
    def label(self):
        return f"{'x'.join(map(str, self.shape))} {self.layout} {self.dtype}"

    @property
    def channels(self):
        return self.shape[1]


def cases(quick=False, shapes=None, dtypes=("float32", "float16")):
    if shapes:
        base = shapes
    else:
        base = QUICK if quick else RESNET50
    out = []
    for shape in base:
        layouts = ("NCHW", "NHWC") if len(shape) == 4 else ("NC",)
        for layout in layouts:
            for dtype in dtypes:
                out.append(Case(shape, layout, dtype))
    if not shapes:
        out += [Case(MLP, "NC", dtype) for dtype in dtypes]
    return out


# ----------------------------------------------------------------------------------------------
# the machine

def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def machine():
    from numba import cuda
    import numba
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "numpy": np.__version__, "numba": numba.__version__, "fastbn": fastbn.__version__,
        "simulator": os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"),
    }
    try:
        from importlib.metadata import version
        info["numba_cuda"] = version("numba-cuda")
    except Exception:                                          # pragma: no cover
        info["numba_cuda"] = None
    device = cuda.get_current_device()
    name = getattr(device, "name", "numba CUDA simulator")
    info["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
    info["compute_capability"] = list(getattr(device, "compute_capability", ()))
    if not info["simulator"]:
        from numba.cuda.cudadrv import driver
        info["driver_cuda_version"] = list(driver.driver.get_version())
        try:
            info["cuda_runtime_version"] = list(cuda.runtime.get_version())
        except Exception:                                      # pragma: no cover
            info["cuda_runtime_version"] = None
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    torch = _torch_cuda()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        try:
            import torch as cpu_torch
            info["torch"] = cpu_torch.__version__ + " (no CUDA: PyTorch not compared)"
        except ImportError:
            info["torch"] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip()
    except OSError:                                            # pragma: no cover
        pass
    from fastbn import _config
    info["launch_config"] = {k: getattr(_config, k) for k in dir(_config)
                             if k.startswith("CUDA_")}
    return info


# ----------------------------------------------------------------------------------------------
# data on the device

class Tensors:
    """The case's device tensors, shared by every variant (PyTorch tensors when PyTorch has
    CUDA, numba device arrays otherwise), and host copies of a few channels for validation."""

    def __init__(self, case, seed=0):
        from numba import cuda
        self.case = case
        self.torch = _torch_cuda()
        channels = case.channels
        self.check_channels = sorted({0, channels // 2, channels - 1})
        rng = np.random.default_rng(seed)
        self.gamma = rng.uniform(0.5, 1.5, channels).astype(np.float32)
        self.beta = rng.standard_normal(channels).astype(np.float32)
        self.running_mean = rng.standard_normal(channels).astype(np.float32) * 0.1
        self.running_var = rng.uniform(0.5, 2.0, channels).astype(np.float32)
        if self.torch is not None:
            torch = self.torch
            gen = torch.Generator(device="cuda").manual_seed(seed)
            dtype = getattr(torch, case.dtype)
            fmt = torch.channels_last if case.layout == "NHWC" else torch.contiguous_format
            x = torch.randn(case.shape, device="cuda", generator=gen, dtype=torch.float32)
            self.x = (x * 2.0 + 0.5).to(dtype).contiguous(memory_format=fmt)
            self.dy = torch.randn(case.shape, device="cuda", generator=gen,
                                  dtype=torch.float32).to(dtype).contiguous(memory_format=fmt)
            self.d_x, self.d_dy = cuda.as_cuda_array(self.x), cuda.as_cuda_array(self.dy)
        else:
            x = (rng.standard_normal(case.shape) * 2.0 + 0.5).astype(case.dtype)
            dy = rng.standard_normal(case.shape).astype(case.dtype)
            if case.layout == "NHWC":
                x, dy = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, dy))
            self.x_bytes = np.frombuffer(x.tobytes(), np.uint8)     # what the copy copies
            if case.layout == "NHWC":
                self.d_x = _permuted(cuda.to_device(x), (0, 3, 1, 2))
                self.d_dy = _permuted(cuda.to_device(dy), (0, 3, 1, 2))
            else:
                self.d_x, self.d_dy = cuda.to_device(x), cuda.to_device(dy)
            self.x, self.dy = self.d_x, self.d_dy
        self.nbytes = int(np.prod(case.shape)) * np.dtype(case.dtype).itemsize
        self.host_x = self.channels_to_host(self.d_x)
        self.host_dy = self.channels_to_host(self.d_dy)

    def channels_to_host(self, a):
        """The check channels of an x-shaped (or (C,)-shaped) device array, as float64."""
        index = self.check_channels
        if self.torch is not None:
            t = self.torch.as_tensor(a, device="cuda")
            select = self.torch.tensor(index, device="cuda")
            return t.index_select(0 if t.dim() == 1 else 1, select).float().cpu().numpy()\
                .astype(np.float64)
        host = a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)
        return np.take(host, index, axis=0 if host.ndim == 1 else 1).astype(np.float64)


def _permuted(device_array, perm):
    """A zero-copy view of a numba device array with permuted axes."""
    from fastbn.backends import cuda as cuda_backend
    shape = tuple(device_array.shape[p] for p in perm)
    strides = tuple(device_array.strides[p] for p in perm)
    return cuda_backend._view(device_array, shape, strides)


# ----------------------------------------------------------------------------------------------
# the variants: {op: callable} for one case; each callable returns its outputs

def fastbn_variant(t, stream=None):
    """The public API on numba device arrays, preallocated outputs; ``stream``: an integer
    handle every launch goes to (None: the default stream)."""
    from numba import cuda
    be = fastbn.backends.load("cuda")
    sdtype = fastbn.stats_dtype(t.case.dtype)
    gamma = cuda.to_device(t.gamma.astype(sdtype))
    beta = cuda.to_device(t.beta.astype(sdtype))
    running_mean = cuda.to_device(t.running_mean.astype(sdtype))
    running_var = cuda.to_device(t.running_var.astype(sdtype))
    eval_mean = cuda.to_device(t.running_mean.astype(sdtype))
    eval_var = cuda.to_device(t.running_var.astype(sdtype))
    y, dx = be.empty_like(t.d_x), be.empty_like(t.d_x)
    # every output preallocated: a call inside a CUDA graph capture must not allocate
    mean, invstd, dgamma, dbeta, eval_mean_out, eval_invstd_out = (
        cuda.device_array(t.case.channels, sdtype) for _ in range(6))
    saved = fastbn.batch_norm_forward(t.d_x, gamma, beta, eps=EPS, stream=stream)

    def fwd_train():
        return fastbn.batch_norm_forward(t.d_x, gamma, beta, eps=EPS, training=True,
                                         running_mean=running_mean, running_var=running_var,
                                         momentum=MOMENTUM, out=(y, mean, invstd), stream=stream)

    def eval_():
        return fastbn.batch_norm_forward(t.d_x, gamma, beta, eps=EPS, training=False,
                                         running_mean=eval_mean, running_var=eval_var,
                                         out=(y, eval_mean_out, eval_invstd_out), stream=stream)

    def backward():
        return fastbn.batch_norm_backward(t.d_dy, t.d_x, saved.mean, saved.invstd, gamma,
                                          out=(dx, dgamma, dbeta), stream=stream)

    return {"fwd-train": fwd_train, "eval": eval_, "backward": backward}


def fastbn_torch_variant(t):
    """The call users make: PyTorch tensors in, no out= (fresh outputs every call)."""
    torch = t.torch
    gamma, beta = torch.as_tensor(t.gamma, device="cuda"), torch.as_tensor(t.beta, device="cuda")
    running_mean = torch.as_tensor(t.running_mean, device="cuda").clone()
    running_var = torch.as_tensor(t.running_var, device="cuda").clone()
    saved = fastbn.batch_norm_forward(t.x, gamma, beta, eps=EPS)

    def fwd_train():
        return fastbn.batch_norm_forward(t.x, gamma, beta, eps=EPS, running_mean=running_mean,
                                         running_var=running_var, momentum=MOMENTUM)

    def eval_():
        return fastbn.batch_norm_forward(t.x, gamma, beta, eps=EPS, training=False,
                                         running_mean=running_mean, running_var=running_var)[:1]

    def backward():
        return fastbn.batch_norm_backward(t.dy, t.x, saved.mean, saved.invstd, gamma)

    return {"fwd-train": fwd_train, "eval": eval_, "backward": backward}


class GraphVariant:
    """The fastbn calls captured in a CUDA graph (torch.cuda.graph) on a side stream: replaying
    it is one host call. Capturing at all checks that an operation makes no host wait, no
    device-to-host copy and no launch outside the capturing stream."""

    def __init__(self, t):
        torch = t.torch
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self.fns = fastbn_variant(t, stream=self.stream.cuda_stream)
        self.graphs, self.outputs, self.errors = {}, {}, {}
        for op, fn in self.fns.items():
            try:
                with torch.cuda.stream(self.stream):
                    fn()                      # compile and create the scratch before capture
                self.stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self.outputs[op] = tuple(fn())
                self.graphs[op] = graph
            except Exception as exc:  # noqa: BLE001 - report the capture failure per op
                self.errors[op] = f"{type(exc).__name__}: {exc}"

    def variant(self):
        def replay(op):
            def run():
                if op in self.errors:
                    raise RuntimeError(f"capture failed: {self.errors[op]}")
                self.graphs[op].replay()
                return self.outputs[op]
            return run
        return {op: replay(op) for op in self.fns}


def torch_variant(t):
    torch = t.torch
    import torch.nn.functional as F
    gamma, beta = torch.as_tensor(t.gamma, device="cuda"), torch.as_tensor(t.beta, device="cuda")
    running_mean = torch.as_tensor(t.running_mean, device="cuda").clone()
    running_var = torch.as_tensor(t.running_var, device="cuda").clone()
    eval_mean = torch.as_tensor(t.running_mean, device="cuda")
    eval_var = torch.as_tensor(t.running_var, device="cuda")
    x_grad = t.x.detach().clone().requires_grad_(True)
    gamma_grad = gamma.clone().requires_grad_(True)
    beta_grad = beta.clone().requires_grad_(True)
    y_graph = F.batch_norm(x_grad, running_mean.clone(), running_var.clone(), gamma_grad,
                           beta_grad, training=True, momentum=MOMENTUM, eps=EPS)

    def fwd_train():
        with torch.no_grad():
            return (F.batch_norm(t.x, running_mean, running_var, gamma, beta, training=True,
                                 momentum=MOMENTUM, eps=EPS),)

    def eval_():
        with torch.no_grad():
            return (F.batch_norm(t.x, eval_mean, eval_var, gamma, beta, training=False,
                                 momentum=MOMENTUM, eps=EPS),)

    def backward():
        return torch.autograd.grad(y_graph, (x_grad, gamma_grad, beta_grad), t.dy,
                                   retain_graph=True)

    return {"fwd-train": fwd_train, "eval": eval_, "backward": backward}


def copy_variant(t):
    """A device-to-device copy of x (read nbytes, write nbytes)."""
    if t.torch is not None:
        target = t.torch.empty_like(t.x)

        def copy():
            return (target.copy_(t.x),)
    else:
        from numba import cuda
        source = cuda.to_device(t.x_bytes)
        target = cuda.device_array(t.nbytes, np.uint8)

        def copy():
            target.copy_to_device(source)
            return (target,)
    return {op: copy for op in OPS}


# ----------------------------------------------------------------------------------------------
# validation and timing

def validate(t, op, outputs, variant):
    """Compare the check channels of a variant's outputs with the float64 reference; returns the
    worst error relative to the tolerance (<= 1 passes)."""
    case = t.case
    x, dy = t.host_x, t.host_dy
    index = t.check_channels
    gamma, beta = t.gamma[index].astype(np.float64), t.beta[index].astype(np.float64)
    rtol = RTOL[case.dtype]
    ref = fastbn.batch_norm_forward(x, gamma, beta, eps=EPS, backend="reference")
    if op == "fwd-train":
        expected = [ref.y, ref.mean, ref.invstd][:len(outputs)]
    elif op == "eval":
        rm = t.running_mean[index].astype(np.float64)
        rv = t.running_var[index].astype(np.float64)
        expected = [fastbn.batch_norm_forward(x, gamma, beta, eps=EPS, training=False,
                                              running_mean=rm, running_var=rv,
                                              backend="reference").y]
    else:
        grads = fastbn.batch_norm_backward(dy, x, ref.mean, ref.invstd, gamma,
                                           backend="reference")
        expected = [grads.dx, grads.dgamma, grads.dbeta]
    if variant == "copy":
        if t.torch is None:         # a byte buffer: it must equal x's bytes
            return 0.0 if np.array_equal(outputs[0].copy_to_host(), t.x_bytes) else np.inf
        got = [t.channels_to_host(outputs[0])]
        expected = [x]
    else:
        got = [t.channels_to_host(o) for o in outputs[:len(expected)]]
    worst = 0.0
    for g, e in zip(got, expected):
        scale = max(float(np.max(np.abs(e))), 1.0)
        if e.ndim == 1 and op == "backward":        # dgamma, dbeta: sums over the channel
            scale *= x.size // len(index) if x.ndim > 1 else 1
        error = np.abs(g - e) / (rtol * np.abs(e) + 4 * rtol * scale)
        worst = max(worst, float(np.max(error)) if error.size else 0.0)
    return worst


def time_cuda(fn, reps, warmup, stream=None):
    """(median, min) milliseconds of fn() between two CUDA events on ``stream`` (a numba stream;
    None: the default stream), and the median host microseconds of the call itself. Under the
    simulator, which records no event times, the event time is host wall time: meaningless."""
    from numba import cuda
    from fastbn.backends import cuda as cuda_backend
    for _ in range(warmup):
        fn()
    cuda.synchronize()
    start, end = cuda.event(), cuda.event()
    samples, host = [], []
    record_on = stream if stream is not None else 0
    for _ in range(reps):
        wall = time.perf_counter()
        start.record(record_on)
        called = time.perf_counter()
        fn()
        host.append((time.perf_counter() - called) * 1e6)
        end.record(record_on)
        end.synchronize()
        if cuda_backend.SIMULATOR:
            samples.append((time.perf_counter() - wall) * 1e3)
        else:
            samples.append(start.elapsed_time(end))
    return float(np.median(samples)), float(np.min(samples)), float(np.median(host))


def run_case(case, reps, warmup, ops=OPS):
    t = Tensors(case)
    variants = {"fastbn": fastbn_variant(t), "copy": copy_variant(t)}
    streams = {}
    if t.torch is not None:
        from numba import cuda
        variants["fastbn-torch"] = fastbn_torch_variant(t)
        graph = GraphVariant(t)
        variants["fastbn-graph"] = graph.variant()
        streams["fastbn-graph"] = cuda.external_stream(graph.stream.cuda_stream)
        variants["torch"] = torch_variant(t)
    rows = []
    for op in ops:
        row = {"case": case.label, "shape": list(case.shape), "layout": case.layout,
               "dtype": case.dtype, "op": op, "nbytes_x": t.nbytes, "variants": {}}
        for name, fns in variants.items():
            try:
                outputs = tuple(fns[op]())
            except Exception as exc:  # noqa: BLE001 - e.g. a failed graph capture: report it
                row["variants"][name] = {"valid": False, "error": f"{type(exc).__name__}: {exc}"}
                continue
            if name == "fastbn-graph":
                t.torch.cuda.synchronize()
            error = validate(t, op, outputs, name)
            entry = {"max_error_over_tolerance": error, "valid": error <= 1.0}
            if entry["valid"]:
                entry["median_ms"], entry["min_ms"], entry["host_us"] = time_cuda(
                    fns[op], reps, warmup, streams.get(name))
            row["variants"][name] = entry
        _derive(row)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _derive(row):
    variants = row["variants"]
    copy_ms = variants.get("copy", {}).get("median_ms")
    copy_gbps = 2 * row["nbytes_x"] / (copy_ms * 1e6) if copy_ms else None
    row["copy_gbps"] = copy_gbps
    for name, entry in variants.items():
        if name == "copy" or "median_ms" not in entry:
            continue
        gbps = MUST_MOVE[row["op"]] * row["nbytes_x"] / (entry["median_ms"] * 1e6)
        entry["gbps"] = gbps
        entry["copy_fraction"] = gbps / copy_gbps if copy_gbps else None
    fast, torch = variants.get("fastbn", {}), variants.get("torch", {})
    if "median_ms" in fast and "median_ms" in torch:
        row["torch_ratio"] = torch["median_ms"] / fast["median_ms"]
    else:
        row["torch_ratio"] = None
    users = variants.get("fastbn-torch", {})
    row["torch_ratio_torch_tensors"] = (torch["median_ms"] / users["median_ms"]
                                        if "median_ms" in users and "median_ms" in torch
                                        else None)


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def _line(row):
    fast = row["variants"]["fastbn"]
    return (f"{row['case']:<28} {row['op']:<9} fastbn {_fmt(fast.get('median_ms'), '.3f')} ms "
            f"{_fmt(fast.get('gbps'), '.0f')} GB/s ({_fmt(fast.get('copy_fraction'), '.0%')} of "
            f"copy), host {_fmt(fast.get('host_us'), '.0f')} us  vs torch "
            f"{_ratio(row.get('torch_ratio'))}" + ("" if fast["valid"] else "  INVALID"))


# ----------------------------------------------------------------------------------------------
# report

def render_markdown(result):
    """A markdown table from a result JSON (as written by main)."""
    m = result["machine"]
    lines = [f"GPU: {m.get('gpu')} (compute capability "
             f"{'.'.join(map(str, m.get('compute_capability') or []))}), "
             f"driver {m.get('nvidia_smi') or m.get('driver_cuda_version')}, "
             f"numba-cuda {m.get('numba_cuda')}, PyTorch {m.get('torch')}, "
             f"cuDNN {m.get('cudnn')}; {m.get('date')}.", "",
             "| case | op | fastbn ms | PyTorch ms | copy ms | fastbn GB/s | of copy "
             "| vs PyTorch | host us/call | torch-tensor call vs PyTorch | graph replay ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        v = row["variants"]
        fast = v["fastbn"]
        ms = "INVALID" if not fast["valid"] else _fmt(fast.get("median_ms"), ".3f")
        torch_entry = v.get("torch", {})
        torch_ms = ("INVALID" if torch_entry and not torch_entry.get("valid")
                    else _fmt(torch_entry.get("median_ms"), ".3f"))
        lines.append(f"| {row['case']} | {row['op']} | {ms} | {torch_ms} "
                     f"| {_fmt(v.get('copy', {}).get('median_ms'), '.3f')} "
                     f"| {_fmt(fast.get('gbps'), '.0f')} | {_fmt(fast.get('copy_fraction'), '.0%')}"
                     f" | {_ratio(row.get('torch_ratio'))} | {_fmt(fast.get('host_us'), '.0f')}"
                     f" | {_ratio(row.get('torch_ratio_torch_tensors'))}"
                     f" | {_graph_cell(v.get('fastbn-graph'))} |")
    lines += ["", "GB/s counts the bytes an operation must move (fwd-train, eval: read x + "
              "write y; backward: read x and dy + write dx). 'of copy' is that rate over a "
              "device-to-device copy's in the same run; 'vs PyTorch' = PyTorch time / fastbn "
              "time (above 1.00x: fastbn faster). 'host us/call': host time of one fastbn call "
              "(launch overhead). 'torch-tensor call': fastbn given PyTorch tensors and no out=. "
              "'graph replay': the same calls captured in a CUDA graph (torch.cuda.graph)."]
    return "\n".join(lines) + "\n"


def _graph_cell(entry):
    if entry is None:
        return "-"
    if not entry.get("valid"):
        return "CAPTURE FAILED" if "error" in entry else "INVALID"
    return _fmt(entry.get("median_ms"), ".3f")


def _parse_shape(text):
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: expected comma-separated integers like "
                                         f"256,64,112,112, got {text!r}") from None
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape: expected 2 (N,C) or 4 (N,C,H,W) positive "
                                         f"sizes, got {text!r}")
    return shape


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and few repetitions: a fast sanity run")
    parser.add_argument("--shape", type=_parse_shape, action="append",
                        help="benchmark this shape instead (repeatable), e.g. 32,64,56,56")
    parser.add_argument("--dtype", action="append", choices=["float32", "float16", "float64"],
                        help="data dtypes (default float32 and float16)")
    parser.add_argument("--op", action="append", choices=OPS, help="operations (default all)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (median)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--md", type=Path, help="write the markdown table here")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="print the markdown table of an existing result JSON and exit")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 10 if args.quick else 50
    if args.warmup is None:
        args.warmup = 2 if args.quick else 5
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps must be >= 1 and --warmup >= 0, got {args.reps}, {args.warmup}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        sys.stdout.write(render_markdown(json.loads(args.render.read_text())))
        return 0
    fastbn.backends.load("cuda")          # a clear error now if there is no GPU
    info = machine()
    print(f"GPU: {info['gpu']}  torch: {info.get('torch')}", flush=True)
    rows = []
    start = time.perf_counter()
    for case in cases(args.quick, args.shape, tuple(args.dtype or ("float32", "float16"))):
        rows += run_case(case, args.reps, args.warmup, tuple(args.op or OPS))
    result = {"machine": info, "reps": args.reps, "warmup": args.warmup,
              "seconds": time.perf_counter() - start, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    table = render_markdown(result)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)
    print(table)
    invalid = [f"{r['case']} {r['op']} {name}" for r in rows for name, v in r["variants"].items()
               if not v["valid"]]
    if invalid:
        print("invalid (not timed): " + ", ".join(invalid), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
