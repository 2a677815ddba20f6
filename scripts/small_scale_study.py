"""The paper's JEM, JEM++, SADA-JEM and the plain classifier on real images, on a CPU, in one command.

Trains the same small Wide-ResNet once per recipe on the same data, each for the same wall-clock budget
(--minutes; the run is stopped with SIGTERM, which makes train_wrn_ebm.py save and exit), then runs the
project's own evaluations on every model and gathers their JSON outputs into one markdown table:

    .venv/bin/python scripts/small_scale_study.py --data ../shared/data/cifar10_subset --out runs/study

The recipes (RECIPES below): `jem`, the paper's objective with short SGLD chains (Adam); `jempp` and
`sadajem`, train_wrn_ebm.py's --recipe presets for JEM++ and SADA-JEM; `clf`, the same network trained as a
plain classifier (--p_x_weight 0). Everything goes through the project's command lines (train_wrn_ebm.py,
eval_wrn_ebm.py, attack.py) as subprocesses; this file only builds their arguments, runs --parallel models
at a time (one CPU thread each) and reads what they wrote. It writes
- OUT/<model>/: the training runs (checkpoints, logs) and OUT/<model>/eval/<mode>/ the evaluations;
- OUT/ood/: the offline out-of-distribution sets (MNIST test digits, uniform noise) as image folders;
- OUT/results.md (also printed) and OUT/results.json: the table, the wall times and the commands;
- --figs_dir (default figs/): small copies of the figures the evaluations drew.

A training run that used its budget (OUT/<model>/budget.json) is not repeated, and one that was cut short
is resumed for the rest of its budget, so the command can be re-run to redo the evaluations alone.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
OOD_SETS = ("cifar_interp", "mnist", "noise")
SCORES = ("px", "py", "pxgrad")
MNIST_RAW = os.path.join(REPO, "..", "shared", "data", "mnist", "MNIST", "raw")


def recipe_flags(args, name):
    """train_wrn_ebm.py flags of one recipe; the network, data, batch and warm-up are the study's, shared."""
    sgld_jem = ["--n_steps", str(args.n_steps), "--sgld_lr", "1", "--sgld_std", "0.01", "--energy_l2",
                str(args.energy_l2), "--optimizer", "adam", "--lr", str(args.lr)]
    return {
        "jem": ["--p_x_weight", "1", *sgld_jem],
        "jempp": ["--recipe", "jempp"],  # PYLD chains, informative start, batch norm, SGD (JEM++'s defaults)
        "sadajem": ["--recipe", "sadajem"],  # SAM, informative start, noise-free K=5 chains, batch norm
        "clf": ["--p_x_weight", "0", "--optimizer", "adam", "--lr", str(args.lr)],
    }[name]


RECIPES = {  # name: label in the table
    "jem": "JEM (paper's objective, Adam)",
    "jempp": "JEM++ (--recipe jempp)",
    "sadajem": "SADA-JEM (--recipe sadajem)",
    "clf": "classifier (p_x_weight 0)",
}
SAMPLERS = ("jem", "jempp", "sadajem")  # the energy models, which have a replay buffer worth showing


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="JEM, JEM++, SADA-JEM and the plain classifier: train each for the "
                                                 "same wall-clock budget, evaluate each, one table")
    parser.add_argument("--data", required=True,
                        help="image folder with train/<class>/ and test/<class>/ (e.g. ../shared/data/cifar10_subset)")
    parser.add_argument("--out", default="runs/study", help="where runs, evaluations and the table go")
    parser.add_argument("--figs_dir", default=os.path.join(REPO, "figs"), help="where the small figures are copied")
    parser.add_argument("--seed", type=int, default=1, help="seed of training and of every evaluation")
    parser.add_argument("--models", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                        help="run only these (the table shows every model found in --out)")
    parser.add_argument("--parallel", type=int, default=2, help="models trained and evaluated at a time, one "
                                                                "CPU thread each")
    parser.add_argument("--mnist_raw", default=MNIST_RAW,
                        help="folder with t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz); "
                             "missing: MNIST is left out of the OOD sets")
    parser.add_argument("--n_ood_images", type=int, default=1000, help="images of each OOD folder (MNIST, noise)")
    # --- the budget and the network, the same for every model
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock training budget of each model")
    parser.add_argument("--depth", type=int, default=10, help="Wide-ResNet depth (6n+4)")
    parser.add_argument("--width", type=int, default=1, help="Wide-ResNet widen factor")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--warmup_iters", type=int, default=100)
    parser.add_argument("--n_valid", type=int, default=500, help="training images held out for validation")
    parser.add_argument("--buffer_size", type=int, default=2000, help="replay buffer (paper: 10000)")
    # --- the paper's JEM row (Adam, short SGLD chains); the other recipes take their authors' settings
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate for jem and clf")
    parser.add_argument("--n_steps", type=int, default=5, help="jem: SGLD steps per training iteration (paper: 20)")
    parser.add_argument("--energy_l2", type=float, default=0.1,
                        help="jem: the authors' energy stabiliser (0: the paper's objective)")
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

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd, log_path, cwd=None):
    """Run one command with one CPU thread, its output to log_path; the wall time in seconds.

    One thread each: --parallel models run side by side on a 2-core machine, and SGLD's small batches gain
    little from a second thread."""
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        done = subprocess.run(cmd, cwd=cwd, env=ONE_THREAD, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"failed (exit {done.returncode}): {shlex.join(cmd)}; see {log_path}")
    return time.time() - start


def run_for(cmd, seconds, log_path):
    """Run a training command for at most `seconds`, then SIGTERM it (it saves last_ckpt.pt and exits)."""
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}  # for {seconds:.0f} s\n")
        log.flush()
        process = subprocess.Popen(cmd, env=ONE_THREAD, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"failed (exit {process.returncode}): {shlex.join(cmd)}; see {log_path}")


def train_command(args, name):
    """The training command of one recipe, from the start."""
    # n_epochs is a ceiling that the budget stops long before; the stop itself writes last_ckpt.pt
    return [os.path.join(REPO, "train_wrn_ebm.py"), "--dataset", args.data, "--n_valid", str(args.n_valid),
            "--depth", str(args.depth), "--width", str(args.width), "--batch_size", str(args.batch_size),
            "--n_epochs", "1000", "--warmup_iters", str(args.warmup_iters), "--p_y_given_x_weight", "1",
            "--p_x_y_weight", "0", "--buffer_size", str(args.buffer_size), "--reinit_freq", "0.05",
            *recipe_flags(args, name), "--on_diverge", "rollback", "--rollback_lr_scale", "0.5", "--seed",
            str(args.seed), "--device", "cpu", "--print_every", "50", "--print_to_log", "--ckpt_every", "1000",
            "--plot_uncond", "--save_dir", os.path.join(args.out, name)]


def train_within_budget(args, name, log):
    """Train until the model has had --minutes of wall-clock training in all (resuming a run cut short);
    a spent budget (OUT/name/budget.json) is not redone. Returns the training command."""
    save_dir = os.path.join(args.out, name)
    marker, cmd = os.path.join(save_dir, "budget.json"), train_command(args, name)
    if not os.path.exists(marker):
        used = 0.0
        if os.path.exists(os.path.join(save_dir, "last_ckpt.pt")):
            used = training_summary(args, name)["seconds"]
            run_for([PYTHON, cmd[0], "--resume", save_dir, "--print_to_log"], max(args.minutes * 60 - used, 1), log)
        else:
            run_for([PYTHON, *cmd], args.minutes * 60, log)
        with open(marker, "w") as f:
            json.dump({"minutes": args.minutes}, f)
    return shlex.join(["python", *cmd])


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
    if name in SAMPLERS:  # the classifier's buffer is never sampled, so only the energy models have one worth showing
        commands.append(ev("cond_samples", "cond_samples"))
    eps = [f"{e:g}" for e in args.attack_eps]
    attack = ["--dataset", args.data, "--distance", "Linf", "--eps", *eps,
              "--n_steps_pgd_attack", str(args.attack_pgd_steps), "--n_eval", str(args.attack_n_eval)]
    commands.append(ev("attack_refine0", "attack", *attack, "--n_steps_refine", "0", "--n_dup_chains", "1"))
    if name in SAMPLERS:  # the paper's defence: SGLD refinement on log p(x), 5 chains, for the energy models
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
    os.makedirs(os.path.join(args.out, name), exist_ok=True)
    start = time.time()
    commands_run.append(train_within_budget(args, name, log))
    times[f"{name}/train"] = time.time() - start
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
    """Iterations, epochs completed, last validation accuracy and wall seconds of a training run, from its files."""
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
    lines = open(os.path.join(args.out, name, "log.txt")).read().splitlines()
    rollbacks = sum("rollback" in line.lower() for line in lines)
    # a run stopped by the budget ends mid-epoch: its log says after which iteration
    stops = [int(m.group(1)) + 1 for line in lines if (m := re.search(r"stopped after iteration (\d+)", line))]
    iterations = max(stops) if stops else evals[-1]["iteration"] if evals else None
    return {"iterations": iterations, "epochs": len(evals),
            "valid_acc": evals[-1]["valid_acc"] if evals else None, "seconds": seconds, "rollback_lines": rollbacks}


def fmt(value, digits=3):
    return "—" if value is None else f"{value:.{digits}f}"


def build_table(args, ood_folders):
    """The markdown table, the models side by side, and the numbers behind it."""
    names = [n for n in RECIPES if os.path.exists(os.path.join(args.out, n, "metrics.jsonl"))]
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
    row("seconds per iteration", "seconds_per_iteration",
        lambda n: training_summary(args, n)["seconds"] / training_summary(args, n)["iterations"], "")
    row("validation accuracy (last epoch)", "valid_acc", lambda n: training_summary(args, n)["valid_acc"], "")
    row("test accuracy", "test_acc", lambda n: result(args, n, "test_clf", "test_clf")["accuracy"],
        ".929 / .958 (JEM++ .941, SADA-JEM .955)")
    row("test cross-entropy", "test_nll", lambda n: result(args, n, "test_clf", "test_clf")["loss"], "")
    row("ECE, 15 bins", "ece", lambda n: result(args, n, "calibration", "calibration")["ece"],
        "JEM several times lower (CIFAR-100)")
    paper_interp = {"px": ".65 / — (JEM++ .77, SADA-JEM .83)", "py": ".75 / .77", "pxgrad": ".78 / —"}
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

    lines = ["| | " + " | ".join(RECIPES[n] for n in names) + " | papers, WRN-28-10, full CIFAR-10 (JEM / classifier) |",
             "|---|" + "---|" * len(names) + "---|"]
    for what, values, paper in rows:
        shown = [fmt(v, 1 if "minutes" in what else 3) for v in values]
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
    **{f"calibration_{n}.png": (n, "calibration", "reliability_diagram.png") for n in RECIPES},
    **{f"logp_hist_{n}.png": (n, "logp_hist", "logp_hist.png") for n in RECIPES},
    **{f"cond_samples_{n}.png": (n, "cond_samples", "cond_samples_000.png") for n in SAMPLERS},
}
ATTACK_CURVES = [("clf", "attack_refine0", "classifier"), ("jem", "attack_refine0", "JEM, no refinement"),
                 *[(n, "attack_refine1", f"{RECIPES[n].split(' (')[0]}, 1 SGLD step x 5 chains") for n in SAMPLERS]]


def copy_figures(args):
    """Copy the evaluations' own PNGs into --figs_dir and draw the robust-accuracy overlay with attack.py."""
    os.makedirs(args.figs_dir, exist_ok=True)
    copied = []
    for target, (name, label, file) in FIGURES.items():
        source = os.path.join(args.out, name, "eval", label, file)
        if os.path.exists(source):
            shutil.copyfile(source, os.path.join(args.figs_dir, target))
            copied.append(target)
    runs = [(os.path.join(args.out, n, "eval", label), text) for n, label, text in ATTACK_CURVES
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

    times, commands_run, failures = {}, {n: [] for n in args.models}, []
    slots = threading.Semaphore(args.parallel)

    def worker(name):
        with slots:
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
        f.write(text + "\n## Commands\n\n```\n" + "\n".join(c for n in args.models for c in commands_run[n]) + "\n```\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"numbers": numbers, "seconds": times, "total_seconds": total, "figures": figures,
                   "commands": commands_run, "failures": failures, "args": vars(args)}, f, indent=2)
    print(text, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
