"""Figures: sample grids (matplotlib figures for evaluation live beside them)."""
import math

import torch
import torchvision


def save_grid(path, images, nrow=None):
    """Save images in [-1, 1] as one PNG grid (square by default, as the paper's plots)."""
    nrow = nrow or max(1, int(math.sqrt(len(images))))
    torchvision.utils.save_image(images.detach().float().clamp(-1, 1).cpu(), path, nrow=nrow,
                                 normalize=True, value_range=(-1, 1))


def class_rows(n_classes, per_class):
    """Labels [0]*per_class + [1]*per_class + ...: one grid row per class."""
    return torch.arange(n_classes).repeat_interleave(per_class)
