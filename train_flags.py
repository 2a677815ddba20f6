"""train_wrn_ebm.py's command line: its flags, the later recipes' presets (--recipe), and the checks of flag
combinations that cannot work.

Flags and defaults are the paper's code's (its command lines run unchanged); `--recipe jempp` / `--recipe
sadajem` fill in JEM++'s and SADA-JEM's published settings for every flag not given (docs/recipes.md).
bench.py builds the training step's flags here too, so it never imports the training script.
"""
import argparse

from data import TORCHVISION_SETS
from sample_quality import add_sample_quality_flags
from utils import UserError, add_model_flags, add_sampler_flags, add_system_flags

PLOT_EVERY = 100  # iterations between sample grids with --plot_uncond / --plot_cond
GAUSSIANS_FILE = "class_gaussians.pt"  # --buffer_init informative: the fitted Gaussians, in the save dir

# --recipe: each later paper's training as its authors published it (the command of their README and
# scripts/, over their code's defaults: JEMPP's train_jempp.py, SADAJEM's train_sadajem.py) for the flags that
# exist here; a flag given on the command line wins.
RECIPES = {
    "jem": {},
    "jempp": dict(norm="batch", optimizer="sgd", lr=0.1, weight_decay=4e-4, warmup_iters=1000, n_epochs=150,
                  decay_epochs=[50, 100, 125], decay_rate=0.2, n_steps=10, in_steps=5, pyld_lr=0.2, eps=1.0,
                  sgld_lr=0.0, sgld_std=0.0, buffer_init="informative", model="yopo"),
    # SADA-JEM's chain step, x <- clamp(x + clamp(g, -1, 1), -1, 1), is one PYLD inner step of 1 (their
    # --sgld_lr 1). Their epoch is a pass over the labeled batches of 128, half of ours over the p(x) batches
    # of 64: their 200 epochs with decays at 60/120/180 are our 100 with decays at 30/60/90.
    "sadajem": dict(norm="batch", optimizer="sam", rho=2.0, lr=0.1, weight_decay=5e-4, warmup_iters=1000,
                    n_epochs=100, decay_epochs=[30, 60, 90], decay_rate=0.2, sigma=0.0, n_valid=0,
                    px_augment=False, labeled_batch_size=128, n_steps=5, in_steps=1, pyld_lr=1.0, eps=1.0,
                    sgld_lr=0.0, sgld_std=0.0, buffer_init="informative"),
}


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = flags_given(parser, argv)
    if "recipe" not in given and args.model == "yopo":
        args.recipe = "jempp"  # JEM++'s flag; their published command names no recipe
    for flag, value in RECIPES[args.recipe].items():
        if flag not in given:
            setattr(args, flag, value)
    if args.gpu_id is not None and "device" not in given:
        args.device = f"cuda:{args.gpu_id}"
    return args


def flags_given(parser, argv=None):
    """The destinations of the flags on the command line: argparse fills in a default only for a name
    the namespace lacks, so a namespace of placeholders keeps them where nothing was given."""
    placeholder = object()
    names = vars(parser.parse_args(argv))
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, placeholder)))
    return {name for name, value in vars(probe).items() if value is not placeholder}


def build_parser():
    parser = argparse.ArgumentParser(description="Train a JEM (Grathwohl et al., ICLR 2020).")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="jem",
                        help="defaults of the paper (jem), JEM++ (jempp, Yang & Ji 2021) or SADA-JEM (sadajem, "
                             "Yang et al. 2023) for every flag not given; see docs/recipes.md")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=str, default="cifar10",
                      help=f"{' | '.join(TORCHVISION_SETS)} | synthetic | PATH of an image folder with "
                           "train/ and test/ class sub-folders")
    data.add_argument("--data_root", type=str, default="../data", help="where torchvision data sets live")
    data.add_argument("--n_valid", type=int, default=5000, help="training images held out for validation")
    data.add_argument("--labels_per_class", type=int, default=-1,
                      help="keep this many labels per class for p(y|x) (semi-supervised); -1: all")
    data.add_argument("--sigma", type=float, default=3e-2, help="std of Gaussian noise added to every image")
    data.add_argument("--no_px_augment", dest="px_augment", action="store_false",
                      help="serve the p(x) data batch without crop and flip, as SADA-JEM (the classification "
                           "batch keeps them)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=["adam", "sgd", "sam"], default="adam",
                       help="adam | sgd (momentum 0.9) | sam: SAM over SGD with momentum 0.9, adaptive (ASAM) when "
                            "--rho >= 0.5, as SADA-JEM")
    optim.add_argument("--rho", type=float, default=2.0,
                       help="--optimizer sam: radius of the weight perturbation (SADA-JEM: 2.0, adaptive)")
    optim.add_argument("--lr", type=float, default=1e-4)
    optim.add_argument("--decay_epochs", nargs="+", type=int, default=[160, 180],
                       help="multiply the learning rate by --decay_rate at the start of these epochs")
    optim.add_argument("--decay_rate", type=float, default=0.3)
    optim.add_argument("--warmup_iters", type=int, default=-1,
                       help="linear learning-rate warm-up over this many iterations (-1: none)")
    optim.add_argument("--batch_size", type=int, default=64)
    optim.add_argument("--labeled_batch_size", type=int, default=None,
                       help="images per classification batch (default: --batch_size; SADA-JEM: 128)")
    optim.add_argument("--n_epochs", type=int, default=200)
    optim.add_argument("--weight_decay", type=float, default=0.0)
    optim.add_argument("--clf_only", action="store_true",
                       help="optimise only the classification head (class_output), as the paper's flag")

    objective = parser.add_argument_group("objective")
    objective.add_argument("--p_x_weight", "--px", type=float, default=1.0, help="weight of the log p(x) term")
    objective.add_argument("--p_y_given_x_weight", "--pyx", type=float, default=1.0, help="weight of the CE term")
    objective.add_argument("--p_x_y_weight", type=float, default=0.0, help="weight of the log p(x, y) term")
    objective.add_argument("--class_cond_p_x_sample", action="store_true",
                           help="draw the p(x) term's samples from p(y)p(x|y) with uniform random y")
    objective.add_argument("--energy_l2", type=float, default=0.0,
                           help="add this times mean(E(x_data)^2 + E(x_q)^2), a stabiliser the authors suggest "
                                "(about 0.1); 0: the paper's objective")

    divergence = parser.add_argument_group("divergence")
    divergence.add_argument("--on_diverge", choices=["stop", "rollback"], default="stop",
                            help="when |L| > 1e8 or NaN: stop (as the paper) or roll back to the last checkpoint "
                                 "with new random numbers")
    divergence.add_argument("--max_rollbacks", type=int, default=3, help="give up after this many rollbacks")
    divergence.add_argument("--rollback_lr_scale", type=float, default=1.0,
                            help="multiply the learning rate by this at each rollback (e.g. 0.5)")

    model = add_model_flags(parser)
    model.add_argument("--dropout_rate", type=float, default=0.0)
    model.add_argument("--model", choices=["wrn", "yopo"], default="wrn",
                       help="JEM++'s flag: yopo implies --recipe jempp (the network is the same Wide-ResNet)")
    sampler = add_sampler_flags(parser, n_steps=20, buffer_size=10000)
    sampler.add_argument("--in_steps", type=int, default=0,
                         help="JEM++'s PYLD: inner steps of --pyld_lr along the clipped gradient per step (0: SGLD)")
    sampler.add_argument("--pyld_lr", type=float, default=0.2, help="PYLD inner step size (<= 0: no inner steps)")
    sampler.add_argument("--eps", type=float, default=1.0, help="PYLD clips the gradient to [-eps, eps]")
    sampler.add_argument("--buffer_init", choices=["uniform", "informative"], default="uniform",
                         help="chain starts and restarts: uniform noise (the paper) or per-class Gaussians fitted to "
                              f"the training images (JEM++), cached in the save dir as {GAUSSIANS_FILE}")

    io = parser.add_argument_group("logging and checkpoints")
    io.add_argument("--save_dir", type=str, default="./experiment")
    io.add_argument("--load_path", type=str, default=None,
                    help="start a new run from this checkpoint's model (and replay buffer); the paper's files work")
    io.add_argument("--resume", type=str, default=None,
                    help="continue a run exactly where it stopped: its save dir or one of its checkpoints")
    io.add_argument("--ckpt_every", type=int, default=10, help="write ckpt_{epoch}.pt every this many epochs")
    io.add_argument("--ckpt_every_iters", type=int, default=0,
                    help="also write ckpt_iter_{iteration}.pt (and last_ckpt.pt) every this many iterations; 0: off")
    io.add_argument("--keep_last", type=int, default=0,
                    help="keep only this many numbered checkpoints (ckpt_*.pt) on disk; 0: keep all")
    io.add_argument("--eval_every", type=int, default=1, help="validation/test accuracy every this many epochs")
    io.add_argument("--eval_every_iters", type=int, default=0,
                    help="also log validation/test accuracy every this many iterations (learning curves; the "
                         "epoch evaluations alone choose best_valid_ckpt.pt); 0: off")
    io.add_argument("--max_train_minutes", type=float, default=0,
                    help="stop, as on SIGTERM (last_ckpt.pt written, --resume continues), once the run has trained "
                         "this many minutes (the clock of metrics.jsonl's train_seconds); 0: no limit")
    io.add_argument("--plot_uncond", action="store_true", help=f"save unconditional samples every {PLOT_EVERY} its")
    io.add_argument("--plot_cond", action="store_true", help=f"save class-conditional samples every {PLOT_EVERY} its")
    io.add_argument("--log_arg", type=str, default=None,
                    help="JEM++'s run-name flag: accepted and recorded in args.json (the run goes to --save_dir)")
    io.add_argument("--fid_every", type=int, default=0,
                    help="log the IS and FID of the replay buffer (rank 0's shard) every this many epochs; 0: off")
    add_sample_quality_flags(parser)
    add_system_flags(parser).add_argument(
        "--cuda_graph", action="store_true",
        help="capture the SGLD chain as a CUDA graph and replay it (GPU only; fewer kernel launches)")
    parser.add_argument("--gpu-id", dest="gpu_id", type=int, default=None,
                        help="JEM++'s flag: the same as --device cuda:N")
    return parser


def needs_conditional_buffer(args):
    return args.p_x_y_weight > 0 or args.class_cond_p_x_sample or args.plot_cond


def check_args(args, world_size=1):
    """Impossible flag combinations, reported before any data or model is built."""
    if args.uncond and needs_conditional_buffer(args):
        raise UserError("--uncond cannot sample class-conditionally: drop --class_cond_p_x_sample, "
                        "--p_x_y_weight and --plot_cond, or drop --uncond")
    if args.buffer_size % world_size != 0:
        raise UserError(f"--buffer_size {args.buffer_size} must divide by the {world_size} processes (each keeps "
                        "an equal shard)")
    if needs_conditional_buffer(args) and (args.buffer_size // world_size) % args.n_classes != 0:
        raise UserError(f"--buffer_size {args.buffer_size} must divide by the {args.n_classes} classes"
                        f"{f' times {world_size} processes' if world_size > 1 else ''} for class-conditional "
                        "sampling (one buffer segment per class)")
    for flag in ("batch_size", "n_epochs", "print_every", "ckpt_every", "eval_every", "max_rollbacks"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.labeled_batch_size is not None and args.labeled_batch_size < 1:
        raise UserError("--labeled_batch_size must be at least 1")
    if min(args.n_steps, args.in_steps, args.buffer_size, args.ckpt_every_iters, args.keep_last, args.energy_l2,
           args.rho, args.fid_every, args.eval_every_iters, args.max_train_minutes) < 0:
        raise UserError("--n_steps, --in_steps, --buffer_size, --ckpt_every_iters, --keep_last, --energy_l2, --rho, "
                        "--fid_every, --eval_every_iters and --max_train_minutes cannot be negative")
    if args.cuda_graph and args.norm == "batch":
        raise UserError("--cuda_graph cannot capture a batch-norm chain (its warm-up would move the running "
                        "statistics): drop --cuda_graph or --norm batch")
    if args.fid_every and not 1 <= args.is_splits <= args.buffer_size // world_size:
        raise UserError(f"--fid_every scores the replay buffer in --is_splits {args.is_splits} splits: it needs "
                        "1 <= --is_splits <= --buffer_size (per process)")
