"""train_wrn_ebm.py's command line: its flags, the later recipes' presets (--recipe), the range of
every number (FLAG_RANGES), the checks of flag combinations that cannot work, and the typed settings
the library takes (`settings_from_args`, built once).

Flags and defaults are the paper's code's (its command lines run unchanged); `--recipe jempp` /
`--recipe sadajem` fill in JEM++'s and SADA-JEM's published settings for every flag not given
(docs/recipes.md). bench.py builds the training step's settings here too, so it never imports the
training script. `resumed_args` reads the flags of the run that --resume continues.
"""
import argparse
import os
import sys

from jem.checkpoint import find_resume_checkpoint, load_checkpoint
from jem.data import TORCHVISION_SETS, DataSettings
from jem.errors import UserError
from jem.eval.sample_quality import add_sample_quality_flags
from jem.flags.common import (OneLineErrors, add_model_flags, add_sampler_flags, add_system_flags,
                              check_ranges, flags_given)
from jem.model import ModelSettings
from jem.optim import OptimizerSettings, Schedule
from jem.recipes import PAPER_SAMPLER, RECIPES
from jem.run.held_out import HeldOutSchedule
from jem.run.rollback import RollbackSettings
from jem.run.stopping import DivergenceCriterion
from jem.sampler import ChainSettings
from jem.step import Objective, StepSettings
from jem.settings import BufferSettings, RunSettings, TrainSettings

PLOT_EVERY = 100  # iterations between sample grids with --plot_uncond / --plot_cond
# Flags that cannot change within a run: its network and its data (the class count follows the
# data).
FIXED_IN_A_RUN = ("depth", "width", "norm", "uncond", "model", "dataset")


def parse_args(argv=None):
    return parse_args_and_given(argv)[0]


def parse_args_and_given(argv=None):
    """(args, the names of the flags the command line set): given flags, then --recipe's values for
    the others, then (--recipe sadajem) the SADA-JEM meaning of their flags, whose names count as
    given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = flags_given(parser, argv)
    if "recipe" not in given and args.model == "yopo":
        args.recipe = "jempp"  # JEM++'s flag; their published command names no recipe
    for flag, value in RECIPES[args.recipe].items():
        if flag not in given:
            setattr(args, flag, value)
    if args.recipe == "sadajem":
        given |= sadajem_meanings(args, given)
    if args.gpu_id is not None and "device" not in given:
        args.device = f"cuda:{args.gpu_id}"
    return args, given


def sadajem_meanings(args, given):
    """Flags of SADA-JEM's published command as their script meant them; returns the names it set.

    Their script wraps --optimizer sgd in SAM, and their --sgld_lr is the step of x <- clamp(x +
    sgld_lr * clamp(g, -1, 1), -1, 1), which here is the PYLD inner step --pyld_lr. What cannot be
    translated is refused.
    """
    if args.optimizer == "adam":
        raise UserError("--recipe sadajem trains with SAM over SGD (their script wraps --optimizer "
                        "in SAM; SAM over Adam is not offered here): drop --optimizer adam, or "
                        "drop --recipe sadajem to train with Adam")
    translated = set()
    if args.optimizer == "sgd":
        args.optimizer = "sam"
        translated.add("optimizer")
    if "sgld_std" in given and args.sgld_std != 0:
        raise UserError("--recipe sadajem: their --sgld_std noise is clamped to [-1, 1] with the "
                        "image, which this sampler does not do: pass --sgld_std 0 (their published "
                        "value), or drop --recipe sadajem")
    if "sgld_lr" in given:
        if "pyld_lr" in given:
            raise UserError("--recipe sadajem: their --sgld_lr is the clipped chain step, "
                            "--pyld_lr here: give one of them")
        args.pyld_lr, args.sgld_lr = args.sgld_lr, 0.0
        translated |= {"pyld_lr", "sgld_lr"}
    return translated


def resumed_args(argv):
    """(flags, training state, {flag: (stored, now)} changed) of the run that --resume continues.

    The flags given now win over the stored ones, read in the stored run's recipe (a SADA-JEM flag
    means what it meant when the run started); those of FIXED_IN_A_RUN are refused if they differ.
    The device and the loader processes belong to this machine, not to the run, so they are not
    taken over; flags the stored run predates take their default, which is what that run did.
    """
    # From a shell argv is None: the flags typed are in sys.argv.
    argv = sys.argv[1:] if argv is None else list(argv)
    args, given = parse_args_and_given(argv)
    path = find_resume_checkpoint(args.resume)
    ckpt = load_checkpoint(path)
    stored = ckpt.get("args")
    if not isinstance(stored, dict) or "optimizer_state_dict" not in ckpt:
        raise UserError(f"{path} holds no resumable training state (a file of the paper's code?); "
                        "start from its weights with --load_path instead")
    if "recipe" not in given and stored.get("recipe", "jem") != args.recipe:
        args, given = parse_args_and_given(["--recipe", stored.get("recipe", "jem"), *argv])
    defaults = vars(parse_args([]))
    stored = {k: v for k, v in stored.items() if k not in ("device", "n_workers")}
    now = {k: getattr(args, k) for k in given}
    changed = {k: (stored.get(k, defaults.get(k)), v) for k, v in now.items()
               if k not in ("resume", "save_dir") and stored.get(k, defaults.get(k)) != v}
    for flag in FIXED_IN_A_RUN:
        if flag in changed:
            raise UserError(f"--{flag} cannot change within a run: {path} was trained with "
                            f"--{flag} {changed[flag][0]}; drop --{flag}, or start a new run with "
                            "--load_path")
    # The run goes on in the folder that holds its checkpoint, also when it was moved or copied
    # since (its stored save_dir may be another machine's); a --save_dir typed now wins.
    merged = {**defaults, **stored, "save_dir": os.path.dirname(path) or ".", **now, "resume": path}
    return argparse.Namespace(**merged), ckpt, changed


def build_parser():
    parser = OneLineErrors(prog="train_wrn_ebm.py",
                           description="Train a JEM (Grathwohl et al., ICLR 2020).")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="jem",
                        help="defaults of the paper (jem), JEM++ (jempp, Yang & Ji 2021) "
                             "or SADA-JEM (sadajem, Yang et al. 2023) for every flag not given; "
                             "see docs/recipes.md")
    add_data_flags(parser)
    add_optimisation_flags(parser)
    add_objective_flags(parser)
    add_divergence_flags(parser)
    add_training_model_flags(parser)
    add_training_sampler_flags(parser)
    add_io_flags(parser)
    add_sample_quality_flags(parser)
    add_training_system_flags(parser)
    return parser


def add_data_flags(parser):
    """The training set, its held-out split and its noise."""
    add = parser.add_argument_group("data").add_argument
    add("--dataset", type=str, default="cifar10",
        help=f"{' | '.join(TORCHVISION_SETS)} | synthetic | PATH of an image folder "
             "with train/ and test/ class sub-folders")
    add("--data_root", type=str, default="../data", help="where torchvision data sets live")
    add("--n_valid", type=int, default=5000, help="training images held out for validation")
    add("--labels_per_class", type=int, default=-1,
        help="keep this many labels per class for p(y|x) (semi-supervised); -1: all")
    add("--sigma", type=float, default=3e-2,
        help="std of Gaussian noise added to every training image")
    add("--test_sigma", type=float, default=None,
        help="std of the noise added to the validation and test images (default: --sigma, "
             "as the paper; JEM++: 0, clean images)")
    add("--no_px_augment", dest="px_augment", action="store_false",
        help="serve the p(x) data batch without crop and flip, as SADA-JEM "
             "(the classification batch keeps them)")


def add_optimisation_flags(parser):
    """The optimiser and its learning-rate schedule."""
    add = parser.add_argument_group("optimisation").add_argument
    add("--optimizer", choices=["adam", "sgd", "sam"], default="adam",
        help="adam | sgd (momentum 0.9) | sam: SAM over SGD with momentum 0.9, adaptive "
             "(ASAM) when --rho >= 0.5, as SADA-JEM")
    add("--rho", type=float, default=2.0,
        help="--optimizer sam: radius of the weight perturbation (SADA-JEM: 2.0, adaptive)")
    add("--lr", type=float, default=1e-4)
    add("--decay_epochs", nargs="+", type=int, default=[160, 180],
        help="multiply the learning rate by --decay_rate at the start of these epochs")
    add("--decay_rate", type=float, default=0.3)
    add("--warmup_iters", type=int, default=-1,
        help="linear learning-rate warm-up over this many iterations (-1: none)")
    add("--batch_size", type=int, default=64)
    add("--labeled_batch_size", type=int, default=None,
        help="images per classification batch (default: --batch_size; SADA-JEM: 128)")
    add("--n_epochs", type=int, default=200)
    add("--epoch_over", choices=["px", "labeled"], default="px",
        help="what one epoch passes over: the p(x) batches (the paper) or the labeled batches "
             "(SADA-JEM); --n_epochs, --decay_epochs, --eval_every and --ckpt_every count these")
    add("--weight_decay", type=float, default=0.0)
    add("--clf_only", action="store_true",
        help="optimise only the classification head (class_output), as the paper's flag")


def add_objective_flags(parser):
    """The weights of the loss terms."""
    add = parser.add_argument_group("objective").add_argument
    add("--p_x_weight", "--px", type=float, default=1.0, help="weight of the log p(x) term")
    add("--p_y_given_x_weight", "--pyx", type=float, default=1.0, help="weight of the CE term")
    add("--p_x_y_weight", type=float, default=0.0, help="weight of the log p(x, y) term")
    add("--class_cond_p_x_sample", action="store_true",
        help="draw the p(x) term's samples from p(y)p(x|y) with uniform random y")
    add("--energy_l2", type=float, default=0.0,
        help="add this times mean(E(x_data)^2 + E(x_q)^2), a stabiliser the authors suggest "
             "(about 0.1); 0: the paper's objective")


def add_divergence_flags(parser):
    """What counts as divergence and what happens then."""
    add = parser.add_argument_group("divergence").add_argument
    add("--on_diverge", choices=["stop", "rollback"], default="stop",
        help="when training diverges (see --diverge_on) or a loss is NaN: stop "
             "(as the paper) or roll back to the last checkpoint with new random numbers")
    add("--diverge_on", choices=["loss", "p_x"], default="loss",
        help="what is checked against --diverge_threshold: the whole loss "
             "(the paper) or its p(x) part, p_x_weight * l_p_x (SADA-JEM)")
    add("--diverge_threshold", type=float, default=1e8,
        help="training has diverged when the checked value exceeds this (the paper: "
             "1e8; SADA-JEM: 1e5)")
    add("--max_rollbacks", type=int, default=3, help="give up after this many rollbacks")
    add("--rollback_lr_scale", type=float, default=1.0,
        help="multiply the learning rate by this at each rollback (e.g. 0.5)")


def add_training_model_flags(parser):
    """The shared model flags and those only training takes."""
    add = add_model_flags(parser).add_argument
    add("--dropout_rate", type=float, default=0.0)
    add("--model", choices=["wrn", "yopo"], default="wrn",
        help="JEM++'s flag: yopo implies --recipe jempp (the network is the same Wide-ResNet)")


def add_training_sampler_flags(parser):
    """The shared SGLD flags at the paper's training values, JEM++'s PYLD step and chain starts."""
    add = add_sampler_flags(parser, n_steps=20, buffer_size=10000).add_argument
    add("--in_steps", type=int, default=PAPER_SAMPLER["in_steps"],
        help="JEM++'s PYLD: inner steps of --pyld_lr along the clipped gradient per step (0: SGLD)")
    add("--pyld_lr", type=float, default=PAPER_SAMPLER["pyld_lr"],
        help="PYLD inner step size (<= 0: no inner steps)")
    add("--eps", type=float, default=PAPER_SAMPLER["eps"],
        help="PYLD clips the gradient to [-eps, eps]")
    add("--buffer_init", choices=["uniform", "informative"],
        default=PAPER_SAMPLER["buffer_init"],
        help="chain starts and restarts: uniform noise (the paper) or per-class Gaussians fitted "
             "to the training images (JEM++) when the run starts, and again when it resumes")


def add_io_flags(parser):
    """Checkpoints, held-out evaluations, time budget and logs."""
    add = parser.add_argument_group("logging and checkpoints").add_argument
    add("--save_dir", type=str, default="./experiment")
    add("--load_path", type=str, default=None,
        help="start a new run from this checkpoint's model (and replay buffer), "
             "or a run folder's last_ckpt.pt; the paper's files work")
    add("--resume", type=str, default=None,
        help="continue a run exactly where it stopped: its save dir or one of its checkpoints")
    add("--ckpt_every", type=int, default=10, help="write ckpt_{epoch}.pt every this many epochs")
    add("--ckpt_every_iters", type=int, default=0,
        help="also write ckpt_iter_{iteration}.pt (and last_ckpt.pt) every this many "
             "iterations; 0: off")
    add("--keep_last", type=int, default=0,
        help="keep only this many numbered checkpoints (ckpt_*.pt) on disk; 0: keep all")
    add("--eval_every", type=int, default=1, help="validation/test accuracy every this many epochs")
    add("--eval_every_iters", type=int, default=0,
        help="also log validation/test accuracy every this many iterations (learning curves; "
             "the epoch evaluations alone choose best_valid_ckpt.pt); 0: off")
    add("--eval_train", action="store_true",
        help="evaluations also report the accuracy on the training split (clean images, "
             "no augmentation, validation held out): how well the model fits what it trains on")
    add("--eval_every_minutes", type=float, default=0,
        help="also log validation/test accuracy every this many minutes of training "
             "(--train_clock); 0: off")
    add("--max_train_minutes", type=float, default=0,
        help="stop, as on SIGTERM (last_ckpt.pt written, "
             "--resume continues), once the run has trained this many minutes (--train_clock), and "
             "log the held-out accuracy there; 0: no limit. On a shared machine budget CPU time: "
             "--train_clock cpu with OMP_NUM_THREADS=1")
    add("--train_clock", choices=["wall", "cpu"], default="wall",
        help="the clock of the two flags above: wall-clock seconds of training "
             "(evaluations left out), or this process's CPU seconds (with OMP_NUM_THREADS=1, "
             "an idle core's wall-clock that other work on the machine does not stretch); "
             "metrics.jsonl records both")
    add("--plot_uncond", action="store_true",
        help=f"save unconditional samples every {PLOT_EVERY} its")
    add("--plot_cond", action="store_true",
        help=f"save class-conditional samples every {PLOT_EVERY} its")
    add("--tensorboard", action="store_true",
        help="also write every metrics.jsonl value, energy histograms and sample grids as "
             "TensorBoard events to SAVE_DIR/tensorboard (tensorboard --logdir SAVE_DIR)")
    add("--log_arg", type=str, default=None,
        help="JEM++'s run-name flag: accepted, recorded in args.json (the run goes to --save_dir)")
    add("--fid_every", type=int, default=0,
        help="log IS and FID of the replay buffer (rank 0's shard) every this many epochs; 0: off")


def add_training_system_flags(parser):
    """The shared system flags, the CUDA graph and JEM++'s --gpu-id."""
    add = add_system_flags(parser).add_argument
    add("--cuda_graph", action="store_true",
        help="capture the SGLD chain as a CUDA graph and replay it (GPU only; "
             "fewer kernel launches)")
    parser.add_argument("--gpu-id", dest="gpu_id", type=int, default=None,
                        help="JEM++'s flag: the same as --device cuda:N")


# Every numeric flag's range, checked in one place (check_ranges): (lowest, highest) allowed, None
# where unbounded; a float must also be a finite number (--sigma nan would train as if it were 0).
FLAG_RANGES = {"n_valid": (0, None), "labels_per_class": (-1, None), "sigma": (0, None),
               "test_sigma": (0, None), "rho": (0, None), "lr": (0, None),
               "decay_epochs": (0, None), "decay_rate": (0, None), "warmup_iters": (-1, None),
               "batch_size": (1, None), "labeled_batch_size": (1, None), "n_epochs": (1, None),
               "weight_decay": (0, None), "p_x_weight": (0, None), "p_y_given_x_weight": (0, None),
               "p_x_y_weight": (0, None), "energy_l2": (0, None), "diverge_threshold": (0, None),
               "max_rollbacks": (1, None), "rollback_lr_scale": (0, None), "depth": (10, None),
               "width": (1, None), "dropout_rate": (0, 1), "n_steps": (0, None),
               "in_steps": (0, None), "buffer_size": (0, None), "reinit_freq": (0, 1),
               "sgld_lr": (0, None), "sgld_std": (0, None), "pyld_lr": (None, None),
               "eps": (0, None), "ckpt_every": (1, None), "ckpt_every_iters": (0, None),
               "keep_last": (0, None), "eval_every": (1, None), "eval_every_iters": (0, None),
               "eval_every_minutes": (0, None), "max_train_minutes": (0, None),
               "fid_every": (0, None), "is_splits": (1, None), "seed": (0, 2**31 - 1),
               "n_workers": (0, None), "print_every": (1, None), "gpu_id": (0, None)}


def needs_conditional_buffer(args):
    return args.p_x_y_weight > 0 or args.class_cond_p_x_sample or args.plot_cond


def check_args(args, world_size=1):
    """Numbers out of range and impossible flag combinations, reported before any data or model is
    built."""
    check_ranges(args, FLAG_RANGES)
    if args.uncond and needs_conditional_buffer(args):
        raise UserError("--uncond cannot sample class-conditionally: drop --class_cond_p_x_sample, "
                        "--p_x_y_weight and --plot_cond, or drop --uncond")
    if args.buffer_size % world_size != 0:
        raise UserError(f"--buffer_size {args.buffer_size} must divide by the {world_size} "
                        "processes (each keeps an equal shard)")
    if needs_conditional_buffer(args) and (args.buffer_size // world_size) % args.n_classes != 0:
        raise UserError(f"--buffer_size {args.buffer_size} must divide by the {args.n_classes} "
                        f"classes{f' times {world_size} processes' if world_size > 1 else ''} for "
                        "class-conditional sampling (one buffer segment per class)")
    if args.cuda_graph and args.norm == "batch":
        raise UserError("--cuda_graph cannot capture a batch-norm chain (its warm-up would move "
                        "the running statistics): drop --cuda_graph or --norm batch")
    if args.fid_every and not 1 <= args.is_splits <= args.buffer_size // world_size:
        raise UserError(f"--fid_every scores the replay buffer in --is_splits {args.is_splits} "
                        "splits: it needs 1 <= --is_splits <= --buffer_size (per process)")


def settings_from_args(args):
    """The typed settings of a run, from its flags (after check_args)."""
    objective = Objective(args.p_x_weight, args.p_y_given_x_weight, args.p_x_y_weight,
                          args.energy_l2, args.class_cond_p_x_sample, args.n_classes)
    chain = ChainSettings(args.n_steps, args.sgld_lr, args.sgld_std, args.in_steps, args.pyld_lr,
                          args.eps, train_mode=args.norm == "batch", cuda_graph=args.cuda_graph)
    return TrainSettings(
        model=ModelSettings(args.depth, args.width, args.norm, args.dropout_rate, args.n_classes,
                            args.uncond),
        data=DataSettings(args.dataset, args.data_root, args.n_classes, args.n_valid,
                          args.labels_per_class, args.sigma, args.test_sigma, args.px_augment,
                          args.batch_size, args.labeled_batch_size, args.seed, args.n_workers),
        step=StepSettings(objective, chain, args.amp),
        optimizer=OptimizerSettings(args.optimizer, args.lr, args.weight_decay, args.rho,
                                    args.clf_only),
        schedule=Schedule(args.lr, tuple(args.decay_epochs), args.decay_rate, args.warmup_iters),
        buffer=BufferSettings(args.buffer_size, args.reinit_freq, args.buffer_init,
                              needs_conditional_buffer(args)),
        divergence=DivergenceCriterion(args.diverge_on, args.diverge_threshold, args.p_x_weight,
                                       args.energy_l2),
        rollback=RollbackSettings(args.on_diverge, args.max_rollbacks, args.rollback_lr_scale),
        held_out=HeldOutSchedule(args.eval_every, args.eval_every_iters, args.eval_every_minutes,
                                 args.train_clock, args.eval_train),
        run=RunSettings(args.save_dir, args.n_epochs, args.epoch_over, args.seed, args.print_every,
                        PLOT_EVERY, args.plot_uncond, args.plot_cond, args.ckpt_every,
                        args.ckpt_every_iters, args.keep_last, args.fid_every,
                        args.max_train_minutes, args.train_clock, args.compile, args.print_to_log))
