"""The one command to run when a GPU is at hand: speed per iteration, time to accuracy, and what the
trained models are worth, written to one folder.

    python scripts/gpu_check.py runs/gpu_check                 # one GPU: about 8 minutes on an H100
    python scripts/gpu_check.py runs/gpu_check --data ../shared/data/cifar10_subset --seeds 1
    python scripts/gpu_check.py /tmp/gpu_check --tiny --device cpu   # every step, tiny, anywhere

In order, each step a subprocess whose output goes to a log in OUT (a step that fails is recorded
and the next one runs; the command exits with status 1 at the end if any failed):

  environment.json       GPU name, compute capability, NVIDIA driver, torch, CUDA and cuDNN
                         versions, the CPU and its bf16 support, the command, the data folder
  bench.txt, bench.json  bench.py over every config: the paper's, the project's and the fast side
                         (--amp --cuda_graph for the JEM configs, --amp for the recipes', whose
                         batch norm a CUDA graph cannot capture), with FLOP/s and share of the peak;
                         peak memory for the JEM configs (--skip_memory for the recipes')
  tta/                   scripts/time_to_accuracy.py on the data folder: the default step (jem), the
                         GPU fast path (jem-fast: --amp --compile --cuda_graph) and --recipe sadajem
                         --amp (sadajem-amp), --minutes of training each, over --seeds: report.txt,
                         results.json, time_to_accuracy.png, each run's logs and metrics.jsonl
  eval/<config>/seed<N>/ eval_wrn_ebm.py on each trained model: test accuracy (test_clf.json), ECE
                         and the reliability diagram (calibration.json), OOD AUROC of px against
                         cifar_interp mixes of the test images (OOD.json), the replay buffer's
                         images by predicted class (cond_samples.json, cond_samples_000.png)
  summary.json           every step's status, seconds and log; per model its accuracy, ECE, AUROC
                         and grid; per configuration time_to_accuracy's summary

Checkpoints and sample buffers (*.pt) are deleted once evaluated (--keep_checkpoints keeps them), so
OUT holds JSON, logs and small PNGs only. --tiny runs the same steps at toy sizes in seconds (bench
of wrn-10-1 for one iteration, a few seconds of training per run, evaluations of 16 images): the
test of this script, and a check that a machine is set up before a real run.
"""
import glob
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's modules
from jem.errors import UserError  # noqa: E402  (needs the path above)
from jem.flags.common import OneLineErrors  # noqa: E402
from utils import prepare_save_dir, run_cli  # noqa: E402

PYTHON = sys.executable
# The data folder: shared/ beside the repository (this machine) or inside it (a copied working tree)
DATA_CANDIDATES = [os.path.join(REPO, "..", "shared", "data", "cifar10_subset"),
                   os.path.join(REPO, "shared", "data", "cifar10_subset")]
# bench.py's configs, in groups of the same flags. The recipes' peak memory is left out: its 12
# fresh processes would add a minute (docs/performance.md, "One command for a GPU").
BENCH_GROUPS = {"jem": (["wrn-10-1", "wrn-16-2", "wrn-28-2", "wrn-28-10"],
                        ["--amp", "--cuda_graph"]),
                        "recipes": (["jempp-wrn-10-1", "sadajem-wrn-10-1", "jempp-wrn-28-10",
                                     "sadajem-wrn-28-10"], ["--amp", "--skip_memory"])}
BENCH_TIMING = ["--iters", "5", "--warmup", "1"]
TTA_CONFIGS = ["jem", "jem-fast", "sadajem-amp"]  # time_to_accuracy.py's names; jem is the baseline
EVAL_MAX_IMAGES = None  # every test image
EVAL_THREADS = 2

# --tiny: the same steps at toy sizes (seconds on a CPU). No --compile: it takes a minute on a CPU.
TINY_BENCH_GROUPS = {"jem": (["wrn-10-1"], ["--amp"])}
TINY_BENCH_TIMING = ["--iters", "1", "--warmup", "0", "--skip_memory"]
TINY_TTA_CONFIGS = ["jem", "sadajem-amp"]
TINY_BASE_FLAGS = ("--depth 10 --width 1 --n_steps 2 --batch_size 8 --labeled_batch_size 8 "
                   "--n_valid 8 --buffer_size 40 --warmup_iters 0 --n_epochs 1000 "
                   "--ckpt_every 10000 --n_workers 0")
TINY_MINUTES = 0.05
TINY_EVAL_MAX_IMAGES = 16


def parse_args(argv=None):
    parser = OneLineErrors(description="Benchmark, time to accuracy and evaluations on a GPU, into "
                                       "one folder")
    add = parser.add_argument
    add("out", help="folder for the JSON, logs and PNGs (made if missing)")
    add("--data", default=None,
        help="image folder with train/ and test/ (default: shared/data/cifar10_subset beside the "
             "repository, or inside it)")
    add("--device", default=None, help="cuda or cpu (default: cuda if available)")
    add("--minutes", type=float, default=0.4,
        help="training time of each time-to-accuracy run (wall clock)")
    add("--seeds", nargs="+", type=int, default=[1, 2])
    add("--configs", nargs="+", default=None,
        help="time_to_accuracy.py's configurations, jem (the baseline) among them (default: "
             f"{' '.join(TTA_CONFIGS)}; with --tiny {' '.join(TINY_TTA_CONFIGS)})")
    add("--threads", type=int, default=4, help="CPU threads of each training run")
    add("--parallel_evals", type=int, default=6,
        help="evaluations at a time (each of 2 CPU threads)")
    add("--skip", nargs="+", default=[], choices=["bench", "tta", "eval"],
        help="steps to leave out")
    add("--keep_checkpoints", action="store_true",
        help="keep the trained checkpoints and sample buffers (*.pt)")
    add("--tiny", action="store_true",
        help="toy sizes: every step in seconds (a test of the script, not a measurement)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Inputs and the machine.

def find_data(data):
    """The data folder, checked to hold train/ and test/."""
    candidates = [data] if data else DATA_CANDIDATES
    found = next((path for path in candidates if os.path.isdir(path)), None)
    if found is None:
        tried = " or ".join(os.path.normpath(path) for path in candidates)
        raise UserError(f"no data folder at {tried}; pass --data PATH, an image folder with train/ "
                        "and test/")
    missing = [split for split in ("train", "test")
               if not os.path.isdir(os.path.join(found, split))]
    if missing:
        raise UserError(f"--data {found} has no {' or '.join(missing)}/ folder: it must be an "
                        "image folder with train/<class>/ and test/<class>/")
    return os.path.abspath(found)


def describe_environment(args, device):
    """What the results were measured on (environment.json)."""
    import torch  # here, not at the top: --help and the docs' checks stay fast

    from jem.run.device import describe_hardware, native_bf16
    from jem.run.profiling import gpu_description
    return {"device": str(device), "hardware": describe_hardware(device),
            "native_bf16": native_bf16(device),
            "gpu": gpu_description(device) if device.type == "cuda" else None,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0],
            "command": shlex.join(["python", "scripts/gpu_check.py", *args.argv]),
            "data": args.data, "tiny": args.tiny, "started": time.strftime("%Y-%m-%d %H:%M:%S")}


# --------------------------------------------------------------------------------------------------
# The steps, each a subprocess.

def run_logged(command, log_path, threads=None):
    """Run a command with its output in log_path: {'command', 'returncode', 'seconds', 'log'}."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT).returncode
    return {"command": shlex.join(command), "returncode": returncode,
            "seconds": round(time.perf_counter() - start, 1), "log": log_path}


def bench(args, device):
    """bench.py over each group of configs: the tables in bench.txt, the results in bench.json."""
    groups, timing = (TINY_BENCH_GROUPS, TINY_BENCH_TIMING) if args.tiny else \
        (BENCH_GROUPS, BENCH_TIMING)
    runs, reports = {}, []
    for group, (configs, flags) in groups.items():
        json_path = os.path.join(args.out, f"bench_{group}.json")
        command = [PYTHON, os.path.join(REPO, "bench.py"), "--configs", *configs, *flags, *timing,
                   "--device", str(device), "--json", json_path]
        runs[f"bench_{group}"] = run_logged(command, os.path.join(args.out, f"bench_{group}.txt"))
        if os.path.exists(json_path):
            with open(json_path) as fh:
                reports.append(json.load(fh))
            os.remove(json_path)
    if reports:
        merged = {**reports[0], "options": [r["options"] for r in reports],
                  "results": [result for r in reports for result in r["results"]]}
        with open(os.path.join(args.out, "bench.json"), "w") as fh:
            json.dump(merged, fh, indent=2)
    with open(os.path.join(args.out, "bench.txt"), "w") as out:
        for run in runs.values():
            with open(run["log"]) as fh:
                out.write(fh.read() + "\n")
            os.remove(run["log"])
            run["log"] = out.name
    return runs


def tta_command(args, device):
    command = [PYTHON, os.path.join(REPO, "scripts", "time_to_accuracy.py"), "--data", args.data,
               "--out", os.path.join(args.out, "tta"), "--seeds", *map(str, args.seeds),
               "--minutes", f"{args.minutes:g}", "--clock", "wall", "--device", str(device),
               "--threads", str(args.threads)]
    if args.tiny:
        return command + ["--configs", *args.configs, "--parallel", "2", "--evals", "3",
                          "--base_flags", TINY_BASE_FLAGS]
    return command + ["--configs", *args.configs, "--parallel", "1"]  # one run at a time on a GPU


def time_to_accuracy(args, device):
    """scripts/time_to_accuracy.py: every configuration and seed, its report in tta/report.txt."""
    os.makedirs(os.path.join(args.out, "tta"), exist_ok=True)
    return {"time_to_accuracy": run_logged(tta_command(args, device),
                                           os.path.join(args.out, "tta", "report.txt"))}


EVALS = {  # name: eval_wrn_ebm.py flags
    "test_clf": ["--eval", "test_clf"],
    "calibration": ["--eval", "calibration"],
    "OOD": ["--eval", "OOD", "--ood_dataset", "cifar_interp", "--score_fn", "px"],
    "cond_samples": ["--eval", "cond_samples"],  # the checkpoint's buffer, by predicted class
}


def trained_models(args):
    """{(config, seed): checkpoint} of the time-to-accuracy runs that finished."""
    found = {}
    for path in sorted(glob.glob(os.path.join(args.out, "tta", "*", "seed*", "last_ckpt.pt"))):
        run = os.path.dirname(path)
        found[(os.path.basename(os.path.dirname(run)), os.path.basename(run)[len("seed"):])] = path
    return found


def evaluate(args, device):
    """eval_wrn_ebm.py's four evaluations of every trained model, --parallel_evals at a time."""
    max_images = TINY_EVAL_MAX_IMAGES if args.tiny else EVAL_MAX_IMAGES
    jobs = {}
    for (config, seed), checkpoint in trained_models(args).items():
        save_dir = os.path.join(args.out, "eval", config, f"seed{seed}")
        os.makedirs(save_dir, exist_ok=True)
        for name, flags in EVALS.items():
            command = [PYTHON, os.path.join(REPO, "eval_wrn_ebm.py"), *flags,
                       "--load_path", checkpoint, "--dataset", args.data, "--save_dir", save_dir,
                       "--device", str(device), "--print_to_log"]
            command += ["--max_images", str(max_images)] if max_images else []
            log = os.path.join(save_dir, f"{name}.log")
            jobs[f"eval {config} seed{seed} {name}"] = (command, log)
    with ThreadPoolExecutor(args.parallel_evals) as pool:
        threads = args.threads if args.tiny else EVAL_THREADS
        futures = {key: pool.submit(run_logged, command, log, threads)
                   for key, (command, log) in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


# --------------------------------------------------------------------------------------------------
# The summary.

def read_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def model_results(args):
    """Per trained model: test accuracy, ECE, OOD AUROC and the first sample grid."""
    models = {}
    for config, seed in sorted(existing_evals(args)):
        folder = os.path.join(args.out, "eval", config, f"seed{seed}")
        test, calibration, ood, samples = (read_json(os.path.join(folder, f"{name}.json"))
                                           for name in EVALS)
        models.setdefault(config, {})[seed] = {
            "test_accuracy": test and test["accuracy"], "ece": calibration and calibration["ece"],
            "ood_auroc_cifar_interp": ood and ood["auroc"],
            "reliability_diagram": calibration and calibration["figure"],
            "sample_grid": samples and samples["grids"][0]}
    return models


def existing_evals(args):
    """(config, seed) of the evaluation folders in OUT (their checkpoints may be gone)."""
    folders = glob.glob(os.path.join(args.out, "eval", "*", "seed*"))
    return {(os.path.basename(os.path.dirname(f)), os.path.basename(f)[len("seed"):])
            for f in folders}


def summarize(args, environment, steps):
    tta = read_json(os.path.join(args.out, "tta", "results.json"))
    bench_results = (read_json(os.path.join(args.out, "bench.json")) or {}).get("results", [])
    keys = ("seeds", "final_mean", "final_min", "final_max", "iterations_per_minute",
            "minutes_to_target", "speedup_to_target", "rollbacks")
    summary = {
        "environment": environment, "steps": steps,
        "failed": [name for name, step in steps.items() if step["returncode"] != 0],
        "bench": [{"config": r["config"], "peaks": r["peaks"],
                   "sides": {side: {k: v for k, v in s.items() if k != "seconds"}
                             for side, s in r["sides"].items()}}
                  for r in bench_results],
        "time_to_accuracy": tta and {"target": tta["target"], "configs": {
            config: {k: s[k] for k in keys} for config, s in tta["summary"].items()}},
        "models": model_results(args),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


def remove_checkpoints(out):
    for path in glob.glob(os.path.join(out, "**", "*.pt"), recursive=True):
        os.remove(path)


def main(argv=None):
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.tiny:
        args.threads, args.minutes = 1, TINY_MINUTES  # two runs side by side on a small CPU
    args.configs = args.configs or (TINY_TTA_CONFIGS if args.tiny else TTA_CONFIGS)
    if "jem" not in args.configs:
        raise UserError("--configs must hold jem, the baseline of time to accuracy")
    args.data = find_data(args.data)
    prepare_save_dir(args.out, flag="OUT")
    args.out = os.path.abspath(args.out)

    from jem.run.device import select_device  # torch: after the checks, which need none
    device = select_device(args.device)
    environment = describe_environment(args, device)
    with open(os.path.join(args.out, "environment.json"), "w") as fh:
        json.dump(environment, fh, indent=1)
    print(environment["hardware"], flush=True)
    steps = {}
    for name, step in (("bench", bench), ("tta", time_to_accuracy), ("eval", evaluate)):
        if name in args.skip:
            continue
        start = time.perf_counter()
        print(f"{name} ...", flush=True)
        steps.update(step(args, device))
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    if not args.keep_checkpoints:
        remove_checkpoints(args.out)
    summary = summarize(args, environment, steps)
    print(f"wrote {args.out}/summary.json; failed: {', '.join(summary['failed']) or 'none'}")
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
