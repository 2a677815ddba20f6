"""Figures: sample grids, histograms, reliability diagrams and robustness curves (PNG, no
pyplot)."""
import math
import os

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFont

from jem.errors import UserError


def new_figure(**options):
    """A matplotlib Figure: no pyplot, so no global backend and no GUI (Agg renders the PNGs).
    matplotlib loads at the first chart, not with this module, which the trainer and every command
    line import for the sample grids: it would add half a second to each."""
    from matplotlib.figure import Figure
    return Figure(**options)


def save_grid(path, images, nrow=None):
    """Save images in [-1, 1] as one PNG grid (square by default, as the paper's plots)."""
    nrow = nrow or max(1, int(math.sqrt(len(images))))
    torchvision.utils.save_image(images.detach().float().clamp(-1, 1).cpu(), path, nrow=nrow,
                                 normalize=True, value_range=(-1, 1))


GRID_PADDING = 2  # pixels between the images of a grid (torchvision's default)
LABEL_FONT_SIZE = 12  # pixels; a grid row is 34 pixels high
FEW_IMAGES = 10  # a reliability bin of fewer images is drawn hatched: its accuracy is mostly noise


def save_labeled_rows(path, images, row_labels, per_row):
    """A PNG grid of len(row_labels) rows of per_row images in [-1, 1], each row's label on its
    left; the images keep their pixels (as save_grid), the labels get a white column of their
    own."""
    grid = torchvision.utils.make_grid(images.detach().float().clamp(-1, 1).cpu(), nrow=per_row,
                                       padding=GRID_PADDING, normalize=True, value_range=(-1, 1))
    pixels = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    margin = 6
    label_width = 2 * margin + max(math.ceil(font.getlength(str(label))) for label in row_labels)
    picture = Image.new("RGB", (label_width + pixels.shape[1], pixels.shape[0]), "white")
    picture.paste(Image.fromarray(pixels), (label_width, 0))
    draw = ImageDraw.Draw(picture)
    row_height = (pixels.shape[0] - GRID_PADDING) // len(row_labels)
    for row, label in enumerate(row_labels):
        middle = GRID_PADDING + row * row_height + (row_height - GRID_PADDING) // 2
        draw.text((label_width - margin, middle), str(label), fill="black", font=font, anchor="rm")
    picture.save(path)


def short_names(names):
    """A data set's name as a legend shows it: an image folder's own name (`../data/cifar10_subset`
    -> `cifar10_subset`; its `test` or `train` split keeps the folder's name in front), a name of
    eval_wrn_ebm.py as it is. Names that would then read the same stay in full."""
    def short(name):
        parts = os.path.normpath(name).split(os.sep)
        return "/".join(parts[-2:]) if parts[-1] in ("test", "train") else parts[-1]

    shortened = {name: short(name) for name in names}
    counts = {}
    for value in shortened.values():
        counts[value] = counts.get(value, 0) + 1
    return {name: value if counts[value] == 1 else name for name, value in shortened.items()}


def class_rows(n_classes, per_class):
    """Labels [0]*per_class + [1]*per_class + ...: one grid row per class."""
    return torch.arange(n_classes).repeat_interleave(per_class)


def save_histograms(path_stem, scores_by_name, xlabel):
    """Overlaid normalised histograms, one per data set, on shared bins; writes .png and .pdf."""
    edges = np.histogram_bin_edges(
        np.concatenate([np.asarray(s) for s in scores_by_name.values()]), bins=100
    )
    fig = new_figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    for name, scores in scores_by_name.items():
        ax.hist(np.asarray(scores), bins=edges, density=True, alpha=0.5, label=name)
    ax.set(xlabel=xlabel, ylabel="density")
    ax.legend()
    paths = [f"{path_stem}.{extension}" for extension in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def save_reliability_diagram(path, bin_lower, bin_upper, bin_accuracy, ece, title, bin_count=None):
    """Accuracy per confidence bin (bars) against the diagonal of perfect calibration, ECE in the
    title.

    With bin_count, each bar shows its number of images on top, and bars of fewer than FEW_IMAGES
    images are pale and hatched: their accuracy says little."""
    lower, upper = np.asarray(bin_lower), np.asarray(bin_upper)
    accuracy = np.nan_to_num(np.asarray(bin_accuracy, dtype=float))
    counts = np.asarray(bin_count if bin_count is not None else [FEW_IMAGES] * len(lower))
    few = (counts > 0) & (counts < FEW_IMAGES)
    fig = new_figure(figsize=(4.5, 4.5), layout="tight")
    ax = fig.subplots()
    width = upper - lower
    ax.bar(lower[~few], accuracy[~few], width=width[~few], align="edge", edgecolor="black",
           label="accuracy")
    if few.any():
        ax.bar(lower[few], accuracy[few], width=width[few], align="edge", edgecolor="black",
               color="C0", alpha=0.35, hatch="//",
               label=f"accuracy, fewer than {FEW_IMAGES} images")
    if bin_count is not None:
        for left, right, height, count in zip(lower, upper, accuracy, counts):
            if count:
                ax.text((left + right) / 2, min(height, 0.9) + 0.01, str(count), ha="center",
                        va="bottom", fontsize=6, rotation=90)
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
    fig = new_figure(figsize=(5, 3.5), layout="tight")
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


def legend_labels(given, defaults):
    """--labels when given (one per run, else one line), the runs' own labels otherwise."""
    if given is not None and len(given) != len(defaults):
        raise UserError(f"{len(given)} --labels for {len(defaults)} runs; give one label per run")
    return given or defaults
