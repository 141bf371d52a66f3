"""Shared test configuration.

The backend-parametrized suites (test_backends.py, test_errors.py) run on the backends named in
FASTBN_TEST_BACKENDS (comma-separated; default "cpu"). The CUDA lane runs the same suites with
FASTBN_TEST_BACKENDS=cuda, under NUMBA_ENABLE_CUDASIM=1 in CI or on a real GPU.
"""
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("default", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=40, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("sim", deadline=None, max_examples=8, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
_profile = os.environ.get("FASTBN_HYPOTHESIS_PROFILE")
if _profile is None:
    _profile = "sim" if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else (
        "ci" if os.environ.get("CI") else "default")
settings.load_profile(_profile)

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    # The simulator runs every GPU thread as a Python thread and its block scheduler polls
    # them; a short GIL switch interval makes the whole simulator lane about 3x faster.
    sys.setswitchinterval(5e-4)

TEST_BACKENDS = [b.strip() for b in os.environ.get("FASTBN_TEST_BACKENDS", "cpu").split(",")
                 if b.strip()]


@pytest.fixture(params=TEST_BACKENDS, scope="session")
def backend(request):
    """A backend under test (compared against the reference)."""
    if request.param == "cuda":
        cuda = pytest.importorskip("numba.cuda")
        if not cuda.is_available():
            pytest.skip("no CUDA GPU and NUMBA_ENABLE_CUDASIM is not set")
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
