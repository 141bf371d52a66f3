"""The ``fastbn`` command's handling of user mistakes: every option and the data are checked
before training, a mistake is one line on stderr and exit status 2 (no traceback), and outputs
are written atomically with metrics.json before any figure."""
import json
import sys

import numpy as np
import pytest

from fastbn import cli
from fastbn.data import write_idx
from fastbn.data import mnist as mnist_module
from fastbn.nn import paper as paper_module


def run(capsys, *argv):
    """(exit status, stdout, stderr) of ``fastbn ARGV``, argparse's exits included."""
    try:
        status = cli.main(list(argv))
    except SystemExit as exit_info:
        status = exit_info.code
    out, err = capsys.readouterr()
    return status, out, err


def write_split(directory, split, images, labels, parts=(0, 1)):
    directory.mkdir(parents=True, exist_ok=True)
    for index in parts:
        write_idx(directory / (mnist_module.SPLIT_FILES[split][index] + ".gz"),
                  (images, labels)[index])


@pytest.fixture
def small_data(tmp_path, rng):
    """A --data directory of 150 training and 50 test images."""
    directory = tmp_path / "idx"
    images = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    labels = (np.arange(200) % 10).astype(np.uint8)
    write_split(directory, "train", images[:150], labels[:150])
    write_split(directory, "test", images[150:], labels[150:])
    return directory


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a run starts: every mistake must be caught before training."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(paper_module, "train_run", refuse)


def assert_one_line_error(status, err, *fragments):
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.mark.parametrize("argv,fragments", [
    (["paper", "--lr", "inf"], ["--lr", "finite", "inf"]),
    (["paper", "--lr", "nan"], ["--lr", "nan"]),
    (["paper", "--init-std", "inf"], ["--init-std", "inf"]),
    (["paper", "--seed", "-1"], ["--seed", "non-negative", "-1"]),
    (["paper", "--seed", "1.5"], ["--seed", "1.5"]),
    (["paper", "--threads", "0"], ["--threads", "0"]),
    (["lr-sweep", "--multipliers", "1,inf"], ["--multipliers", "inf"]),
    (["lr-sweep", "--lr", "1e300", "--multipliers", "1,1e10"], ["--multipliers 1e+10", "finite"]),
    (["paper", "--download", "--dataset", "fashion-mnist"], ["--download", "MNIST"]),
])
def test_bad_options_are_one_line_errors_before_training(tmp_path, capsys, no_training, argv,
                                                         fragments):
    out = tmp_path / "out"
    status, _, err = run(capsys, *argv, "--out", str(out), "--quiet")
    assert_one_line_error(status, err, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("command", ["paper", "lr-sweep"])
def test_out_naming_an_existing_file(tmp_path, capsys, no_training, command):
    target = tmp_path / "results"
    target.write_text("keep me")
    status, _, err = run(capsys, command, "--out", str(target), "--quiet")
    assert_one_line_error(status, err, f"--out {target}", "not a directory")
    assert target.read_text() == "keep me"
    status, _, err = run(capsys, command, "--out", str(target / "sub"), "--quiet")
    assert_one_line_error(status, err, "--out", "not a directory")


def test_batch_size_larger_than_the_training_set(tmp_path, capsys, no_training, small_data):
    status, _, err = run(capsys, "paper", "--data", str(small_data), "--batch-size", "151",
                         "--out", str(tmp_path / "out"), "--quiet")
    assert_one_line_error(status, err, "--batch-size 151", "150 training")
    assert not (tmp_path / "out").exists()


def test_data_directory_too_small_for_the_held_out_split(tmp_path, capsys, no_training, rng):
    directory = tmp_path / "idx"
    images = rng.integers(0, 256, (600, 28, 28), dtype=np.uint8)
    labels = (np.arange(600) % 10).astype(np.uint8)            # 60 per class, 100 are held out
    write_split(directory, "train", images, labels)
    status, _, err = run(capsys, "paper", "--data", str(directory), "--out",
                         str(tmp_path / "out"), "--quiet")
    assert_one_line_error(status, err, str(directory), "held-out", "100", "60")


@pytest.mark.parametrize("missing", [0, 1], ids=["labels-only", "images-only"])
def test_half_a_test_split_is_an_error_not_a_fallback(tmp_path, capsys, no_training, rng,
                                                      missing):
    directory = tmp_path / "idx"
    images = rng.integers(0, 256, (2500, 28, 28), dtype=np.uint8)
    labels = (np.arange(2500) % 10).astype(np.uint8)
    write_split(directory, "train", images, labels)
    write_split(directory, "test", images[:20], labels[:20], parts=(1 - missing,))
    status, _, err = run(capsys, "paper", "--data", str(directory), "--out",
                         str(tmp_path / "out"), "--quiet")
    assert_one_line_error(status, err, str(directory), mnist_module.SPLIT_FILES["test"][missing])


def test_broken_data_directory_is_a_one_line_error(tmp_path, capsys, no_training):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"")
    status, _, err = run(capsys, "paper", "--data", str(tmp_path), "--out",
                         str(tmp_path / "out"))
    assert_one_line_error(status, err, str(tmp_path / "train-"), "magic number")
    status, _, err = run(capsys, "paper", "--data", str(tmp_path / "nowhere"), "--out",
                         str(tmp_path / "out"))
    assert_one_line_error(status, err, "nowhere", "not a directory")


def test_missing_matplotlib_is_reported_before_training(tmp_path, capsys, no_training,
                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib fails
    for command in ("paper", "lr-sweep"):
        status, _, err = run(capsys, command, "--out", str(tmp_path / "out"), "--quiet")
        assert_one_line_error(status, err, "matplotlib", 'pip install "fastbn[paper]"')


def test_metrics_json_is_written_before_the_figures(tmp_path, capsys, small_data,
                                                    monkeypatch):
    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting broke")
    monkeypatch.setattr(paper_module, "plot_figure1", broken_plot)
    with pytest.raises(RuntimeError, match="plotting broke"):
        cli.main(["paper", "--data", str(small_data), "--steps", "4", "--batch-size", "20",
                  "--out", str(tmp_path / "out"), "--quiet"])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["config"]["steps"] == 4
    assert metrics["figures"] == list(paper_module.FIGURE1_FILES)


def test_figures_are_written_atomically(tmp_path, capsys, small_data, monkeypatch):
    """A figure that fails half-way leaves neither a partial PNG nor a temporary file."""
    from matplotlib.figure import Figure
    save = Figure.savefig
    calls = []

    def flaky_savefig(self, fname, *args, **kwargs):
        calls.append(fname)
        if len(calls) == 2:
            with open(fname, "wb") as f:
                f.write(b"\x89PNG half")
            raise OSError("disk full")
        return save(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", flaky_savefig)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        cli.main(["paper", "--data", str(small_data), "--steps", "4", "--batch-size", "20",
                  "--out", str(out), "--quiet"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["figure1a_test_accuracy.png", "metrics.json"], names


def test_an_unusable_backend_is_reported_before_training(tmp_path, capsys, no_training):
    import fastbn
    try:
        fastbn.batch_norm_forward(np.ones((2, 1), np.float32), backend="cuda")
    except RuntimeError:
        pass
    else:
        pytest.skip("the cuda backend works here")
    status, _, err = run(capsys, "paper", "--backend", "cuda", "--out", str(tmp_path / "out"),
                         "--quiet")
    assert_one_line_error(status, err, "--backend cuda", "GPU")
    assert not (tmp_path / "out").exists()
