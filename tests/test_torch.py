"""fastbn.torch against PyTorch's own modules: outputs, gradients and every buffer, step by step.

torch is imported directly: these tests must run (never skip) wherever the torch extra is
installed, and CI fails when it is missing. FASTBN_TEST_BACKENDS picks the fastbn backend the
modules run on (the first name; default "cpu").
"""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastbn
import fastbn.torch as fbt
from fastbn.torch import _ops

BACKEND = os.environ.get("FASTBN_TEST_BACKENDS", "cpu").split(",")[0].strip()

# relative tolerances per dtype: errors are compared as atol + rtol * |ref| with
# atol = rtol * max|ref|, so they scale with the magnitude of what is compared
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3}


# PyTorch 2.13's oneDNN convolution backward corrupts the heap on some machines (found on a
# 2-core AMD EPYC with AVX-512: brgconv_strided avx512_core, channels_last, 2 threads, a batch
# of 3 and 5 channels), in PyTorch alone, without fastbn imported (docs/torch.md, "A PyTorch
# crash"). These tests compare batch norms, not convolutions: the convolutions around them run
# PyTorch's native kernels, so that oneDNN's bug cannot crash or hang the test lane.
@pytest.fixture(autouse=True)
def fastbn_backend():
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with fastbn.use_backend(BACKEND):
            yield
    finally:
        torch.backends.mkldnn.enabled = saved


def assert_close(actual, expected, dtype, what):
    rtol = RTOL[dtype]
    atol = rtol * max(float(expected.detach().abs().max()), 1e-30) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------
# the modules against PyTorch's

# (fastbn class, torch class, input shape, memory format): sizes that are not powers of two
KINDS = {
    "1d-NC": (fbt.BatchNorm1d, nn.BatchNorm1d, (6, 5), None),
    "1d-NCL": (fbt.BatchNorm1d, nn.BatchNorm1d, (4, 5, 7), None),
    "2d": (fbt.BatchNorm2d, nn.BatchNorm2d, (3, 5, 3, 7), None),
    "2d-channels_last": (fbt.BatchNorm2d, nn.BatchNorm2d, (3, 5, 3, 7), torch.channels_last),
    "3d": (fbt.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 2, 5), None),
    "3d-channels_last": (fbt.BatchNorm3d, nn.BatchNorm3d, (2, 5, 3, 2, 5),
                         torch.channels_last_3d),
}

OPTIONS = {
    "default": {},
    "momentum=None": {"momentum": None},
    "momentum=0.3,eps=1e-3": {"momentum": 0.3, "eps": 1e-3},
    "affine=False": {"affine": False},
    "bias=False": {"bias": False},
    "track_running_stats=False": {"track_running_stats": False},
    "affine=False,track_running_stats=False": {"affine": False, "track_running_stats": False},
}


def make_pair(fast_cls, torch_cls, channels, dtype, options, seed=0):
    """A fastbn module and a PyTorch module with the same (non-trivial) state."""
    reference = torch_cls(channels, dtype=dtype, **options)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (reference.weight, reference.bias):
            if tensor is not None:
                tensor.copy_(torch.rand(channels, generator=generator) + 0.5)
        if reference.running_mean is not None:
            reference.running_mean.copy_(torch.randn(channels, generator=generator))
            reference.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    fast = fast_cls(channels, dtype=dtype, **options)
    fast.load_state_dict(reference.state_dict())
    return fast, reference


def make_input(shape, dtype, memory_format, seed, scale=3.0, shift=2.0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + shift
    x = x.to(dtype)
    if memory_format is not None:
        x = x.to(memory_format=memory_format)
    return x.requires_grad_()


def parameters(module):
    return [p for p in (module.weight, module.bias) if p is not None]


def run_step(module, x, dy):
    """y, dx and the parameter gradients of one forward/backward."""
    for p in parameters(module):
        p.grad = None
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = module(x)
    y.backward(dy)
    return y.detach(), x.grad, [p.grad for p in parameters(module)]


def assert_same_step(fast, reference, x, dy, dtype, what):
    fast_y, fast_dx, fast_grads = run_step(fast, x, dy)
    ref_y, ref_dx, ref_grads = run_step(reference, x, dy)
    assert fast_y.dtype == ref_y.dtype and fast_y.shape == ref_y.shape
    assert fast_y.stride() == ref_y.stride(), f"{what}: y strides differ (a layout copy?)"
    assert_close(fast_y, ref_y, dtype, f"{what}: y")
    assert_close(fast_dx, ref_dx, dtype, f"{what}: dx")
    for name, fast_grad, ref_grad in zip(("weight", "bias"), fast_grads, ref_grads):
        assert fast_grad.dtype == ref_grad.dtype
        # parameter gradients are sums over the batch: compare them at the float32 level
        assert_close(fast_grad, ref_grad, dtype, f"{what}: {name}.grad")
    assert_same_buffers(fast, reference, dtype, what)


def assert_same_buffers(fast, reference, dtype, what):
    fast_buffers, ref_buffers = dict(fast.named_buffers()), dict(reference.named_buffers())
    assert fast_buffers.keys() == ref_buffers.keys()
    for name, ref_buffer in ref_buffers.items():
        if name == "num_batches_tracked":
            assert int(fast_buffers[name]) == int(ref_buffer), f"{what}: {name}"
        else:
            assert_close(fast_buffers[name], ref_buffer, dtype, f"{what}: {name}")


def check_against_torch(kind, dtype, options, steps=3):
    fast_cls, torch_cls, shape, memory_format = KINDS[kind]
    fast, reference = make_pair(fast_cls, torch_cls, shape[1], dtype, options)
    for step in range(steps):
        x = make_input(shape, dtype, memory_format, seed=step)
        dy = make_input(shape, dtype, memory_format, seed=100 + step, scale=1.0, shift=0.0)
        assert_same_step(fast, reference, x, dy.detach(), dtype, f"{kind} train step {step}")
    fast.eval()
    reference.eval()
    x = make_input(shape, dtype, memory_format, seed=50)
    dy = make_input(shape, dtype, memory_format, seed=150, scale=1.0, shift=0.0)
    assert_same_step(fast, reference, x, dy.detach(), dtype, f"{kind} eval")


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("kind", ["2d", "1d-NC"])
def test_every_option_matches_torch(kind, options):
    check_against_torch(kind, torch.float32, options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16],
                         ids=["float32", "float64", "float16"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_and_dtype_matches_torch(kind, dtype):
    check_against_torch(kind, dtype, {"momentum": None} if dtype == torch.float64 else {})


def test_float16_input_with_float32_parameters_matches_torch():
    """Mixed precision: float16 activations, float32 parameters and buffers (as PyTorch)."""
    fast, reference = make_pair(fbt.BatchNorm2d, nn.BatchNorm2d, 5, torch.float32, {})
    x = make_input((3, 5, 3, 7), torch.float16, None, seed=1)
    dy = make_input((3, 5, 3, 7), torch.float16, None, seed=2, scale=1.0, shift=0.0)
    assert_same_step(fast, reference, x, dy.detach(), torch.float16, "mixed")


def test_large_mean_matches_float64_torch():
    """fastbn's statistics stay exact where float32 sums lose digits: compare float32 modules
    against PyTorch in float64 on data with a large mean."""
    fast, _ = make_pair(fbt.BatchNorm2d, nn.BatchNorm2d, 5, torch.float32, {})
    reference64, _ = make_pair(nn.BatchNorm2d, nn.BatchNorm2d, 5, torch.float64, {})
    x = make_input((3, 5, 3, 7), torch.float64, None, seed=2, scale=1.0, shift=1e4)
    x32 = x.detach().float()
    y32 = fast(x32)
    y64 = reference64(x32.double())
    assert_close(y32.double(), y64, torch.float32, "y at mean 1e4")


# ----------------------------------------------------------------------------------------------
# what the modules are

def test_modules_are_drop_in_subclasses():
    for fast_cls, torch_cls in ((fbt.BatchNorm1d, nn.BatchNorm1d),
                                (fbt.BatchNorm2d, nn.BatchNorm2d),
                                (fbt.BatchNorm3d, nn.BatchNorm3d),
                                (fbt.SyncBatchNorm, nn.SyncBatchNorm)):
        fast, reference = fast_cls(4), torch_cls(4)
        assert isinstance(fast, torch_cls)
        assert fast.state_dict().keys() == reference.state_dict().keys()
        assert [n for n, _ in fast.named_parameters()] == \
            [n for n, _ in reference.named_parameters()]
    module = fbt.BatchNorm2d(4, bias=False)
    assert module.bias is None and module.weight is not None
    module.half()
    assert module.weight.dtype == torch.float16 and module.running_var.dtype == torch.float16
    assert module.num_batches_tracked.dtype == torch.int64
    y = module(torch.randn(3, 4, 3, 3, dtype=torch.float16))
    assert y.dtype == torch.float16 and int(module.num_batches_tracked) == 1
    module.to(torch.float64).eval()
    assert module(torch.randn(3, 4, 3, 3, dtype=torch.float64)).dtype == torch.float64


def test_channels_last_is_not_copied():
    """The NumPy view fastbn gets is the tensor's own memory, with its strides."""
    x = torch.randn(3, 5, 3, 7).to(memory_format=torch.channels_last)
    view = _ops._view(x)
    assert view.ctypes.data == x.data_ptr()
    assert view.strides == tuple(s * x.element_size() for s in x.stride())
    y = fbt.BatchNorm2d(5)(x)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_bfloat16_falls_back_to_torch():
    fast, reference = make_pair(fbt.BatchNorm2d, nn.BatchNorm2d, 5, torch.bfloat16, {})
    x = torch.randn(3, 5, 3, 7, dtype=torch.bfloat16)
    torch.testing.assert_close(fast(x), reference(x), rtol=0, atol=0)
    assert int(fast.num_batches_tracked) == 1


def test_empty_batch_matches_torch():
    fast, reference = make_pair(fbt.BatchNorm2d, nn.BatchNorm2d, 5, torch.float32, {})
    for module in (fast, reference):
        x = torch.randn(0, 5, 3, 7, requires_grad=True)
        y = module(x)
        y.sum().backward()
        assert y.shape == x.shape
    torch.testing.assert_close(fast.weight.grad, reference.weight.grad)
    assert_same_buffers(fast, reference, torch.float32, "empty batch")


def test_eval_without_running_stats_uses_batch_statistics():
    fast, reference = make_pair(fbt.BatchNorm2d, nn.BatchNorm2d, 5, torch.float32,
                                {"track_running_stats": False})
    fast.eval()
    reference.eval()
    x = make_input((3, 5, 3, 7), torch.float32, None, seed=3)
    dy = make_input((3, 5, 3, 7), torch.float32, None, seed=4, scale=1.0, shift=0.0)
    assert_same_step(fast, reference, x, dy.detach(), torch.float32, "eval, no buffers")


def test_nonfinite_channel_keeps_its_running_statistics():
    module = fbt.BatchNorm2d(3)
    x = torch.randn(4, 3, 3, 5)
    x[1, 2, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        y = module(x)
    assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, :2]).all()
    assert module.running_mean[2] == 0 and module.running_var[2] == 1
    assert module.running_mean[0] != 0


# ----------------------------------------------------------------------------------------------
# errors: PyTorch's kinds, and nothing changes

BAD_INPUTS = {
    "wrong ndim": (fbt.BatchNorm2d, nn.BatchNorm2d, {}, (3, 4, 5), ValueError),
    "1d wrong ndim": (fbt.BatchNorm1d, nn.BatchNorm1d, {}, (3, 4, 5, 6), ValueError),
    "one value per channel": (fbt.BatchNorm2d, nn.BatchNorm2d, {}, (1, 4, 1, 1), ValueError),
    "one row (1d)": (fbt.BatchNorm1d, nn.BatchNorm1d, {}, (1, 4), ValueError),
    "wrong channels": (fbt.BatchNorm2d, nn.BatchNorm2d, {}, (3, 5, 2, 3), RuntimeError),
    "negative eps": (fbt.BatchNorm2d, nn.BatchNorm2d, {"eps": -1.0}, (3, 4, 2, 3), ValueError),
    "zero eps": (fbt.BatchNorm2d, nn.BatchNorm2d, {"eps": 0.0}, (3, 4, 2, 3), ValueError),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_like_torch_and_changes_nothing(case):
    fast_cls, torch_cls, options, shape, error = case
    fast, reference = make_pair(fast_cls, torch_cls, 4, torch.float32, options)
    before = {name: t.clone() for name, t in fast.state_dict().items()}
    x = torch.randn(shape)
    with pytest.raises(error):
        reference(x)
    with pytest.raises(error):
        fast(x)
    for name, tensor in fast.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"


def test_one_value_per_channel_is_fine_in_eval():
    fast, reference = make_pair(fbt.BatchNorm2d, nn.BatchNorm2d, 4, torch.float32, {})
    fast.eval()
    reference.eval()
    x = torch.randn(1, 4, 1, 1)
    assert_close(fast(x), reference(x), torch.float32, "eval, one value")


# ----------------------------------------------------------------------------------------------
# the custom operators

def _op_samples(dtype=torch.float64):
    generator = torch.Generator().manual_seed(7)

    def tensor(*shape):
        return (torch.randn(shape, generator=generator, dtype=torch.float64) + 1).to(dtype)

    x = tensor(3, 4, 2, 5).requires_grad_()
    x_channels_last = tensor(3, 4, 2, 5).to(memory_format=torch.channels_last).requires_grad_()
    weight, bias = tensor(4).requires_grad_(), tensor(4).requires_grad_()
    running_mean, running_var = tensor(4), tensor(4).abs() + 0.5
    return x, x_channels_last, weight, bias, running_mean, running_var


def test_opcheck_forward_and_backward():
    x, x_cl, weight, bias, running_mean, running_var = _op_samples()
    forward_cases = [
        (x, weight, bias, running_mean.clone(), running_var.clone(), True, 0.1, 1e-5),
        (x_cl, weight, bias, running_mean.clone(), running_var.clone(), True, 0.1, 1e-5),
        (x, weight, bias, running_mean.clone(), running_var.clone(), False, 0.1, 1e-5),
        (x, None, None, None, None, True, 0.0, 1e-3),
        (x_cl.detach().float(), weight.detach().float(), None, running_mean.float(),
         running_var.float(), True, 0.2, 1e-5),
    ]
    for args in forward_cases:
        torch.library.opcheck(torch.ops.fastbn.batch_norm_forward.default, args)
    y, mean, invstd, _, _ = _ops.batch_norm_forward(x, weight, bias, None, None, True, 0.1, 1e-5)
    dy = torch.randn_like(x)
    for training in (True, False):
        torch.library.opcheck(torch.ops.fastbn.batch_norm_backward.default,
                              (dy, x.detach(), mean, invstd, weight.detach(), training))


def test_gradcheck_float64():
    x, x_cl, weight, bias, running_mean, running_var = _op_samples()
    for sample in (x, x_cl):
        def train(x, weight, bias):
            return _ops.batch_norm_forward(x, weight, bias, None, None, True, 0.1, 1e-5)[0]

        def evaluate(x, weight, bias):
            return _ops.batch_norm_forward(x, weight, bias, running_mean, running_var, False,
                                           0.1, 1e-5)[0]
        assert torch.autograd.gradcheck(train, (sample, weight, bias))
        assert torch.autograd.gradcheck(evaluate, (sample, weight, bias))


def test_ops_match_torch_functional():
    """The operators' y, mean and invstd, and the updated running statistics."""
    x, _, weight, bias, running_mean, running_var = _op_samples()
    ref_mean, ref_var = running_mean.clone(), running_var.clone()
    y_ref = F.batch_norm(x, ref_mean, ref_var, weight, bias, True, 0.25, 1e-4)
    y, mean, invstd, new_mean, new_var = _ops.batch_norm_forward(
        x, weight, bias, running_mean, running_var, True, 0.25, 1e-4)
    dims = (0, 2, 3)
    assert_close(y, y_ref, torch.float64, "y")
    assert_close(mean, x.mean(dims), torch.float64, "mean")
    assert_close(invstd, torch.rsqrt(x.var(dims, unbiased=False) + 1e-4), torch.float64,
                 "invstd")
    assert_close(new_mean, ref_mean, torch.float64, "running_mean")
    assert_close(new_var, ref_var, torch.float64, "running_var")
    assert not torch.equal(running_mean, ref_mean), "the op must not write its inputs"


# ----------------------------------------------------------------------------------------------
# the fused operators and modules

ACTIVATION_FUNCTIONS = {"relu": F.relu, "sigmoid": torch.sigmoid, "none": lambda y: y}


@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "none"])
def test_fused_ops_opcheck_and_gradcheck(activation, with_residual):
    x, x_cl, weight, bias, running_mean, running_var = _op_samples()
    residual = torch.randn_like(x).requires_grad_() if with_residual else None
    for training in (True, False):
        torch.library.opcheck(torch.ops.fastbn.batch_norm_act_forward.default,
                              (x, weight, bias, residual, running_mean.clone(),
                               running_var.clone(), activation, training, 0.1, 1e-5))

    def fused(x, weight, bias, *residual):
        return _ops.batch_norm_act_forward(x, weight, bias, residual[0] if residual else None,
                                           None, None, activation, True, 0.1, 1e-5)[0]
    inputs = (x, weight, bias) + ((residual,) if with_residual else ())
    assert torch.autograd.gradcheck(fused, inputs)


@pytest.mark.parametrize("with_residual", [False, True], ids=["no-residual", "residual"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["NCHW", "NHWC"])
def test_fused_module_matches_unfused_torch(activation, with_residual, memory_format):
    fused = fbt.BatchNormAct2d(5, activation=activation)
    reference = nn.BatchNorm2d(5)
    fused.load_state_dict(reference.state_dict())
    assert fused.state_dict().keys() == reference.state_dict().keys()
    act = ACTIVATION_FUNCTIONS[activation]
    for step, training in enumerate((True, True, False)):
        fused.train(training)
        reference.train(training)
        x = make_input((3, 5, 3, 7), torch.float32, memory_format, seed=step)
        residual = make_input((3, 5, 3, 7), torch.float32, memory_format, seed=10 + step)
        dy = make_input((3, 5, 3, 7), torch.float32, memory_format, seed=20 + step)
        outputs = []
        for module, fuse in ((fused, True), (reference, False)):
            module.zero_grad()
            xi = x.detach().clone().requires_grad_()
            ri = residual.detach().clone().requires_grad_()
            if fuse:
                y = module(xi, ri) if with_residual else module(xi)
            else:
                y = act(module(xi) + ri) if with_residual else act(module(xi))
            y.backward(dy.detach())
            outputs.append((y, xi.grad, ri.grad, module.weight.grad, module.bias.grad))
        what = f"{activation} step {step}"
        for name, got, want in zip(("y", "dx", "dresidual", "dweight", "dbias"), *outputs):
            if want is None:
                assert got is None
            else:
                assert_close(got, want, torch.float32, f"{what}: {name}")
        assert_same_buffers(fused, reference, torch.float32, what)


# ----------------------------------------------------------------------------------------------
# the eager path (one autograd.Function calling fastbn) against the custom operators

def operator_path(monkeypatch):
    """Make the modules take the custom operators, as under torch.compile."""
    monkeypatch.setattr(_ops, "eager_ok", lambda x, residual=None: False)


def module_step(module, x, residual, dy):
    module.zero_grad()
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    if residual is not None:
        residual = residual.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = module(x) if residual is None else module(x, residual)
    y.backward(dy)
    grads = [x.grad] + [None if t is None else t.grad for t in (module.weight, module.bias)]
    grads.append(None if residual is None else residual.grad)
    return [y.detach()] + grads + [b.clone() for b in module.buffers()]


EAGER_CASES = {
    "plain": ("none", False, {}),
    "relu+residual": ("relu", True, {}),
    "sigmoid": ("sigmoid", False, {}),
    "momentum=None": ("none", False, {"momentum": None}),
    "affine=False": ("relu", True, {"affine": False}),
    "track_running_stats=False": ("none", False, {"track_running_stats": False}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16],
                         ids=["float32", "float64", "float16"])
@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("case", EAGER_CASES.values(), ids=EAGER_CASES.keys())
def test_eager_path_gives_the_operators_bits(case, memory_format, dtype, monkeypatch):
    """Same fastbn calls, so the same bits: y, every gradient, every buffer, every step."""
    activation, with_residual, options = case

    def build():
        if activation == "none":
            return fbt.BatchNorm2d(5, dtype=dtype, **options)
        return fbt.BatchNormAct2d(5, activation=activation, dtype=dtype, **options)
    eager, operator = build(), build()
    results = {"eager": [], "operator": []}
    for step, training in enumerate((True, True, False)):
        x = make_input((3, 5, 3, 7), dtype, memory_format, seed=step)
        residual = make_input((3, 5, 3, 7), dtype, memory_format, seed=10 + step) \
            if with_residual else None
        dy = make_input((3, 5, 3, 7), dtype, memory_format, seed=20 + step).detach()
        for name, module in (("eager", eager), ("operator", operator)):
            module.train(training)
            with monkeypatch.context() as patch:
                if name == "operator":
                    operator_path(patch)
                results[name].append(module_step(module, x, residual, dy))
    for step, (got, want) in enumerate(zip(results["eager"], results["operator"])):
        assert got[0].stride() == want[0].stride(), f"step {step}: y strides"
        for i, (a, b) in enumerate(zip(got, want)):
            if b is None:
                assert a is None, f"step {step}, output {i}"
            else:
                assert a.dtype == b.dtype and a.stride() == b.stride(), f"step {step}, {i}"
                torch.testing.assert_close(a, b, rtol=0, atol=0,
                                           msg=lambda m: f"step {step}, output {i}: {m}")


def test_eager_path_calls_no_operator_and_modes_see_the_operator(monkeypatch):
    """Plain eager calls skip the custom operator's dispatch; a dispatch mode (what make_fx,
    FakeTensor and FlopCounterMode use) still sees fastbn::batch_norm_forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def refuse(*args, **kwargs):
        raise AssertionError("the custom operator was called on the eager path")
    module = fbt.BatchNorm2d(5)
    x = torch.randn(3, 5, 3, 7, requires_grad=True)
    with monkeypatch.context() as patch:
        patch.setattr(_ops, "batch_norm_forward", refuse)
        patch.setattr(_ops, "batch_norm_backward", refuse)
        module(x).sum().backward()
        with torch.no_grad():
            module(x)

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(str(func))
            return func(*args, **(kwargs or {}))
    with Record() as record:
        module(x).sum().backward()
    assert "fastbn.batch_norm_forward.default" in record.calls
    assert "fastbn.batch_norm_backward.default" in record.calls


def test_eager_path_gradcheck_float64():
    torch.manual_seed(0)
    for activation, with_residual in (("none", False), ("relu", True), ("sigmoid", False)):
        module = (fbt.BatchNorm2d(3, dtype=torch.float64) if activation == "none" else
                  fbt.BatchNormAct2d(3, activation=activation, dtype=torch.float64))
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
        x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)
        inputs = (x, module.weight, module.bias)
        if with_residual:
            inputs += (torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True),)
        for training in (True, False):
            module.train(training)
            assert torch.autograd.gradcheck(lambda x, w, b, *r: module(x, *r), inputs), \
                (activation, training)


def test_eager_path_bumps_buffer_versions_and_refuses_double_backward():
    module = fbt.BatchNorm2d(5)
    versions = module.running_mean._version, module.running_var._version
    x = torch.randn(3, 5, 3, 7, requires_grad=True)
    y = module(x)
    assert module.running_mean._version > versions[0]
    assert module.running_var._version > versions[1]
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        dx.sum().backward()


def test_eager_path_bad_input_changes_nothing():
    module = fbt.BatchNormAct2d(5)
    before = [b.clone() for b in module.buffers()]
    with pytest.raises(ValueError):
        module(torch.randn(1, 5, 1, 1))
    with pytest.raises(RuntimeError):
        module(torch.randn(3, 4, 3, 3))
    for got, want in zip(module.buffers(), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fused_module_with_broadcast_residual_falls_back():
    fused = fbt.BatchNormAct2d(5)
    reference = nn.BatchNorm2d(5)
    x = torch.randn(3, 5, 3, 7)
    residual = torch.randn(1, 5, 1, 1)
    assert_close(fused(x, residual), F.relu(reference(x) + residual), torch.float32, "y")


# ----------------------------------------------------------------------------------------------
# convert

class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: conv-BN-ReLU-conv-BN, + identity, ReLU."""

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


class SmallResNet(nn.Module):
    def __init__(self, classes=10, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(2 * width, 2 * width), nn.BatchNorm1d(2 * width),
                                  nn.ReLU(), nn.Linear(2 * width, classes))

    def forward(self, x):
        return self.head(self.layer2(self.layer1(self.stem(x))))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, but its child can be fused."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.block(x)
        if x.sum() > 0:
            x = x * 2
        return self.bn(x)


def _count(module, cls):
    return sum(type(m) is cls for m in module.modules())


def test_convert_replaces_shares_state_and_fuses():
    model = SmallResNet()
    parameters_before = {id(p) for p in model.parameters()}
    keys_before = set(model.state_dict())
    converted = fbt.convert(model)
    assert isinstance(converted, torch.fx.GraphModule)
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    # stem BN->ReLU, bn1->ReLU and bn2->add->ReLU per block, the head's BN1d->ReLU
    assert _count(converted, fbt.BatchNormAct2d) == 5
    assert _count(converted, fbt.BatchNormAct1d) == 1
    assert _count(converted, fbt.BatchNorm2d) == 1   # the downsample's BN: no activation after
    assert set(converted.state_dict()) == keys_before
    assert {id(p) for p in converted.parameters()} == parameters_before


def test_convert_without_fusion_keeps_the_class():
    model = SmallResNet()
    converted = fbt.convert(model, fuse=False)
    assert converted is model
    assert _count(converted, fbt.BatchNorm2d) == 6 and _count(converted, fbt.BatchNorm1d) == 1


def test_convert_untraceable_module_gets_plain_replacement_and_fused_children():
    model = Untraceable()
    converted = fbt.convert(model)
    assert converted is model
    assert type(converted.bn) is fbt.BatchNorm2d
    assert isinstance(converted.block, torch.fx.GraphModule)
    assert _count(converted, fbt.BatchNormAct2d) == 1
    x = torch.randn(2, 3, 6, 7)
    reference = Untraceable()
    reference.load_state_dict(model.state_dict())
    assert_close(converted(x), reference(x), torch.float32, "untraceable")


class FunctionalBlock(nn.Module):
    """The patterns written with functions: F.relu, torch.add then torch.relu, residual first."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = F.relu(self.bn1(x))
        return torch.relu(torch.add(x, self.bn2(y)))


class NotFusable(nn.Module):
    """BN outputs with a second user, and a residual mutated in place: nothing may fuse."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(x)
        z = F.relu(y) + y
        z += self.bn2(x)          # writes into z, which is used again below
        return F.relu(z) * z


def test_convert_fuses_functional_patterns():
    model = FunctionalBlock()
    reference = FunctionalBlock()
    reference.load_state_dict(model.state_dict())
    converted = fbt.convert(model)
    assert _count(converted, fbt.BatchNormAct2d) == 2
    x = make_input((3, 4, 3, 5), torch.float32, None, seed=4)
    assert_close(converted(x), reference(x), torch.float32, "functional patterns")


def test_convert_does_not_fuse_what_would_change_results():
    model = NotFusable()
    reference = NotFusable()
    reference.load_state_dict(model.state_dict())
    converted = fbt.convert(model)
    assert converted is model   # nothing fused: the module keeps its class
    assert _count(converted, fbt.BatchNormAct2d) == 0 and _count(converted, fbt.BatchNorm2d) == 2
    x = make_input((3, 4, 3, 5), torch.float32, None, seed=5)
    assert_close(converted(x), reference(x), torch.float32, "not fusable")


def test_convert_sync_gives_sync_batch_norm():
    converted = fbt.convert(SmallResNet(), sync=True)
    assert _count(converted, fbt.SyncBatchNorm) == 7
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())


def test_convert_keeps_modes_and_options():
    model = nn.Sequential(nn.BatchNorm2d(4, momentum=None, eps=1e-3, affine=False),
                          nn.BatchNorm1d(4, track_running_stats=False),
                          nn.BatchNorm3d(4, bias=False)).eval()
    converted = fbt.convert(model)
    for original, new in zip((nn.BatchNorm2d(4, momentum=None, eps=1e-3, affine=False),
                              nn.BatchNorm1d(4, track_running_stats=False),
                              nn.BatchNorm3d(4, bias=False)), converted):
        assert (new.momentum, new.eps, new.affine, new.track_running_stats) == \
            (original.momentum, original.eps, original.affine, original.track_running_stats)
        assert (new.bias is None) == (original.bias is None)
        assert not new.training
    # a frozen BN inside a training model (fine-tuning) stays frozen, fused or not
    model = SmallResNet().train()
    model.layer1.bn1.eval()
    converted = fbt.convert(model)
    assert converted.training and converted.layer2.bn1.training
    assert type(converted.layer1.bn1) is fbt.BatchNormAct2d and not converted.layer1.bn1.training


@pytest.mark.parametrize("memory_format", [None, torch.channels_last], ids=["NCHW", "NHWC"])
def test_converted_resnet_trains_like_torch(memory_format):
    """A few SGD steps with and without convert: the same losses, outputs and buffers."""
    torch.manual_seed(0)
    reference = SmallResNet()
    model = SmallResNet()
    model.load_state_dict(reference.state_dict())
    model = fbt.convert(model)
    if memory_format is not None:
        reference = reference.to(memory_format=memory_format)
        model = model.to(memory_format=memory_format)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
                  for m in (reference, model)]
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(6, 3, 9, 9, generator=generator)
        if memory_format is not None:
            x = x.to(memory_format=memory_format)
        labels = torch.randint(0, 10, (6,), generator=generator)
        losses = []
        for module, optimizer in zip((reference, model), optimizers):
            optimizer.zero_grad()
            loss = F.cross_entropy(module(x), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        # the error grows with every step through the optimizer: float32 level, a few ulps
        assert_close(losses[1], losses[0], torch.float32, f"loss at step {step}")
    for (name, ref_tensor), (_, tensor) in zip(sorted(reference.state_dict().items()),
                                                sorted(model.state_dict().items())):
        if ref_tensor.is_floating_point():
            torch.testing.assert_close(tensor, ref_tensor, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(tensor, ref_tensor), name
    reference.eval()
    model.eval()
    x = torch.randn(4, 3, 9, 9, generator=generator)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


def test_torch_compile_sees_one_graph_and_updates_buffers():
    """fullgraph=True: the custom ops (and the buffer copies) trace without a graph break."""
    torch.manual_seed(2)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model.load_state_dict(reference.state_dict())
    model = fbt.convert(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for step in range(2):
        x = make_input((3, 3, 6, 7), torch.float32, None, seed=step)
        y, y_ref = compiled(x), reference(x)
        assert_close(y, y_ref, torch.float32, f"compiled y, step {step}")
        (grad,) = torch.autograd.grad(y.sum(), x)
        (grad_ref,) = torch.autograd.grad(y_ref.sum(), x)
        assert_close(grad, grad_ref, torch.float32, f"compiled dx, step {step}")
    for (name, tensor), (_, ref_tensor) in zip(sorted(model.state_dict().items()),
                                                sorted(reference.state_dict().items())):
        assert_close(tensor.double(), ref_tensor.double(), torch.float32, name)


# ----------------------------------------------------------------------------------------------
# SyncBatchNorm in one process, and the import rules

def test_sync_batch_norm_without_process_group_is_local_batch_norm():
    fast, reference = make_pair(fbt.SyncBatchNorm, nn.BatchNorm2d, 5, torch.float32, {})
    for step in range(2):
        x = make_input((3, 5, 3, 7), torch.float32, None, seed=step)
        dy = make_input((3, 5, 3, 7), torch.float32, None, seed=10 + step, scale=1.0, shift=0.0)
        assert_same_step(fast, reference, x, dy.detach(), torch.float32, f"step {step}")


def test_import_fastbn_does_not_import_torch():
    code = "import sys, fastbn; assert 'torch' not in sys.modules, 'fastbn imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_without_torch_says_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import fastbn.torch\nexcept ImportError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True)
    assert 'pip install -e ".[torch]"' in result.stdout
    assert "pip install torch" in result.stdout


def test_bench_torch_quick_runs(tmp_path):
    """The benchmark, tiny, once: so that it cannot rot (the real run: docs/torch.md).

    It runs as users run it, in a process of its own (python -m benchmarks.bench_torch), under
    a deadline: a hang or a crash there fails this test with the child's tracebacks (Python's
    faulthandler dumps every thread's stack on SIGSEGV and when the deadline passes) instead of
    holding the test lane. A stop's CI once ran past its 90 minutes in this test, in-process:
    oneDNN's heap corruption (see fastbn_backend), so the child runs without oneDNN too."""
    import json

    from benchmarks import bench_torch
    out = tmp_path / "torch.json"
    deadline = 600
    code = ("import faulthandler, runpy, sys, torch; "
            "torch.backends.mkldnn.enabled = False; "  # see fastbn_backend
            f"faulthandler.dump_traceback_later({deadline}, exit=True); "
            f"sys.argv = ['bench_torch', '--quick', '--json', {str(out)!r}]; "
            "runpy.run_module('benchmarks.bench_torch', run_name='__main__')")
    try:
        result = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code],
                                capture_output=True, text=True, timeout=deadline + 60,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"bench_torch --quick ran past {deadline + 60} s; its output:\n"
                    f"{error.stdout}\n{error.stderr}")
    assert result.returncode == 0, (f"bench_torch --quick exit {result.returncode}:\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    results = json.loads(out.read_text())
    assert {row["layout"] for row in results["model"]} == {"NCHW", "channels_last"}
    assert all(row["train_speedup"] > 0 for row in results["model"])
    assert len(results["layers"]) == 7 and results["machine"]["cpu"]
    assert "train step, channels_last" in bench_torch.table(results)
