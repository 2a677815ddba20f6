"""Time to accuracy: how soon does each configuration train a JEM to a given held-out accuracy?

Speed per iteration says little if a faster step learns worse. This trains every configuration (a
recipe, with or without the fast flags) on the same data, for the same training time, from the same
seeds, and follows held-out accuracy and the energy gap f(x_data) - f(x_q) against training time:

    python scripts/time_to_accuracy.py --data synthetic --minutes 5 --seeds 1 2 3 \
        --out runs/tta_synthetic
    python scripts/time_to_accuracy.py --data ../shared/data/cifar10_subset --minutes 10 \
        --out runs/tta_cifar
    python scripts/time_to_accuracy.py --data cifar10 --configs jem jem-fast jempp jempp-amp \
        --parallel 1 --minutes 30 --out runs/tta_gpu  # one GPU: a run at a time, wall clock


Every run is `train_wrn_ebm.py` with `--max_train_minutes` (its clock leaves out the evaluations)
and `--eval_every_minutes`, as a subprocess of `--threads` CPU threads, `--parallel` at a time; a
finished run (its metrics.jsonl says it reached its budget) is not run again and one cut short is
resumed, so the command can be re-run. It writes OUT/<config>/seed<N>/ (the runs), OUT/results.json
(every curve and the summary) and OUT/time_to_accuracy.png (accuracy and energy gap against minutes:
the mean over seeds, the band from the lowest to the highest), and prints, per configuration, the
final accuracy and the time the mean curve needs to reach the target: by default the baseline's
(`jem`, the paper's float32 step) mean accuracy at the end of its budget.
"""
import json
import os
import shlex
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no GUI backend, works on headless servers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
sys.path.insert(0, REPO)  # the repository's modules
from jem.flags.common import OneLineErrors  # noqa: E402  (needs the path above)
from jem.run.log import read_metrics, run_ended  # noqa: E402

# Shared by every configuration: a small network, the paper's batch, a short warm-up
# for a short budget; the epoch count is a ceiling that the time budget reaches long
# before. Held-out images get the paper's noise whatever the recipe (JEM++ and SADA-JEM
# would evaluate clean ones), so every configuration is measured on the same images.
BASE_FLAGS = ("--depth 10 --width 1 --batch_size 64 --warmup_iters 100 --n_valid 500 --test_sigma "
              "0.03 --buffer_size 2000 --n_epochs 10000 --ckpt_every 10000 --on_diverge rollback "
              "--rollback_lr_scale 0.5")
# name: train_wrn_ebm.py flags over BASE_FLAGS. `jem` is
# the paper's step and recipe (Adam 1e-4, 20 SGLD steps).
CONFIGS = {
    "jem": "",
    "jem-amp": "--amp",
    "jem-compile": "--compile",
    "jem-cuda_graph": "--cuda_graph",
    "jem-fast": "--amp --compile --cuda_graph",  # the GPU fast path
    "jempp": "--recipe jempp",
    "jempp-amp": "--recipe jempp --amp",
    "sadajem": "--recipe sadajem",
    "sadajem-amp": "--recipe sadajem --amp",
    "clf": "--p_x_weight 0",  # not a JEM: the plain classifier, for reference
}
DEFAULT_CONFIGS = ["jem", "jem-amp", "jempp", "jempp-amp", "sadajem", "sadajem-amp"]
CLOCKS = {"wall": "train_seconds", "cpu": "cpu_seconds"}
GRID_POINTS = 200  # the curves are compared on this many equal steps of the budget


def parse_args(argv=None):
    parser = OneLineErrors(description="Train each configuration for the same time over several "
                                       "seeds; held-out accuracy against training time, and the "
                                       "time to a target")
    add = parser.add_argument
    add("--data", required=True,
        help="train_wrn_ebm.py's --dataset: synthetic, cifar10, "
             "... or an image folder with train/ and test/")
    add("--data_root", default=None, help="train_wrn_ebm.py's --data_root for torchvision sets")
    add("--out", default="runs/time_to_accuracy", help="where the runs, the JSON and the figure go")
    add("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    add("--seeds", nargs="+", type=int, default=[1, 2, 3])
    add("--minutes", type=float, default=5.0, help="training time of every run")
    add("--baseline", default="jem", choices=list(CONFIGS),
        help="the configuration the others are compared with")
    add("--target", type=float, default=None,
        help="the accuracy to reach (default: the baseline's mean at the end of its budget)")
    add("--metric", choices=["test_acc", "valid_acc"], default="test_acc")
    add("--clock", choices=list(CLOCKS), default="wall",
        help="train_wrn_ebm.py's --train_clock, of the budget and the curves: "
             "wall-clock seconds of training, or the run's CPU seconds (with --threads 1, "
             "an idle core's wall-clock that other work on the machine does not stretch)")
    add("--evals", type=int, default=20,
        help="held-out evaluations per run, evenly over its budget")
    add("--base_flags", default=BASE_FLAGS, help="train_wrn_ebm.py flags shared by every run")
    add("--parallel", type=int, default=2, help="runs at a time")
    add("--threads", type=int, default=1, help="CPU threads of each run (OMP_NUM_THREADS)")
    add("--device", default=None, help="train_wrn_ebm.py's --device (default: its own choice)")
    add("--report_only", action="store_true", help="train nothing; summarise the runs in --out")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# The runs.

def run_dir(args, config, seed):
    return os.path.join(args.out, config, f"seed{seed}")


def train_command(args, config, seed):
    flags = shlex.split(args.base_flags) + shlex.split(CONFIGS[config])
    flags += ["--dataset", args.data, "--seed", str(seed), "--max_train_minutes",
              f"{args.minutes:g}",
              "--train_clock", args.clock, "--eval_every_minutes", f"{args.minutes / args.evals:g}",
              "--print_every", "10", "--print_to_log", "--save_dir", run_dir(args, config, seed)]
    flags += ["--data_root", args.data_root] if args.data_root else []
    flags += ["--device", args.device] if args.device else []
    return [PYTHON, os.path.join(REPO, "train_wrn_ebm.py"), *flags]


def train_once(args, config, seed, print_lock):
    """One run to the end of its budget: skipped when done, resumed when cut short."""
    save_dir = run_dir(args, config, seed)
    if run_ended(save_dir):
        return
    cmd = train_command(args, config, seed)
    if os.path.exists(os.path.join(save_dir, "last_ckpt.pt")):
        cmd = [PYTHON, cmd[1], "--resume", save_dir, "--max_train_minutes", f"{args.minutes:g}",
               "--print_to_log"]
    os.makedirs(save_dir, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    with open(os.path.join(save_dir, "driver.log"), "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        returncode = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        raise RuntimeError(f"{config} seed {seed} failed (exit {returncode}); see "
                           f"{save_dir}/driver.log")
    if not run_ended(save_dir):  # a signal stopped it early: it saved, and a re-run continues it
        raise RuntimeError(f"{config} seed {seed} stopped before the end of its budget; run the "
                           "command again")
    with print_lock:
        print(f"{config} seed {seed}: done", flush=True)


def train_all(args):
    """Every (configuration, seed), --parallel at a time; the seeds go round the configurations so
    that the runs side by side are of different configurations."""
    jobs = [(config, seed) for seed in args.seeds for config in args.configs]
    lock = threading.Lock()
    with ThreadPoolExecutor(args.parallel) as pool:
        for future in [pool.submit(train_once, args, config, seed, lock) for config, seed in jobs]:
            future.result()


# --------------------------------------------------------------------------------------------------
# Reading the runs.

def read_run(save_dir, metric, clock):
    """A run's accuracy and energy-gap curves against minutes of training, and what it did."""
    records = read_metrics(save_dir)
    evals = [r for r in records if r["kind"] == "eval" and r.get(metric) is not None]
    train = [r for r in records if r["kind"] == "train"]
    hardware = next((r["hardware"] for r in records if r["kind"] == "run"), None)
    last = max(records, key=lambda r: r.get("train_seconds") or 0)
    return {"minutes": [r[CLOCKS[clock]] / 60 for r in evals],
            "accuracy": [r[metric] for r in evals],
            "eval_iterations": [r["iteration"] for r in evals],
            "gap_minutes": [r[CLOCKS[clock]] / 60 for r in train if "f_data" in r],
            "energy_gap": [r["f_data"] - r["f_q"] for r in train if "f_data" in r],
            "iterations": last.get("iteration"), "clock_seconds": last.get(CLOCKS[clock]),
            "train_seconds": last.get("train_seconds"), "cpu_seconds": last.get("cpu_seconds"),
            "hardware": hardware, "rollbacks": sum(r["kind"] == "diverged" for r in records)}


def on_grid(minutes, values, grid):
    """The latest value at or before each grid time (NaN before the first). A run stops within an
    iteration after its budget, so its last times count as the budget's end."""
    index = np.searchsorted(np.minimum(minutes, grid[-1]), grid, side="right") - 1
    return np.where(index >= 0, np.asarray(values, dtype=float)[np.clip(index, 0, None)], np.nan)


def first_time_reaching(grid, curve, target):
    reached = np.nonzero(curve >= target)[0]
    return float(grid[reached[0]]) if len(reached) else None


def summarize(args, runs):
    """Per configuration: mean/min/max curves on the grid, final accuracy, and the time the mean
    takes to reach the target (default: the baseline's mean final accuracy)."""
    grid = np.linspace(0, args.minutes, GRID_POINTS + 1)
    summary = {}
    for config, by_seed in runs.items():
        curves = np.stack([on_grid(r["minutes"], r["accuracy"], grid) for r in by_seed.values()])
        finals = [r["accuracy"][-1] for r in by_seed.values() if r["accuracy"]]
        summary[config] = {
            "seeds": sorted(by_seed), "grid_minutes": grid.tolist(),
                           "mean": np.nanmean(curves, 0).tolist(),
            "low": np.nanmin(curves, 0).tolist(), "high": np.nanmax(curves, 0).tolist(),
            "final_mean": float(np.mean(finals)),
            "final_std": float(np.std(finals, ddof=1)) if len(finals) > 1 else 0.0,
            "final_min": float(min(finals)), "final_max": float(max(finals)),
            "iterations_per_minute": float(np.mean([r["iterations"] / (r["clock_seconds"] / 60)
                                                    for r in by_seed.values()])),
            "wall_over_cpu": float(np.mean([r["train_seconds"] / r["cpu_seconds"]
                                            for r in by_seed.values()])),
            "rollbacks": sum(r["rollbacks"] for r in by_seed.values()),
        }
    # Quality apart from speed: every configuration's accuracy
    # after as many iterations as the slowest run made
    common = min(r["eval_iterations"][-1] for by_seed in runs.values() for r in by_seed.values())
    for config, by_seed in runs.items():
        at_common = [np.interp(common, r["eval_iterations"], r["accuracy"])
                     for r in by_seed.values()]
        summary[config].update(common_iterations=int(common),
                               accuracy_at_common_iterations=float(np.mean(at_common)),
                               accuracy_at_common_iterations_min=float(min(at_common)),
                               accuracy_at_common_iterations_max=float(max(at_common)))
    target = args.target if args.target is not None else summary[args.baseline]["final_mean"]
    for config, s in summary.items():
        mean = np.asarray(s["mean"])
        # the mean counts only where every seed has a value
        all_seeds = ~np.isnan(np.asarray(s["low"]))
        s["minutes_to_target"] = first_time_reaching(grid[all_seeds], mean[all_seeds], target)
    baseline_time = summary[args.baseline]["minutes_to_target"]
    for s in summary.values():
        s["speedup_to_target"] = baseline_time / s["minutes_to_target"] \
            if baseline_time and s["minutes_to_target"] else None
    return target, summary


# --------------------------------------------------------------------------------------------------
# The report.

def print_table(args, target, summary, hardware):
    where = "given" if args.target is not None else f"{args.baseline}'s mean at the end"
    print(f"{hardware}\nseeds {' '.join(map(str, args.seeds))} (those found of each), "
          f"{args.minutes:g} minutes of training each ({args.clock} clock), {args.metric}; target "
          f"{target:.4f} ({where})")
    common = next(iter(summary.values()))["common_iterations"]
    baseline_column = f"time / {args.baseline}'s"
    print(f"{'config':<14} {'seeds':>5} {'it/min':>7} {'wall/cpu':>8} {'final acc: mean':>16} "
          f"{'sd':>6} {'min-max':>12} {f'acc @ {common} it':>14} {'min to target':>14} "
          f"{'/ budget':>9} {baseline_column:>12} {'speed-up':>9}")
    for config, s in summary.items():
        reach, share = ("not reached", "—") if s["minutes_to_target"] is None else \
            (f"{s['minutes_to_target']:.2f}", f"{s['minutes_to_target'] / args.minutes:.2f}")
        ratio, speedup = ("—", "—") if s["speedup_to_target"] is None else \
            (f"{1 / s['speedup_to_target']:.2f}", f"{s['speedup_to_target']:.2f}x")
        print(f"{config:<14} {len(s['seeds']):>5} {s['iterations_per_minute']:>7.1f} "
              f"{s['wall_over_cpu']:>8.2f} {s['final_mean']:>16.4f} {s['final_std']:>6.3f} "
              f"{s['final_min']:>5.3f}-{s['final_max']:<6.3f} "
              f"{s['accuracy_at_common_iterations']:>14.4f} {reach:>14} {share:>9} {ratio:>12} "
              f"{speedup:>9}")


def plot(args, target, summary, runs, path):
    """Accuracy against minutes of training (mean over seeds, band from lowest to highest) and
    against iterations
(every seed), and the energy gap against minutes (mean over seeds)."""
    fig = Figure(figsize=(15, 4.2))
    acc_ax, iter_ax, gap_ax = fig.subplots(1, 3)
    for i, (config, s) in enumerate(summary.items()):
        color = f"C{i}"
        acc_ax.plot(s["grid_minutes"], s["mean"], color=color, label=config)
        acc_ax.fill_between(s["grid_minutes"], s["low"], s["high"], color=color, alpha=0.15,
                            linewidth=0)
        for j, r in enumerate(runs[config].values()):
            iter_ax.plot(r["eval_iterations"], r["accuracy"], color=color, linewidth=0.8,
                         label=config if j == 0 else None)
        grid = np.asarray(s["grid_minutes"])
        gaps = [on_grid(r["gap_minutes"], r["energy_gap"], grid)
                for r in runs[config].values() if r["energy_gap"]]
        if gaps:  # a plain classifier has none
            gap_ax.plot(grid, np.nanmean(np.stack(gaps), 0), color=color, label=config)
    acc_ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    acc_ax.set(xlabel=f"minutes of training ({args.clock} clock)",
               ylabel=f"held-out accuracy ({args.metric})",
               title=f"{os.path.basename(os.path.normpath(args.data))}: mean and range over seeds")
    iter_ax.set(xlabel="iterations", ylabel=f"held-out accuracy ({args.metric})",
                title="the same runs against iterations (quality apart from speed)")
    gap_ax.axhline(0, color="grey", linewidth=0.8)
    gap_ax.set(xlabel=f"minutes of training ({args.clock} clock)",
               ylabel="energy gap f(x_data) - f(x_q)", title="energy gap (mean over seeds)")
    acc_ax.set_xlim(0, args.minutes)
    gap_ax.set_xlim(0, args.minutes)
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def report(args):
    runs = {config: {seed: read_run(run_dir(args, config, seed), args.metric,
                                    args.clock) for seed in args.seeds
                     if os.path.exists(os.path.join(run_dir(args, config, seed), "metrics.jsonl"))}
            for config in args.configs}
    runs = {config: by_seed for config, by_seed in runs.items() if by_seed}
    if args.baseline not in runs:
        raise SystemExit(f"no runs of the baseline {args.baseline} in {args.out}: add it to "
                         "--configs")
    target, summary = summarize(args, runs)
    hardware = next(r["hardware"] for by_seed in runs.values() for r in by_seed.values()
                    if r["hardware"])

    print_table(args, target, summary, hardware)
    figure = os.path.join(args.out, "time_to_accuracy.png")
    plot(args, target, summary, runs, figure)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"hardware": hardware, "target": target, "options": vars(args),
                   "summary": summary,
                   "runs": {c: {str(s): r for s, r in by_seed.items()}
                            for c, by_seed in runs.items()},

                   "commands": {c: shlex.join(train_command(args, c, "SEED")[1:]) for c in runs}},
                  fh, indent=1)
    print(f"wrote {args.out}/results.json and {figure}")
    return summary


def main(argv=None):
    # before a first eval
    warnings.filterwarnings("ignore", "All-NaN slice|Mean of empty slice", RuntimeWarning)
    args = parse_args(argv)
    if args.baseline not in args.configs:
        raise SystemExit(f"--baseline {args.baseline} must be one of --configs")
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        train_all(args)
    return report(args)


if __name__ == "__main__":
    main()
