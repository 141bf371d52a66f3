"""Shared test configuration.

The backend-parametrized suites (test_backends.py, test_errors.py, test_invariants.py,
test_fused.py) run on the backends named in FASTBN_TEST_BACKENDS (comma-separated; default
"cpu"). The CUDA lane runs the same suites with FASTBN_TEST_BACKENDS=cuda, under
NUMBA_ENABLE_CUDASIM=1 in CI or on a real GPU.

PyTorch is the independent oracle, and it must not vanish silently: the session fails when any
test skips for lack of torch, and when CI is set and torch is not importable (set
FASTBN_ALLOW_NO_TORCH=1 to run without it on purpose).
"""
import importlib.util
import os
import re
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
    # cuda.shared.array races between a block's threads in the simulator (tests/_simulator.py)
    sys.path.insert(0, os.path.dirname(__file__))
    import _simulator
    _simulator.install()

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


# ----------------------------------------------------------------------------------------------
# the PyTorch oracle must not vanish silently

_NO_TORCH = re.compile(r"(could not import|no module named|not installed)\W+torch\b|"
                       r"\btorch\b.*(not installed|not importable|is missing)", re.IGNORECASE)
_skipped_for_torch = []


def _skip_reason(report):
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and _NO_TORCH.search(_skip_reason(report)):
        _skipped_for_torch.append(f"{report.nodeid}: {_skip_reason(report)}")


def _torch_problems():
    if os.environ.get("FASTBN_ALLOW_NO_TORCH"):
        return []
    problems = []
    if os.environ.get("CI") and importlib.util.find_spec("torch") is None:
        problems.append("CI is set but torch is not importable: the PyTorch oracle tests "
                        "cannot run (pip install -e \".[torch]\")")
    if _skipped_for_torch:
        problems.append(f"{len(_skipped_for_torch)} test(s) skipped for lack of torch:\n  "
                        + "\n  ".join(_skipped_for_torch[:20]))
    return problems


def pytest_sessionfinish(session, exitstatus):
    if _torch_problems() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    problems = _torch_problems()
    if problems:
        terminalreporter.section("the PyTorch oracle is missing: this session FAILS", red=True)
        for problem in problems:
            terminalreporter.line(problem, red=True)
