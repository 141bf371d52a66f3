"""fastbn's operations as PyTorch custom operators, with autograd and fake (meta) kernels.

Four operators, all with the channel axis 1 (PyTorch's layout convention):

``fastbn::batch_norm_forward`` / ``fastbn::batch_norm_backward``
    plain batch normalization.
``fastbn::batch_norm_act_forward`` / ``fastbn::batch_norm_act_backward``
    ``y = act(weight * xhat + bias + residual)`` in one pass (``activation`` "relu",
    "sigmoid" or "none"; ``residual`` x-shaped or None).

The forward operators are functional: they return the updated running statistics as new
tensors instead of writing the buffers, the way ATen's ``_native_batch_norm_legit_functional``
does, and the module copies them into its buffers. PyTorch 2.13 refuses an autograd formula
for a custom operator that declares ``mutates_args`` ("Cannot register autograd formula for
non-functional operator"). fastbn still updates them in the same pass as the statistics, on
copies of the buffers (C values each). The new statistics are (0,) tensors when nothing is
updated (eval, or no buffers), since a custom operator cannot return None.

Outputs are allocated by PyTorch (``torch.empty_like(x)`` keeps channels_last strides) and
handed to fastbn as ``out=``, so the real kernel and the fake kernel agree on every stride by
construction. CPU tensors reach fastbn as NumPy views (``Tensor.numpy()`` shares memory and
keeps strides: no copy); CUDA tensors are passed as they are and fastbn dispatches on their
``__cuda_array_interface__`` (that path is untested here: no GPU, see docs/torch.md).

The eager path. Dispatching a custom operator from Python costs tens of microseconds per call
(more with its autograd node), which is more than fastbn's kernels take on small feature maps.
So in plain eager mode on the CPU (:func:`eager_ok`: not compiling, not tracing, no dispatch or
torch-function mode, no functorch transform, a plain tensor) the modules call
:func:`eager_forward` instead: one ``torch.autograd.Function`` (or, when nothing needs a
gradient, a plain call) that calls fastbn directly. It computes what the operators compute,
with the same fastbn operations (the same bits), but updates the running statistics in place (fastbn
validates everything before it writes anything, so an error still leaves them untouched).
y, dx and dresidual are allocated by fastbn, from its output pool, and handed over
with ``torch.from_numpy`` (no copy): no ``out=`` checks, and above all no fresh pages. In a
training step PyTorch's own large allocations come back from the OS zero-filled page by page
(about 11,000 page faults per step of the benchmark's NCHW model, some 10 ms), and the pool
keeps its blocks. The price: such a tensor's storage cannot be resized (``resize_``, or
``out=`` of another shape, raises). The parameter gradients, which become ``.grad``, are
copied into PyTorch tensors (C values). torch.compile, torch.export, make_fx, opcheck and
everything else still see the four operators.
"""
from typing import Optional

import torch

import fastbn

__all__ = ["batch_norm_forward", "batch_norm_backward", "batch_norm_act_forward",
           "batch_norm_act_backward", "stats_dtype", "eager_ok", "eager_forward"]


def stats_dtype(dtype):
    """fastbn's dtype for mean/invstd: float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _view(t):
    """What fastbn gets for a tensor: a zero-copy NumPy view on the CPU, the tensor itself on
    CUDA (fastbn reads its __cuda_array_interface__)."""
    if t is None:
        return None
    t = t.detach()
    return t.numpy() if t.device.type == "cpu" else t


def _stream(x):
    """PyTorch's current stream for CUDA tensors (fastbn launches on it); None on the CPU."""
    return torch.cuda.current_stream(x.device) if x.device.type == "cuda" else None


def _activation(name):
    return None if name == "none" else name


# y, mean, invstd, new_running_mean, new_running_var
FORWARD_OUTPUTS = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _running_stats_for_fastbn(running_mean, running_var, training):
    """Copies for fastbn to update in training, the buffers themselves (read only) in eval."""
    if training and running_mean is not None:
        return running_mean.clone(), running_var.clone()
    return running_mean, running_var


def _new_running_stats(x, running_mean, running_var, training):
    """The forward's last two outputs: the updated copies, or (0,) placeholders."""
    if training and running_mean is not None:
        return running_mean, running_var
    return x.new_empty((0,)), x.new_empty((0,))


def _fake_running_stats(x, running_mean, running_var, training):
    if training and running_mean is not None:
        return torch.empty_like(running_mean), torch.empty_like(running_var)
    return x.new_empty((0,)), x.new_empty((0,))


def _empty_stats(x):
    channels = x.shape[1]
    dtype = stats_dtype(x.dtype)
    return x.new_empty((channels,), dtype=dtype), x.new_empty((channels,), dtype=dtype)


# ----------------------------------------------------------------------------------------------
# plain batch norm

@torch.library.custom_op("fastbn::batch_norm_forward", mutates_args=())
def batch_norm_forward(x: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                       running_var: Optional[torch.Tensor], training: bool, momentum: float,
                       eps: float) -> FORWARD_OUTPUTS:
    """(y, mean, invstd, new_running_mean, new_running_var); ``training`` means "normalize
    with the batch statistics" (and update the running statistics, when given)."""
    y = torch.empty_like(x)
    mean, invstd = _empty_stats(x)
    running_mean, running_var = _running_stats_for_fastbn(running_mean, running_var, training)
    fastbn.batch_norm_forward(_view(x), _view(weight), _view(bias), axis=1, eps=eps,
                              training=training, running_mean=_view(running_mean),
                              running_var=_view(running_var), momentum=momentum,
                              out=(_view(y), _view(mean), _view(invstd)), stream=_stream(x))
    return (y, mean, invstd) + _new_running_stats(x, running_mean, running_var, training)


@batch_norm_forward.register_fake
def _(x, weight, bias, running_mean, running_var, training, momentum, eps):
    return ((torch.empty_like(x),) + _empty_stats(x)
            + _fake_running_stats(x, running_mean, running_var, training))


@torch.library.custom_op("fastbn::batch_norm_backward", mutates_args=())
def batch_norm_backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                        invstd: torch.Tensor, weight: Optional[torch.Tensor],
                        training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dweight/dbias in mean's dtype whether or not weight is given."""
    dx = torch.empty_like(x)
    dweight, dbias = torch.empty_like(mean), torch.empty_like(mean)
    fastbn.batch_norm_backward(_view(dy), _view(x), _view(mean), _view(invstd), _view(weight),
                               axis=1, training=training,
                               out=(_view(dx), _view(dweight), _view(dbias)), stream=_stream(x))
    return dx, dweight, dbias


@batch_norm_backward.register_fake
def _(dy, x, mean, invstd, weight, training):
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)


def _param_grad(grad, param):
    """A parameter's gradient in the parameter's dtype (fastbn sums in the stats dtype)."""
    return None if param is None else grad.to(param.dtype)


def _bias_grad(grad, bias_dtype):
    return None if bias_dtype is None else grad.to(bias_dtype)


def _setup_forward(ctx, inputs, output):
    x, weight, bias, _running_mean, _running_var, training, _momentum, _eps = inputs
    _y, mean, invstd, new_running_mean, new_running_var = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.training = training
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, invstd, new_running_mean, new_running_var)
    ctx.set_materialize_grads(False)  # no zero gradients for the four statistics outputs


def _backward_forward(ctx, dy, *_statistics_grads):
    if dy is None:
        return (None,) * 8
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = batch_norm_backward(dy, x, mean, invstd, weight, ctx.training)
    return (dx, _param_grad(dweight, weight), _bias_grad(dbias, ctx.bias_dtype),
            None, None, None, None, None)


batch_norm_forward.register_autograd(_backward_forward, setup_context=_setup_forward)


# ----------------------------------------------------------------------------------------------
# batch norm + residual + activation, fused

@torch.library.custom_op("fastbn::batch_norm_act_forward", mutates_args=())
def batch_norm_act_forward(x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                           running_mean: Optional[torch.Tensor],
                           running_var: Optional[torch.Tensor], activation: str,
                           training: bool, momentum: float,
                           eps: float) -> FORWARD_OUTPUTS:
    """batch_norm_forward's outputs for y = act(weight * xhat + bias + residual)."""
    y = torch.empty_like(x)
    mean, invstd = _empty_stats(x)
    running_mean, running_var = _running_stats_for_fastbn(running_mean, running_var, training)
    fastbn.batch_norm_act_forward(_view(x), _view(weight), _view(bias),
                                  activation=_activation(activation), residual=_view(residual),
                                  axis=1, eps=eps, training=training,
                                  running_mean=_view(running_mean),
                                  running_var=_view(running_var), momentum=momentum,
                                  out=(_view(y), _view(mean), _view(invstd)), stream=_stream(x))
    return (y, mean, invstd) + _new_running_stats(x, running_mean, running_var, training)


@batch_norm_act_forward.register_fake
def _(x, weight, bias, residual, running_mean, running_var, activation, training, momentum,
      eps):
    return ((torch.empty_like(x),) + _empty_stats(x)
            + _fake_running_stats(x, running_mean, running_var, training))


@torch.library.custom_op("fastbn::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward(dy: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
                            mean: torch.Tensor, invstd: torch.Tensor,
                            weight: Optional[torch.Tensor], activation: str, residual: bool,
                            training: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias, dresidual); dresidual is an empty (0,) tensor when ``residual`` is
    False (custom operators cannot return None)."""
    dx = torch.empty_like(x)
    dweight, dbias = torch.empty_like(mean), torch.empty_like(mean)
    dresidual = torch.empty_like(x) if residual else x.new_empty((0,))
    fastbn.batch_norm_act_backward(_view(dy), _view(y), _view(x), _view(mean), _view(invstd),
                                   _view(weight), activation=_activation(activation),
                                   residual=residual, axis=1, training=training,
                                   out=(_view(dx), _view(dweight), _view(dbias),
                                        _view(dresidual) if residual else None),
                                   stream=_stream(x))
    return dx, dweight, dbias, dresidual


@batch_norm_act_backward.register_fake
def _(dy, y, x, mean, invstd, weight, activation, residual, training):
    dresidual = torch.empty_like(x) if residual else x.new_empty((0,))
    return torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean), dresidual


def _setup_act_forward(ctx, inputs, output):
    x, weight, bias, residual, _rm, _rv, activation, training, _momentum, _eps = inputs
    y, mean, invstd, new_running_mean, new_running_var = output
    ctx.save_for_backward(y, x, weight, mean, invstd)
    ctx.activation = activation
    ctx.training = training
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, invstd, new_running_mean, new_running_var)
    ctx.set_materialize_grads(False)


def _backward_act_forward(ctx, dy, *_statistics_grads):
    if dy is None:
        return (None,) * 10
    y, x, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias, dresidual = batch_norm_act_backward(
        dy, y, x, mean, invstd, weight, ctx.activation, ctx.has_residual, ctx.training)
    return (dx, _param_grad(dweight, weight), _bias_grad(dbias, ctx.bias_dtype),
            dresidual if ctx.has_residual else None,
            None, None, None, None, None, None)


batch_norm_act_forward.register_autograd(_backward_act_forward, setup_context=_setup_act_forward)


# ----------------------------------------------------------------------------------------------
# the eager path (see the module docstring)

_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_active = torch._C._are_functorch_transforms_active
_is_tracing = torch.jit.is_tracing
_increment_version = torch.autograd.graph.increment_version


def eager_ok(x, residual=None):
    """Whether the modules may call fastbn directly (:func:`eager_forward`) rather than through
    the custom operators: plain eager execution of plain CPU tensors, where nothing (compiler,
    tracer, mode, functorch transform) needs to see an operator."""
    return (not _is_compiling() and type(x) is torch.Tensor and x.device.type == "cpu"
            and (residual is None or type(residual) is torch.Tensor)
            and not _dispatch_modes() and not _function_modes() and not _functorch_active()
            and not _is_tracing())


def _np(t):
    return None if t is None else t.detach().numpy()


def _eager_call(x, weight, bias, residual, running_mean, running_var, activation, training,
                momentum, eps):
    """fastbn's forward on NumPy views: (y, mean, invstd), y a tensor over fastbn's output
    (``torch.from_numpy``: no copy), mean and invstd NumPy arrays. In training the running
    statistics (when given) are updated in place."""
    if activation == "none" and residual is None:
        y, mean, invstd = fastbn.batch_norm_forward(
            x.detach().numpy(), _np(weight), _np(bias), axis=1, eps=eps, training=training,
            running_mean=_np(running_mean), running_var=_np(running_var), momentum=momentum)
    else:
        y, mean, invstd = fastbn.batch_norm_act_forward(
            x.detach().numpy(), _np(weight), _np(bias), activation=_activation(activation),
            residual=_np(residual), axis=1, eps=eps, training=training,
            running_mean=_np(running_mean), running_var=_np(running_var), momentum=momentum)
    if training and running_mean is not None:
        _increment_version(running_mean)  # written through NumPy: tell autograd, as copy_ would
        _increment_version(running_var)
    return torch.from_numpy(y), mean, invstd


class _EagerBatchNorm(torch.autograd.Function):
    """y = act(weight * xhat + bias + residual) with fastbn's backward; the autograd formula of
    batch_norm_forward / batch_norm_act_forward, without the operator dispatch."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, activation, training,
                momentum, eps):
        y, mean, invstd = _eager_call(x, weight, bias, residual, running_mean, running_var,
                                      activation, training, momentum, eps)
        ctx.stats = (mean, invstd)
        ctx.activation = activation
        ctx.training = training
        ctx.has_residual = residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        if activation == "none":
            ctx.save_for_backward(x, weight)
        else:
            ctx.save_for_backward(x, weight, y)  # the activation's derivative comes from y
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        mean, invstd = ctx.stats
        saved = ctx.saved_tensors
        x, weight = saved[0], saved[1]
        # no out=: fastbn allocates (dx and dresidual from its output pool) and takes its
        # quickest validation (see the module docstring)
        if ctx.activation == "none" and not ctx.has_residual:
            dx, dweight, dbias = fastbn.batch_norm_backward(
                dy.detach().numpy(), x.detach().numpy(), mean, invstd, _np(weight), axis=1,
                training=ctx.training)
            dresidual = None
        else:
            y = saved[2] if ctx.activation != "none" else None
            dx, dweight, dbias, dresidual = fastbn.batch_norm_act_backward(
                dy.detach().numpy(), _np(y), x.detach().numpy(), mean, invstd, _np(weight),
                activation=_activation(ctx.activation), residual=ctx.has_residual, axis=1,
                training=ctx.training)
        needs = ctx.needs_input_grad
        # parameter gradients become .grad: PyTorch-owned tensors (cast, or copied when the
        # dtype already matches), never NumPy-backed ones
        return (torch.from_numpy(dx) if needs[0] else None,
                _owned_grad(dweight, weight.dtype) if needs[1] else None,
                _owned_grad(dbias, ctx.bias_dtype) if needs[2] else None,
                torch.from_numpy(dresidual) if needs[3] and dresidual is not None else None,
                None, None, None, None, None, None)


def _owned_grad(array, dtype):
    return torch.from_numpy(array).to(dtype, copy=True)


def _needs_grad(*tensors):
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def eager_forward(x, weight, bias, residual, running_mean, running_var, activation, training,
                  momentum, eps):
    """y as batch_norm_act_forward computes it (activation "none" and no residual: as
    batch_norm_forward), differentiable, for inputs :func:`eager_ok` accepts. Unlike the
    operators it updates running_mean / running_var in place (training and given), after
    fastbn has validated everything."""
    if _needs_grad(x, weight, bias, residual):
        return _EagerBatchNorm.apply(x, weight, bias, residual, running_mean, running_var,
                                     activation, training, momentum, eps)
    return _eager_call(x, weight, bias, residual, running_mean, running_var, activation,
                       training, momentum, eps)[0]
