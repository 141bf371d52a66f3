"""The paper's MNIST experiments (Ioffe & Szegedy 2015, section 4.1, Figure 1; section 3.3).

Figure 1: a 784-100-100-100-10 network of sigmoid units, small Gaussian initial weights and a
softmax cross-entropy loss, trained with mini-batches of 60 for 50,000 steps, once as is (the
baseline) and once with BatchNorm before each hidden sigmoid. Both runs share the learning
rate, the initial weights and the order of the mini-batches. Recorded at regular steps:
(a) test accuracy, with the BN network in inference (eval) mode; (b, c) the 15th, 50th and
85th percentiles of the input to one fixed sigmoid of the last hidden layer, over a fixed
batch of test images, also in eval mode.

The learning-rate sweep trains both networks at multiples of the learning rate, to show that
BN tolerates rates at which the baseline stalls or diverges.

Both run data parallel over MPI with ``comm`` (``mpiexec -n K fastbn paper --distributed``):
every rank builds the same networks, trains on its rows of every global batch (BatchNorm
synchronized, gradients summed over the ranks) and evaluates its share of the test set, and
every rank returns the same metrics, equal to a single process's up to the order of float
additions.
"""
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .layers import BatchNormActivation, Linear, Sequential, Sigmoid
from .optim import SGD
from .population import recompute_population_stats
from .train import DIVERGENCE_LOSS, Trainer, diverged, evaluate, quiet_divergence

HIDDEN = (100, 100, 100)
PERCENTILES = (15, 50, 85)
RUN_NAMES = ("baseline", "bn")
RUN_LABELS = {"baseline": "Without BN", "bn": "With BN"}

DEFAULTS = dict(steps=50_000, batch_size=60, lr=0.5, init_std=0.01, seed=0, momentum=0.0,
                weight_decay=0.0, monitor_size=1000, unit=0, target=0.9)
SWEEP_DEFAULTS = dict(DEFAULTS, steps=10_000, multipliers=(1, 5, 30), stall_below=0.5)
FIGURE1_FILES = ("figure1a_test_accuracy.png", "figure1b_baseline_sigmoid_input.png",
                 "figure1c_bn_sigmoid_input.png", "figure1.png")
LR_SWEEP_FILE = "lr_sweep.png"


def paper_network(batch_norm, *, init_std=DEFAULTS["init_std"], seed=0, hidden=HIDDEN,
                  dtype=np.float32, backend=None, comm=None):
    """784-100-100-100-10 sigmoid MLP; with ``batch_norm`` a BatchNorm before each hidden
    sigmoid, fused with it into one :class:`BatchNormActivation` layer (and no bias in the
    Linear before it: BN's beta takes that role). The same ``seed`` gives both variants the
    same initial weights. ``comm``: the BatchNorm layers are synchronized over this MPI
    communicator (data-parallel training)."""
    rng = np.random.default_rng(seed)
    layers, width = [], 784
    for size in hidden:
        layers.append(Linear(width, size, bias=not batch_norm, std=init_std, rng=rng,
                             dtype=dtype))
        if batch_norm:
            layers.append(BatchNormActivation(size, "sigmoid", dtype=dtype, backend=backend,
                                              comm=comm))
        else:
            layers.append(Sigmoid())
        width = size
    layers.append(Linear(width, 10, std=init_std, rng=rng, dtype=dtype))
    return Sequential(*layers)


def _is_sigmoid(layer):
    return isinstance(layer, Sigmoid) or (isinstance(layer, BatchNormActivation)
                                          and layer.activation == "sigmoid")


def sigmoid_inputs(model, x, unit):
    """The input to sigmoid ``unit`` of the last hidden layer, for each row of ``x``, with the
    model in eval mode (for a fused BN + sigmoid layer: its BN output)."""
    last = max(i for i, layer in enumerate(model.layers) if _is_sigmoid(layer))
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for layer in model.layers[:last]:
            x = layer.forward(x)
        if isinstance(model.layers[last], BatchNormActivation):
            x = model.layers[last].normalize(x)
    finally:
        for module, mode in modes:
            module.training = mode
    return x[:, unit]


def evaluation_steps(steps, eval_every=None):
    """The steps after which a run is evaluated: every ``eval_every`` (default steps // 50,
    which gives 50 points) and always the last step."""
    eval_every = max(1, steps // 50) if eval_every is None else eval_every
    points = list(range(eval_every, steps + 1, eval_every))
    if not points or points[-1] != steps:
        points.append(steps)
    return points


def steps_to_reach(record, target):
    """The first evaluated step at which test accuracy >= target, or None."""
    for step, accuracy in zip(record["steps"], record["test_accuracy"]):
        if accuracy >= target:
            return step
    return None


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal; on a pipe, a line
    every 10%)."""

    def __init__(self, total, label, stream=None, enabled=True, width=24):
        self.total, self.label, self.width, self.enabled = total, label, width, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.start = time.perf_counter()
        self._last_draw = -math.inf
        self._last_decile = -1

    def update(self, done, note=""):
        if not self.enabled:
            return
        now = time.perf_counter()
        decile = 10 * done // max(self.total, 1)
        finished = done >= self.total
        if self.tty and not finished and now - self._last_draw < 0.2:
            return
        if not self.tty and decile == self._last_decile and not finished:
            return
        self._last_draw, self._last_decile = now, decile
        elapsed = now - self.start
        fill = self.width * done // max(self.total, 1)
        eta = elapsed / done * (self.total - done) if done else 0.0
        line = (f"{self.label:<10} [{'#' * fill}{'.' * (self.width - fill)}] "
                f"{done:>{len(str(self.total))}}/{self.total} {elapsed:6.1f}s "
                f"eta {eta:5.0f}s {note}")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        if self.tty and finished:
            self.stream.write("\n")
        self.stream.flush()


def train_run(model, data, *, steps, lr, batch_size, seed, eval_steps, monitor_x=None,
              unit=0, momentum=0.0, weight_decay=0.0, progress=None, comm=None):
    """Train ``model`` and record the curves; stops at the first diverged loss (NaN, inf, or
    above ``DIVERGENCE_LOSS``). With an MPI communicator ``comm``, data parallel (see
    :class:`Trainer`; the model's BatchNorm layers must be built with ``comm``); ``batch_size``
    is the global batch.

    Returns a dict with ``steps``, ``test_accuracy``, ``test_loss``, ``train_loss`` (the mean
    mini-batch loss since the previous evaluation), ``sigmoid_input_percentiles``,
    ``diverged_at_step`` (None if the run finished) and timing.
    """
    train_x, train_y, test_x, test_y = data
    optimizer = SGD(model.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    trainer = Trainer(model, optimizer, train_x, train_y, batch_size=batch_size,
                      rng=np.random.default_rng([seed, 1]), comm=comm)
    record = {"steps": [], "test_accuracy": [], "test_loss": [], "train_loss": [],
              "sigmoid_input_percentiles": {str(p): [] for p in PERCENTILES},
              "diverged_at_step": None}
    train_seconds = 0.0
    with quiet_divergence():
        for point in eval_steps:
            start = time.perf_counter()
            losses = trainer.run(point - trainer.steps_done)
            train_seconds += time.perf_counter() - start
            if losses and diverged(losses[-1]):
                record["diverged_at_step"] = trainer.steps_done
                if progress is not None:
                    progress.update(progress.total, f"diverged at step {trainer.steps_done}")
                break
            accuracy, test_loss = evaluate(model, test_x, test_y, comm=comm)
            record["steps"].append(trainer.steps_done)
            record["test_accuracy"].append(accuracy)
            record["test_loss"].append(test_loss)
            record["train_loss"].append(float(np.mean(losses)))
            if monitor_x is not None:   # every rank holds the same model: no communication
                values = sigmoid_inputs(model, monitor_x, unit)
                for p, q in zip(PERCENTILES, np.percentile(values, PERCENTILES)):
                    record["sigmoid_input_percentiles"][str(p)].append(float(q))
            if progress is not None:
                progress.update(trainer.steps_done, f"test acc {accuracy:.4f}")
    record["steps_done"] = trainer.steps_done
    record["final_test_accuracy"] = record["test_accuracy"][-1] if record["steps"] else None
    record["best_test_accuracy"] = max(record["test_accuracy"]) if record["steps"] else None
    record["train_seconds"] = train_seconds
    record["ms_per_step"] = 1e3 * train_seconds / max(trainer.steps_done, 1)
    return record


def population_accuracy(model, data, batch_size, comm=None):
    """Test accuracy after Algorithm 2: BN statistics recomputed over the whole training set
    in mini-batches of ``batch_size`` (the last incomplete one left out). With ``comm``, each
    rank feeds its rows of every mini-batch to the synchronized BatchNorm layers."""
    train_x, _, test_x, test_y = data
    start, stop = 0, batch_size
    if comm is not None:
        from fastbn import distributed
        start, stop = distributed.shard(batch_size, comm)
    batches = [train_x[i + start:i + stop]
               for i in range(0, len(train_x) - batch_size + 1, batch_size)]
    recompute_population_stats(model, batches)
    return evaluate(model, test_x, test_y, comm=comm)[0]


def monitor_batch(test_x, size, seed):
    """The fixed batch on which the sigmoid-input percentiles are measured."""
    size = min(size, len(test_x))
    index = np.random.default_rng([seed, 2]).choice(len(test_x), size, replace=False)
    return test_x[np.sort(index)]


def run_paper(dataset, *, steps=DEFAULTS["steps"], batch_size=DEFAULTS["batch_size"],
              lr=DEFAULTS["lr"], init_std=DEFAULTS["init_std"], seed=DEFAULTS["seed"],
              eval_every=None, backend=None, momentum=DEFAULTS["momentum"],
              weight_decay=DEFAULTS["weight_decay"], monitor_size=DEFAULTS["monitor_size"],
              unit=DEFAULTS["unit"], target=DEFAULTS["target"], show_progress=True,
              stream=None, comm=None):
    """Train the baseline and the BN network; return the metrics (see ``fastbn paper``).

    With an MPI communicator ``comm`` (collective: every rank passes the same dataset and
    arguments), both networks are trained data parallel on the global batch ``batch_size``;
    every rank returns the same metrics, and only rank 0 shows progress."""
    data = dataset.arrays()
    eval_steps = evaluation_steps(steps, eval_every)
    monitor_x = monitor_batch(data[2], monitor_size, seed)
    config = dict(steps=steps, batch_size=batch_size, lr=lr, init_std=init_std, seed=seed,
                  eval_every=eval_steps[0] if len(eval_steps) > 1 else steps,
                  evaluation_points=len(eval_steps), backend=backend or "cpu",
                  momentum=momentum, weight_decay=weight_decay, hidden=list(HIDDEN),
                  activation="sigmoid", dtype="float32", monitor_batch_size=len(monitor_x),
                  monitor_unit=unit, monitor_layer="last hidden (input to its sigmoid)",
                  target_accuracy=target, bn_eval="running averages (momentum 0.1)",
                  **parallel_config(batch_size, comm))
    show_progress = show_progress and (comm is None or comm.Get_rank() == 0)
    runs = {}
    for name in RUN_NAMES:
        model = paper_network(name == "bn", init_std=init_std, seed=seed, backend=backend,
                              comm=comm)
        progress = Progress(steps, name, stream=stream, enabled=show_progress)
        runs[name] = train_run(model, data, steps=steps, lr=lr, batch_size=batch_size,
                               seed=seed, eval_steps=eval_steps, monitor_x=monitor_x,
                               unit=unit, momentum=momentum, weight_decay=weight_decay,
                               progress=progress, comm=comm)
        if name == "bn" and runs[name]["diverged_at_step"] is None:
            runs[name]["final_test_accuracy_population_stats"] = population_accuracy(
                model, data, batch_size, comm)
    metrics = {"config": config, "dataset": dataset.describe(), "runs": runs}
    metrics["summary"] = summarize(runs, target)
    return metrics


def parallel_config(batch_size, comm):
    """The config entries that say how the global batch was split (one process: 1 rank)."""
    if comm is None:
        return dict(ranks=1)
    from fastbn.distributed import shard_bounds
    size = comm.Get_size()
    rows = [stop - start for start, stop in (shard_bounds(batch_size, rank, size)
                                             for rank in range(size))]
    return dict(ranks=size, rows_per_rank=rows,
                data_parallel="MPI: synchronized BatchNorm, gradients summed over the ranks")


def summarize(runs, target):
    """Final accuracies and steps to reach ``target`` and the baseline's final accuracy."""
    baseline_final = runs["baseline"]["final_test_accuracy"]
    summary = {"target_accuracy": target, "baseline_final_accuracy": baseline_final}
    for name, record in runs.items():
        summary[name] = {
            "final_test_accuracy": record["final_test_accuracy"],
            "best_test_accuracy": record["best_test_accuracy"],
            "steps_to_target": steps_to_reach(record, target),
            "steps_to_baseline_final": (None if baseline_final is None
                                        else steps_to_reach(record, baseline_final)),
            "diverged_at_step": record["diverged_at_step"],
            "ms_per_step": record["ms_per_step"],
        }
    return summary


def _pct(value):
    return "-" if value is None else f"{100 * value:.2f}%"


def _steps(value):
    return "never" if value is None else f"{value:,}"


def summary_table(metrics):
    """The plain-text table printed at the end of ``fastbn paper``."""
    summary = metrics["summary"]
    target = summary["target_accuracy"]
    baseline_final = summary["baseline_final_accuracy"]
    head = ["run", "final acc", "best acc", f"steps to {_pct(target)}",
            f"steps to {_pct(baseline_final)} (baseline final)", "ms/step"]
    rows = []
    for name in RUN_NAMES:
        s = summary[name]
        final = _pct(s["final_test_accuracy"])
        if s["diverged_at_step"] is not None:
            final = f"diverged@{s['diverged_at_step']}"
        rows.append([RUN_LABELS[name], final, _pct(s["best_test_accuracy"]),
                     _steps(s["steps_to_target"]), _steps(s["steps_to_baseline_final"]),
                     f"{s['ms_per_step']:.2f}"])
    lines = _format_table(head, rows)
    bn_record = metrics["runs"]["bn"]
    if "final_test_accuracy_population_stats" in bn_record:
        lines.append(f"With BN, inference statistics from Algorithm 2 (population over the "
                     f"training set): {_pct(bn_record['final_test_accuracy_population_stats'])}")
    bn_steps, base_steps = (summary["bn"]["steps_to_baseline_final"],
                            summary["baseline"]["steps_to_baseline_final"])
    if bn_steps and base_steps:
        ratio = base_steps / bn_steps
        compared = f"{ratio:.1f}x fewer" if ratio >= 1 else f"{1 / ratio:.1f}x more"
        lines.append(f"BN reached the baseline's final accuracy in {bn_steps:,} steps, "
                     f"{compared} than the baseline ({base_steps:,}).")
    return "\n".join(lines)


def _format_table(head, rows):
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    def fmt(row):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


# ----------------------------------------------------------------------------------------------
# learning-rate sweep

def run_lr_sweep(dataset, *, multipliers=SWEEP_DEFAULTS["multipliers"],
                 steps=SWEEP_DEFAULTS["steps"], batch_size=DEFAULTS["batch_size"],
                 lr=DEFAULTS["lr"], init_std=DEFAULTS["init_std"], seed=DEFAULTS["seed"],
                 eval_every=None, backend=None, target=DEFAULTS["target"],
                 stall_below=SWEEP_DEFAULTS["stall_below"], show_progress=True, stream=None,
                 comm=None):
    """Train both networks at ``lr * m`` for each multiplier m; divergence (a mini-batch loss
    that is NaN, infinite or above ``DIVERGENCE_LOSS``) ends that run and is recorded, not
    raised. A run that finishes below the test accuracy ``stall_below`` has stalled. Each
    result's ``status`` is "ok", "stalled ..." or "diverged ...". ``comm``: data parallel over
    MPI, as in :func:`run_paper`."""
    data = dataset.arrays()
    show_progress = show_progress and (comm is None or comm.Get_rank() == 0)
    eval_steps = evaluation_steps(steps, eval_every)
    results = []
    for multiplier in multipliers:
        for name in RUN_NAMES:
            model = paper_network(name == "bn", init_std=init_std, seed=seed, backend=backend,
                                  comm=comm)
            label = f"{name} x{multiplier:g}"
            progress = Progress(steps, label, stream=stream, enabled=show_progress)
            record = train_run(model, data, steps=steps, lr=lr * multiplier,
                               batch_size=batch_size, seed=seed, eval_steps=eval_steps,
                               progress=progress, comm=comm)
            record.pop("sigmoid_input_percentiles")
            final = record["final_test_accuracy"]
            if record["diverged_at_step"] is not None:
                status = f"diverged at step {record['diverged_at_step']:,}"
            elif final is None or final < stall_below:
                status = f"stalled (final accuracy below {_pct(stall_below)})"
            else:
                status = "ok"
            record.update(run=name, multiplier=multiplier, lr=lr * multiplier, status=status,
                          steps_to_target=steps_to_reach(record, target))
            results.append(record)
    config = dict(steps=steps, batch_size=batch_size, base_lr=lr, multipliers=list(multipliers),
                  init_std=init_std, seed=seed, backend=backend or "cpu",
                  target_accuracy=target, stall_below=stall_below, hidden=list(HIDDEN),
                  activation="sigmoid",
                  divergence=f"a mini-batch loss that is NaN, infinite or above "
                             f"{DIVERGENCE_LOSS:g}", **parallel_config(batch_size, comm))
    return {"config": config, "dataset": dataset.describe(), "results": results}


def sweep_table(sweep):
    target = sweep["config"]["target_accuracy"]
    head = ["lr", "run", "final acc", "best acc", f"steps to {_pct(target)}", "status"]
    rows = [[f"{r['lr']:g} (x{r['multiplier']:g})", RUN_LABELS[r["run"]],
             _pct(r["final_test_accuracy"]), _pct(r["best_test_accuracy"]),
             _steps(r["steps_to_target"]), r["status"]] for r in sweep["results"]]
    return "\n".join(_format_table(head, rows))


# ----------------------------------------------------------------------------------------------
# figures (matplotlib's Agg canvas: no display is ever opened)

def _save(fig, path):
    """Save a PNG atomically: to a temporary file beside ``path``, renamed over it once
    complete, so that a failure leaves no partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.part")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(path)


def _figure(width=5.0, height=3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _plot_accuracy(ax, metrics):
    for name, style in (("baseline", dict(color="tab:gray", ls="--")),
                        ("bn", dict(color="tab:blue"))):
        record = metrics["runs"][name]
        ax.plot(record["steps"], record["test_accuracy"], label=RUN_LABELS[name], **style)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    finals = [r["final_test_accuracy"] or 0.0 for r in metrics["runs"].values()]
    ax.set_ylim(0.7 if min(finals) >= 0.8 else 0.0, 1.0)   # the paper's Figure 1(a) shows 0.7-1
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")


def _plot_percentiles(ax, record, title, ylim=None):
    for p, style in zip(PERCENTILES, (":", "-", ":")):
        ax.plot(record["steps"], record["sigmoid_input_percentiles"][str(p)], ls=style,
                color="k", label=f"{p}th percentile")
    ax.set_xlabel("training step")
    ax.set_ylabel("input to a last-layer sigmoid")
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def plot_figure1(metrics, out_dir):
    """Figure 1 (a), (b), (c) as separate PNGs (:data:`FIGURE1_FILES`) and side by side;
    returns the paths."""
    out_dir = Path(out_dir)
    values = [v for r in metrics["runs"].values()
              for series in r["sigmoid_input_percentiles"].values() for v in series
              if math.isfinite(v)]
    ylim = None
    if values:
        low, high = min(values), max(values)
        pad = 0.05 * (high - low) + 1e-3
        ylim = (low - pad, high + pad)   # (b) and (c) on one scale, as in the paper
    titles = {"baseline": "(b) Without BN", "bn": "(c) With BN"}
    paths = [out_dir / name for name in FIGURE1_FILES]
    fig = _figure()
    ax = fig.add_subplot()
    _plot_accuracy(ax, metrics)
    ax.set_title("(a) Test accuracy")
    fig.tight_layout()
    _save(fig, paths[0])
    for name, path in (("baseline", paths[1]), ("bn", paths[2])):
        fig = _figure()
        _plot_percentiles(fig.add_subplot(), metrics["runs"][name], titles[name], ylim)
        fig.tight_layout()
        _save(fig, path)
    fig = _figure(14.0, 3.8)
    axes = fig.subplots(1, 3)
    _plot_accuracy(axes[0], metrics)
    axes[0].set_title("(a) Test accuracy")
    _plot_percentiles(axes[1], metrics["runs"]["baseline"], titles["baseline"], ylim)
    _plot_percentiles(axes[2], metrics["runs"]["bn"], titles["bn"], ylim)
    fig.tight_layout()
    _save(fig, paths[3])
    return [str(p) for p in paths]


def plot_lr_sweep(sweep, out_dir):
    """Test accuracy against step for every (multiplier, run); returns the PNG's path."""
    multipliers = sweep["config"]["multipliers"]
    fig = _figure(4.2 * len(multipliers), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(multipliers), sharey=True))
    for ax, multiplier in zip(axes, multipliers):
        for r in sweep["results"]:
            if r["multiplier"] != multiplier:
                continue
            style = dict(color="tab:blue") if r["run"] == "bn" else dict(color="tab:gray", ls="--")
            label = RUN_LABELS[r["run"]]
            if r["diverged_at_step"] is not None:
                label += f" (diverged at {r['diverged_at_step']:,})"
            ax.plot(r["steps"], r["test_accuracy"], label=label, **style)
        ax.set_title(f"lr = {sweep['config']['base_lr'] * multiplier:g} (x{multiplier:g})")
        ax.set_xlabel("training step")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    axes[0].set_ylabel("test accuracy")
    fig.tight_layout()
    return _save(fig, Path(out_dir) / LR_SWEEP_FILE)
