"""Small pieces both entry scripts share: user errors, device and seeding, the run log."""
import json
import os
import random
import sys
import time

import numpy as np
import torch


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, wrong checkpoint): shown as one line."""


def run_cli(main, argv=None):
    """Run an entry point; a UserError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def select_device(name=None):
    """`--device` or, when not given, cuda if available else cpu. Enables cudnn autotuning on GPU."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is visible; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda":
        # Input sizes never change in JEM, so let cudnn pick the fastest convolution algorithms.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_save_dir(save_dir):
    """Create the save dir and check it is writable, before any expensive work starts."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        probe = os.path.join(save_dir, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --save_dir {save_dir} ({e.strerror}); choose a writable folder")


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    os.replace(tmp, path)


class RunLog:
    """Readable lines to the console and `log.txt`; machine-readable records to `metrics.jsonl`.

    With quiet=True (`--print_to_log`) lines go to log.txt only, as the paper's flag did.
    """

    def __init__(self, save_dir, quiet=False, append=False):
        mode = "a" if append else "w"
        self.text = open(os.path.join(save_dir, "log.txt"), mode, buffering=1)
        self.metrics = open(os.path.join(save_dir, "metrics.jsonl"), mode, buffering=1)
        self.quiet = quiet
        self.start = time.time()

    def line(self, message, console_writer=print):
        stamped = f"[{time.time() - self.start:8.1f}s] {message}"
        self.text.write(stamped + "\n")
        if not self.quiet:
            console_writer(stamped)

    def record(self, **fields):
        self.metrics.write(json.dumps(fields, sort_keys=True) + "\n")

    def close(self):
        self.text.close()
        self.metrics.close()


def read_metrics(save_dir):
    """The records of a run's metrics.jsonl in order; where a resumed run logged an iteration again, the later
    record of each kind wins."""
    latest = {}
    with open(os.path.join(save_dir, "metrics.jsonl")) as fh:
        for line in fh:
            record = json.loads(line)
            latest[(record["kind"], record.get("iteration"), record.get("end_of_epoch"))] = record
    return sorted(latest.values(), key=lambda r: (r.get("iteration") or 0, r.get("train_seconds") or 0))


def run_ended(save_dir, reasons=("done", "budget")):
    """Whether the run in save_dir reached its end: its last start ended with one of `reasons` ('done': every
    epoch; 'budget': --max_train_minutes; 'signal': stopped early, to be resumed)."""
    path = os.path.join(save_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        kinds = [json.loads(line) for line in fh]
    ends = [r for r in kinds if r["kind"] in ("run", "end")]
    return bool(ends) and ends[-1]["kind"] == "end" and ends[-1]["reason"] in reasons


class SilentLog:
    """The log of ranks other than 0 in a distributed run: rank 0 alone writes."""

    def line(self, message, console_writer=print):
        pass

    def record(self, **fields):
        pass

    def close(self):
        pass


# --------------------------------------------------------------------------------------------------
# Flags that training and evaluation share (same names and meaning; the paper's defaults differ).

def norm_flag(value):
    """`--norm` takes batch|instance|layer|act, or none/None for the paper's default (no norm)."""
    if value.lower() == "none":
        return None
    if value not in ("batch", "instance", "layer", "act"):
        raise ValueError(value)
    return value


norm_flag.__name__ = "norm"  # argparse names the type in its error line


def add_model_flags(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--depth", type=int, default=28, help="Wide-ResNet depth, 6n+4")
    group.add_argument("--width", type=int, default=10, help="Wide-ResNet widen factor k")
    group.add_argument("--norm", type=norm_flag, default=None,
                       help="batch | instance | layer | act | none (default none, as the paper)")
    group.add_argument("--uncond", action="store_true",
                       help="score p(x) with a separate scalar head instead of logsumexp of the logits")
    return group


def add_sampler_flags(parser, n_steps, buffer_size):
    group = parser.add_argument_group("SGLD sampler")
    group.add_argument("--n_steps", type=int, default=n_steps, help="SGLD steps per sample")
    group.add_argument("--buffer_size", type=int, default=buffer_size,
                       help="replay buffer size (0: every chain starts from fresh noise)")
    group.add_argument("--reinit_freq", type=float, default=0.05,
                       help="probability that a chain restarts from noise instead of the buffer")
    group.add_argument("--sgld_lr", type=float, default=1.0, help="SGLD step size on the score gradient")
    group.add_argument("--sgld_std", type=float, default=1e-2, help="std of the SGLD noise")
    return group


def add_system_flags(parser):
    group = parser.add_argument_group("system")
    group.add_argument("--device", type=str, default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    group.add_argument("--seed", type=int, default=1, help="seed for torch, numpy and random")
    group.add_argument("--amp", action="store_true",
                       help="bf16 mixed precision, where the hardware has it (GPUs from Ampere on; CPUs with AMX-BF16 "
                            "or AVX512-BF16); elsewhere one line says so and float32 is used")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the Wide-ResNet (a GPU speed-up; slower on the CPUs we measured)")
    group.add_argument("--n_workers", type=int, default=None,
                       help="data-loading processes (default: 4 on GPU, 0 on CPU)")
    group.add_argument("--print_every", type=int, default=100, help="log every this many iterations")
    group.add_argument("--print_to_log", action="store_true",
                       help="write log lines to log.txt only, not to the console")
    return group
