"""Softmax cross-entropy, forward and backward together."""
import numpy as np


def log_softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class SoftmaxCrossEntropy:
    """Mean over the batch of -log softmax(logits)[label].

    ``forward(logits, labels)`` returns the loss as a Python float (computed in float64);
    ``backward()`` returns dloss/dlogits = (softmax - onehot) / batch, in the logits' dtype.
    With ``total_batch_size`` the sum is divided by it instead of by this batch's size: in
    data-parallel training each rank passes the global batch size, so that the gradients summed
    over the ranks are those of the global batch's mean loss.

    See Also
    --------
    torch.nn.functional.cross_entropy
    """

    def __init__(self, total_batch_size=None):
        self.total_batch_size = total_batch_size

    def forward(self, logits, labels):
        labels = np.asarray(labels)
        rows = np.arange(len(labels))
        log_probs = log_softmax(logits.astype(np.float64))
        count = len(labels) if self.total_batch_size is None else self.total_batch_size
        self._saved = (log_probs, labels, logits.dtype, count)
        return float(-log_probs[rows, labels].sum() / count)

    def backward(self):
        log_probs, labels, dtype, count = self._saved
        dlogits = np.exp(log_probs)
        dlogits[np.arange(len(labels)), labels] -= 1.0
        return (dlogits / count).astype(dtype)

    __call__ = forward


def softmax_cross_entropy(logits, labels):
    """(loss, dloss/dlogits) in one call."""
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, labels)
    return loss, loss_fn.backward()
