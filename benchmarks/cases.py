"""Benchmark problems: which tensors, in which memory layout, and the arrays each operation needs.

A case is a logical shape (NCHW, or (N, C) for a fully connected batch) plus a memory layout:

* ``NCHW``: C-contiguous NCHW, channel axis 1 (the channel-major regime, inner = H*W);
* ``NHWC``: C-contiguous NHWC with axis=-1 (the channels-last regime, inner = 1);
* ``NHWC-view``: the same NHWC memory seen as an NCHW-shaped array with axis=1 (what PyTorch's
  channels_last tensors are); fastbn sees the same canonical view as ``NHWC``, without a copy;
* ``NC``: a C-contiguous (N, C) batch, channel axis 1.
"""
from dataclasses import dataclass, field
from math import prod

import numpy as np

OPERATIONS = ("fwd-train", "eval", "backward", "moments")
# the fused ops (fastbn.batch_norm_act_forward / _backward) as relu(bn(x) + residual)
FUSED_OPERATIONS = ("act-fwd-train", "act-backward")
# keeps relu away from its kink: no element of bn(x) + residual lies within this of zero, so
# every implementation (float16 to float64) agrees on which elements relu passes
RELU_MARGIN = 0.05
EPS = 1e-5
MOMENTUM = 0.1


# x-sized tensors each operation must read or write: fwd-train and eval read x and write y;
# backward reads x and dy and writes dx; the fused forward also reads the residual, the fused
# backward reads dy, y and x and writes dx and dresidual
TENSORS_MOVED = {"fwd-train": 2, "eval": 2, "backward": 3, "moments": 1,
                 "act-fwd-train": 3, "act-backward": 5}


@dataclass(frozen=True)
class Case:
    name: str            # what the tensor is, e.g. "resnet50 conv2_x"
    shape: tuple         # logical shape: (N, C, H, W) or (N, C)
    layout: str          # "NCHW", "NHWC", "NHWC-view" or "NC"
    dtype: str

    @property
    def channels(self):
        return self.shape[1]

    @property
    def axis(self):
        return -1 if self.layout == "NHWC" else 1

    @property
    def size(self):
        return prod(self.shape)

    @property
    def nbytes(self):
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def label(self):
        dims = "×".join(str(d) for d in self.shape)
        return f"{dims} {self.layout} {self.dtype}"

    def bytes_moved(self, op):
        """Bytes the operation must read and write (per-channel vectors neglected)."""
        return TENSORS_MOVED[op] * self.nbytes

    def allocate(self, values=None):
        """An uninitialized (or filled) array of this case's shape in its memory layout."""
        n, c, *spatial = self.shape
        dtype = np.dtype(self.dtype)
        if self.layout in ("NHWC", "NHWC-view"):
            stored = np.empty((n, *spatial, c), dtype)
            if values is not None:
                stored[...] = np.moveaxis(values, 1, -1)
            return stored if self.layout == "NHWC" else np.moveaxis(stored, -1, 1)
        stored = np.empty(self.shape, dtype)
        if values is not None:
            stored[...] = values
        return stored


@dataclass
class Problem:
    """The inputs of every operation on one case, and preallocated outputs."""
    case: Case
    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    saved_mean: np.ndarray      # the forward's batch statistics, input of the backward
    saved_invstd: np.ndarray
    extra: dict = field(default_factory=dict)

    @classmethod
    def make(cls, case, seed=0):
        rng = np.random.default_rng(seed)
        c = case.channels
        # per-channel offsets, so that no channel is already normalized
        offsets = rng.uniform(-1.0, 1.0, (1, c) + (1,) * (len(case.shape) - 2))
        logical = rng.standard_normal(case.shape, np.float32) * np.float32(2.0)
        logical += offsets.astype(np.float32)
        x = case.allocate(logical.astype(case.dtype, copy=False))
        del logical
        dy = case.allocate(rng.standard_normal(case.shape, np.float32).astype(case.dtype))
        sdtype = np.float64 if case.dtype == "float64" else np.float32
        gamma = rng.uniform(0.5, 1.5, c).astype(sdtype)
        beta = rng.standard_normal(c).astype(sdtype)
        reduce = tuple(d for d in range(x.ndim) if d != case.axis % x.ndim)
        mean = x.mean(axis=reduce, dtype=np.float64)
        var = x.var(axis=reduce, dtype=np.float64)
        return cls(case, x, dy, gamma, beta,
                   running_mean=mean.astype(sdtype), running_var=var.astype(sdtype),
                   saved_mean=mean.astype(sdtype),
                   saved_invstd=(1.0 / np.sqrt(var + EPS)).astype(sdtype))

    def output_like_x(self):
        return self.case.allocate()

    def residual(self):
        """The fused ops' residual z (x's layout and dtype), drawn so that bn(x) + z is never
        within RELU_MARGIN of zero; cached."""
        if "residual" not in self.extra:
            case = self.case
            rng = np.random.default_rng(1)
            x = self.logical(self.x)
            shape = [1] * x.ndim
            shape[1] = case.channels
            mean, invstd = (v.astype(np.float64).reshape(shape)
                            for v in (self.saved_mean, self.saved_invstd))
            gamma, beta = (v.astype(np.float64).reshape(shape) for v in (self.gamma, self.beta))
            pre = (x.astype(np.float64) - mean) * invstd * gamma + beta
            z = rng.standard_normal(x.shape)
            near = np.abs(pre + z) < RELU_MARGIN
            z[near] += 2 * RELU_MARGIN * np.where(pre[near] + z[near] >= 0, 1, -1)
            z = z.astype(case.dtype)
            # rounding z to the dtype must not bring any element back near zero
            bad = np.abs(pre + z) < RELU_MARGIN / 2
            z[bad] += np.asarray(RELU_MARGIN, case.dtype)
            self.extra["residual"] = case.allocate(z)
        return self.extra["residual"]

    def logical(self, a):
        """a (in the case's memory layout) as the logical NCHW / NC array (a view)."""
        return np.moveaxis(a, -1, 1) if self.case.layout == "NHWC" else a

    def stats_vector(self):
        return np.empty(self.case.channels, self.saved_mean.dtype)


def _resnet50(batch, layouts, dtypes):
    """BatchNorm inputs of ResNet-50 at this batch size (one per stage, plus the widest)."""
    shapes = [("conv2_x", (batch, 64, 56, 56)), ("conv2_x out", (batch, 256, 56, 56)),
              ("conv3_x out", (batch, 512, 28, 28)), ("conv4_x out", (batch, 1024, 14, 14)),
              ("conv5_x out", (batch, 2048, 7, 7))]
    return [Case(f"resnet50 {name}", shape, layout, dtype)
            for name, shape in shapes for layout in layouts for dtype in dtypes]


# The full run: ResNet-50 shapes at batch 64 in both layouts (float32), the first of them also
# in float16/float64 and as an NCHW-shaped view of NHWC memory, and two MLP batches.
# 64x256x56x56 float32 (196 MiB) is the tensor larger than the last-level cache.
FULL_CASES = (
    _resnet50(64, ("NCHW", "NHWC"), ("float32",))
    + [Case("resnet50 conv2_x", (64, 64, 56, 56), "NHWC-view", "float32")]
    + [Case("resnet50 conv2_x", (64, 64, 56, 56), layout, dtype)
       for dtype in ("float16", "float64") for layout in ("NCHW", "NHWC")]
    + [Case("mlp small", (60, 100), "NC", "float32"),
       Case("mlp", (8192, 512), "NC", "float32"),
       Case("mlp", (8192, 512), "NC", "float16"),
       Case("mlp", (8192, 512), "NC", "float64")]
)

# Thread scaling (1 and 2 threads) on one case per regime.
SCALING_CASES = (
    Case("resnet50 conv2_x", (64, 64, 56, 56), "NCHW", "float32"),
    Case("resnet50 conv2_x", (64, 64, 56, 56), "NHWC", "float32"),
    Case("mlp", (8192, 512), "NC", "float32"),
)

# The smoke run (CI): every layout and dtype at tiny, non-power-of-two sizes, and one larger
# shape cut into several tasks (it runs in the calling thread: it is below CPU_PARALLEL_MIN_SIZE).
SMOKE_CASES = tuple(
    [Case("smoke", (3, 5, 7, 9), layout, dtype)
     for layout in ("NCHW", "NHWC", "NHWC-view") for dtype in ("float16", "float32", "float64")]
    + [Case("smoke", (13, 7), "NC", dtype) for dtype in ("float16", "float32", "float64")]
    + [Case("smoke parallel", (5, 7, 31, 37), "NCHW", "float32"),
       Case("smoke parallel", (5, 7, 31, 37), "NHWC", "float32")]
)


# Small and medium tensors (issue 10), timed at 1 and 2 threads: the paper's MLP batch, a wider
# MLP batch, a small conv feature map in both layouts, and a medium one.
SMALL_SHAPES = (("mlp paper", (60, 100), "NC"), ("mlp", (256, 512), "NC"),
                ("conv small", (32, 64, 8, 8), "NCHW"), ("conv small", (32, 64, 8, 8), "NHWC"),
                ("conv medium", (16, 128, 28, 28), "NCHW"))
SMALL_CASES = tuple(Case(name, shape, layout, dtype)
                    for name, shape, layout in SMALL_SHAPES
                    for dtype in ("float16", "float32", "float64"))

# The fused BN + residual + relu (ResNet's block tail): float32, both layouts, a large tensor,
# one past the last-level cache of most machines, a short-run one, and the medium ones.
FUSED_CASES = (
    [Case("resnet50 conv2_x", (64, 64, 56, 56), layout, "float32") for layout in ("NCHW", "NHWC")]
    + [Case("resnet50 conv2_x out", (64, 256, 56, 56), "NCHW", "float32"),
       Case("resnet50 conv4_x out", (64, 1024, 14, 14), "NCHW", "float32"),
       Case("conv medium", (16, 128, 28, 28), "NCHW", "float32"),
       Case("conv small", (32, 64, 8, 8), "NHWC", "float32")]
)

SMOKE_FUSED_CASES = (Case("smoke", (3, 5, 7, 9), "NCHW", "float32"),
                     Case("smoke", (3, 5, 7, 9), "NHWC", "float64"),
                     Case("smoke", (13, 7), "NC", "float16"),
                     Case("smoke parallel", (5, 7, 31, 37), "NCHW", "float32"))
