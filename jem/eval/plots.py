"""Figures: sample grids, histograms, reliability diagrams and robustness curves (PNG, no pyplot)."""
import math

import numpy as np
import torch
import torchvision
from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI (Agg renders PNGs)

from jem.errors import UserError


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


def plot_robustness(runs, path):
    """Robust accuracy against eps for (label, result) pairs, all of one --distance, as one PNG."""
    distances = {result["distance"] for _, result in runs}
    if len(distances) > 1:
        raise UserError(f"these runs attack in different norms ({', '.join(sorted(distances))}); "
                        "overlay runs of one --distance at a time")
    fig = Figure(figsize=(5, 3.5), layout="tight")
    ax = fig.subplots()
    for label, result in runs:
        ax.plot(result["eps"], result["robust_accuracy"], marker="o", label=label)
    ax.set_xlabel(AXIS_LABELS[distances.pop()])
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=150)


AXIS_LABELS = {"Linf": "ε (L∞, in 1/255)", "L2": "ε (L2 norm, pixels in [0, 1])"}
