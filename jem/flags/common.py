"""Flags both entry scripts share (same names and meaning; the paper's defaults differ), argparse
with one-line errors, and the range checks of numeric flags."""
import argparse
import math

from jem.errors import UserError


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
    add = group.add_argument
    add("--depth", type=int, default=28, help="Wide-ResNet depth, 6n+4")
    add("--width", type=int, default=10, help="Wide-ResNet widen factor k")
    add("--norm", type=norm_flag, default=None,
        help="batch | instance | layer | act | none (default none, as the paper)")
    add("--uncond", action="store_true",
        help="score p(x) with a separate scalar head instead of logsumexp of the logits")
    return group


def add_sampler_flags(parser, n_steps, buffer_size):
    group = parser.add_argument_group("SGLD sampler")
    add = group.add_argument
    add("--n_steps", type=int, default=n_steps, help="SGLD steps per sample")
    add("--buffer_size", type=int, default=buffer_size,
        help="replay buffer size (0: every chain starts from fresh noise)")
    add("--reinit_freq", type=float, default=0.05,
        help="probability that a chain restarts from noise instead of the buffer")
    add("--sgld_lr", type=float, default=1.0, help="SGLD step size on the score gradient")
    add("--sgld_std", type=float, default=1e-2, help="std of the SGLD noise")
    return group


def add_system_flags(parser):
    group = parser.add_argument_group("system")
    add = group.add_argument
    add("--device", type=str, default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    add("--seed", type=int, default=1, help="seed for torch, numpy and random")
    add("--amp", action="store_true",
        help="bf16 mixed precision, where the hardware has it (GPUs from Ampere on; "
             "CPUs with AMX-BF16 or AVX512-BF16); elsewhere one line says so and float32 is used")
    add("--compile", action="store_true",
        help="torch.compile the Wide-ResNet (a GPU speed-up; slower on the CPUs we measured)")
    add("--n_workers", type=int, default=None,
        help="data-loading processes (default: 4 on GPU, 0 on CPU)")
    add("--print_every", type=int, default=100, help="log every this many iterations")
    add("--print_to_log", action="store_true",
        help="write log lines to log.txt only, not to the console")
    return group


class OneLineErrors(argparse.ArgumentParser):
    """argparse with its errors (an unknown flag, a bad choice, a word for a number) in one line, as
    every other bad input: without the usage summary, which for these scripts runs to forty lines.

    A flag must be spelled in full: argparse's prefix matching would take `--ood cifar_interp` for
    `--ood_dataset` and `--n_epoch` for `--n_epochs`, and a new flag could silently change what an
    old command line means."""

    def __init__(self, *args, allow_abbrev=False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists every flag)\n")


def check_ranges(args, ranges):
    """One line for the first flag of `ranges` whose value (each value, for a list) is out of its
    range or not a finite number; a flag left at a placeholder (None, or evaluation's "from the
    checkpoint") is not checked."""
    for flag, (low, high) in ranges.items():
        values = getattr(args, flag)
        for value in values if isinstance(values, list) else [values]:
            if not isinstance(value, (int, float)):
                continue  # a placeholder
            if not (math.isfinite(value) and (low is None or value >= low)
                    and (high is None or value <= high)):
                raise UserError(f"--{flag} {value}: it must be {range_in_words(low, high)}")


def range_in_words(low, high):
    if low is None:
        return "a finite number"
    if high is None:
        return f"a number of at least {low}"
    return f"a number from {low} to {high}"


def flags_given(parser, argv=None):
    """The destinations of the flags on the command line: argparse fills in a default only for a
    name the namespace lacks, so a namespace of placeholders keeps them where nothing was given."""
    placeholder = object()
    names = vars(parser.parse_args(argv))
    probe = parser.parse_args(
        argv, namespace=argparse.Namespace(**dict.fromkeys(names, placeholder))
    )
    return {name for name, value in vars(probe).items() if value is not placeholder}
