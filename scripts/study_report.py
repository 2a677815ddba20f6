"""The small-scale study's report: its table (mean and range over seeds) and its figures, from the
files that the project's own command lines wrote (metrics.jsonl of each training run, the JSON of
each evaluation).

scripts/small_scale_study.py runs the study and calls `write_report`; nothing here trains or
evaluates.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no GUI backend, works on headless servers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's modules
from jem.run.log import read_metrics  # noqa: E402  (needs the path above)

LABELS = {  # name: label in the table
    "jem": "JEM (paper's objective, Adam)",
    "jempp": "JEM++ (--recipe jempp)",
    "sadajem": "SADA-JEM (--recipe sadajem)",
    "clf": "classifier (p_x_weight 0)",
}
SHORT = {"jem": "JEM", "jempp": "JEM++", "sadajem": "SADA-JEM", "clf": "classifier"}
# the energy models, which have a replay buffer worth showing
SAMPLERS = ("jem", "jempp", "sadajem")
SCORES = ("px", "py", "pxgrad")
PAPER_INTERP = {"px": ".65 / — (JEM++ .77, SADA-JEM .83)", "py": ".75 / .77",
                "pxgrad": ".78 / —"}



def run_dir(out, name, seed):
    return os.path.join(out, name, f"seed{seed}")


def training_summary(save_dir):
    """What a training run did: iterations, epochs, minutes of training (the run's CPU clock: one
    thread, so an idle core's wall-clock), and its last evaluation's accuracies."""
    rs = read_metrics(save_dir)
    timed = [r for r in rs if "train_seconds" in r]
    evals = [r for r in rs if r["kind"] == "eval"]
    last_eval = evals[-1] if evals else {}
    return {"iterations": max(r["iteration"] for r in timed),
            "epochs": sum(bool(r.get("end_of_epoch", True)) for r in evals),
            "train_minutes": max(r["cpu_seconds"] for r in timed) / 60,
            "seconds_per_iteration": max(r["cpu_seconds"] for r in timed)
            / max(1, max(r["iteration"] for r in timed)),
            "train_acc": last_eval.get("train_acc"), "valid_acc": last_eval.get("valid_acc"),
            "rollbacks": sum(r["kind"] == "diverged" for r in rs)}


def result(save_dir, label, mode):
    """The JSON an evaluation wrote, or None when it did not run."""
    path = os.path.join(save_dir, "eval", label, f"{mode}.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


# --------------------------------------------------------------------------------------------------
# The table.

def cell(values, digits):
    """'mean (min–max)' over seeds; one value as it is; '—' when there is none."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def table_rows(args, ood_folders):
    """(what, key, getter of one run's value from its folder, the papers' number) for every row."""
    rows = [("training epochs", "epochs", lambda d: training_summary(d)["epochs"], "200 epochs"),
            ("training iterations", "iterations", lambda d: training_summary(d)["iterations"], ""),
            ("training minutes (one CPU thread, evaluations left out)", "train_minutes",
             lambda d: training_summary(d)["train_minutes"], "days on a GPU"),
             ("seconds per iteration", "seconds_per_iteration",
              lambda d: training_summary(d)["seconds_per_iteration"], ""),
              ("training accuracy (last epoch, clean images)", "train_acc",
               lambda d: training_summary(d)["train_acc"], ""),
               ("validation accuracy (last epoch)", "valid_acc",
                lambda d: training_summary(d)["valid_acc"], ""),
                ("test accuracy", "test_acc",
                 lambda d: result(d, "test_clf", "test_clf")["accuracy"],
                 ".929 / .958 (JEM++ .941, SADA-JEM .955)"),
                 ("test cross-entropy", "test_nll",
                  lambda d: result(d, "test_clf", "test_clf")["loss"], ""),
                  ("ECE, 15 bins", "ece", lambda d: result(d, "calibration", "calibration")["ece"],
                   "JEM several times lower (CIFAR-100)")]
    for ood_set in ood_folders:
        for score in SCORES:
            rows.append((f"OOD AUROC, {ood_set}, {score}", f"auroc_{ood_set}_{score}",
                         lambda d, o=ood_set, s=score: result(d, f"ood_{o}_{s}", "OOD")["auroc"],
                         PAPER_INTERP[score] if ood_set == "cifar_interp" else ""))
    eps = [f"{e:g}" for e in args.attack_eps]
    for label, what in (("attack_refine0", "no refinement"),
                        ("attack_refine1", "1 SGLD step, 5 chains")):
        for i, e in enumerate(eps):
            rows.append((f"robust acc. L∞ ε={e}/255, {what}", f"{label}_eps{e}",
                         lambda d, run=label, i=i: result(d, run, "attack")["robust_accuracy"][i],
                         "JEM falls off more slowly" if i == len(eps) - 1 else ""))
    return rows


def build_table(args, names, ood_folders):
    """The markdown table (models side by side, each cell the mean and range over the seeds) and its
    numbers."""
    numbers = {n: {} for n in names}
    lines = ["| | " + " | ".join(LABELS[n] for n in names) + " | papers, WRN-28-10, full CIFAR-10 "
                                                             "(JEM / classifier) |",
             "|---|" + "---|" * len(names) + "---|"]
    for what, key, getter, paper in table_rows(args, ood_folders):
        cells = []
        for n in names:
            values = []
            for seed in args.seeds:
                try:
                    values.append(getter(run_dir(args.out, n, seed)))
                except (TypeError, KeyError, IndexError, FileNotFoundError, ValueError):
                    values.append(None)
            numbers[n][key] = values
            integer = key in ("epochs", "iterations")
            cells.append(cell(values, 0 if integer else 1 if "minutes" in key else 3))
        lines.append(f"| {what} | " + " | ".join(cells) + f" | {paper} |")
    return "\n".join(lines) + "\n", numbers


# --------------------------------------------------------------------------------------------------
# Figures.

def pooled_bins(dirs):
    """The reliability bins of several runs' calibration.json pooled: counts added, accuracy and
    confidence weighted by count; and the pooled ECE."""
    results = [r for r in (result(d, "calibration", "calibration") for d in dirs) if r is not None]
    if not results:
        return None
    bins = results[0]["bins"]
    counts = np.array([[b["count"] for b in r["bins"]] for r in results], dtype=float)
    total = counts.sum(0)

    def weighted(key):
        values = np.array([[b[key] or 0.0 for b in r["bins"]] for r in results])
        return (values * counts).sum(0) / np.maximum(total, 1)

    accuracy, confidence = weighted("accuracy"), weighted("confidence")
    ece = float(np.sum(total / total.sum() * np.abs(accuracy - confidence)))
    return {"lower": np.array([b["lower"] for b in bins]),
            "upper": np.array([b["upper"] for b in bins]),
            "accuracy": np.where(total > 0, accuracy, np.nan), "count": total, "ece": ece,
            "runs": len(results)}


def reliability_figure(args, names, path):
    """One reliability diagram per model, side by side, the seeds' test predictions pooled."""
    pooled = {n: pooled_bins([run_dir(args.out, n, s) for s in args.seeds]) for n in names}
    pooled = {n: p for n, p in pooled.items() if p is not None}
    if not pooled:
        return False
    fig = Figure(figsize=(3.2 * len(pooled), 3.4), layout="tight")
    axes = np.atleast_1d(fig.subplots(1, len(pooled), sharey=True))
    for ax, (name, p) in zip(axes, pooled.items()):
        ax.bar(p["lower"], np.nan_to_num(p["accuracy"]), width=p["upper"] - p["lower"],
               align="edge", edgecolor="black", linewidth=0.5)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey")
        seeds = f"{p['runs']} seed{'s' if p['runs'] > 1 else ''}"
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence",
               title=f"{SHORT[name]} ({seeds}): ECE {100 * p['ece']:.1f}%")
    fig.axes[0].set_ylabel("accuracy (test, the seeds pooled)")
    fig.savefig(path, dpi=90)
    return True


def accuracy_curves(save_dir, key):
    """(minutes of training, accuracy) at every evaluation of a run that has `key` (test_acc,
    train_acc)."""
    points = [(r["cpu_seconds"] / 60, r[key]) for r in read_metrics(save_dir)
              if r["kind"] == "eval" and key in r]
    return [p[0] for p in points], [p[1] for p in points]


def accuracy_time_figure(args, names, path):
    """Test accuracy (solid) and training accuracy (dashed) against minutes of training, every seed
    of every model."""
    fig = Figure(figsize=(6.5, 4.2), layout="tight")
    ax = fig.subplots()
    for i, name in enumerate(names):
        dirs = [run_dir(args.out, name, seed) for seed in args.seeds]
        dirs = [d for d in dirs if os.path.exists(os.path.join(d, "metrics.jsonl"))]
        for j, d in enumerate(dirs):
            for key, style in (("test_acc", "-"), ("train_acc", ":")):
                minutes, acc = accuracy_curves(d, key)
                split = "test" if key == "test_acc" else "train"
                label = f"{SHORT[name]} ({split})" if j == 0 else None

                ax.plot(minutes, acc, linestyle=style, color=f"C{i}", linewidth=1, label=label)
    ax.set(xlabel="minutes of training (one CPU thread)", ylabel="accuracy", ylim=(0, 1),
           title="accuracy against training time, every seed")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=90)
    return True


# copy name: (model, evaluation folder, file the evaluation wrote), from
# the first seed's run. The uncond_samples grids stay in OUT: at this scale
# they are near-noise, which PNG cannot compress (about 300 KB each).
FIGURES = {
    **{f"calibration_{n}.png": (n, "calibration", "reliability_diagram.png") for n in LABELS},
    **{f"logp_hist_{n}.png": (n, "logp_hist", "logp_hist.png") for n in LABELS},
    **{f"cond_samples_{n}.png": (n, "cond_samples", "cond_samples_000.png") for n in SAMPLERS},
}


def copy_figures(args, names, python=sys.executable):
    """The evaluations' own PNGs of the first seed into --figs_dir (prefixed by --figs_prefix), the
    robust-accuracy overlay drawn by scripts/plot_attack.py, and the two figures across seeds drawn
    here."""
    os.makedirs(args.figs_dir, exist_ok=True)
    prefix, first, copied = args.figs_prefix, args.seeds[0], []
    for target, (name, label, file) in FIGURES.items():
        source = os.path.join(run_dir(args.out, name, first), "eval", label, file)
        if name in names and os.path.exists(source):
            shutil.copyfile(source, os.path.join(args.figs_dir, prefix + target))
            copied.append(prefix + target)
    curves = [("clf", "attack_refine0", "classifier"),
              ("jem", "attack_refine0", "JEM, no refinement"),
              *[(n, "attack_refine1", f"{SHORT[n]}, 1 SGLD step x 5 chains") for n in SAMPLERS]]
    runs = [(os.path.join(run_dir(args.out, n, first), "eval", label), text)
            for n, label, text in curves
            if n in names and os.path.exists(os.path.join(run_dir(args.out, n, first), "eval",
                                                          label, "attack.json"))]
    if runs:
        cmd = [python, os.path.join(REPO, "scripts", "plot_attack.py"), *[r for r, _ in runs],
               "--out", os.path.join(args.figs_dir, prefix + "attack_linf.png"),
               "--labels", *[t for _, t in runs]]

        subprocess.run(cmd, check=True, capture_output=True)
        copied.append(prefix + "attack_linf.png")
    for name, draw in (("reliability.png", reliability_figure),
                       ("accuracy_vs_time.png", accuracy_time_figure)):
        if draw(args, names, os.path.join(args.figs_dir, prefix + name)):
            copied.append(prefix + name)
    return copied


def earlier_results(out):
    """What earlier invocations wrote to results.json: a study run piecewise (over sessions, or
    different seeds for different models) keeps every step's wall time and command."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def fewer_seeds(numbers, seeds):
    """', over seeds 1, 2 for SADA-JEM' for each model with results for only some of the seeds."""
    notes = []
    for name, rows in numbers.items():
        found = [seed for i, seed in enumerate(seeds)
                 if any(values[i] is not None for values in rows.values())]
        if found and len(found) < len(seeds):
            notes.append(f"over seed{'s' if len(found) > 1 else ''} "
                         f"{', '.join(map(str, found))} for {SHORT[name]}")
    return "; " + "; ".join(notes) if notes else ""


def write_results(args, table, numbers, figures, times, commands_run, failures, total):
    """OUT/results.md and OUT/results.json; returns the text of results.md above its commands."""
    text = (f"{table}\nEach cell: the mean over seeds {', '.join(map(str, args.seeds))} "
            f"(lowest–highest){fewer_seeds(numbers, args.seeds)}. "
            + ("" if args.report_only else f"Wall time of this command: {total / 60:.1f} minutes. ")
            + f"Each step's wall time: results.json.\nFigures in {args.figs_dir}: "
              f"{', '.join(figures)}\n")
    if failures:
        text += "\nFAILED:\n" + "\n".join(failures) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        commands = "\n".join(c for cs in commands_run.values() for c in cs)
        f.write(text + "\n## Commands\n\n```\n" + commands + "\n```\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"numbers": numbers, "seconds": times, "total_seconds": total, "figures": figures,
                   "commands": commands_run, "failures": failures, "args": vars(args)}, f, indent=2)
    return text
