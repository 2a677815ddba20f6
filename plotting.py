"""Figures: sample grids (matplotlib figures for evaluation live beside them)."""
import math

import numpy as np
import torch
import torchvision
from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI (Agg renders PNGs)


def save_grid(path, images, nrow=None):
    """Save images in [-1, 1] as one PNG grid (square by default, as the paper's plots)."""
    nrow = nrow or max(1, int(math.sqrt(len(images))))
    torchvision.utils.save_image(images.detach().float().clamp(-1, 1).cpu(), path, nrow=nrow,
                                 normalize=True, value_range=(-1, 1))


def class_rows(n_classes, per_class):
    """Labels [0]*per_class + [1]*per_class + ...: one grid row per class."""
    return torch.arange(n_classes).repeat_interleave(per_class)


def save_histograms(path_stem, scores_by_name, xlabel):
    """Overlaid normalised histograms, one per data set, on shared bins; writes .png and .pdf."""
    edges = np.histogram_bin_edges(np.concatenate([np.asarray(s) for s in scores_by_name.values()]), bins=100)
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    for name, scores in scores_by_name.items():
        ax.hist(np.asarray(scores), bins=edges, density=True, alpha=0.5, label=name)
    ax.set(xlabel=xlabel, ylabel="density")
    ax.legend()
    paths = [f"{path_stem}.{extension}" for extension in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def save_reliability_diagram(path, bin_lower, bin_upper, bin_accuracy, ece, title):
    """Accuracy per confidence bin (bars) against the diagonal of perfect calibration, ECE in the title."""
    lower, upper = np.asarray(bin_lower), np.asarray(bin_upper)
    fig = Figure(figsize=(4.5, 4.5), layout="tight")
    ax = fig.subplots()
    ax.bar(lower, np.nan_to_num(np.asarray(bin_accuracy, dtype=float)), width=upper - lower, align="edge",
           edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (max p(y|x))", ylabel="accuracy",
           title=f"{title}: ECE = {100 * ece:.2f}%")
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=150)
