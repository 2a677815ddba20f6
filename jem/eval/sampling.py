"""How evaluation samples from a model, and the two evaluation modes that sample (uncond_samples, cond_samples).

A model is sampled the way it was trained. A checkpoint that a later recipe trained (--recipe jempp or sadajem,
or any PYLD chain) stores its training flags, and its chains run here with them: its step (PYLD's clipped and
clamped steps, its step sizes and noise), its chain starts (per-class Gaussians, fitted again to its training
images) and, with batch norm, on the chain's batch statistics as in training (the running statistics stay as the
checkpoint holds them). Its test images get its training noise (--sigma), as its authors' evaluation scripts did.
A published JEM++ or SADA-JEM file stores no flags: `--recipe jempp|sadajem` names its training. The paper's
models keep the evaluation flags of the paper's script (--sgld_lr 1 --sgld_std 0.01 by default). A flag given on
the command line always wins.
"""
import math
import os
from contextlib import contextmanager

import torch
from tqdm import tqdm

from jem.chain_init import ClassGaussians, IMAGE_SHAPE, UniformNoise
from jem.data import SYNTHETIC_CLASSES, DataSettings, plain_training_images
from jem.eval.datasets import EVAL_SETS
from jem.optim import frozen_running_stats
from jem.eval.plots import save_grid, save_labeled_rows
from jem.recipes import RECIPES, sampler_of
from jem.sampler import ChainSettings, ReplayBuffer, sample_q
from jem.errors import UserError

TRAINED_FLAGS = ("sgld_lr", "sgld_std", "in_steps", "pyld_lr", "buffer_init", "sigma")  # read from the training
EVAL_BATCH_SIZE = 100  # images per batch when classifying a buffer
PER_ROW = 10  # images per class row in the cond_samples grids


def add_recipe_sampler_flags(parser):
    group = parser.add_argument_group("the sampler of a later recipe (default: the checkpoint's training)")
    group.add_argument("--recipe", choices=sorted(RECIPES), default="jem",
                       help="sample as this recipe trained (for files that store no training flags, e.g. JEM++'s and "
                            "SADA-JEM's published models); default: the checkpoint's recipe, else jem")
    group.add_argument("--in_steps", type=int, default=0, help="PYLD inner steps per step (0: SGLD)")
    group.add_argument("--pyld_lr", type=float, default=0.2, help="PYLD inner step size")
    group.add_argument("--buffer_init", choices=["uniform", "informative"], default="uniform",
                       help="starts of fresh chains: uniform noise, or per-class Gaussians of the training images")


def sample_as_trained(args, ckpt, given):
    """Set the sampler flags not `given` on the command line to those of the model's training (see the module
    docstring); also args.pyld_eps (PYLD's clip), args.chains_in_train_mode and args.training_data."""
    stored = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    if "recipe" not in given:
        args.recipe = stored.get("recipe", "jem")
    trained = trained_flags(args.recipe, "recipe" in given, stored)
    for flag in TRAINED_FLAGS:
        if flag not in given and flag in trained:
            setattr(args, flag, trained[flag])
    args.pyld_eps = trained.get("eps", 1.0)
    args.chains_in_train_mode = bool(trained) and args.norm == "batch"
    args.training_data = {k: stored[k] for k in ("dataset", "n_valid", "labels_per_class") if k in stored} or None


def trained_flags(recipe, recipe_given, stored):
    """The training flags of a later recipe's model: --recipe's own when given, else the checkpoint's when its
    chains were PYLD; {} for the paper's models (and the paper's recipe)."""
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
        step = (f"PYLD, {args.in_steps} inner steps of {args.pyld_lr:g} along the gradient clipped to "
                f"+-{args.pyld_eps:g}{f' after a step of {args.sgld_lr:g}' if args.sgld_lr > 0 else ''}")
    else:
        step = f"SGLD, step {args.sgld_lr:g}"
    mode = ", batch statistics" if args.chains_in_train_mode else ""
    return (f"{step}, noise {args.sgld_std:g}{mode}; fresh chains from {args.buffer_init} starts; "
            f"test noise {args.sigma:g}")


@contextmanager
def chains_as_trained(model, args):
    """The model in training mode with its running statistics frozen while chains run, when its chains ran on
    batch statistics in training (a later recipe with batch norm); else as it is, in eval mode."""
    if not args.chains_in_train_mode:
        yield
        return
    model.train()
    try:
        with frozen_running_stats(model):
            yield
    finally:
        model.eval()


def fresh_chain_starts(args, device):
    """Where fresh chains start: uniform noise, or (--buffer_init informative) the class Gaussians of the training
    images: those the checkpoint names, else the training split of --dataset's set, all of it."""
    if args.buffer_init == "uniform":
        return UniformNoise()
    data = args.training_data or {"dataset": EVAL_SETS.get(args.dataset, (args.dataset,))[0], "n_valid": 0}
    training = DataSettings(**{"labels_per_class": -1, **data, "data_root": args.data_root,
                               "n_classes": args.n_classes, "n_workers": args.n_workers})
    return ClassGaussians.fit(plain_training_images(training, device), args.n_classes).to(device)


# --------------------------------------------------------------------------------------------------
# The sampling modes.

def advance_buffer(args, model, replay_buffer, grid_prefix):
    """--n_sample_steps rounds of sample_q on --batch_size chains drawn from the buffer, as the paper's code.

    Every --print_every-th round's samples are saved as a grid. Returns the grid paths and, when the buffer
    is empty (--buffer_size 0: every round's chains start from fresh noise), every round's samples.
    """
    grids, short_run = [], []
    for round_ in tqdm(range(args.n_sample_steps), desc="sampling rounds", disable=args.print_to_log):
        with chains_as_trained(model, args):
            samples = sample_q(model, replay_buffer, args.batch_size, chain=chain_settings(args))
        if len(replay_buffer) == 0:
            short_run.append(samples.cpu())
        if round_ % args.print_every == 0:
            grids.append(f"{grid_prefix}_{round_:06d}.png")
            save_grid(grids[-1], samples)
    return grids, short_run


def save_buffer(args, images, **extra):
    path = os.path.join(args.save_dir, f"{args.eval}_buffer.pt")
    torch.save({"replay_buffer": images.detach().cpu(), **extra}, path)
    return path


def sample_fresh_buffer(args, model, device):
    """A buffer of --buffer_size fresh starts advanced --n_sample_steps rounds (grids along the way).

    With --buffer_size 0 the samples of every round (--n_sample_steps x --batch_size images) stand in for it.
    """
    starts = fresh_chain_starts(args, device)
    fresh = ReplayBuffer(args.buffer_size, args.n_classes, args.reinit_freq, device, chain_init=starts)
    grids, short_run = advance_buffer(args, model, fresh, grid_prefix=os.path.join(args.save_dir, "uncond_samples"))
    if short_run:
        fresh = ReplayBuffer(0, args.n_classes, args.reinit_freq, device, images=torch.cat(short_run))
    return fresh, grids


def uncond_samples(args, model, replay_buffer, device):
    """Unconditional samples from a fresh buffer; the final buffer and a grid of its first 100 images."""
    fresh, grids = sample_fresh_buffer(args, model, device)
    final_grid = os.path.join(args.save_dir, "uncond_samples_final.png")
    save_grid(final_grid, fresh.images[:100])
    return {"n_samples": len(fresh), "grids": grids, "final_grid": final_grid,
            "buffer": save_buffer(args, fresh.images)}


@torch.no_grad()
def classify_images(model, images):
    """Predicted class and its logit f(x)[y] (log p(x, y) + const) for each image."""
    logits = torch.cat([model.classify(batch).float() for batch in images.split(EVAL_BATCH_SIZE)])
    best, predicted = logits.max(1)
    return predicted, best


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
NAMED_CLASSES = {"cifar10": CIFAR10_CLASSES, "svhn": tuple("0123456789"),
                 "synthetic": SYNTHETIC_CLASSES}


def class_names(dataset, n_classes):
    """The names of a model's n_classes classes, from the data set it learned them on: CIFAR-10's,
    SVHN's digits, the synthetic shapes, or an image folder's class folders (in ImageFolder's
    order); the class indices where the set names none, or names another number of classes."""
    names = NAMED_CLASSES.get(EVAL_SETS.get(dataset, (dataset,))[0])
    if names is None and os.path.isdir(dataset):
        splits = [os.path.join(dataset, split) for split in ("train", "test")]
        folder = next((split for split in splits if os.path.isdir(split)), dataset)
        names = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if names is None or len(names) != n_classes:
        return [str(c) for c in range(n_classes)]
    return list(names)


def save_class_grids(args, images, predicted, scores):
    """At most --n_grids grids of one row per predicted class, PER_ROW images a row, highest
    log p(x, y) first: grid g holds each class's ranks g*PER_ROW .. (g+1)*PER_ROW-1. Classes short
    of images get white cells. Each row is labeled with its class's name (class_names of the
    training set)."""
    ranked = []
    for c in range(args.n_classes):
        members = (predicted == c).nonzero().squeeze(1)
        ranked.append(images[members[scores[members].argsort(descending=True)]].cpu())
    training_set = (getattr(args, "training_data", None) or {}).get("dataset", args.dataset)
    names = class_names(training_set, args.n_classes)
    blank = torch.ones(PER_ROW, *IMAGE_SHAPE)
    n_grids = min(args.n_grids, math.ceil(max(len(members) for members in ranked) / PER_ROW))
    grids = []
    for g in range(n_grids):
        rows = [torch.cat([members[g * PER_ROW:(g + 1) * PER_ROW], blank])[:PER_ROW]
                for members in ranked]
        grids.append(os.path.join(args.save_dir, f"cond_samples_{g:03d}.png"))
        save_labeled_rows(grids[-1], torch.cat(rows), names, PER_ROW)
    return grids, names


def cond_samples(args, model, replay_buffer, device):
    """Classify every buffer image and save grids with one row per predicted class (the best-ranked
    --n_grids grids); the classified buffer too with --save_buffer.

    The buffer is the checkpoint's or, with --fresh_samples, a new one sampled as uncond_samples does.
    """
    if args.fresh_samples:
        replay_buffer, _ = sample_fresh_buffer(args, model, device)
    elif len(replay_buffer) == 0:
        raise UserError(f"{args.load_path} has no replay buffer: sample one with --fresh_samples "
                        "--buffer_size N --n_steps T")
    predicted, scores = classify_images(model, replay_buffer.images)
    grids, names = save_class_grids(args, replay_buffer.images, predicted, scores)
    buffer = None
    if args.save_buffer:
        buffer = save_buffer(args, replay_buffer.images, predicted_class=predicted.cpu(),
                             score=scores.cpu())
    return {"buffer_source": "fresh" if args.fresh_samples else "checkpoint",
            "n_samples": len(replay_buffer), "class_names": names,
            "class_counts": torch.bincount(predicted, minlength=args.n_classes).tolist(), "grids": grids,
            "buffer": buffer}
