"""The NumPy float64 reference, validated against independent oracles: central finite
differences, and PyTorch float64 autograd (torch is required: a missing oracle fails these tests
instead of skipping them, and conftest.py fails a session in which any test skips for it)."""
import numpy as np
import pytest

import fastbn

LAYOUTS = [((5, 3), 1), ((4, 3, 5), 1), ((3, 4, 2, 3), 1), ((3, 2, 3, 4), -1), ((2, 3, 4), 0)]


def _problem(rng, shape, axis):
    x = rng.standard_normal(shape) * 2.0 + 0.5
    channels = shape[axis]
    gamma = rng.uniform(0.5, 1.5, channels)
    beta = rng.standard_normal(channels)
    probe = rng.standard_normal(shape)          # loss = sum(y * probe)
    return x, gamma, beta, probe


def _loss(x, gamma, beta, probe, axis, training=True, running=None):
    if training:
        y = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, backend="reference").y
    else:
        y = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=False,
                                      running_mean=running[0], running_var=running[1],
                                      backend="reference").y
    return float(np.sum(y * probe))


def _central_difference(f, v, step=1e-6):
    grad = np.zeros_like(v)
    for index in np.ndindex(v.shape):
        keep = v[index]
        v[index] = keep + step
        plus = f()
        v[index] = keep - step
        minus = f()
        v[index] = keep
        grad[index] = (plus - minus) / (2 * step)
    return grad


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_reference_backward_matches_finite_differences(shape, axis, training, rng):
    x, gamma, beta, probe = _problem(rng, shape, axis)
    channels = shape[axis]
    running = (rng.standard_normal(channels), rng.uniform(0.5, 2.0, channels))

    def f():
        return _loss(x, gamma, beta, probe, axis, training, running)

    out = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, training=training,
                                    running_mean=None if training else running[0],
                                    running_var=None if training else running[1],
                                    backend="reference")
    dx, dgamma, dbeta = fastbn.batch_norm_backward(probe, x, out.mean, out.invstd, gamma,
                                                   axis=axis, training=training,
                                                   backend="reference")
    np.testing.assert_allclose(dx, _central_difference(f, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dgamma, _central_difference(f, gamma), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dbeta, _central_difference(f, beta), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False])
def test_reference_matches_torch_autograd(shape, axis, affine, rng):
    import torch      # the oracle: missing torch is a failure, not a skip
    x, gamma, beta, probe = _problem(rng, shape, axis)
    if not affine:
        gamma = beta = None
    channels = shape[axis]
    running_mean, running_var = rng.standard_normal(channels), rng.uniform(0.5, 2, channels)
    ours_rm, ours_rv = running_mean.copy(), running_var.copy()
    out = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, eps=1e-3, momentum=0.3,
                                    running_mean=ours_rm, running_var=ours_rv,
                                    backend="reference")
    grads = fastbn.batch_norm_backward(probe, x, out.mean, out.invstd, gamma, axis=axis,
                                       backend="reference")

    # torch normalizes over axis 1 only: move our channel axis there
    tx = torch.tensor(np.moveaxis(x, axis, 1), requires_grad=True)
    tg = None if gamma is None else torch.tensor(gamma, requires_grad=True)
    tb = None if beta is None else torch.tensor(beta, requires_grad=True)
    t_rm, t_rv = torch.tensor(running_mean), torch.tensor(running_var)
    ty = torch.nn.functional.batch_norm(tx, t_rm, t_rv, tg, tb, training=True, momentum=0.3,
                                        eps=1e-3)
    (ty * torch.tensor(np.moveaxis(probe, axis, 1))).sum().backward()

    np.testing.assert_allclose(out.y, np.moveaxis(ty.detach().numpy(), 1, axis), rtol=1e-12,
                               atol=1e-12)
    np.testing.assert_allclose(ours_rm, t_rm.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours_rv, t_rv.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grads.dx, np.moveaxis(tx.grad.numpy(), 1, axis), rtol=1e-10,
                               atol=1e-11)
    if affine:
        np.testing.assert_allclose(grads.dgamma, tg.grad.numpy(), rtol=1e-10, atol=1e-11)
        np.testing.assert_allclose(grads.dbeta, tb.grad.numpy(), rtol=1e-10, atol=1e-11)

    # eval mode against torch with the updated running statistics
    y_eval = fastbn.batch_norm(x, ours_rm, ours_rv, gamma, beta, eps=1e-3, axis=axis,
                               backend="reference")
    t_eval = torch.nn.functional.batch_norm(tx.detach(), t_rm, t_rv, tg, tb, training=False,
                                            eps=1e-3)
    np.testing.assert_allclose(y_eval, np.moveaxis(t_eval.detach().numpy(), 1, axis),
                               rtol=1e-12, atol=1e-12)


def test_reference_saved_statistics_match_torch_native(rng):
    import torch      # the oracle: missing torch is a failure, not a skip
    x = rng.standard_normal((6, 4, 5)).astype(np.float32) * 3 + 1
    out = fastbn.batch_norm_forward(x, eps=1e-5, backend="reference")
    _, save_mean, save_invstd = torch.native_batch_norm(torch.tensor(x), None, None, None, None,
                                                        True, 0.1, 1e-5)
    assert out.mean.dtype == np.float32 and out.invstd.dtype == np.float32
    np.testing.assert_allclose(out.mean, save_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.invstd, save_invstd.numpy(), rtol=1e-5)
