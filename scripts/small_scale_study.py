"""JEM against the plain classifier on real images, on a CPU, in one command.

Trains the same small Wide-ResNet twice on the same data with the same budget (epochs, iterations, batch,
optimizer, seed): JEM (--p_x_weight 1) and the plain classifier (--p_x_weight 0), then runs the project's
own evaluations on both and gathers their JSON outputs into one markdown table:

    .venv/bin/python scripts/small_scale_study.py --data ../shared/data/cifar10_subset --out runs/study

Everything goes through the project's command lines (train_wrn_ebm.py, eval_wrn_ebm.py, attack.py) as
subprocesses; this file only builds their arguments, runs the two models side by side (one CPU thread
each) and reads what they wrote. It writes
- OUT/jem/, OUT/clf/: the training runs (checkpoints, logs) and OUT/<model>/eval/<mode>/ the evaluations;
- OUT/ood/: the offline out-of-distribution sets (MNIST test digits, uniform noise) as image folders;
- OUT/results.md (also printed) and OUT/results.json: the table, the wall times and the commands;
- --figs_dir (default figs/): small copies of the figures the evaluations drew.

A training run that is already complete in OUT is not repeated (it is resumed, which ends at once), so
the command can be re-run to redo the evaluations alone.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
MODELS = {"jem": 1.0, "clf": 0.0}  # name: --p_x_weight
OOD_SETS = ("cifar_interp", "mnist", "noise")
SCORES = ("px", "py", "pxgrad")
MNIST_RAW = os.path.join(REPO, "..", "shared", "data", "mnist", "MNIST", "raw")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="JEM vs the plain classifier: train both, evaluate both, "
                                                 "one table")
    parser.add_argument("--data", required=True,
                        help="image folder with train/<class>/ and test/<class>/ (e.g. ../shared/data/cifar10_subset)")
    parser.add_argument("--out", default="runs/study", help="where runs, evaluations and the table go")
    parser.add_argument("--figs_dir", default=os.path.join(REPO, "figs"), help="where the small figures are copied")
    parser.add_argument("--seed", type=int, default=1, help="seed of training and of every evaluation")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="run only these (the table shows every model found in --out)")
    parser.add_argument("--mnist_raw", default=MNIST_RAW,
                        help="folder with t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz); "
                             "missing: MNIST is left out of the OOD sets")
    parser.add_argument("--n_ood_images", type=int, default=1000, help="images of each OOD folder (MNIST, noise)")
    # --- the budget, the same for both models
    parser.add_argument("--depth", type=int, default=10, help="Wide-ResNet depth (6n+4)")
    parser.add_argument("--width", type=int, default=1, help="Wide-ResNet widen factor")
    parser.add_argument("--n_epochs", type=int, default=15)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup_iters", type=int, default=100)
    parser.add_argument("--n_valid", type=int, default=500, help="training images held out for validation")
    # --- JEM's sampler (ignored by the classifier, which draws no samples)
    parser.add_argument("--n_steps", type=int, default=5, help="SGLD steps per training iteration (paper: 20)")
    parser.add_argument("--buffer_size", type=int, default=2000, help="replay buffer (paper: 10000)")
    parser.add_argument("--energy_l2", type=float, default=0.1,
                        help="the authors' energy stabiliser (acts on JEM only; 0: the paper's objective)")
    # --- evaluation sizes
    parser.add_argument("--attack_n_eval", type=int, default=100)
    parser.add_argument("--attack_pgd_steps", type=int, default=10)
    parser.add_argument("--attack_eps", type=float, nargs="+", default=[0, 1, 2, 4, 8], help="L-inf, in 1/255")
    parser.add_argument("--sample_rounds", type=int, default=50, help="uncond_samples: sampling rounds")
    parser.add_argument("--sample_steps", type=int, default=20, help="uncond_samples: SGLD steps per round")
    parser.add_argument("--sample_buffer", type=int, default=100, help="uncond_samples: buffer size")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Running the project's command lines.

def run(cmd, log_path, cwd=None):
    """Run one command with one CPU thread, its output to log_path; the wall time in seconds.

    One thread each: the two models run side by side on a 2-core machine, and SGLD's small batches gain
    little from a second thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"failed (exit {done.returncode}): {shlex.join(cmd)}; see {log_path}")
    return time.time() - start


def train_command(args, name):
    save_dir = os.path.join(args.out, name)
    if os.path.exists(os.path.join(save_dir, "last_ckpt.pt")):  # complete or stopped: go on from there
        return [PYTHON, os.path.join(REPO, "train_wrn_ebm.py"), "--resume", save_dir, "--n_epochs", str(args.n_epochs),
                "--print_to_log"]
    return [PYTHON, os.path.join(REPO, "train_wrn_ebm.py"), "--dataset", args.data, "--n_valid", str(args.n_valid),
            "--depth", str(args.depth), "--width", str(args.width), "--batch_size", str(args.batch_size),
            "--n_epochs", str(args.n_epochs), "--optimizer", "adam", "--lr", str(args.lr),
            "--warmup_iters", str(args.warmup_iters), "--p_x_weight", str(MODELS[name]),
            "--p_y_given_x_weight", "1", "--p_x_y_weight", "0", "--n_steps", str(args.n_steps),
            "--buffer_size", str(args.buffer_size), "--reinit_freq", "0.05", "--sgld_lr", "1", "--sgld_std", "0.01",
            "--energy_l2", str(args.energy_l2), "--on_diverge", "rollback", "--rollback_lr_scale", "0.5",
            "--seed", str(args.seed), "--device", "cpu", "--print_every", "50", "--print_to_log",
            "--ckpt_every", str(args.n_epochs), "--plot_uncond", "--save_dir", save_dir]


def eval_commands(args, name, ood_folders):
    """(label, command, cwd) of every evaluation of one model; their outputs go to OUT/name/eval/<label>/.

    The OOD and histogram runs work inside OUT/ood so that the sets are named by short relative paths
    (`cifar10_test`, `mnist`, `noise`) in the JSON files and the histogram's legend."""
    ckpt = os.path.join(args.out, name, "last_ckpt.pt")
    ood_dir = os.path.join(args.out, "ood")

    def ev(label, mode, *flags, cwd=None):
        save_dir = os.path.join(args.out, name, "eval", label)
        return label, [PYTHON, os.path.join(REPO, "eval_wrn_ebm.py"), "--load_path", ckpt, "--eval", mode,
                       "--save_dir", save_dir, "--device", "cpu", "--seed", str(args.seed), "--print_to_log",
                       *flags], cwd

    commands = [ev("test_clf", "test_clf", "--dataset", args.data),
                ev("calibration", "calibration", "--dataset", args.data)]
    for ood_set in ood_folders:
        for score in SCORES:
            commands.append(ev(f"ood_{ood_set}_{score}", "OOD", "--dataset", "cifar10_test", "--ood_dataset", ood_set,
                               "--score_fn", score, cwd=ood_dir))
    commands.append(ev("logp_hist", "logp_hist", "--dataset", "cifar10_test", "--score_fn", "px",
                       "--datasets", "cifar10_test", *ood_folders, cwd=ood_dir))
    commands.append(ev("uncond_samples", "uncond_samples", "--buffer_size", str(args.sample_buffer),
                       "--n_steps", str(args.sample_steps), "--n_sample_steps", str(args.sample_rounds),
                       "--print_every", str(args.sample_rounds), "--reinit_freq", "0.05"))
    if MODELS[name] > 0:  # the classifier's buffer is never sampled, so only JEM has one worth showing
        commands.append(ev("cond_samples", "cond_samples"))
    eps = [f"{e:g}" for e in args.attack_eps]
    attack = ["--dataset", args.data, "--distance", "Linf", "--eps", *eps,
              "--n_steps_pgd_attack", str(args.attack_pgd_steps), "--n_eval", str(args.attack_n_eval)]
    commands.append(ev("attack_refine0", "attack", *attack, "--n_steps_refine", "0", "--n_dup_chains", "1"))
    if MODELS[name] > 0:  # the paper's defence: SGLD refinement on log p(x), 5 chains, for the EBM
        commands.append(ev("attack_refine1", "attack", *attack, "--n_steps_refine", "1", "--n_dup_chains", "5"))
    return commands


def make_ood_folders(args):
    """OUT/ood/{cifar10_test -> the data's test split, mnist, noise}; returns the OOD set names."""
    ood_dir = os.path.join(args.out, "ood")
    os.makedirs(ood_dir, exist_ok=True)
    link = os.path.join(ood_dir, "cifar10_test")
    if not os.path.exists(link):
        os.symlink(os.path.join(args.data, "test"), link)
    names = ["cifar_interp"]
    log = os.path.join(args.out, "prepare.log")
    images = [os.path.join(args.mnist_raw, f) for f in ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz")]
    labels = [os.path.join(args.mnist_raw, f) for f in ("t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz")]
    images, labels = [p for p in images if os.path.exists(p)], [p for p in labels if os.path.exists(p)]
    if images and labels:
        if not os.path.isdir(os.path.join(ood_dir, "mnist")):
            run([PYTHON, os.path.join(REPO, "scripts", "idx_to_folder.py"), images[0], labels[0],
                 os.path.join(ood_dir, "mnist"), "--max_images", str(args.n_ood_images)], log)
        names.append("mnist")
    else:
        print(f"no MNIST IDX files in {args.mnist_raw}: MNIST is left out", flush=True)
    if not os.path.isdir(os.path.join(ood_dir, "noise")):
        run([PYTHON, os.path.join(REPO, "scripts", "noise_folder.py"), os.path.join(ood_dir, "noise"),
             "--n_images", str(args.n_ood_images), "--seed", str(args.seed)], log)
    names.append("noise")
    return names


def run_model(args, name, ood_folders, times, commands_run):
    """Train one model, then run its evaluations one after another; wall times into `times`."""
    log = os.path.join(args.out, f"{name}.driver.log")
    cmd = train_command(args, name)
    commands_run.append(shlex.join(cmd))
    times[f"{name}/train"] = run(cmd, log)
    for label, cmd, cwd in eval_commands(args, name, ood_folders):
        commands_run.append((f"(cd {cwd} && " if cwd else "") + shlex.join(cmd) + (")" if cwd else ""))
        times[f"{name}/{label}"] = run(cmd, log, cwd=cwd)
        print(f"{name}: {label} done in {times[f'{name}/{label}']:.0f}s", flush=True)



# --------------------------------------------------------------------------------------------------
# The table.

def result(args, name, label, mode):
    """The JSON an evaluation wrote, or None when it did not run."""
    path = os.path.join(args.out, name, "eval", label, f"{mode}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def training_summary(args, name):
    """Iterations, epochs, final valid/test accuracy and wall seconds of a training run, from its files."""
    records = [json.loads(line) for line in open(os.path.join(args.out, name, "metrics.jsonl"))]
    evals = [r for r in records if r.get("kind") == "eval"]
    # log lines start with "[  123.4s]", the seconds since that process started; a resumed run starts again
    # from 0, so the wall time is the sum of each process's last stamp
    seconds, last = 0.0, 0.0
    for line in open(os.path.join(args.out, name, "log.txt")):
        if not (line.startswith("[") and "s]" in line):
            continue
        stamp = float(line[1:line.index("s]")])
        if stamp < last:
            seconds += last
        last = stamp
    seconds += last
    rollbacks = sum("rollback" in line.lower() for line in open(os.path.join(args.out, name, "log.txt")))
    return {"iterations": evals[-1]["iteration"] if evals else None, "epochs": len(evals),
            "valid_acc": evals[-1]["valid_acc"] if evals else None, "seconds": seconds, "rollback_lines": rollbacks}


def fmt(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def build_table(args, ood_folders):
    """The markdown table, both models side by side, and the numbers behind it."""
    names = [n for n in MODELS if os.path.exists(os.path.join(args.out, n, "metrics.jsonl"))]
    rows, numbers = [], {n: {} for n in names}

    def row(what, key, getter, paper=""):
        values = []
        for n in names:
            try:
                value = getter(n)
            except (TypeError, KeyError, IndexError):
                value = None
            numbers[n][key] = value
            values.append(value)
        rows.append((what, values, paper))

    row("training iterations (epochs)", "iterations",
        lambda n: training_summary(args, n)["iterations"], "200 epochs")
    row("training wall time, minutes", "train_minutes",
        lambda n: training_summary(args, n)["seconds"] / 60, "days on a GPU")
    row("validation accuracy (last epoch)", "valid_acc", lambda n: training_summary(args, n)["valid_acc"], "")
    row("test accuracy", "test_acc", lambda n: result(args, n, "test_clf", "test_clf")["accuracy"],
        ".929 / .958")
    row("test cross-entropy", "test_nll", lambda n: result(args, n, "test_clf", "test_clf")["loss"], "")
    row("ECE, 15 bins", "ece", lambda n: result(args, n, "calibration", "calibration")["ece"],
        "JEM several times lower (CIFAR-100)")
    paper_interp = {"px": ".65 / —", "py": ".75 / .77", "pxgrad": ".78 / —"}
    for ood_set in ood_folders:
        for score in SCORES:
            row(f"OOD AUROC, {ood_set}, {score}", f"auroc_{ood_set}_{score}",
                lambda n, o=ood_set, s=score: result(args, n, f"ood_{o}_{s}", "OOD")["auroc"],
                paper_interp[score] if ood_set == "cifar_interp" else "")
    eps = [f"{e:g}" for e in args.attack_eps]
    for label, what in (("attack_refine0", "no refinement"), ("attack_refine1", "1 SGLD step, 5 chains")):
        for i, e in enumerate(eps):
            row(f"robust acc. L∞ ε={e}/255, {what}", f"{label}_eps{e}",
                lambda n, l=label, i=i: result(args, n, l, "attack")["robust_accuracy"][i],
                "JEM falls off more slowly" if i == len(eps) - 1 else "")

    lines = ["| | " + " | ".join({"jem": "JEM (p_x_weight 1)", "clf": "classifier (p_x_weight 0)"}[n] for n in names)
             + " | paper, WRN-28-10, full CIFAR-10 (JEM / classifier) |",
             "|---|" + "---|" * len(names) + "---|"]
    for what, values, paper in rows:
        shown = [("—" if v is None else str(v)) if what.startswith("training iterations") else fmt(v, 1 if "minutes" in what else 3)
                 for v in values]
        if what.startswith("training iterations"):
            shown = [f"{v} ({training_summary(args, n)['epochs']})" if v is not None else "—"
                     for v, n in zip(values, names)]
        lines.append(f"| {what} | " + " | ".join(shown) + f" | {paper} |")
    return "\n".join(lines) + "\n", numbers


# --------------------------------------------------------------------------------------------------
# Figures.

# copy name: (model, evaluation folder, file the evaluation wrote). The uncond_samples grids stay in OUT: at
# this scale they are near-noise, which PNG cannot compress (about 300 KB each).
FIGURES = {
    "calibration_jem.png": ("jem", "calibration", "reliability_diagram.png"),
    "calibration_clf.png": ("clf", "calibration", "reliability_diagram.png"),
    "logp_hist_jem.png": ("jem", "logp_hist", "logp_hist.png"),
    "logp_hist_clf.png": ("clf", "logp_hist", "logp_hist.png"),
    "cond_samples_jem.png": ("jem", "cond_samples", "cond_samples_000.png"),
}


def copy_figures(args):
    """Copy the evaluations' own PNGs into --figs_dir and draw the robust-accuracy overlay with attack.py."""
    os.makedirs(args.figs_dir, exist_ok=True)
    copied = []
    for target, (name, label, file) in FIGURES.items():
        source = os.path.join(args.out, name, "eval", label, file)
        if os.path.exists(source):
            shutil.copyfile(source, os.path.join(args.figs_dir, target))
            copied.append(target)
    runs = [(os.path.join(args.out, n, "eval", label), text) for n, label, text in
            (("clf", "attack_refine0", "classifier"), ("jem", "attack_refine0", "JEM, no refinement"),
             ("jem", "attack_refine1", "JEM, 1 SGLD step x 5 chains"))
            if os.path.exists(os.path.join(args.out, n, "eval", label, "attack.json"))]
    if runs:
        cmd = [PYTHON, os.path.join(REPO, "attack.py"), *[r for r, _ in runs], "--out",
               os.path.join(args.figs_dir, "attack_linf.png"), "--labels", *[t for _, t in runs]]
        run(cmd, os.path.join(args.out, "figures.log"))
        copied.append("attack_linf.png")
    return copied


def main(argv=None):
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    args.figs_dir = os.path.abspath(args.figs_dir)
    if not os.path.isdir(os.path.join(args.data, "train")) or not os.path.isdir(os.path.join(args.data, "test")):
        sys.exit(f"{args.data}: needs train/<class>/ and test/<class>/ image folders")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    ood_folders = make_ood_folders(args)

    times, commands_run, failures = {}, {n: [] for n in MODELS}, []

    def worker(name):
        try:
            run_model(args, name, ood_folders, times, commands_run[name])
        except RuntimeError as e:
            failures.append(f"{name}: {e}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in args.models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    figures = copy_figures(args)
    table, numbers = build_table(args, ood_folders)
    total = time.time() - start
    text = (f"{table}\nWall time of this command: {total / 60:.1f} minutes (each step: results.json).\n"
            f"Figures in {args.figs_dir}: {', '.join(figures)}\n")
    if failures:
        text += "\nFAILED:\n" + "\n".join(failures) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text + "\n## Commands\n\n```\n" + "\n".join(commands_run["jem"] + commands_run["clf"]) + "\n```\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"numbers": numbers, "seconds": times, "total_seconds": total, "figures": figures,
                   "commands": commands_run, "failures": failures, "args": vars(args)}, f, indent=2)
    print(text, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
