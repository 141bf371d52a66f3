"""Smoke run of every benchmark (CI): each implementation in benchmarks/registry.py is validated
against the NumPy reference and timed once on tiny cases of every layout and dtype, and the
full-run machinery (JSON, tables, markers, thread scaling, compile time) runs end to end.

The benchmarks themselves: ``python -m benchmarks.bench_cpu`` (docs/benchmarks.md).
"""
import json
import math
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:        # benchmarks/ is not installed; import it from the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_cpu, cold_start, registry  # noqa: E402
from benchmarks.cases import OPERATIONS, SMOKE_CASES  # noqa: E402

IMPLEMENTATIONS, SKIPPED = registry.available()


@pytest.fixture(autouse=True)
def _keep_every_round(monkeypatch):
    # the smoke run checks the machinery: with the simulator lane beside it every round would be
    # thrown away for load, with a pause each (bench_cpu.measure)
    monkeypatch.setattr(bench_cpu, "MAX_DISCARDED", 0)


@pytest.mark.parametrize("case", SMOKE_CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_every_implementation_is_valid_and_timed(case):
    rows = bench_cpu.run_case(case, IMPLEMENTATIONS, rounds=1, slow_rounds=1)
    assert [r["op"] for r in rows] == list(OPERATIONS)
    for row in rows:
        assert row["invalid"] == [], f"{row['op']}: {row['validation_error']}"
        assert set(row["timings"]) == set(IMPLEMENTATIONS)
        for name, t in row["timings"].items():
            # one kept round of `repeats` calls: its median is its minimum
            assert t["n"] == 1 and t["repeats"] >= 1, (name, t)
            assert math.isfinite(t["median_s"]) and t["min_s"] == t["median_s"], (name, t)
        # the ratios are the ones the timings give (what the tables print)
        fresh = row["timings"]["fastbn"]["median_s"]
        kernel = row["timings"].get("fastbn-out", row["timings"]["fastbn"])["median_s"]
        assert row["x_copy"] == pytest.approx(kernel / row["copy_floor_s"], rel=1e-12)
        assert row["gbps"] == pytest.approx(row["bytes"] / fresh / 1e9, rel=1e-12)
        assert row["bytes"] == case.bytes_moved(row["op"]) > 0


def test_torch_is_compared():
    import torch  # noqa: F401  (the baseline: missing torch is a failure, not a skip)
    assert "torch" in IMPLEMENTATIONS, SKIPPED


def _docs(tmp_path, markers=True):
    docs, readme = tmp_path / "benchmarks.md", tmp_path / "README.md"
    names = ("bench:cpu", "bench:cpu-threads", "bench:cpu-compile") if markers else ()
    docs.write_text("# b\n" + "".join(f"<!-- {m}:start -->\nold\n<!-- {m}:end -->\n"
                                      for m in names))
    readme.write_text("# r\n<!-- bench:cpu:start -->\nold\n<!-- bench:cpu:end -->\ntail\n")
    return docs, readme


def test_full_run_writes_json_and_tables(tmp_path):
    docs, readme = _docs(tmp_path)
    out = tmp_path / "cpu.json"
    bench_cpu.main(["--smoke", "--cases", "NC float32", "--no-compile", "--out", str(out),
                    "--docs", str(docs), "--readme", str(readme)])
    result = json.loads(out.read_text())
    assert result["machine"]["numba"] and result["results"]
    assert {r["threads"] for r in result["thread_scaling"]} >= {1}
    text = readme.read_text()
    assert "13×7 NC float32" in text and "old" not in text and text.endswith("tail\n")
    assert "× copy" in docs.read_text() and "old" not in docs.read_text().split("cpu-compile")[0]


def test_missing_markers_fail_before_measuring(tmp_path):
    docs, readme = _docs(tmp_path, markers=False)
    with pytest.raises(SystemExit, match="bench:cpu:start"):
        bench_cpu.main(["--smoke", "--no-compile", "--docs", str(docs), "--readme", str(readme)])


def test_cold_start_child_reports_first_calls():
    start = time.perf_counter()
    result = cold_start.child("ops", ["NCHW", "NC"], "float32", None)   # this checkout's cache
    elapsed = time.perf_counter() - start
    for layout in ("NCHW", "NC"):
        assert set(result[layout]) == set(cold_start.FIRST_CALLS) | {"moments"}
        assert all(math.isfinite(v) and v > 0 for v in result[layout].values())
    # what the child measured happened inside it: together no longer than the child's life
    measured = cold_start.first_calls_s(result, "NCHW") + cold_start.first_calls_s(result, "NC")
    assert 0 < measured <= elapsed, (measured, elapsed)