"""Draw the learning curves of one or several training runs, from their metrics.jsonl, as one PNG.

    python scripts/plot_runs.py runs/jem runs/jempp --labels JEM JEM++ --x minutes --out runs.png

Four panels: the loss terms (l_p_x, l_p_y_given_x, l_p_x_y, ... as the runs logged them), training
and held-out accuracy, the energy gap f(x_data) - f(x_q), the learning rate; a colour per run.
For a machine without TensorBoard, and for a paper's figure.
"""
import os
import sys

# the repository's modules
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matplotlib.figure import Figure  # noqa: E402  (no pyplot: no GUI backend, Agg renders PNGs)

from jem.errors import UserError  # noqa: E402  (needs the path above)
from jem.eval.plots import legend_labels  # noqa: E402
from jem.flags.common import OneLineErrors  # noqa: E402
from jem.run.log import read_metrics  # noqa: E402
from utils import run_cli  # noqa: E402

X_AXES = {"iteration": ("iteration", 1), "minutes": ("train_seconds", 60)}  # record field, divisor
HELD_OUT = {"valid_acc": ("validation", "--"), "test_acc": ("test", ":"),
            "train_acc": ("training split, clean", "-.")}  # eval records' fields (--eval_train)
TERM_STYLES = ["-", "--", ":", "-."]


def parse_args(argv=None):
    parser = OneLineErrors(prog="plot_runs.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("runs", nargs="+", metavar="RUN_DIR",
        help="save dirs of train_wrn_ebm.py runs (each with its metrics.jsonl)")
    add("--labels", nargs="+", default=None,
        help="one legend label per run (default: the name of its folder)")
    add("--x", choices=sorted(X_AXES), default="iteration",
        help="the horizontal axis: training iterations, or minutes of the run's training clock "
             "(evaluations left out; --resume continues it)")
    add("--out", default="runs.png", help="the PNG to write")
    return parser.parse_args(argv)


def read_run(run_dir):
    """The records of a run: a save dir, or the path of its metrics.jsonl."""
    if os.path.basename(run_dir) == "metrics.jsonl":
        run_dir = os.path.dirname(run_dir) or "."
    if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        raise UserError(f"no metrics.jsonl in {run_dir}: "
                        "give the --save_dir of a train_wrn_ebm.py run")
    return read_metrics(run_dir)


def default_labels(run_dirs):
    """Each run's folder name, or its whole path where two runs share a name."""
    names = [os.path.basename(os.path.normpath(path)) for path in run_dirs]
    return [name if names.count(name) == 1 else os.path.normpath(path)
            for name, path in zip(names, run_dirs)]


def curve(records, field, x_axis, value=None):
    """(xs, ys) of the records that have `field` (and the x axis's field); `value` derives y."""
    x_field, divisor = X_AXES[x_axis]
    points = [(r[x_field] / divisor, value(r) if value else r[field]) for r in records
              if r.get(field) is not None and r.get(x_field) is not None]
    return [x for x, _ in points], [y for _, y in points]


def plot_runs(runs, x_axis, path):
    """runs: (label, records) pairs. One PNG of four panels, a colour per run."""
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    terms_ax, acc_ax, gap_ax, lr_ax = fig.subplots(2, 2, sharex=True).flat
    for i, (label, records) in enumerate(runs):
        color = f"C{i % 10}"
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        terms = sorted({k for r in train for k in r if k.startswith("l_")},
                       key=lambda k: (k != "l_p_x", k != "l_p_y_given_x", k))
        for j, term in enumerate(terms):
            terms_ax.plot(*curve(train, term, x_axis), color=color, linestyle=TERM_STYLES[j % 4],
                          label=f"{label}: {term}")
        acc_ax.plot(*curve(train, "acc", x_axis), color=color, alpha=0.35, linewidth=1,
                    label=f"{label}: training batch")
        for field, (split, style) in HELD_OUT.items():
            xs, ys = curve(evals, field, x_axis)
            if xs:
                acc_ax.plot(xs, ys, color=color, linestyle=style, marker="o", markersize=3,
                            label=f"{label}: {split}")
        with_both = [r for r in train if r.get("f_q") is not None]
        gap_ax.plot(*curve(with_both, "f_data", x_axis, lambda r: r["f_data"] - r["f_q"]),
                    color=color, label=label)
        lr_ax.plot(*curve(train, "lr", x_axis), color=color, label=label)
    xlabel = "iteration" if x_axis == "iteration" else "minutes of training"
    terms_ax.set(title="loss terms", ylabel="loss")
    acc_ax.set(title="accuracy", ylabel="accuracy")
    gap_ax.set(title="energy gap", ylabel="f(x_data) - f(x_q)", xlabel=xlabel)
    lr_ax.set(title="learning rate", ylabel="learning rate", xlabel=xlabel)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (terms_ax, acc_ax, gap_ax, lr_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=150)


def main(argv=None):
    args = parse_args(argv)
    records = [read_run(path) for path in args.runs]
    labels = legend_labels(args.labels, default_labels(args.runs))
    plot_runs(list(zip(labels, records)), args.x, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
