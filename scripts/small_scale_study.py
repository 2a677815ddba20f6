"""The paper's JEM, JEM++, SADA-JEM and the plain classifier on real images, on a CPU, in one
command.

Trains the same small Wide-ResNet once per recipe and seed on the same data, each for the same
training time (--minutes) or the same number of epochs (--epochs; with --train_per_class, on a set
small enough to over-fit), then runs the project's own evaluations on every model and gathers their
JSON outputs into one markdown table (mean and range over seeds):

    .venv/bin/python scripts/small_scale_study.py --data ../shared/data/cifar10_subset \
        --out runs/study --minutes 6
    .venv/bin/python scripts/small_scale_study.py --data ../shared/data/cifar10_subset \
        --out runs/converged --epochs 50 --seeds 1 2 3 --amp --models clf jem sadajem \
        --figs_prefix converged_
    .venv/bin/python scripts/small_scale_study.py --data ../shared/data/cifar10_subset \
        --out runs/overfit --train_per_class 100 --epochs 400 --seeds 1 2 3 --amp \
        --models clf jem sadajem --figs_prefix overfit_

The recipes: `jem`, the paper's objective with short SGLD chains (Adam); `jempp` and `sadajem`,
train_wrn_ebm.py's --recipe presets for JEM++ and SADA-JEM; `clf`, the same network trained as a
plain classifier (--p_x_weight 0). Everything goes through the project's command lines
(train_wrn_ebm.py, eval_wrn_ebm.py, scripts/plot_attack.py) as subprocesses; this file only builds
their arguments and runs --parallel of them at a time (one CPU thread each);
scripts/study_report.py reads what they wrote. It writes
- OUT/<model>/seed<N>/: the training runs (checkpoints, logs) and OUT/<model>/seed<N>/eval/<mode>/
  the evaluations;
- OUT/ood/: the offline out-of-distribution sets (MNIST test digits, uniform noise) as image
  folders;
- OUT/results.md (also printed) and OUT/results.json: the table, the wall times and the commands;
- --figs_dir (default figs/): small copies of the figures, and reliability diagrams and accuracy
  against training time across models and seeds.

A training run that got to its end (its metrics.jsonl says so) is not repeated, and one that was cut
short (the machine stopped, the command was interrupted) continues from its last checkpoint; an
evaluation that wrote its results is not run again: the command can be re-run, in this session or a
later one, and does only what is left.
"""
import os
import shlex
import subprocess
import sys
import threading
import time

# its report module, also when imported by path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_report import (LABELS, SAMPLERS, SCORES, build_table, copy_figures,  # noqa: E402
                          earlier_results, run_dir, write_results)

from jem.flags.common import OneLineErrors  # noqa: E402
from jem.run.log import run_ended  # noqa: E402  (study_report puts the repository on the path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
MNIST_RAW = os.path.join(REPO, "..", "shared", "data", "mnist", "MNIST", "raw")


def recipe_flags(args, name):
    """train_wrn_ebm.py flags of one recipe; the network, data, batch and warm-up are the study's,
    shared."""
    sgld_jem = ["--n_steps", str(args.n_steps), "--sgld_lr", "1", "--sgld_std", "0.01",
                "--energy_l2", str(args.energy_l2), "--optimizer", "adam", "--lr", str(args.lr)]
    return {
        "jem": ["--p_x_weight", "1", *sgld_jem],
        # PYLD chains, informative start, batch norm, SGD (JEM++'s defaults)
        "jempp": ["--recipe", "jempp"],
        # SAM, informative start, noise-free K=5 chains, batch norm
        "sadajem": ["--recipe", "sadajem"],
        "clf": ["--p_x_weight", "0", "--optimizer", "adam", "--lr", str(args.lr)],
    }[name]


# --epochs E: each recipe's learning-rate decays at the same fractions of the run as in its paper
# (JEM: 160 and 180 of 200 epochs; JEM++: 50, 100, 125 of 150; SADA-JEM: 60, 120, 180 of 200), so
# every run ends converging.
DECAY_FRACTIONS = {"jem": (0.8, 0.9), "clf": (0.8, 0.9), "jempp": (1 / 3, 2 / 3, 5 / 6),
                   "sadajem": (0.3, 0.6, 0.9)}


def decay_flags(args, name):
    """--decay_epochs of a run of --epochs (the recipe's own --decay_rate stays); none for a time
    budget."""
    if not args.epochs:
        return []
    return ["--decay_epochs", *[str(max(1, round(f * args.epochs))) for f in DECAY_FRACTIONS[name]]]


def parse_args(argv=None):
    parser = OneLineErrors(
        description="JEM, JEM++, SADA-JEM and the plain classifier, each trained for one budget "
                    "over several seeds and evaluated: one table")
    add = parser.add_argument
    add("--data", required=True,
        help="image folder with train/<class>/ and test/<class>/ "
             "(e.g. ../shared/data/cifar10_subset)")
    add("--out", default="runs/study", help="where runs, evaluations and the table go")
    add("--figs_dir", default=os.path.join(REPO, "figs"), help="where the small figures are copied")
    add("--figs_prefix", default="", help="prefix of the figure files' names in --figs_dir")
    add("--seeds", "--seed", nargs="+", type=int, default=[1],
        help="seeds of training and of every evaluation: each model is trained once per seed")
    add("--models", nargs="+", choices=list(LABELS), default=list(LABELS),
        help="run only these (the table shows every model found in --out)")
    add("--report_only", action="store_true",
        help="train and evaluate nothing: the table and figures of what OUT holds for --models and "
             "--seeds (e.g. after runs of different seeds for different models)")
    add("--parallel", type=int, default=2,
        help="runs trained and evaluated at a time, one CPU thread each")

    add("--mnist_raw", default=MNIST_RAW,
        help="folder with t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz); missing: "
             "MNIST is left out of the OOD sets")
    add("--n_ood_images", type=int, default=1000, help="images of each OOD folder (MNIST, noise)")
    # --- the budget and the network, the same for every model
    add("--minutes", type=float, default=8.0,
        help="training time of each run (train_wrn_ebm.py's --max_train_minutes, on its CPU clock)")
    add("--epochs", type=int, default=0,
        help="train each run for this many epochs instead of --minutes (the converged regime)")
    add("--train_per_class", type=int, default=0,
        help="train on the first K images of each class of --data's train/ "
             "(by file name; --n_valid of them are held out for validation): "
             "a set small enough for the classifier to over-fit within the budget. 0: every image")
    add("--amp", action="store_true",
        help="train in bf16 mixed precision (evaluations stay float32)")
    add("--depth", type=int, default=10, help="Wide-ResNet depth (6n+4)")
    add("--width", type=int, default=1, help="Wide-ResNet widen factor")
    add("--batch_size", type=int, default=64)
    add("--warmup_iters", type=int, default=100)
    add("--n_valid", type=int, default=500, help="training images held out for validation")
    add("--buffer_size", type=int, default=2000, help="replay buffer (paper: 10000)")
    # --- the paper's JEM row (Adam, short SGLD chains); the other recipes take their authors'
    # settings
    add("--lr", type=float, default=1e-3, help="Adam's learning rate for jem and clf")
    add("--n_steps", type=int, default=5, help="jem: SGLD steps per training iteration (paper: 20)")
    add("--energy_l2", type=float, default=0.1,
        help="jem: the authors' energy stabiliser (0: the paper's objective)")
    # --- evaluation sizes
    add("--attack_n_eval", type=int, default=100)
    add("--attack_pgd_steps", type=int, default=10)
    add("--attack_eps", type=float, nargs="+", default=[0, 1, 2, 4, 8], help="L-inf, in 1/255")
    add("--sample_rounds", type=int, default=50, help="uncond_samples: sampling rounds")
    add("--sample_steps", type=int, default=20, help="uncond_samples: SGLD steps per round")
    add("--sample_buffer", type=int, default=100, help="uncond_samples: buffer size")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Running the project's command lines.

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd, log_path, cwd=None):
    """Run one command with one CPU thread, its output to log_path; the wall time in seconds.

    One thread each: --parallel runs go side by side on a 2-core machine, and SGLD's small batches
    gain little from a second thread."""
    start = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        done = subprocess.run(cmd, cwd=cwd, env=ONE_THREAD, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"failed (exit {done.returncode}): {shlex.join(cmd)}; see {log_path}")
    return time.time() - start


def train_command(args, name, seed):
    """The training command of one recipe and seed, from the start. Time is on each run's CPU clock:
    with one thread, an idle core's wall-clock time that runs side by side do not stretch."""
    # Without --epochs, n_epochs is a ceiling that the time budget reaches long before.
    budget = ["--n_epochs", str(args.epochs)] if args.epochs else \
        ["--n_epochs", "1000", "--max_train_minutes", f"{args.minutes:g}"]
    return [os.path.join(REPO, "train_wrn_ebm.py"), "--dataset", training_folder(args), "--n_valid",
            str(args.n_valid),
            "--depth", str(args.depth), "--width", str(args.width), "--batch_size",
            str(args.batch_size),
            *budget, *decay_flags(args, name), "--warmup_iters", str(args.warmup_iters),
            "--p_y_given_x_weight", "1",
            "--p_x_y_weight", "0", "--buffer_size", str(args.buffer_size), "--reinit_freq", "0.05",
            *recipe_flags(args, name), "--on_diverge", "rollback", "--rollback_lr_scale", "0.5",
            "--seed",
            str(seed), "--device", "cpu", "--train_clock", "cpu", "--print_every", "50",
            "--print_to_log", "--ckpt_every", "1000",
            "--eval_train", *(["--amp"] if args.amp else []), "--plot_uncond",
            "--save_dir", run_dir(args.out, name, seed)]


def training_folder(args):
    """The image folder the models train on: --data, or OUT/train<K>_per_class with
    --train_per_class K."""
    folder = f"train{args.train_per_class}_per_class"
    return os.path.join(args.out, folder) if args.train_per_class else args.data


def make_training_folder(args):
    """OUT/train<K>_per_class: train/<class>/ links to the first K images of each class, test/ a
    link to --data's."""
    folder = training_folder(args)
    if folder == args.data or os.path.isdir(folder):
        return
    train = os.path.join(args.data, "train")
    classes = {name: sorted(os.listdir(os.path.join(train, name)))
               for name in sorted(os.listdir(train))}
    for name, files in classes.items():  # all checked before anything is made
        if len(files) < args.train_per_class:
            sys.exit(f"{train}/{name}: {len(files)} images, fewer than --train_per_class "
                     f"{args.train_per_class}")
    for name, files in classes.items():
        os.makedirs(os.path.join(folder, "train", name))
        for file in files[:args.train_per_class]:
            os.symlink(os.path.join(train, name, file), os.path.join(folder, "train", name, file))
    os.symlink(os.path.join(args.data, "test"), os.path.join(folder, "test"))


def train_to_the_end(args, name, seed, log):
    """Train one run to the end of its budget: not again once it got there, from its last checkpoint
    when it was cut short. Returns the training command and this call's wall time in seconds (None
    when it trained nothing)."""
    save_dir = run_dir(args.out, name, seed)
    cmd = train_command(args, name, seed)
    seconds = None
    if not run_ended(save_dir):
        if os.path.exists(os.path.join(save_dir, "last_ckpt.pt")):
            seconds = run([PYTHON, cmd[0], "--resume", save_dir, "--print_to_log"], log)
        else:
            seconds = run([PYTHON, *cmd], log)
        # a signal stopped it early: it saved, and a re-run continues it
        if not run_ended(save_dir):
            raise RuntimeError(f"{save_dir} stopped before the end of its budget; run the study "
                               "again to continue")
    return shlex.join(["python", *cmd]), seconds


def eval_commands(args, name, seed, ood_folders):
    """(label, command, cwd) of every evaluation of one model; their outputs go to
    OUT/name/eval/<label>/.

    The OOD and histogram runs work inside OUT/ood so that the sets are named by short relative
    paths (`cifar10_test`, `mnist`, `noise`) in the JSON files and the histogram's legend."""
    ckpt = os.path.join(run_dir(args.out, name, seed), "last_ckpt.pt")
    ood_dir = os.path.join(args.out, "ood")

    def ev(label, mode, *flags, cwd=None):
        save_dir = os.path.join(run_dir(args.out, name, seed), "eval", label)
        return label, [PYTHON, os.path.join(REPO, "eval_wrn_ebm.py"), "--load_path", ckpt, "--eval",
                       mode,
                       "--save_dir", save_dir, "--device", "cpu", "--seed", str(seed),
                       "--print_to_log", *flags], cwd

    commands = [ev("test_clf", "test_clf", "--dataset", args.data),
                ev("calibration", "calibration", "--dataset", args.data)]
    for ood_set in ood_folders:
        for score in SCORES:
            commands.append(ev(f"ood_{ood_set}_{score}", "OOD", "--dataset", "cifar10_test",
                               "--ood_dataset", ood_set, "--score_fn", score, cwd=ood_dir))
    commands.append(ev("logp_hist", "logp_hist", "--dataset", "cifar10_test", "--score_fn", "px",
                       "--datasets", "cifar10_test", *ood_folders, cwd=ood_dir))
    commands.append(ev("uncond_samples", "uncond_samples", "--buffer_size", str(args.sample_buffer),
                       "--n_steps", str(args.sample_steps),
                       "--n_sample_steps", str(args.sample_rounds),
                       "--print_every", str(args.sample_rounds), "--reinit_freq", "0.05"))
    # the classifier's buffer is never sampled, so only the energy models have one worth showing
    if name in SAMPLERS:
        commands.append(ev("cond_samples", "cond_samples"))
    eps = [f"{e:g}" for e in args.attack_eps]
    attack = ["--dataset", args.data, "--distance", "Linf", "--eps", *eps,
              "--n_steps_pgd_attack", str(args.attack_pgd_steps),
              "--n_eval", str(args.attack_n_eval)]
    commands.append(ev("attack_refine0", "attack", *attack, "--n_steps_refine", "0",
                       "--n_dup_chains", "1"))
    # the paper's defence: SGLD refinement on log p(x), 5 chains, for the energy models
    if name in SAMPLERS:
        commands.append(ev("attack_refine1", "attack", *attack, "--n_steps_refine", "1",
                           "--n_dup_chains", "5"))
    return commands


def ood_set_names(args):
    """The OOD sets of the study: CIFAR interpolations always, MNIST and noise where OUT/ood has
    their folders."""
    return ["cifar_interp"] + [n for n in ("mnist", "noise")
                               if os.path.isdir(os.path.join(args.out, "ood", n))]


def make_ood_folders(args):
    """OUT/ood/{cifar10_test -> the data's test split, mnist, noise}; returns the OOD set names."""
    ood_dir = os.path.join(args.out, "ood")
    os.makedirs(ood_dir, exist_ok=True)
    link = os.path.join(ood_dir, "cifar10_test")
    if not os.path.exists(link):
        os.symlink(os.path.join(args.data, "test"), link)
    log = os.path.join(args.out, "prepare.log")
    images = [os.path.join(args.mnist_raw, f)
              for f in ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz")]
    labels = [os.path.join(args.mnist_raw, f)
              for f in ("t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte.gz")]
    images, labels = ([p for p in paths if os.path.exists(p)] for paths in (images, labels))

    if images and labels:
        if not os.path.isdir(os.path.join(ood_dir, "mnist")):
            run([PYTHON, os.path.join(REPO, "scripts", "idx_to_folder.py"), images[0], labels[0],
                 os.path.join(ood_dir, "mnist"), "--max_images", str(args.n_ood_images)], log)
    else:
        print(f"no MNIST IDX files in {args.mnist_raw}: MNIST is left out", flush=True)
    if not os.path.isdir(os.path.join(ood_dir, "noise")):
        run([PYTHON, os.path.join(REPO, "scripts", "noise_folder.py"),
             os.path.join(ood_dir, "noise"),
             "--n_images", str(args.n_ood_images), "--seed", str(args.seeds[0])], log)
    return ood_set_names(args)


def run_model(args, name, seed, ood_folders, times, commands_run):
    """Train one run, then its evaluations one after another; wall times into `times`."""
    save_dir = run_dir(args.out, name, seed)
    os.makedirs(save_dir, exist_ok=True)
    log = os.path.join(save_dir, "driver.log")
    command, seconds = train_to_the_end(args, name, seed, log)
    commands_run.append(command)
    # a run an earlier invocation trained keeps the time that one wrote to results.json
    if seconds is not None:
        times[f"{name}/seed{seed}/train"] = seconds
    for label, cmd, cwd in eval_commands(args, name, seed, ood_folders):
        done = os.path.join(save_dir, "eval", label, "done")
        commands_run.append((f"(cd {cwd} && " if cwd else "") + shlex.join(cmd)
                            + (")" if cwd else ""))
        if os.path.exists(done):
            continue
        times[f"{name}/seed{seed}/{label}"] = run(cmd, log, cwd=cwd)
        open(done, "w").close()
        print(f"{name} seed {seed}: {label} done in {times[f'{name}/seed{seed}/{label}']:.0f}s",
              flush=True)


def main(argv=None):
    args = parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    args.figs_dir = os.path.abspath(args.figs_dir)
    if not all(os.path.isdir(os.path.join(args.data, split)) for split in ("train", "test")):
        sys.exit(f"{args.data}: needs train/<class>/ and test/<class>/ image folders")
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    if args.report_only:  # a report makes nothing: it reads what the earlier invocations made
        ood_folders = ood_set_names(args)
    else:
        ood_folders = make_ood_folders(args)
        make_training_folder(args)

    jobs = [(name, seed) for seed in args.seeds for name in args.models]
    times, commands_run, failures = {}, {f"{n}/seed{s}": [] for n, s in jobs}, []
    slots = threading.Semaphore(args.parallel)

    def worker(name, seed):
        with slots:
            try:
                run_model(args, name, seed, ood_folders, times, commands_run[f"{name}/seed{seed}"])
            except RuntimeError as e:
                failures.append(f"{name} seed {seed}: {e}")

    threads = [] if args.report_only else \
        [threading.Thread(target=worker, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    earlier = earlier_results(args.out)
    times = {**earlier.get("seconds", {}), **times}
    commands_run = {**earlier.get("commands", {}),
                    **{run: cmds for run, cmds in commands_run.items() if cmds}}

    names = [n for n in LABELS
             if any(os.path.exists(os.path.join(run_dir(args.out, n, s), "metrics.jsonl"))
                    for s in args.seeds)]
    figures = copy_figures(args, names, PYTHON)
    table, numbers = build_table(args, names, ood_folders)
    # a report alone keeps the wall time of the last invocation that trained or evaluated
    total = earlier.get("total_seconds") if args.report_only else time.time() - start
    text = write_results(args, table, numbers, figures, times, commands_run, failures, total)
    print(text, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
