"""eval_wrn_ebm.py's command line: its flags (the paper's, with the model flags taken from the
checkpoint by default), their ranges, and how a model is sampled as it was trained: the sampler
flags not given come from its training (`sample_as_trained`), and evaluation's typed settings
(`sampling_settings`, `chain_settings`) are built from them once.

A checkpoint that a later recipe trained (--recipe jempp or sadajem, or any PYLD chain) stores its
training flags, and its chains run with them: its step, its chain starts (per-class Gaussians,
fitted again to its training images) and, with batch norm, batch statistics as in training (the
running statistics stay as the checkpoint holds them). Its test images get its training noise
(--sigma), as its authors' evaluation scripts did. A published JEM++ or SADA-JEM file stores no
flags: `--recipe jempp|sadajem` names its training. The paper's models keep the evaluation flags
of the paper's script. A flag given on the command line always wins.
"""
from jem.checkpoint import require_checkpoint_file
from jem.data import DataSettings
from jem.eval.attack import AttackSettings, add_attack_flags
from jem.eval.datasets import EVAL_NAMES, EVAL_SETS
from jem.eval.metrics import SCORES
from jem.eval.sample_quality import add_sample_quality_flags, inception_weights_path
from jem.eval.sampling import SamplingSettings
from jem.errors import UserError
from jem.flags.common import (OneLineErrors, add_model_flags, add_sampler_flags, add_system_flags,
                              check_ranges)
from jem.recipes import RECIPES, sampler_of
from jem.sampler import ChainSettings

MODE_NAMES = ("test_clf", "OOD", "logp_hist", "uncond_samples", "cond_samples", "calibration",
              "attack", "sample_quality")  # eval_wrn_ebm.py's MODES, one function each



MODEL_FLAGS = ("depth", "width", "norm", "uncond")
# WRN-28-10 for CIFAR-10, the paper's
PAPER_MODEL = {"depth": 28, "width": 10, "norm": None, "uncond": False, "n_classes": 10}
FROM_CHECKPOINT = object()  # default of the model flags: take the value from the checkpoint


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def build_parser():
    parser = OneLineErrors(
        prog="eval_wrn_ebm.py",
        description="Evaluate a JEM checkpoint (Grathwohl et al., ICLR 2020).",
        epilog="--depth, --width, --norm and --uncond default to the checkpoint's: its stored "
               "arguments, else the shapes of its weights, else the paper's WRN-28-10 without "
               "norm. A model of a later recipe is sampled as it was trained "
               "(jem/flags/evaluate.py): the sampler flags not given default to its training's.")
    parser.add_argument("--eval", choices=list(MODE_NAMES), default="OOD", help="what to evaluate")
    parser.add_argument("--load_path", type=str, default=None,
                        help="checkpoint of this project or of the paper's code, "
                             "or a run's save dir (its last_ckpt.pt); every mode but "
                             "sample_quality of a --samples file or folder needs one")
    parser.add_argument("--save_dir", type=str, default="./experiment/eval",
                        help="where <mode>.json, figures and samples go")

    add_data_flags(parser)
    add_evaluation_flags(parser)
    add_sample_quality_flags(parser)
    add_model_flags(parser)
    parser.set_defaults(**{flag: FROM_CHECKPOINT for flag in MODEL_FLAGS})
    add_sampler_flags(parser, n_steps=0, buffer_size=0)
    add_recipe_sampler_flags(parser)
    # set from the checkpoint's training by sample_as_trained
    parser.set_defaults(pyld_eps=1.0, chains_in_train_mode=False, training_data=None)
    add_system_flags(parser)
    add_attack_flags(parser)
    return parser


def add_data_flags(parser):
    """The labeled, in-distribution and OOD sets and their noise."""
    names = (f"data sets: {', '.join(EVAL_NAMES)}, or the PATH of an image folder "
             "(PATH/test/<class>/*, PATH/<class>/* or PATH/*.png)")
    add = parser.add_argument_group("data", names).add_argument
    add("--dataset", type=str, default="cifar_test",
        help="labeled set of test_clf and calibration; in-distribution set (positives) of OOD, "
             "and the set that cifar_interp mixes")
    add("--ood_dataset", type=str, default="svhn", help="OOD: the out-of-distribution set")
    add("--datasets", nargs="+", type=str, default=[], help="logp_hist: one histogram per set")
    add("--data_root", type=str, default="../data", help="where torchvision data sets live")
    add("--celeba_root", type=str, default=None,
        help="image folder read for the data set named celeba (shorter side resized to 32, "
             "aspect kept, as the paper)")
    add("--sigma", type=float, default=3e-2,
        help="std of the Gaussian noise added to every test image, as in training; 0: none")
    add("--max_images", type=int, default=None,
        help="use only the first this many images of each data set (quick checks; default all)")


def add_evaluation_flags(parser):
    """Scores, sampling rounds and what the sampling modes write."""
    add = parser.add_argument_group("evaluation").add_argument
    add("--score_fn", choices=list(SCORES), default="px",
        help="OOD and logp_hist: px = logsumexp f(x), py = max p(y|x), "
             "pxgrad = -||d logsumexp f(x)/dx||")
    add("--batch_size", type=int, default=64, help="SGLD chains per sample_q call")
    add("--n_sample_steps", type=int, default=100,
        help="sampling rounds; each round advances --batch_size chains of the buffer")
    add("--fresh_samples", action="store_true",
        help="cond_samples: sample a new buffer instead of using the checkpoint's")
    add("--n_grids", type=int, default=10,
        help="cond_samples: grids written at most, the best-ranked images first "
             "(10 images of each class a grid)")
    add("--save_buffer", action="store_true",
        help="cond_samples: also write the classified buffer to cond_samples_buffer.pt")

    add("--samples", type=str, default="buffer",
        help="sample_quality: 'buffer' (the checkpoint's replay buffer, all of it), "
             "a <mode>_buffer.pt file, or an image folder / data set name")


EVAL_FLAG_RANGES = {"sigma": (0, None), "max_images": (1, None), "batch_size": (1, None),
                    "n_sample_steps": (0, None), "is_splits": (1, None), "depth": (10, None),
                    "width": (1, None), "n_steps": (0, None), "buffer_size": (0, None),
                    "reinit_freq": (0, 1), "sgld_lr": (0, None), "sgld_std": (0, None),
                    "in_steps": (0, None), "pyld_lr": (None, None), "seed": (0, 2**31 - 1),
                    "n_workers": (0, None), "print_every": (1, None), "eps": (0, None),
                    "n_steps_pgd_attack": (0, None), "pgd_step_factor": (0, None),
                    "n_steps_refine": (0, None), "n_dup_chains": (1, None), "n_eval": (1, None),
                    "max_chains_per_pass": (1, None), "n_grids": (0, None)}


def check_args(args):
    """Numbers out of range and impossible flag combinations, reported before the checkpoint or any
    data is read."""
    check_ranges(args, EVAL_FLAG_RANGES)
    if args.load_path is None and not (args.eval == "sample_quality" and args.samples != "buffer"):
        raise UserError(f"--eval {args.eval} needs --load_path MODEL.pt (a checkpoint of this "
                        "project or of the paper's code)")
    if args.eval == "logp_hist" and not args.datasets:
        raise UserError("logp_hist needs --datasets NAME [NAME ...], e.g. --datasets cifar10 svhn")
    if args.eval == "sample_quality":
        args.inception_weights = inception_weights_path(
            args.inception_weights
        )  # before the checkpoint is read
    if args.eval == "uncond_samples" or (args.eval == "cond_samples" and args.fresh_samples):
        if args.n_steps < 1:
            raise UserError(f"{args.eval} samples a new buffer: pass --n_steps T and --buffer_size "
                            "N, or --buffer_size 0 for chains from fresh noise (the paper: "
                            "--buffer_size 10000 --n_steps 40)")
    if args.load_path is not None:  # last: a wrong flag is named first; before the save dir is made
        args.load_path = require_checkpoint_file(args.load_path)  # of a save dir: its last_ckpt.pt


# the flags a later recipe's model is sampled with, read from its training
TRAINED_FLAGS = ("sgld_lr", "sgld_std", "in_steps", "pyld_lr", "buffer_init", "sigma")


def add_recipe_sampler_flags(parser):
    title = "the sampler of a later recipe (default: the checkpoint's training)"
    add = parser.add_argument_group(title).add_argument
    add("--recipe", choices=sorted(RECIPES), default="jem",
        help="sample as this recipe trained (for files that store no training flags, e.g. JEM++'s "
             "and SADA-JEM's published models); default: the checkpoint's recipe, else jem")
    add("--in_steps", type=int, default=0, help="PYLD inner steps per step (0: SGLD)")
    add("--pyld_lr", type=float, default=0.2, help="PYLD inner step size")
    add("--buffer_init", choices=["uniform", "informative"], default="uniform",
        help="starts of fresh chains: uniform noise, or per-class Gaussians of the training images")


def sample_as_trained(args, ckpt, given):
    """Set the sampler flags not `given` on the command line to those of the model's training (see
    the module docstring); also args.pyld_eps (PYLD's clip), args.chains_in_train_mode and
    args.training_data."""
    stored = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if "recipe" not in given:
        args.recipe = stored.get("recipe", "jem")
    trained = trained_flags(args.recipe, "recipe" in given, stored)
    for flag in TRAINED_FLAGS:
        if flag not in given and flag in trained:
            setattr(args, flag, trained[flag])
    args.pyld_eps = trained.get("eps", 1.0)
    args.chains_in_train_mode = bool(trained) and args.norm == "batch"
    args.training_data = {
        k: stored[k] for k in ("dataset", "n_valid", "labels_per_class") if k in stored
    } or None


def trained_flags(recipe, recipe_given, stored):
    """The training flags of a later recipe's model: --recipe's own when given, else the
    checkpoint's when its chains were PYLD; {} for the paper's models (and the paper's recipe)."""
    if recipe_given:
        return sampler_of(recipe) if recipe != "jem" else {}
    if stored.get("recipe", "jem") != "jem" or stored.get("in_steps", 0) > 0:
        return stored
    return {}


def chain_settings(args):
    """Evaluation's chains, from its flags once sample_as_trained has set them."""
    return ChainSettings(args.n_steps, args.sgld_lr, args.sgld_std, args.in_steps, args.pyld_lr,
                         args.pyld_eps, train_mode=args.chains_in_train_mode)


def describe_sampler(args):
    """The chain step in a few words, for the log."""
    if args.in_steps > 0 and args.pyld_lr > 0:
        step = (
            f"PYLD, {args.in_steps} inner steps of {args.pyld_lr:g} along the gradient clipped "
            f"to +-{args.pyld_eps:g}"
            + (f" after a step of {args.sgld_lr:g}" if args.sgld_lr > 0 else "")
        )
    else:
        step = f"SGLD, step {args.sgld_lr:g}"
    mode = ", batch statistics" if args.chains_in_train_mode else ""
    return (f"{step}, noise {args.sgld_std:g}{mode}; fresh chains from {args.buffer_init} starts; "
            f"test noise {args.sigma:g}")


def training_data(args):
    """The images a model's informative chain starts are fitted to: its training split as the
    checkpoint names it, else all training images of --dataset's set."""
    data = args.training_data or {"dataset": EVAL_SETS.get(args.dataset, (args.dataset,))[0],
                                  "n_valid": 0}
    return DataSettings(**{"labels_per_class": -1, **data, "data_root": args.data_root,
                           "n_classes": args.n_classes, "n_workers": args.n_workers})


def sampling_settings(args):
    """Evaluation's fresh buffers and their rounds, from its flags once sample_as_trained ran."""
    return SamplingSettings(chain_settings(args), args.n_classes, args.buffer_size,
                            args.reinit_freq, args.batch_size, args.n_sample_steps,
                            args.print_every, args.buffer_init,
                            training_data(args) if args.buffer_init == "informative" else None,
                            args.print_to_log)


def attack_settings(args):
    """--eval attack's settings, from its flags once sample_as_trained ran (the refinement takes the
    model's own step)."""
    chain = ChainSettings(args.n_steps_refine, args.sgld_lr, args.sgld_std, args.in_steps,
                          args.pyld_lr, args.pyld_eps)
    return AttackSettings(args.distance, tuple(args.eps or ()), args.n_steps_pgd_attack,
                          args.pgd_step_factor, args.random_start, args.n_steps_refine,
                          args.n_dup_chains, args.attack_grad, args.max_chains_per_pass, chain,
                          args.sigma, args.dataset, args.data_root, args.celeba_root, args.n_eval,
                          args.batch_size, args.seed, args.save_dir, args.compile,
                          args.print_to_log)
