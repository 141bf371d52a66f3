"""One registry of "the same operation in each library", used by the benchmarks and the tests.

Every implementation turns a :class:`~benchmarks.cases.Problem` into one zero-argument callable
per operation. A callable runs the operation into preallocated outputs where the library allows
it (so that no implementation pays page faults for fresh output buffers) and returns the outputs
as a tuple:

=============  =========================
operation      outputs
=============  =========================
fwd-train      y, batch mean, invstd (the running statistics are updated in place)
eval           y
backward       dx, dgamma, dbeta
moments        mean, biased variance
=============  =========================

``copy-numpy`` and ``copy-numba`` are the memory floor: a plain copy of x's memory into y's, for
every operation; the floor of a case is the faster of the two.
"""
import numpy as np

import fastbn

from .cases import EPS, MOMENTUM, OPERATIONS

# relative tolerances against the float64 reference, as in tests/_cases.py
RTOL = {"float16": 4e-3, "float32": 2e-5, "float64": 1e-10}


def num_threads():
    import numba
    return numba.get_num_threads()


def set_num_threads(n):
    """Numba's and (if installed) PyTorch's thread count, kept equal."""
    import numba
    numba.set_num_threads(n)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(n)


def memory_of(a):
    """The flat array of a's memory (a is dense in some axis order: NCHW, NHWC, ...)."""
    flat = np.ravel(a, order="K")
    assert np.shares_memory(flat, a), "benchmark arrays must be dense"
    return flat


class Implementation:
    name = "?"
    slow = False           # timed in fewer rounds

    def unavailable(self):
        """None, or why this implementation cannot run here."""
        return None

    def prepare(self, problem):
        """{operation: callable} for this problem."""
        raise NotImplementedError


class Fastbn(Implementation):
    """fastbn's public API on one backend."""

    def __init__(self, backend, name):
        self.backend = backend
        self.name = name
        self.slow = backend == "reference"

    def prepare(self, p):
        axis, backend = p.case.axis, self.backend
        y = p.output_like_x()
        dx = p.output_like_x()
        mean, invstd = p.stats_vector(), p.stats_vector()
        dgamma, dbeta = p.stats_vector(), p.stats_vector()
        running_mean, running_var = p.running_mean.copy(), p.running_var.copy()

        def fwd_train():
            return tuple(fastbn.batch_norm_forward(
                p.x, p.gamma, p.beta, axis=axis, eps=EPS, training=True,
                running_mean=running_mean, running_var=running_var, momentum=MOMENTUM,
                out=(y, mean, invstd), backend=backend))

        def eval_():
            return fastbn.batch_norm_forward(
                p.x, p.gamma, p.beta, axis=axis, eps=EPS, training=False,
                running_mean=p.running_mean, running_var=p.running_var,
                out=(y, mean, invstd), backend=backend).y,

        def backward():
            return tuple(fastbn.batch_norm_backward(
                p.dy, p.x, p.saved_mean, p.saved_invstd, p.gamma, axis=axis, training=True,
                out=(dx, dgamma, dbeta), backend=backend))

        def moments():
            return fastbn.moments(p.x, axis=axis, backend=backend)

        return {"fwd-train": fwd_train, "eval": eval_, "backward": backward, "moments": moments}


class Torch(Implementation):
    """PyTorch's CPU kernels (ATen native_batch_norm and its backward, var_mean), on the same
    number of threads as numba; the ``.out`` overloads write into preallocated tensors."""
    name = "torch"

    def unavailable(self):
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed"
        return None

    def prepare(self, p):
        import torch
        torch.set_num_threads(num_threads())
        aten = torch.ops.aten
        case = p.case

        def tensor(a):
            t = torch.from_numpy(a)
            # NHWC memory with axis=-1 is PyTorch's channels_last NCHW tensor
            return t.permute(0, 3, 1, 2) if case.layout == "NHWC" else t

        def array(t):
            return (t.permute(0, 2, 3, 1) if case.layout == "NHWC" else t).numpy()

        x, dy = tensor(p.x), tensor(p.dy)
        gamma, beta = torch.from_numpy(p.gamma), torch.from_numpy(p.beta)
        running_mean = torch.from_numpy(p.running_mean.copy())
        running_var = torch.from_numpy(p.running_var.copy())
        eval_mean, eval_var = torch.from_numpy(p.running_mean), torch.from_numpy(p.running_var)
        saved_mean, saved_invstd = torch.from_numpy(p.saved_mean), torch.from_numpy(p.saved_invstd)
        y, dx = torch.empty_like(x), torch.empty_like(x)
        mean, invstd = torch.empty_like(gamma), torch.empty_like(gamma)
        eval_save = torch.empty(0, dtype=gamma.dtype), torch.empty(0, dtype=gamma.dtype)
        dgamma, dbeta = torch.empty_like(gamma), torch.empty_like(gamma)
        reduce = [d for d in range(x.dim()) if d != 1]
        mask = [True, True, True]

        def fwd_train():
            aten.native_batch_norm.out(x, gamma, beta, running_mean, running_var, True,
                                       MOMENTUM, EPS, out=y, save_mean=mean, save_invstd=invstd)
            return array(y), mean.numpy(), invstd.numpy()

        def eval_():
            aten.native_batch_norm.out(x, gamma, beta, eval_mean, eval_var, False, MOMENTUM, EPS,
                                       out=y, save_mean=eval_save[0], save_invstd=eval_save[1])
            return array(y),

        def backward():
            aten.native_batch_norm_backward.out(dy, x, gamma, running_mean, running_var,
                                                saved_mean, saved_invstd, True, EPS, mask,
                                                out0=dx, out1=dgamma, out2=dbeta)
            return array(dx), dgamma.numpy(), dbeta.numpy()

        def moments():
            var, mean_ = torch.var_mean(x, dim=reduce, correction=0)
            return mean_.numpy(), var.numpy()

        return {"fwd-train": fwd_train, "eval": eval_, "backward": backward, "moments": moments}


_copy_kernel = None


def _numba_copy():
    global _copy_kernel
    if _copy_kernel is None:
        from numba import njit, prange

        @njit(parallel=True, cache=True, boundscheck=False)
        def parallel_copy(src, dst, blocks):
            n = src.shape[0]
            for b in prange(blocks):
                lo = b * n // blocks
                hi = (b + 1) * n // blocks
                s = src[lo:hi]
                d = dst[lo:hi]
                for i in range(hi - lo):   # 0-based: lets LLVM vectorize
                    d[i] = s[i]

        _copy_kernel = parallel_copy
    return _copy_kernel


class Copy(Implementation):
    """The memory floor: copy x's memory (one read, one write) into a preallocated array."""

    def __init__(self, how):
        self.how = how
        self.name = f"copy-{how}"

    def prepare(self, p):
        src = memory_of(p.x)
        out = p.output_like_x()
        dst = memory_of(out)
        if self.how == "numpy":
            def copy():
                np.copyto(dst, src)
                return out,
        else:
            kernel = _numba_copy()
            # float16 as its bits: numba's CPU target has no float16 (a copy is a copy)
            src_bits, dst_bits = src.view(np.uint16 if src.itemsize == 2 else src.dtype), \
                dst.view(np.uint16 if dst.itemsize == 2 else dst.dtype)
            blocks = 64

            def copy():
                kernel(src_bits, dst_bits, blocks)
                return out,
        return {op: copy for op in OPERATIONS}


IMPLEMENTATIONS = {
    "fastbn": Fastbn("cpu", "fastbn"),
    "reference": Fastbn("reference", "reference"),
    "torch": Torch(),
    "copy-numpy": Copy("numpy"),
    "copy-numba": Copy("numba"),
}
COPY_FLOOR = ("copy-numpy", "copy-numba")


def available(names=None):
    """{name: implementation} of those that can run here, and {name: reason} of the others."""
    names = IMPLEMENTATIONS if names is None else names
    ok, skipped = {}, {}
    for name in names:
        impl = IMPLEMENTATIONS[name]
        reason = impl.unavailable()
        if reason is None:
            ok[name] = impl
        else:
            skipped[name] = reason
    return ok, skipped


# ----------------------------------------------------------------------------------------------
# validation against the NumPy float64 reference

def _max_rel_error(got, want, rtol):
    """Largest |got - want| / (atol + rtol |want|) with atol = rtol * max|want| (<= 1 passes)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return np.inf
    if want.size == 0:
        return 0.0
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)):
        return np.inf
    scale = max(float(np.max(np.abs(want[finite]), initial=0.0)), 1.0)
    err = np.abs(got[finite] - want[finite]) / (rtol * scale + rtol * np.abs(want[finite]))
    return float(np.max(err, initial=0.0))


def validate(name, op, outputs, reference_outputs, problem):
    """Worst error of implementation ``name`` over the outputs, in units of the tolerance
    (<= 1 passes). The copy floor is checked against x itself."""
    dtype = problem.case.dtype
    if name in COPY_FLOOR:
        return 0.0 if np.array_equal(outputs[0], problem.x) else np.inf
    rtol = RTOL[dtype]
    worst = 0.0
    for got, want in zip(outputs, reference_outputs):
        worst = max(worst, _max_rel_error(got, want, rtol))
    return worst
