"""The output pool (fastbn/_pool.py): freed output memory is reused, memory a caller can still
reach never is, the pool stays within its bound, and it can be turned off every way."""
import gc
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import fastbn
from fastbn import _pool
from fastbn._pool import OutputPool, size_class

MIB = 1 << 20
SHAPE = (5, 7, 61, 67)            # 572 KiB of float32: above the 256 KiB threshold


def address(a):
    return a.__array_interface__["data"][0]


def pool(max_bytes=64 * MIB):
    return OutputPool(max_bytes=max_bytes)


# ---- reuse and reachability ------------------------------------------------------------------

def test_a_freed_output_is_reused():
    p = pool()
    first = p.empty(SHAPE, np.float32)
    where = address(first)
    del first
    again = p.empty(SHAPE, np.float32)
    assert address(again) == where
    stats = p.stats()
    assert (stats["hits"], stats["misses"], stats["blocks"]) == (1, 1, 1)


def _holders():
    """Ways a caller can keep an output's memory reachable after dropping the array itself."""
    holders = {
        "the array": lambda y: y,
        "a slice": lambda y: y[1:, ::2],
        "a transpose": lambda y: y.T,
        "a reshape": lambda y: y.reshape(-1),
        "a view of a view": lambda y: y[1:][:, 1:].view(np.uint8)[::3],
        "a dtype view": lambda y: y.view(np.int32),
        "its base": lambda y: y.base,
        "a memoryview": lambda y: memoryview(y),
        "np.frombuffer of a memoryview": lambda y: np.frombuffer(memoryview(y), np.float32),
        "as_strided": lambda y: as_strided(y, shape=(3,), strides=(8,)),
        "np.asarray": lambda y: np.asarray(y),
        "a list holding a view": lambda y: [y[0]],
        "np.array(copy=False)": lambda y: np.array(y, copy=False),
    }
    try:
        import torch
        holders["torch.from_numpy"] = lambda y: torch.from_numpy(y)
        holders["torch.from_numpy of a view"] = lambda y: torch.from_numpy(y[2:]).permute(0, 3, 1, 2)
        holders["torch.as_tensor"] = lambda y: torch.as_tensor(y)
    except ImportError:
        pass
    return holders


HOLDERS = _holders()


def _memory_of(held):
    """An array aliasing the memory a holder keeps (for overlap checks)."""
    if isinstance(held, list):
        held = held[0]
    if hasattr(held, "numpy"):          # a torch tensor
        held = held.numpy()
    return np.asarray(held)


@pytest.mark.parametrize("how", HOLDERS)
def test_reachable_memory_is_never_handed_out(how):
    p = pool()
    y = p.empty(SHAPE, np.float32)
    y[...] = 3.0
    held = HOLDERS[how](y)
    del y
    gc.collect(0)   # (no cycles hold these arrays: a young-generation pass, not a full one,
                    # which costs seconds in a process that has compiled many kernels)
    seen = _memory_of(held)
    before = np.array(seen, copy=True)
    for _ in range(3):
        other = p.empty(SHAPE, np.float32)
        assert not np.shares_memory(other, seen), how
        other[...] = -1.0
    assert np.array_equal(_memory_of(held), before)
    assert p.stats()["misses"] >= 2            # it had to make new blocks
    # once nothing reaches it, the block is reused
    del held, seen, other
    gc.collect(0)
    assert p.stats()["free_blocks"] == p.stats()["blocks"]


def test_live_outputs_never_overlap():
    p = pool()
    rng = np.random.default_rng(1)
    live = []
    for i in range(300):
        shape = (int(rng.integers(64, 200)), int(rng.integers(1000, 3000)))
        dtype = rng.choice([np.float16, np.float32, np.float64])
        a = p.empty(shape, dtype)
        a.view(np.uint8)[...] = i % 251
        live.append((a, i % 251))
        if len(live) > 6:
            live.pop(int(rng.integers(0, len(live))))
        for j, (b, _) in enumerate(live[:-1]):
            assert not np.shares_memory(a, b)
    for b, value in live:
        assert np.all(b.view(np.uint8) == value)


# ---- shapes, dtypes and memory order -----------------------------------------------------------

def _layouts():
    base = np.empty((6, 5, 47, 53), np.float32)            # 1.4 MiB
    return {
        "NCHW": base,
        "NHWC": np.empty((6, 47, 53, 5), np.float32),
        "NHWC memory as NCHW": np.empty((6, 47, 53, 5), np.float32).transpose(0, 3, 1, 2),
        "Fortran": np.asfortranarray(base),
        "negative strides": base[:, ::-1],
        "every other channel": base[:, ::2],
        "size-1 axes": np.empty((1, 300, 1, 600), np.float64).transpose(2, 1, 0, 3),
        "CHWN": np.empty((5, 47, 53, 6), np.float32).transpose(3, 0, 1, 2),
        "(N, C)": np.empty((4000, 70), np.float64),
        "(N, C) transposed": np.empty((70, 4000), np.float64).T,
        "1-D": np.empty(100000, np.float32),
        "float16": np.empty((6, 47, 53, 31), np.float16).transpose(0, 3, 1, 2),
        "small (not pooled)": np.empty((7, 3, 5), np.float32).transpose(2, 0, 1),
    }


@pytest.mark.parametrize("name", _layouts())
def test_empty_like_keeps_the_memory_order(name):
    a = _layouts()[name]
    p = pool()
    for _ in range(2):                   # a new block, then a reused one
        got = p.empty_like(a)
        want = np.empty_like(a, order="K")
        assert (got.shape, got.dtype, got.strides) == (want.shape, want.dtype, want.strides)
        assert got.flags.writeable and got.flags.aligned
        del got


@pytest.mark.parametrize("shape", [300000, (300000,), [600, 500], (2, 3, 4, 5, 6, 700), (0,),
                                   (0, 100000), (), (100,)])
@pytest.mark.parametrize("dtype", ["float16", np.float32, np.dtype(np.float64), "int8"])
def test_empty_matches_np_empty(shape, dtype):
    got = pool().empty(shape, dtype)
    want = np.empty(shape, dtype)
    assert (got.shape, got.dtype, got.strides) == (want.shape, want.dtype, want.strides)
    assert got.flags.c_contiguous and got.flags.writeable


def test_pooled_arrays_are_64_byte_aligned():
    p = pool()
    for n in (65536, 70001, 123457, 1 << 20):
        assert address(p.empty(n, np.float32)) % 64 == 0


def test_size_classes():
    previous = 0
    for n in list(range(1, 5000)) + [int(v) for v in np.geomspace(5000, 1 << 34, 2000)]:
        c = size_class(n)
        assert n <= c <= max(n * 1.125, 16), n
        assert c >= previous
        previous = c


# ---- bounds --------------------------------------------------------------------------------

def test_the_pool_stays_within_its_bound():
    p = pool(max_bytes=8 * MIB)
    live = []
    for _ in range(40):
        live.append(p.empty(MIB // 4, np.float32))          # 1 MiB each
        assert p.stats()["bytes_held"] <= 8 * MIB
    assert p.stats()["evicted"] >= 32
    # forgotten blocks stay valid while in use
    for i, a in enumerate(live):
        a[...] = i
    assert all(np.all(a == i) for i, a in enumerate(live))


def test_a_request_over_the_bound_is_a_plain_array():
    p = pool(max_bytes=2 * MIB)
    a = p.empty(MIB, np.float32)                 # 4 MiB
    assert p.stats()["blocks"] == 0 and p.stats()["bypassed"] == 1
    assert a.base is None


def test_small_requests_bypass_the_pool():
    p = pool()
    for n in (1, 100, 60 * 100, 65535):          # below 256 KiB of float32
        assert p.empty(n, np.float32).base is None
    assert p.stats()["blocks"] == 0


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_no_growth_over_10000_calls_with_varying_shapes():
    p = pool(max_bytes=32 * MIB)
    rng = np.random.default_rng(2)
    live = []

    def calls(n):
        for _ in range(n):
            shape = (int(rng.integers(2, 9)), int(rng.integers(64, 128)), int(rng.integers(100, 900)))
            a = p.empty(shape, np.float32)
            a.reshape(-1)[::1024] = 1.0              # touch every page
            live.append(a)
            if len(live) > 4:
                live.pop(0)
            stats = p.stats() if rng.random() < 0.01 else None
            if stats:
                assert stats["bytes_held"] <= 32 * MIB

    calls(1000)
    gc.collect()
    rss = _rss_bytes()
    held = p.stats()["bytes_held"]
    calls(9000)
    gc.collect()
    assert p.stats()["bytes_held"] <= 32 * MIB
    assert p.stats()["hits"] > 5000                 # it did reuse
    assert _rss_bytes() - rss < 16 * MIB, (rss, _rss_bytes(), held)


# ---- threads ---------------------------------------------------------------------------------

def test_threads_never_share_a_block():
    p = pool(max_bytes=24 * MIB)          # small enough that eviction happens too
    errors = []
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)

    def work(tag):
        rng = np.random.default_rng(tag)
        mine = []
        try:
            for i in range(300):
                shape = (int(rng.integers(80, 120)), 1024)
                a = p.empty(shape, np.float32)
                value = tag * 1000 + i
                a[...] = value
                mine.append((a, value))
                if len(mine) > 3:
                    mine.pop(0)
                for b, v in mine:
                    if not np.all(b == v):
                        errors.append(f"thread {tag}: an output was overwritten")
                        return
        except Exception as e:                      # pragma: no cover
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    stats = p.stats()
    assert stats["bytes_held"] <= 24 * MIB and stats["hits"] > 0


# ---- off switch --------------------------------------------------------------------------------

def test_max_bytes_zero_is_off():
    p = pool(max_bytes=0)
    for _ in range(5):
        a = p.empty(SHAPE, np.float32)
        assert a.base is None
        del a
    assert p.stats()["enabled"] is False and p.stats()["blocks"] == 0
    assert p.stats()["hits"] == 0


def test_configure_turns_it_off_and_on():
    p = pool()
    kept = p.empty(SHAPE, np.float32)
    kept[...] = 7.0
    p.empty(SHAPE, np.float32)
    assert p.stats()["blocks"] == 2
    p.configure(max_bytes=0)                       # drops every block, in use or free
    assert p.stats()["blocks"] == 0 and p.stats()["bytes_held"] == 0
    assert np.all(kept == 7.0)                     # an output in use stays valid
    assert p.empty(SHAPE, np.float32).base is None
    p.configure(max_bytes=64 * MIB)
    assert p.empty(SHAPE, np.float32).base is not None


def test_public_switch_of_the_global_pool():
    saved = _pool.output_pool_stats()["max_bytes"]
    try:
        stats = _pool.set_output_pool(0)
        assert stats["enabled"] is False and stats["bytes_held"] == 0
        assert _pool.empty(SHAPE, np.float32).base is None
        stats = _pool.set_output_pool(16 * MIB)
        assert stats["enabled"] is True and stats["max_bytes"] == 16 * MIB
        assert _pool.empty(SHAPE, np.float32).base is not None
        assert _pool.set_output_pool()["max_bytes"] == _pool.default_max_bytes()
    finally:
        _pool.set_output_pool(saved)


@pytest.mark.parametrize("bad", [-1, -MIB])
def test_negative_bounds_are_errors(bad):
    with pytest.raises(ValueError, match="max_bytes"):
        OutputPool(max_bytes=bad)
    with pytest.raises(ValueError, match="min_bytes"):
        pool().configure(min_bytes=bad)


_CHILD = ("import json, numpy as np, fastbn._pool as p; a = p.empty((1 << 20,), np.float32); "
          "print(json.dumps(p.output_pool_stats()))")


@pytest.mark.parametrize("value, enabled, max_bytes", [
    ("0", False, 0), ("33554432", True, 32 * MIB), ("1e8", True, 10 ** 8),
    ("", True, None)])
def test_environment_variable(value, enabled, max_bytes):
    env = dict(os.environ, FASTBN_OUTPUT_POOL_BYTES=value)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                         text=True, check=True).stdout
    stats = json.loads(out)
    assert stats["enabled"] is enabled
    assert stats["max_bytes"] == (max_bytes if max_bytes is not None
                                  else _pool.default_max_bytes())
    assert stats["blocks"] == (1 if enabled else 0)


def test_a_bad_environment_variable_names_itself():
    env = dict(os.environ, FASTBN_OUTPUT_POOL_BYTES="lots")
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "FASTBN_OUTPUT_POOL_BYTES" in proc.stderr


# ---- through the public API (once fastbn's host backends allocate from the pool) ---------------

wired = pytest.mark.skipif(not hasattr(fastbn, "set_output_pool"),
                           reason="fastbn does not export the output pool yet")


@wired
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_api_outputs_come_from_the_pool_and_stay_valid(backend):
    saved = fastbn.output_pool_stats()["max_bytes"]
    try:
        fastbn.set_output_pool(64 * MIB)
        rng = np.random.default_rng(3)
        x = rng.standard_normal(SHAPE).astype(np.float32)
        first = fastbn.batch_norm_forward(x, backend=backend).y
        copy = first.copy()
        hits = fastbn.output_pool_stats()["hits"]
        for _ in range(3):
            y = fastbn.batch_norm_forward(x * 2 + 1, backend=backend).y
            assert not np.shares_memory(y, first)
        assert np.array_equal(first, copy)
        assert fastbn.output_pool_stats()["hits"] > hits          # freed ones were reused
        xt = np.empty(SHAPE[:1] + SHAPE[2:] + SHAPE[1:2], np.float32).transpose(0, 3, 1, 2)
        xt[...] = x
        y = fastbn.batch_norm_forward(xt, backend=backend).y
        assert y.strides == np.empty_like(xt, order="K").strides
        fastbn.set_output_pool(0)
        assert fastbn.batch_norm_forward(x, backend=backend).y.base is None
    finally:
        fastbn.set_output_pool(saved)


@wired
def test_api_no_growth_over_10000_calls():
    saved = fastbn.output_pool_stats()["max_bytes"]
    try:
        fastbn.set_output_pool(32 * MIB)
        rng = np.random.default_rng(4)
        inputs = [rng.standard_normal((int(n), 3, 128, 171)).astype(np.float32)
                  for n in rng.integers(1, 6, 8)]
        for i in range(10000):
            x = inputs[i % len(inputs)]
            y, mean, invstd = fastbn.batch_norm_forward(x, axis=1 if i % 2 else -1)
            if i == 1000:
                gc.collect()
                held = fastbn.output_pool_stats()["bytes_held"]
                blocks = fastbn.output_pool_stats()["blocks"]
        stats = fastbn.output_pool_stats()
        assert stats["bytes_held"] <= 32 * MIB
        assert stats["blocks"] <= blocks + len(inputs) and stats["bytes_held"] <= held + 8 * MIB
    finally:
        fastbn.set_output_pool(saved)
