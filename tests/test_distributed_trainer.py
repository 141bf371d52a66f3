"""Data-parallel training: ``mpiexec -n K fastbn paper --distributed`` against one process.

K ranks train on their rows of every global batch (61 rows: 31/30 on 2 ranks, 21/20/20 on 3),
with synchronized BatchNorm and the gradients summed over the ranks, and must reproduce the
metrics of plain single-process ``fastbn paper`` with the same arguments.

Tolerances. The network trains in float32. K ranks compute the same sums in another order:
each rank's BLAS sums its own rows, and the ranks' float32 gradients are then added in float64
and rounded once; the BN statistics are Chan-merged from per-shard moments instead of taken in
one pass. So each step differs from the single-process one by float32 rounding (about 1e-7
relative), and 300 steps of SGD at lr 2 amplify that: on the machine these were written on, the
largest differences were 2.5e-6 relative in the train and test losses and 1.6e-5 absolute in
the sigmoid-input percentiles (values of order 1), with equal test accuracies. The bounds below
are 1e-4 relative for losses and 2e-4 + 1e-4·|value| for percentiles (40x and 10x that), and
one test example for accuracies, as one image near a decision boundary may flip. (At learning
rates where training is chaotic, such as ``lr-sweep``'s x30, rounding differences grow
exponentially: there even one ``--distributed`` rank differs visibly from a plain run.)
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _mpi import MPIEXEC, TIMEOUT_S, launch, needs_mpi, needs_mpi4py
from fastbn import cli

HERE = Path(__file__).parent
PAPER_ARGS = ["--steps", "300", "--eval-every", "25", "--batch-size", "61", "--lr", "2",
              "--seed", "0", "--threads", "1", "--quiet"]
SWEEP_ARGS = ["--steps", "60", "--eval-every", "30", "--batch-size", "61", "--multipliers",
              "1,5", "--threads", "1", "--quiet"]
FASTBN = [sys.executable, "-m", "fastbn.cli"]
FIGURES = ["figure1.png", "figure1a_test_accuracy.png", "figure1b_baseline_sigmoid_input.png",
           "figure1c_bn_sigmoid_input.png"]
LOSS_RTOL = 1e-4
PERCENTILE_ATOL, PERCENTILE_RTOL = 2e-4, 1e-4


def rows_per_rank(batch, ranks):
    base, extra = divmod(batch, ranks)
    return [base + (r < extra) for r in range(ranks)]


def fastbn_run(tmp_path, *argv, ranks=None):
    """Run ``[mpiexec -n ranks] python -m fastbn.cli argv --out tmp_path``; returns
    (returncode, output)."""
    launcher = [] if ranks is None else [MPIEXEC, "-n", str(ranks)]
    return launch([*launcher, *FASTBN, *argv, "--out", str(tmp_path)])


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Plain ``fastbn paper`` in one process: the metrics every data-parallel run must match."""
    out = tmp_path_factory.mktemp("single")
    returncode, output = fastbn_run(out, "paper", *PAPER_ARGS)
    assert returncode == 0, output[-4000:]
    return json.loads((out / "metrics.json").read_text())


def assert_same_metrics(got, want):
    test_examples = want["dataset"]["test_size"]
    one_example = 1.0 / test_examples + 1e-12
    for name in ("baseline", "bn"):
        a, b = got["runs"][name], want["runs"][name]
        assert a["steps"] == b["steps"] and a["steps_done"] == b["steps_done"], name
        assert a["diverged_at_step"] == b["diverged_at_step"] is None, name
        np.testing.assert_allclose(a["test_accuracy"], b["test_accuracy"], rtol=0,
                                   atol=one_example, err_msg=f"{name}: test accuracy")
        for key in ("train_loss", "test_loss"):
            np.testing.assert_allclose(a[key], b[key], rtol=LOSS_RTOL, err_msg=f"{name}: {key}")
        for p, series in b["sigmoid_input_percentiles"].items():
            np.testing.assert_allclose(a["sigmoid_input_percentiles"][p], series,
                                       rtol=PERCENTILE_RTOL, atol=PERCENTILE_ATOL,
                                       err_msg=f"{name}: {p}th percentile")
    assert abs(got["runs"]["bn"]["final_test_accuracy_population_stats"]
               - want["runs"]["bn"]["final_test_accuracy_population_stats"]) <= one_example


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_paper_on_k_ranks_matches_one_process(ranks, single_process, tmp_path):
    returncode, output = fastbn_run(tmp_path, "paper", "--distributed", *PAPER_ARGS,
                                    ranks=ranks)
    assert returncode == 0, output[-4000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["ranks"] == ranks
    assert metrics["config"]["rows_per_rank"] == rows_per_rank(61, ranks)
    assert_same_metrics(metrics, single_process)
    # rank 0 alone writes and prints: one set of files, one summary, one data line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FIGURES + ["metrics.json"])
    assert output.count("wrote ") == 1 and output.count("data: ") == 1, output[-4000:]
    assert f"data parallel: {ranks} MPI ranks" in output


@needs_mpi4py
def test_distributed_without_mpiexec_is_one_rank(single_process, tmp_path):
    """``fastbn paper --distributed`` started without mpiexec runs as a single rank."""
    returncode, output = fastbn_run(tmp_path, "paper", "--distributed", *PAPER_ARGS)
    assert returncode == 0, output[-4000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["ranks"] == 1 and metrics["config"]["rows_per_rank"] == [61]
    assert_same_metrics(metrics, single_process)


@needs_mpi
@pytest.mark.mpi
def test_lr_sweep_on_two_ranks_matches_one_process(tmp_path):
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    for out, extra in ((single, dict()), (parallel, dict(ranks=2))):
        distributed = ["--distributed"] if extra else []
        returncode, output = fastbn_run(out, "lr-sweep", *distributed, *SWEEP_ARGS, **extra)
        assert returncode == 0, output[-4000:]
    want = json.loads((single / "lr_sweep.json").read_text())
    got = json.loads((parallel / "lr_sweep.json").read_text())
    assert got["config"]["ranks"] == 2 and got["config"]["rows_per_rank"] == [31, 30]
    one_example = 1.0 / want["dataset"]["test_size"] + 1e-12
    assert len(got["results"]) == len(want["results"]) == 4
    for a, b in zip(got["results"], want["results"]):
        what = f"{b['run']} x{b['multiplier']:g}"
        assert (a["run"], a["multiplier"], a["steps"], a["diverged_at_step"]) == \
               (b["run"], b["multiplier"], b["steps"], b["diverged_at_step"]), what
        np.testing.assert_allclose(a["test_accuracy"], b["test_accuracy"], rtol=0,
                                   atol=one_example, err_msg=what)
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=LOSS_RTOL,
                                   err_msg=what)


@needs_mpi
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_nn_api(ranks, tmp_path):
    """Trainer / train_step / evaluate / checkpoints / Algorithm 2 with ``comm`` against one
    process on a small float64 network, and their errors raised alike on every rank."""
    returncode, output = launch([MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpi4py",
                                 str(HERE / "mpi" / "check_trainer.py"), str(tmp_path)])
    assert returncode == 0, output[-6000:]
    assert f"check_trainer: {ranks} ranks, 0 failures" in output


# ----------------------------------------------------------------------------------------------
# failures: every rank ends, and the message names the rank

def _mpmd(tmp_path, rank0_argv, rank1_argv):
    """Two ranks with different command lines (MPI's MPMD launch: ``A : B``)."""
    return launch([MPIEXEC, "-n", "1", *FASTBN, *rank0_argv, "--out", str(tmp_path), ":",
                   "-n", "1", *FASTBN, *rank1_argv, "--out", str(tmp_path)])


@needs_mpi
@pytest.mark.mpi
def test_data_missing_on_one_rank_ends_every_rank(tmp_path):
    argv = ["paper", "--distributed", "--steps", "5", "--quiet"]
    returncode, output = _mpmd(tmp_path, argv, argv + ["--data", str(tmp_path / "nowhere")])
    assert returncode == 1, output[-4000:]
    assert ("fastbn: error: fastbn paper --distributed failed on rank 1 of 2: "
            "FileNotFoundError: --data") in output, output[-4000:]
    assert not (tmp_path / "metrics.json").exists()


@needs_mpi
@pytest.mark.mpi
def test_ranks_must_agree_on_the_training_options(tmp_path):
    argv = ["paper", "--distributed", "--quiet"]
    returncode, output = _mpmd(tmp_path, argv + ["--steps", "5"], argv + ["--steps", "7"])
    assert returncode == 1, output[-4000:]
    assert "--steps differs across ranks (rank 0: 5, rank 1: 7)" in output, output[-4000:]


INJECT_FAILURE = '''
import sys
from mpi4py import MPI
from fastbn import cli
from fastbn.nn import paper

if MPI.COMM_WORLD.Get_rank() == 1:
    def failing(*args, **kwargs):
        raise MemoryError("injected failure on one rank")
    paper.sigmoid_inputs = failing      # called after the first steps, on this rank only
status = cli.main(sys.argv[1:])
print("not reached" if status == 0 else f"status {status}", flush=True)
sys.exit(status)
'''


@needs_mpi
@pytest.mark.mpi
def test_unexpected_error_on_one_rank_aborts_the_job(tmp_path):
    script = tmp_path / "inject.py"
    script.write_text(INJECT_FAILURE)
    returncode, output = launch([MPIEXEC, "-n", "2", sys.executable, str(script), "paper",
                                 "--distributed", "--steps", "20", "--eval-every", "10",
                                 "--quiet", "--out", str(tmp_path)])
    assert returncode != 0
    assert ("fastbn paper: rank 1 of 2: MemoryError: injected failure on one rank"
            in output), output[-4000:]
    assert "aborting the MPI job" in output
    assert "not reached" not in output
    assert not (tmp_path / "metrics.json").exists()


def test_missing_mpi4py_says_how_to_install(tmp_path):
    # sys.modules[name] = None makes "import name" raise ImportError, as if not installed
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from fastbn import cli\n"
            f"sys.exit(cli.main(['paper', '--distributed', '--out', {str(tmp_path)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert result.returncode == 1
    assert 'pip install "fastbn[mpi]"' in result.stderr and "--distributed" in result.stderr
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("variable", ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_mpiexec_without_distributed_is_refused(monkeypatch, capsys, tmp_path, variable):
    """K copies of a plain run would each train alone and overwrite each other's files."""
    for name in cli._LAUNCHER_SIZE + cli._LAUNCHER_RANK:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "3")
    assert cli.main(["paper", "--steps", "5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "one of 3 MPI processes but without --distributed" in err
    assert not (tmp_path / "metrics.json").exists()
