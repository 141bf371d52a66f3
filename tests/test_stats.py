"""fastbn.stats.RunningMoments: argument checks, all-or-nothing state loading, and non-finite
batches (skipped whole, with a warning naming the channels)."""
import warnings

import numpy as np
import pytest

import fastbn
from fastbn import stats


def filled(rng, channels=3):
    acc = fastbn.RunningMoments(channels)
    acc.update(rng.standard_normal((9, channels)) * 2 + 5)
    return acc


def assert_unchanged(acc, before):
    assert acc.count == before["count"]
    np.testing.assert_array_equal(acc.mean, before["mean"])
    np.testing.assert_array_equal(acc.m2, before["m2"])


@pytest.mark.parametrize("num_channels", [-1, 2.0, True, "3", None])
def test_num_channels_is_a_non_negative_integer(num_channels):
    with pytest.raises(ValueError, match="num_channels: expected a non-negative integer"):
        fastbn.RunningMoments(num_channels)
    assert fastbn.RunningMoments(np.int32(2)).num_channels == 2


@pytest.mark.parametrize("ddof", [-1, 0.5, 1.0, True, np.bool_(False), "1", None])
def test_var_rejects_a_ddof_that_is_not_a_non_negative_integer(rng, ddof):
    acc = filled(rng)
    with pytest.raises(ValueError, match=r"ddof: expected a non-negative integer, got"):
        acc.var(ddof=ddof)


def test_var_accepts_integer_ddof(rng):
    acc = filled(rng)
    np.testing.assert_allclose(acc.var(ddof=np.int64(1)), acc.m2 / (acc.count - 1))
    with pytest.raises(ValueError, match=r"ddof: expected less than count \(9\), got 9"):
        acc.var(ddof=9)


def _state(acc, **changes):
    state = acc.state_dict()
    state.update(changes)
    return state


@pytest.mark.parametrize("change,error,message", [
    (dict(count=np.int64(-1)), ValueError, r"state\['count'\]: expected a non-negative integer"),
    (dict(count=2.5), ValueError, r"state\['count'\]: expected a non-negative integer"),
    (dict(count=True), ValueError, r"state\['count'\]: expected a non-negative integer"),
    (dict(mean=np.array([1 + 2j, 0, 0])), TypeError, r"state\['mean'\]: expected real numbers"),
    (dict(m2=np.array(["a", "b", "c"])), TypeError, r"state\['m2'\]: expected real numbers"),
    (dict(mean=np.array([0.0, np.nan, 0.0])), ValueError,
     r"state\['mean'\]: expected finite values, got nan in channel 1"),
    (dict(m2=np.array([0.0, 1.0, np.inf])), ValueError,
     r"state\['m2'\]: expected finite values, got inf in channel 2"),
    (dict(m2=np.array([0.0, -1.0, 1.0])), ValueError,
     r"state\['m2'\]: expected non-negative .* got -1.0 in channel 1"),
    (dict(mean=np.zeros(4)), ValueError, r"state\['mean'\]: expected shape \(3,\), got \(4,\)"),
    (dict(extra=np.zeros(3)), ValueError, r"unexpected \['extra'\]"),
])
def test_load_state_dict_checks_every_entry_and_changes_nothing(rng, change, error, message):
    acc = filled(rng)
    source = fastbn.RunningMoments(3).update(rng.standard_normal((4, 3)))
    before = acc.state_dict()
    with pytest.raises(error, match=message):
        acc.load_state_dict(_state(source, **change))
    assert_unchanged(acc, before)


@pytest.mark.parametrize("key", ["count", "mean", "m2"])
def test_load_state_dict_names_a_missing_entry_without_a_bare_key_error(rng, key):
    acc = filled(rng)
    before = acc.state_dict()
    state = acc.state_dict()
    del state[key]
    with pytest.raises(ValueError, match=rf"missing \['{key}'\]"):
        acc.load_state_dict(state)
    assert_unchanged(acc, before)
    with pytest.raises(TypeError, match="state: expected a mapping"):
        acc.load_state_dict([1, 2, 3])


def test_load_state_dict_round_trip_through_npz(rng, tmp_path):
    acc = filled(rng)
    np.savez(tmp_path / "acc.npz", **acc.state_dict())
    with np.load(tmp_path / "acc.npz") as data:         # count comes back as a 0-d array
        copy = fastbn.RunningMoments(3).load_state_dict(dict(data))
    assert copy.count == acc.count and isinstance(copy.count, int)
    np.testing.assert_array_equal(copy.mean, acc.mean)
    np.testing.assert_array_equal(copy.m2, acc.m2)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_update_with_non_finite_data_warns_and_changes_nothing(rng, bad):
    acc = filled(rng, channels=4)
    before = acc.state_dict()
    x = rng.standard_normal((6, 4))
    x[2, 1] = bad
    x[4, 3] = bad
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) 1, 3 of 4"):
        assert acc.update(x) is acc
    assert_unchanged(acc, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning):
            acc.update(x)
    assert_unchanged(acc, before)
    acc.update(x[:, :][np.isfinite(x).all(axis=1)])     # the finite rows still go in
    assert acc.count == before["count"] + 4


def test_update_whose_statistics_overflow_is_skipped(rng):
    acc = fastbn.RunningMoments(2)
    x = np.array([[1e300, 1.0], [-1e300, 2.0]])          # M2 = 2e600 overflows float64
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) 0 of 2"):
        acc.update(x)
    assert acc.count == 0


def test_no_allreduce_method_and_no_import_of_distributed():
    """RunningMoments no longer reaches into fastbn.distributed (that was an import cycle);
    the MPI merge is fastbn.distributed.allreduce_moments(acc, comm)."""
    assert not hasattr(fastbn.RunningMoments, "allreduce")
    source = open(stats.__file__).read()
    assert "distributed" not in source.replace("fastbn.distributed.allreduce_moments", "")
