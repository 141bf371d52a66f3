"""One registry of "the same operation in each library", used by the benchmarks and the tests.

Every implementation turns a :class:`~benchmarks.cases.Problem` into one zero-argument callable
per operation it offers, returning the outputs as a tuple:

=============  =========================================================================
operation      outputs
=============  =========================================================================
fwd-train      y, batch mean, invstd (the running statistics are updated in place)
eval           y
backward       dx, dgamma, dbeta
moments        mean, biased variance
act-fwd-train  y = relu(bn(x) + residual), batch mean, invstd (torch: y only)
act-backward   dx, dgamma, dbeta, dresidual of that
=============  =========================================================================

Each library is timed twice where its API allows: the default call, which returns fresh
outputs (what users write: ``fastbn``, ``torch``), and the call into preallocated outputs
(``fastbn-out``, ``torch-out``), which pays no page faults for new output memory.
``copy-numpy`` and ``copy-numba`` are the memory floor: a plain copy of x's memory into a
preallocated array, for every operation; the floor of a case is the faster of the two.
"""
import numpy as np

import fastbn

from .cases import EPS, FUSED_OPERATIONS, MOMENTUM, OPERATIONS

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

    def prepare(self, problem, ops=OPERATIONS):
        """{operation: callable} for this problem, for those of ``ops`` it offers."""
        raise NotImplementedError


def _has_fused():
    return hasattr(fastbn, "batch_norm_act_forward") and hasattr(fastbn, "batch_norm_act_backward")


def act_forward_output(p):
    """The fused forward's y on the reference backend: the act-backward's input (cached)."""
    if "act_y" not in p.extra:
        p.extra["act_y"] = fastbn.batch_norm_act_forward(
            p.x, p.gamma, p.beta, activation="relu", residual=p.residual(), axis=p.case.axis,
            eps=EPS, training=True, backend="reference").y
    return p.extra["act_y"]


class Fastbn(Implementation):
    """fastbn's public API on one backend: the default call (fresh outputs), or with ``out=``
    preallocated outputs."""

    def __init__(self, backend, name, out=False):
        self.backend = backend
        self.name = name
        self.out = out
        self.slow = backend == "reference"

    def prepare(self, p, ops=OPERATIONS):
        axis, backend = p.case.axis, self.backend
        if self.out:
            y, dx = p.output_like_x(), p.output_like_x()
            forward_out = (y, p.stats_vector(), p.stats_vector())
            backward_out = (dx, p.stats_vector(), p.stats_vector())
        else:
            forward_out = backward_out = None
        running_mean, running_var = p.running_mean.copy(), p.running_var.copy()

        def fwd_train():
            return tuple(fastbn.batch_norm_forward(
                p.x, p.gamma, p.beta, axis=axis, eps=EPS, training=True,
                running_mean=running_mean, running_var=running_var, momentum=MOMENTUM,
                out=forward_out, backend=backend))

        def eval_():
            return fastbn.batch_norm_forward(
                p.x, p.gamma, p.beta, axis=axis, eps=EPS, training=False,
                running_mean=p.running_mean, running_var=p.running_var,
                out=forward_out, backend=backend).y,

        def backward():
            return tuple(fastbn.batch_norm_backward(
                p.dy, p.x, p.saved_mean, p.saved_invstd, p.gamma, axis=axis, training=True,
                out=backward_out, backend=backend))

        def moments():
            return tuple(fastbn.moments(p.x, axis=axis, backend=backend))

        offered = {"fwd-train": fwd_train, "eval": eval_, "backward": backward,
                   "moments": moments}
        if _has_fused() and set(ops) & set(FUSED_OPERATIONS):
            offered.update(self._fused(p, running_mean, running_var))
        return offered

    def _fused(self, p, running_mean, running_var):
        axis, backend = p.case.axis, self.backend
        residual = p.residual()
        if self.out:
            forward_out = (p.output_like_x(), p.stats_vector(), p.stats_vector())
            backward_out = (p.output_like_x(), p.stats_vector(), p.stats_vector(),
                            p.output_like_x())
        else:
            forward_out = backward_out = None

        def act_fwd_train():
            return tuple(fastbn.batch_norm_act_forward(
                p.x, p.gamma, p.beta, activation="relu", residual=residual, axis=axis, eps=EPS,
                training=True, running_mean=running_mean, running_var=running_var,
                momentum=MOMENTUM, out=forward_out, backend=backend))

        def act_backward():
            return tuple(fastbn.batch_norm_act_backward(
                p.dy, y, p.x, p.saved_mean, p.saved_invstd, p.gamma, activation="relu",
                residual=True, axis=axis, training=True, out=backward_out, backend=backend))

        y = act_forward_output(p)
        return {"act-fwd-train": act_fwd_train, "act-backward": act_backward}


class FastbnComposed(Implementation):
    """The fused ops written with fastbn's plain ops and NumPy, as a user would without them:
    ``batch_norm_forward``, then ``y += residual`` and ``relu`` in place on its fresh y; the
    backward masks dy by ``y > 0`` (a fresh array, also the residual's gradient) and calls
    ``batch_norm_backward``."""
    name = "fastbn-composed"

    def prepare(self, p, ops=FUSED_OPERATIONS):
        axis = p.case.axis
        residual = p.residual()
        running_mean, running_var = p.running_mean.copy(), p.running_var.copy()
        y = act_forward_output(p)

        def act_fwd_train():
            out = fastbn.batch_norm_forward(
                p.x, p.gamma, p.beta, axis=axis, eps=EPS, training=True,
                running_mean=running_mean, running_var=running_var, momentum=MOMENTUM)
            np.add(out.y, residual, out=out.y)
            np.maximum(out.y, 0, out=out.y)
            return tuple(out)

        def act_backward():
            dpre = p.dy * (y > 0)
            grads = fastbn.batch_norm_backward(dpre, p.x, p.saved_mean, p.saved_invstd, p.gamma,
                                               axis=axis, training=True)
            return tuple(grads) + (dpre,)

        return {"act-fwd-train": act_fwd_train, "act-backward": act_backward}


class Torch(Implementation):
    """PyTorch's CPU kernels on the same number of threads as numba.

    The default call returns fresh outputs: ``torch.native_batch_norm`` (what
    ``F.batch_norm`` runs, without its Python wrapper) and ``aten::native_batch_norm_backward``
    (what autograd runs), ``torch.var_mean``; the fused ops as torchvision's ResNet writes
    them, ``F.batch_norm`` then ``add_`` and ``relu_``, with the backward by autograd. With
    ``out=True`` the ``.out`` overloads write into preallocated tensors."""

    def __init__(self, out=False):
        self.out = out
        self.name = "torch-out" if out else "torch"

    def unavailable(self):
        try:
            import torch  # noqa: F401
        except ImportError:
            return "torch is not installed"
        return None

    def prepare(self, p, ops=OPERATIONS):
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
        reduce = [d for d in range(x.dim()) if d != 1]
        mask = [True, True, True]

        def moments():
            var, mean_ = torch.var_mean(x, dim=reduce, correction=0)
            return mean_.numpy(), var.numpy()

        if self.out:
            y, dx = torch.empty_like(x), torch.empty_like(x)
            mean, invstd = torch.empty_like(gamma), torch.empty_like(gamma)
            eval_save = torch.empty(0, dtype=gamma.dtype), torch.empty(0, dtype=gamma.dtype)
            dgamma, dbeta = torch.empty_like(gamma), torch.empty_like(gamma)

            def fwd_train():
                aten.native_batch_norm.out(x, gamma, beta, running_mean, running_var, True,
                                           MOMENTUM, EPS, out=y, save_mean=mean,
                                           save_invstd=invstd)
                return array(y), mean.numpy(), invstd.numpy()

            def eval_():
                aten.native_batch_norm.out(x, gamma, beta, eval_mean, eval_var, False, MOMENTUM,
                                           EPS, out=y, save_mean=eval_save[0],
                                           save_invstd=eval_save[1])
                return array(y),

            def backward():
                aten.native_batch_norm_backward.out(dy, x, gamma, running_mean, running_var,
                                                    saved_mean, saved_invstd, True, EPS, mask,
                                                    out0=dx, out1=dgamma, out2=dbeta)
                return array(dx), dgamma.numpy(), dbeta.numpy()

            return {"fwd-train": fwd_train, "eval": eval_, "backward": backward,
                    "moments": moments}

        native_batch_norm = torch.native_batch_norm
        native_backward = aten.native_batch_norm_backward

        def fwd_train():
            y, mean, invstd = native_batch_norm(x, gamma, beta, running_mean, running_var, True,
                                                MOMENTUM, EPS)
            return array(y), mean.numpy(), invstd.numpy()

        def eval_():
            return array(native_batch_norm(x, gamma, beta, eval_mean, eval_var, False, MOMENTUM,
                                           EPS)[0]),

        def backward():
            dx, dgamma, dbeta = native_backward(dy, x, gamma, running_mean, running_var,
                                                saved_mean, saved_invstd, True, EPS, mask)
            return array(dx), dgamma.numpy(), dbeta.numpy()

        offered = {"fwd-train": fwd_train, "eval": eval_, "backward": backward,
                   "moments": moments}
        if set(ops) & set(FUSED_OPERATIONS):
            offered.update(self._fused(p, tensor, array, gamma, beta))
        return offered

    def _fused(self, p, tensor, array, gamma, beta):
        import torch
        from torch.nn import functional as F
        x, dy, residual = tensor(p.x), tensor(p.dy), tensor(p.residual())
        running_mean = torch.from_numpy(p.running_mean.copy())
        running_var = torch.from_numpy(p.running_var.copy())

        def act_fwd_train():
            y = F.batch_norm(x, running_mean, running_var, gamma, beta, True, MOMENTUM, EPS)
            return array(y.add_(residual).relu_()),

        # one recorded forward; each timed call is the autograd backward through it
        leaves = [t.detach().clone().requires_grad_() for t in (x, gamma, beta, residual)]
        xg, gg, bg, rg = leaves
        graph_mean, graph_var = running_mean.clone(), running_var.clone()
        out = F.relu(F.batch_norm(xg, graph_mean, graph_var, gg, bg, True, MOMENTUM, EPS) + rg)

        def act_backward():
            dx, dgamma, dbeta, dres = torch.autograd.grad(out, leaves, dy, retain_graph=True)
            return array(dx), dgamma.numpy(), dbeta.numpy(), array(dres)

        return {"act-fwd-train": act_fwd_train, "act-backward": act_backward}


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

    def prepare(self, p, ops=OPERATIONS):
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
        return {op: copy for op in OPERATIONS + FUSED_OPERATIONS}


IMPLEMENTATIONS = {
    "fastbn": Fastbn("cpu", "fastbn"),
    "fastbn-out": Fastbn("cpu", "fastbn-out", out=True),
    "reference": Fastbn("reference", "reference"),
    "torch": Torch(),
    "torch-out": Torch(out=True),
    "copy-numpy": Copy("numpy"),
    "copy-numba": Copy("numba"),
}
# the fused-op benchmark: the fused ops (default call and out=), their composition from plain
# ops, PyTorch's composition, the reference (validation) and the copy floor
FUSED_IMPLEMENTATIONS = {
    "fastbn": IMPLEMENTATIONS["fastbn"],
    "fastbn-out": IMPLEMENTATIONS["fastbn-out"],
    "fastbn-composed": FastbnComposed(),
    "reference": IMPLEMENTATIONS["reference"],
    "torch": IMPLEMENTATIONS["torch"],
    "copy-numpy": IMPLEMENTATIONS["copy-numpy"],
    "copy-numba": IMPLEMENTATIONS["copy-numba"],
}
COPY_FLOOR = ("copy-numpy", "copy-numba")


def available(names=None, table=None):
    """{name: implementation} of those that can run here, and {name: reason} of the others
    (from ``table``, default IMPLEMENTATIONS)."""
    table = IMPLEMENTATIONS if table is None else table
    names = table if names is None else names
    ok, skipped = {}, {}
    for name in names:
        impl = table[name]
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
    if len(outputs) > len(reference_outputs):
        return np.inf
    rtol = RTOL[dtype]
    worst = 0.0
    for got, want in zip(outputs, reference_outputs):
        worst = max(worst, _max_rel_error(got, want, rtol))
    return worst
