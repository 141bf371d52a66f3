"""The backend contract, written once: what every backend module must define.

A backend is a module (``reference``, ``cpu``, ``cuda``) exposing the array helpers and the
operations below, with exactly these parameter names. ``tests/test_contract.py`` checks every
backend against this table; ``HostRoundTrip`` (``_roundtrip.py``) reads the argument roles from
it to run any device backend on host arrays.

Conventions for every operation:

* x-shaped arguments (suffix ``3``) are canonical ``(outer, C, inner)`` views (``_layout.py``);
  ``inner == 1`` is the channels-last regime, ``inner > 1`` the channel-major one.
* per-channel vectors are 1-D ``(C,)`` arrays in the caller's own dtypes (float16, float32 or
  float64, possibly strided); ``weight``/``bias`` may be None (identity).
* ``mean``/``invstd``/``var`` outputs and ``dgamma``/``dbeta`` are written in their own dtype
  (the stats dtype the API chose). Every output is fully written by the operation.
* ``activation`` is None, ``"relu"`` or ``"sigmoid"``; ``residual3`` is None or an x-shaped
  input added before the activation: ``y = act(gamma * xhat + beta + residual)``.
* ``warn(channels)`` is called, before any running statistic changes, with the list of
  channels whose new running statistics would not be finite (in the running statistics'
  dtype); it may raise, and then nothing has changed. Those channels are left unchanged.
  A device backend that cannot call back without a host wait records them on the device
  instead (``fastbn.backends.cuda.nonfinite_channels()``).
* The API validates everything first: backends assume valid, non-overlapping arguments
  (except ``y3 is x3`` / ``dx3 is dy3``, the documented in-place calls).
"""
from typing import NamedTuple

ACTIVATIONS = (None, "relu", "sigmoid")


class Operation(NamedTuple):
    """One operation: its parameters in order, and the role of each array parameter."""
    params: tuple
    inputs: tuple = ()     #: read only
    inouts: tuple = ()     #: read and updated in place
    outputs: tuple = ()    #: written (every element)
    returns: str = ""      #: what it returns, if anything
    doc: str = ""


OPERATIONS = {
    "channel_moments": Operation(
        params=("x3",), inputs=("x3",), returns="(mean, m2): float64 (C,) arrays of the backend",
        doc="Exact per-channel mean and sum of squared deviations, in float64 (RunningMoments, "
            "the synchronized forward)."),
    "moments": Operation(
        params=("x3", "mean", "var"), inputs=("x3",), outputs=("mean", "var"),
        doc="Per-channel mean and biased variance, written in the outputs' dtype."),
    "forward_train": Operation(
        params=("x3", "weight", "bias", "eps", "momentum", "running_mean", "running_var",
                "activation", "residual3", "warn", "y3", "mean", "invstd"),
        inputs=("x3", "weight", "bias", "residual3"), inouts=("running_mean", "running_var"),
        outputs=("y3", "mean", "invstd"),
        doc="Algorithm 1 (+ activation, residual): batch mean and biased variance, y, and the "
            "running statistics r = (1 - momentum) r + momentum * batch (unbiased variance) "
            "when running_mean/running_var are not None."),
    "forward_eval": Operation(
        params=("x3", "weight", "bias", "running_mean", "running_var", "eps", "activation",
                "residual3", "y3", "mean", "invstd"),
        inputs=("x3", "weight", "bias", "running_mean", "running_var", "residual3"),
        outputs=("y3", "mean", "invstd"),
        doc="Algorithm 2 (+ activation, residual): normalize with the running statistics; "
            "mean = running_mean and invstd = 1/sqrt(running_var + eps) in the outputs' dtype."),
    "backward": Operation(
        params=("dy3", "x3", "mean", "invstd", "weight", "training", "activation", "y3", "dx3",
                "dgamma", "dbeta", "dresidual3"),
        inputs=("dy3", "x3", "mean", "invstd", "weight", "y3"),
        outputs=("dx3", "dgamma", "dbeta", "dresidual3"),
        doc="Gradients of forward_train (training=True: the statistics depend on x) or of "
            "forward_eval (False). With an activation its derivative is recovered from the "
            "forward's output y3 (relu: y > 0; sigmoid: y (1 - y)); dresidual3, when not None, "
            "receives the gradient of the residual (dy through the activation)."),
    "backward_reduce": Operation(
        params=("dy3", "x3", "mean"), inputs=("dy3", "x3", "mean"),
        returns="(3, C) float64 host array: sum(dy), sum(dy (x - mean)), sum(x - mean)",
        doc="The backward's per-channel reductions alone (the synchronized backward adds them "
            "over processes)."),
    "backward_apply": Operation(
        params=("dy3", "x3", "mean", "scale", "mean_dy", "coef", "dx3"),
        inputs=("dy3", "x3", "mean", "scale", "mean_dy", "coef"), outputs=("dx3",),
        doc="dx = scale (dy - mean_dy - (x - mean) coef) with per-channel float64 coefficients "
            "(the synchronized backward's last step)."),
    "update_running_stats": Operation(
        params=("running_mean", "running_var", "mean", "var", "count", "momentum", "warn"),
        inputs=("mean", "var"), inouts=("running_mean", "running_var"),
        doc="r = (1 - momentum) r + momentum * batch, with var * count / (count - 1); mean and "
            "var are float64 (C,) arrays of the backend (the synchronized forward)."),
}

# Array helpers every backend defines (the API layer uses nothing else).
HELPERS = {
    "owns": "owns(a) -> bool: whether a is memory of this backend's kind (host arrays for "
            "reference/cpu, __cuda_array_interface__ arrays for cuda)",
    "asarray": "asarray(a, name) -> the backend's array for a, or a TypeError naming `name`",
    "empty": "empty(shape, dtype) -> uninitialized array",
    "empty_like": "empty_like(a) -> uninitialized array of a's shape, dtype and memory order",
    "is_writeable": "is_writeable(a) -> bool",
    "view3": "view3(a, shape3, strides3) -> no-copy (outer, C, inner) view",
    "gather3": "gather3(a, perm, shape3) -> contiguous (outer, C, inner) copy",
    "scatter3": "scatter3(dst, src3, perm): write a gather3-shaped result back into dst",
    "byte_bounds": "byte_bounds(a) -> (low, high): the addresses a may touch, for overlap checks",
    "shares_memory": "shares_memory(a, b) -> bool: exact (or conservative) overlap test",
    "to_host": "to_host(a) -> a NumPy array with a's values",
    "to_device": "to_device(a) -> a's values in this backend's memory",
    "forward_direct": "forward_direct(x, gamma, beta, activation, residual, axis, eps, training, "
                      "running_mean, running_var, momentum) -> (y, mean, invstd), or None: the "
                      "whole public forward (no out=) on its raw arguments when they are of the "
                      "backend's common kind, with the bits of the API's path; None (having "
                      "changed nothing) for anything else, which the API then validates and "
                      "runs",
    "backward_direct": "backward_direct(dy, x, mean, invstd, gamma, activation, y, residual, "
                       "axis, training) -> (dx, dgamma, dbeta, dresidual or None), or None: as "
                       "forward_direct, for the backward",
    "result": "result(a) -> the caller's object for an output array (cuda: the PyTorch tensor or "
              "CuPy array it views; host backends: a itself)",
}

ATTRIBUTES = {
    "name": "the backend's name",
    "ON_DEVICE": "True for a backend whose arrays live in device memory",
}
