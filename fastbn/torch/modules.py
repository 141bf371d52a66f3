"""Drop-in batch-norm modules: subclasses of PyTorch's, computed by fastbn's kernels.

They keep PyTorch's constructor, parameters, buffers and state_dict keys, and follow
``torch.nn.modules.batchnorm._BatchNorm.forward`` step for step. Two deliberate differences:
bad input raises before anything changes (PyTorch bumps ``num_batches_tracked`` before it
checks the batch), and a channel whose batch statistics are not finite keeps its running
statistics (fastbn's rule; a RuntimeWarning names it).

Cases fastbn does not compute go to PyTorch's own forward unchanged: an empty batch (PyTorch
returns a differentiable copy and leaves the running statistics alone), dtypes other than
float16/32/64 (bfloat16), devices other than CPU and CUDA, and eps <= 0 in eval mode.
"""
import torch
import torch.nn.functional as F

from . import _ops

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d",
           "BatchNormAct3d", "ACTIVATIONS"]

FAST_DTYPES = (torch.float16, torch.float32, torch.float64)
FAST_DEVICES = ("cpu", "cuda")
ACTIVATIONS = ("relu", "sigmoid")
_ACTIVATION_FUNCTIONS = {"none": lambda y: y, "relu": F.relu, "sigmoid": torch.sigmoid}


def check_batch(input, eps, what="batch_norm"):
    """PyTorch's training-mode checks, with its messages, before any buffer changes."""
    size = input.size()
    values_per_channel = size[0]
    for extent in size[2:]:
        values_per_channel *= extent
    if values_per_channel == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {size}")
    if not eps > 0:
        raise ValueError(f"{what} eps must be positive during training, but got {eps}")


def check_channels(module, input):
    """PyTorch raises RuntimeError when the channels disagree with the parameters/buffers."""
    if module.weight is None and module.running_mean is None:
        return  # nothing per channel to disagree with: PyTorch accepts any channel count
    if input.dim() < 2 or input.shape[1] != module.num_features:
        got = input.shape[1] if input.dim() >= 2 else None
        raise RuntimeError(f"input: expected {module.num_features} channels (num_features) on "
                           f"dim 1, got {got} for input of size {tuple(input.shape)}")


def fastbn_supports(module, input, residual=None):
    """Whether fastbn computes this call; otherwise PyTorch's own forward does."""
    return _supports(input, residual, module.eps, module.weight, module.bias, module.running_mean,
                     module.running_var)


def _supports(input, residual, eps, *vectors):
    if input.dtype not in FAST_DTYPES or input.device.type not in FAST_DEVICES \
            or input.numel() == 0:
        return False
    device = input.device
    for tensor in vectors:
        if tensor is not None and (tensor.dtype not in FAST_DTYPES or tensor.device != device):
            return False
    if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype
                                 or residual.device != device):
        return False  # broadcasting or type promotion: leave it to PyTorch's add
    return eps > 0


def _check_channels(num_features, input, weight, running_mean):
    """check_channels on tensors already read from the module."""
    if weight is None and running_mean is None:
        return
    if input.dim() < 2 or input.shape[1] != num_features:
        got = input.shape[1] if input.dim() >= 2 else None
        raise RuntimeError(f"input: expected {num_features} channels (num_features) on "
                           f"dim 1, got {got} for input of size {tuple(input.shape)}")


class _FastBatchNorm:
    """The forward shared by BatchNorm1d/2d/3d and their fused BatchNormAct variants."""

    def _momentum_factor(self):
        """PyTorch's exponential_average_factor for this batch, before num_batches_tracked
        is incremented (momentum=None: the cumulative average 1 / batches so far)."""
        if self.momentum is not None:
            return float(self.momentum)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            return 1.0 / float(self.num_batches_tracked + 1)
        return 0.0

    def _pytorch_forward(self, input, residual, activation):
        """The unfused computation in PyTorch: BN, then + residual, then the activation."""
        y = torch.nn.modules.batchnorm._BatchNorm.forward(self, input)
        if residual is not None:
            y = y + residual
        return _ACTIVATION_FUNCTIONS[activation](y)

    def _batch_norm(self, input, residual=None, activation="none"):
        self._check_input_dim(input)
        # each attribute read once (nn.Module.__getattr__ costs a dictionary search per read)
        training, eps = self.training, self.eps
        weight, bias = self.weight, self.bias
        running_mean, running_var = self.running_mean, self.running_var
        use_batch_stats = training or (running_mean is None and running_var is None)
        if use_batch_stats:
            check_batch(input, eps)
        if not _supports(input, residual, eps, weight, bias, running_mean, running_var):
            return self._pytorch_forward(input, residual, activation)
        _check_channels(self.num_features, input, weight, running_mean)
        factor = self._momentum_factor()
        # PyTorch passes the buffers only when they are updated (training and tracked) or
        # used to normalize (eval)
        if training and not self.track_running_stats:
            running_mean = running_var = None
        counts_batch = training and self.track_running_stats \
            and self.num_batches_tracked is not None
        if _ops.eager_ok(input, residual):
            # one fastbn call; it updates the running statistics in place, after it has
            # accepted the batch
            y = _ops.eager_forward(input, weight, bias, residual, running_mean, running_var,
                                   activation, use_batch_stats, factor, eps)
        else:
            if activation == "none" and residual is None:
                y, _, _, new_mean, new_var = _ops.batch_norm_forward(
                    input, weight, bias, running_mean, running_var, use_batch_stats, factor,
                    eps)
            else:
                y, _, _, new_mean, new_var = _ops.batch_norm_act_forward(
                    input, weight, bias, residual, running_mean, running_var, activation,
                    use_batch_stats, factor, eps)
            # only now that the batch was accepted
            if use_batch_stats and running_mean is not None:
                with torch.no_grad():
                    running_mean.copy_(new_mean)
                    running_var.copy_(new_var)
        if counts_batch:
            self.num_batches_tracked.add_(1)
        return y

    def forward(self, input):
        return self._batch_norm(input)


class BatchNorm1d(_FastBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by fastbn: (N, C) or (N, C, L) input."""


class BatchNorm2d(_FastBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by fastbn: (N, C, H, W) input, NCHW or channels_last."""


class BatchNorm3d(_FastBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by fastbn: (N, C, D, H, W) input."""


class _FusedActivation:
    """``act(BN(input) + residual)`` in one fastbn pass (what ``convert`` fuses BN -> ReLU and
    BN -> add -> ReLU into). Same parameters, buffers and state_dict keys as the BN module."""

    def __init__(self, *args, activation="relu", **kwargs):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(*args, **kwargs)
        self.activation = activation

    def extra_repr(self):
        return f"{super().extra_repr()}, activation={self.activation!r}"

    def forward(self, input, residual=None):
        return self._batch_norm(input, residual, self.activation)


class BatchNormAct1d(_FusedActivation, BatchNorm1d):
    """``act(BatchNorm1d(input) + residual)``, fused."""


class BatchNormAct2d(_FusedActivation, BatchNorm2d):
    """``act(BatchNorm2d(input) + residual)``, fused."""


class BatchNormAct3d(_FusedActivation, BatchNorm3d):
    """``act(BatchNorm3d(input) + residual)``, fused."""
