"""How evaluation samples a model: fresh buffers advanced round by round, chains run the way the
model was trained (jem/flags/evaluate.py decides how, from its checkpoint), and the buffer's images
classified and laid out one row per class.
"""
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from jem.chain_init import IMAGE_SHAPE, ClassGaussians, UniformNoise
from jem.data import SYNTHETIC_CLASSES, DataSettings, plain_training_images
from jem.eval.datasets import EVAL_SETS
from jem.eval.plots import save_grid, save_labeled_rows
from jem.optim import frozen_running_stats
from jem.sampler import ChainSettings, ReplayBuffer, sample_q

EVAL_BATCH_SIZE = 100  # images per batch when classifying a buffer
PER_ROW = 10  # images per class row in the cond_samples grids


@dataclass(frozen=True)
class SamplingSettings:
    """Fresh buffers and the rounds that advance them (the paper's uncond_samples)."""

    chain: ChainSettings = ChainSettings()
    n_classes: int = 10
    buffer_size: int = 10000  # 0: every round's chains start from fresh noise (short-run)
    reinit_freq: float = 0.05
    batch_size: int = 64  # chains per round
    n_rounds: int = 100  # --n_sample_steps
    grid_every: int = 100  # rounds between sample grids (--print_every)
    buffer_init: str = "uniform"  # where fresh chains start: uniform | informative
    training_data: Optional[DataSettings] = None  # what informative starts are fitted to
    quiet: bool = False


@contextmanager
def chains_as_trained(model, chain):
    """The model in training mode with its running statistics frozen while chains run, when its
    chains ran on batch statistics in training (chain.train_mode); else as it is, in eval mode."""
    if not chain.train_mode:
        yield
        return
    model.train()
    try:
        with frozen_running_stats(model):
            yield
    finally:
        model.eval()


def fresh_chain_starts(settings, device):
    """Where fresh chains start: uniform noise, or the class Gaussians of the training images."""
    if settings.buffer_init == "uniform":
        return UniformNoise()
    images = plain_training_images(settings.training_data, device)
    return ClassGaussians.fit(images, settings.n_classes).to(device)


def advance_buffer(model, replay_buffer, settings, grid_prefix):
    """settings.n_rounds rounds of sample_q on batch_size chains drawn from the buffer, as the
    paper's code. Every grid_every-th round's samples are saved as a grid. Returns the grid paths
    and, when the buffer is empty (every round's chains start fresh), every round's samples."""
    grids, short_run = [], []
    rounds = tqdm(range(settings.n_rounds), desc="sampling rounds", disable=settings.quiet)
    for round_ in rounds:
        with chains_as_trained(model, settings.chain):
            samples = sample_q(model, replay_buffer, settings.batch_size, chain=settings.chain)
        if len(replay_buffer) == 0:
            short_run.append(samples.cpu())
        if round_ % settings.grid_every == 0:
            grids.append(f"{grid_prefix}_{round_:06d}.png")
            save_grid(grids[-1], samples)
    return grids, short_run


def save_buffer(path, images, **extra):
    torch.save({"replay_buffer": images.detach().cpu(), **extra}, path)
    return path


def sample_fresh_buffer(model, settings, device, grid_prefix):
    """A buffer of buffer_size fresh starts advanced n_rounds rounds (grids along the way); with a
    buffer_size of 0 the samples of every round stand in for it."""
    starts = fresh_chain_starts(settings, device)
    fresh = ReplayBuffer(settings.buffer_size, settings.n_classes, settings.reinit_freq, device,
                         chain_init=starts)
    grids, short_run = advance_buffer(model, fresh, settings, grid_prefix)
    if short_run:
        fresh = ReplayBuffer(0, settings.n_classes, settings.reinit_freq, device,
                             images=torch.cat(short_run))
    return fresh, grids


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


def save_class_grids(images, predicted, scores, names, n_grids, save_dir):
    """At most n_grids grids of one row per predicted class, PER_ROW images a row, highest
    log p(x, y) first: grid g holds each class's ranks g*PER_ROW .. (g+1)*PER_ROW-1. Classes short
    of images get white cells; each row is labeled with its class's name."""
    ranked = []
    for c in range(len(names)):
        members = (predicted == c).nonzero().squeeze(1)
        ranked.append(images[members[scores[members].argsort(descending=True)]].cpu())
    blank = torch.ones(PER_ROW, *IMAGE_SHAPE)
    n_grids = min(n_grids, math.ceil(max(len(members) for members in ranked) / PER_ROW))
    grids = []
    for g in range(n_grids):
        rows = [torch.cat([members[g * PER_ROW:(g + 1) * PER_ROW], blank])[:PER_ROW]
                for members in ranked]
        grids.append(os.path.join(save_dir, f"cond_samples_{g:03d}.png"))
        save_labeled_rows(grids[-1], torch.cat(rows), names, PER_ROW)
    return grids
