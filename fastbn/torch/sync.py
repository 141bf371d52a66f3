"""SyncBatchNorm for CPU tensors over torch.distributed (gloo): statistics of the global batch.

In training, each rank computes its shard's per-channel (count, mean, M2) in float64 with
fastbn, the ranks all-gather them, and every rank merges them in rank order with Chan's
formula: the same operations on the same numbers, so every rank gets the same bits (and no
E[x^2] - E[x]^2 cancellation). Shards may be uneven or empty. The backward all-gathers the
per-channel float64 sums of dy and dy * (x - mean) and adds them in rank order.

Before any statistic is exchanged the ranks all-gather a small header (failed?, channels,
count, eps, dtype, momentum factor); bad input on any rank then raises the same
DistributedError on every rank instead of leaving the others waiting in a collective.

weight.grad and bias.grad are this rank's own sums, as in torch.nn.SyncBatchNorm:
DistributedDataParallel then reduces them like every other parameter's gradient.
"""
import warnings

import numpy as np
import torch
import torch.distributed as dist

import fastbn
from fastbn.distributed import DistributedError
from fastbn.stats import chan_merge

from .modules import FAST_DTYPES, _FastBatchNorm, check_channels

__all__ = ["SyncBatchNorm"]

_HEADER = ("failed", "channels", "count", "eps", "dtype", "momentum factor")


def _all_gather(tensor, group):
    """Every rank's tensor, in rank order."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return gathered


def _sum_in_rank_order(tensors):
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total += tensor
    return total


def _channel_view(vector, ndim):
    """A (C,) vector shaped to broadcast along dim 1 of an ndim-dimensional tensor."""
    return vector.view([1, -1] + [1] * (ndim - 2))


class _SyncBatchNormFunction(torch.autograd.Function):
    """y from the global statistics; backward with the global per-channel sums."""

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, eps, count, group):
        y = torch.empty_like(input)
        if input.numel() > 0:
            # the global statistics play the role of running statistics: normalize with them
            fastbn.batch_norm_forward(
                input.detach().numpy(), None if weight is None else weight.detach().numpy(),
                None if bias is None else bias.detach().numpy(), axis=1, eps=eps,
                training=False, running_mean=mean.numpy(), running_var=var.numpy(),
                out=(y.numpy(), None, None))
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        input, weight, mean, invstd = ctx.saved_tensors
        ndim = input.dim()
        reduce_dims = [0] + list(range(2, ndim))
        dy64 = dy.double()
        centered = input.double() - _channel_view(mean, ndim)
        local_sums = torch.stack([dy64.sum(reduce_dims), (dy64 * centered).sum(reduce_dims)])
        sum_dy, sum_dy_centered = _sum_in_rank_order(_all_gather(local_sums, ctx.group))
        scale = invstd if weight is None else invstd * weight.double()
        dx64 = (dy64 - _channel_view(sum_dy / ctx.count, ndim)
                - centered * _channel_view(invstd * invstd * sum_dy_centered / ctx.count, ndim)
                ) * _channel_view(scale, ndim)
        dx = torch.empty_like(input)
        dx.copy_(dx64)
        grad_weight = None if weight is None else (local_sums[1] * invstd).to(weight.dtype)
        grad_bias = None if ctx.bias_dtype is None else local_sums[0].to(ctx.bias_dtype)
        return dx, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(_FastBatchNorm, torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` for CPU tensors, over any torch.distributed process group
    (gloo). Eval mode, and training with a single process, normalize locally like
    fastbn.torch.BatchNorm*d."""

    def forward(self, input):
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        distributed = dist.is_available() and dist.is_initialized()
        if not (self.training and distributed and dist.get_world_size(group) > 1):
            return self._batch_norm(input)
        return self._sync_batch_norm(input, group)

    def _check_local(self, input):
        """This rank's checks; returns its count of values per channel."""
        self._check_input_dim(input)
        if input.dtype not in FAST_DTYPES:
            raise TypeError(f"input: expected float16, float32 or float64, got {input.dtype}")
        if input.device.type != "cpu":
            raise ValueError(f"input: fastbn.torch.SyncBatchNorm works on CPU tensors, got a "
                             f"tensor on {input.device}; use torch.nn.SyncBatchNorm on GPUs")
        if input.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        check_channels(self, input)
        if not self.eps > 0:
            raise ValueError(f"SyncBatchNorm eps must be positive during training, but got "
                             f"{self.eps}")
        return input.numel() // input.shape[1]

    def _agree(self, input, group):
        """Every rank learns every rank's header; any failure raises on every rank."""
        error, count = None, 0
        try:
            count = self._check_local(input)
        except Exception as exc:
            error = exc
        header = torch.tensor([error is not None, input.shape[1] if input.dim() >= 2 else -1,
                               count, float(self.eps),
                               FAST_DTYPES.index(input.dtype) if input.dtype in FAST_DTYPES
                               else -1, self._momentum_factor()], dtype=torch.float64)
        table = torch.stack(_all_gather(header, group))
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if table[:, 0].any():
            messages = [None] * world
            dist.all_gather_object(messages, None if error is None else
                                   f"{type(error).__name__}: {error}", group=group)
            failures = {r: m for r, m in enumerate(messages) if m is not None}
            text = "; ".join(f"rank {r} of {world}: {m}" for r, m in failures.items())
            raise DistributedError(f"SyncBatchNorm failed on {text}", failures) from error
        for column in (1, 3, 4, 5):
            if not (table[:, column] == table[0, column]).all():
                values = ", ".join(f"rank {r}: {v:g}" for r, v in
                                   enumerate(table[:, column].tolist()))
                raise DistributedError(f"SyncBatchNorm: {_HEADER[column]} differ across ranks "
                                       f"({values}); every rank must pass the same")
        counts = [int(c) for c in table[:, 2].tolist()]
        total = sum(counts)
        if total < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got "
                             f"{total} over all {world} ranks (this rank, {rank}, has input "
                             f"size {input.size()})")
        return counts

    def _sync_batch_norm(self, input, group):
        counts = self._agree(input, group)
        channels = input.shape[1]
        local = fastbn.RunningMoments(channels).update(input.detach().numpy(), axis=1)
        gathered = _all_gather(torch.from_numpy(np.stack([local.mean, local.m2])), group)
        count, mean, m2 = 0, np.zeros(channels), np.zeros(channels)
        for rank_count, rank_stats in zip(counts, gathered):
            rank_stats = rank_stats.numpy()
            count, mean, m2 = chan_merge(count, mean, m2, rank_count, rank_stats[0],
                                         rank_stats[1])
        mean = torch.from_numpy(mean)
        var = torch.from_numpy(m2 / count)   # biased: what the batch is normalized with
        y = _SyncBatchNormFunction.apply(input, self.weight, self.bias, mean, var,
                                         float(self.eps), count, group)
        if self.track_running_stats:
            self._update_running_stats(mean, var * (count / (count - 1)))
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean, unbiased_var):
        factor = self._momentum_factor()
        new_mean = ((1 - factor) * self.running_mean.double() + factor * mean
                    ).to(self.running_mean.dtype)
        new_var = ((1 - factor) * self.running_var.double() + factor * unbiased_var
                   ).to(self.running_var.dtype)
        finite = torch.isfinite(new_mean) & torch.isfinite(new_var)
        if not finite.all():
            channels = torch.nonzero(~finite).flatten().tolist()
            warnings.warn(f"SyncBatchNorm: batch statistics are not finite in channels "
                          f"{channels}; their running statistics were left unchanged",
                          RuntimeWarning, stacklevel=3)
        self.running_mean.copy_(torch.where(finite, new_mean, self.running_mean))
        self.running_var.copy_(torch.where(finite, new_var, self.running_var))
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
