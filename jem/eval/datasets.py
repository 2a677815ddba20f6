"""Evaluation data sets: the paper's names for test-time splits and out-of-distribution sets, image
folders of any layout, and the checks evaluation makes on them.

Training data (transforms, the synthetic set, the validation split, training loaders) is
jem/data.py's.
"""
import os

import numpy as np
import torchvision
from torch.utils.data import Dataset, Subset

from jem.data import AddGaussianNoise, class_folders, load_dataset, targets_of, test_transform
from jem.errors import UserError

EVAL_SETS = {
    # name: (data set, training split?); the paper's eval names first, then this project's aliases
    "cifar_test": ("cifar10", False),
    "cifar_train": ("cifar10", True),
    "svhn_test": ("svhn", False),
    "svhn_train": ("svhn", True),
    "svhn": ("svhn", False),
    "cifar_100": ("cifar100", False),
    "cifar10": ("cifar10", False),
    "cifar100": ("cifar100", False),
    "cifar100_test": ("cifar100", False),
    "synthetic": ("synthetic", False),
}
EVAL_NAMES = (*EVAL_SETS, "cifar_interp", "celeba")
NO_LABEL = -1  # the label of images that have none (interpolations, a folder of loose images)
INTERP_SEED = 1234  # fixes which two images each cifar_interp image mixes, on every machine


def check_labeled(dataset, n_classes, name, needed_by):
    """A UserError unless every image of `dataset` carries one of the model's n_classes labels."""
    labels = targets_of(dataset)
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= n_classes:
        found = f"labels {labels.min()}..{labels.max()}" if len(labels) else "no images"
        raise UserError(f"{name} has no labels of this model's {n_classes} classes (found "
                        f"{found}): {needed_by} needs a labeled --dataset (a test split or a "
                        "folder of class folders)")


class ImageFiles(Dataset):
    """Every image directly inside one folder, unlabeled: e.g. CelebA's img_align_celeba/."""

    def __init__(self, folder, transform):
        extensions = torchvision.datasets.folder.IMG_EXTENSIONS
        self.paths = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                            if name.lower().endswith(extensions))
        self.targets = [NO_LABEL] * len(self.paths)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(torchvision.datasets.folder.default_loader(self.paths[i])), NO_LABEL


class InterpolatedPairs(Dataset):
    """The paper's CIFAR10-interp OOD set: the average of two different images of `base`, plus
    noise.

    As in the paper's code, `base` serves test images that carry the sigma noise already and the mix
    gets sigma noise once more (in all, noise of std sigma * sqrt(3/2)). Image i is mixed with a
    fixed partner: a seeded random cycle through the set, so never itself.
    """

    def __init__(self, base, sigma, seed=INTERP_SEED):
        if len(base) < 2:
            raise UserError("cifar_interp needs at least two images in the data set it mixes")
        order = np.random.RandomState(seed).permutation(len(base))
        self.partner = np.empty_like(order)
        self.partner[order] = np.roll(order, -1)
        self.base, self.noise = base, AddGaussianNoise(sigma)
        self.targets = [NO_LABEL] * len(base)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        (a, _), (b, _) = self.base[i], self.base[int(self.partner[i])]
        return self.noise((a + b) / 2), NO_LABEL


def eval_image_folder(path, transform):
    """PATH/test/<class>/* when PATH has a test/ folder, else PATH/<class>/*, else PATH/*
    (unlabeled)."""
    if not os.path.isdir(path):
        raise UserError(f"no data set {path!r}: use one of {', '.join(EVAL_NAMES)} or the path of "
                        "an image folder (PATH/test/<class>/*, PATH/<class>/* or PATH/*.png)")
    test = os.path.join(path, "test")
    folder = test if os.path.isdir(test) else path
    if not any(entry.is_dir() for entry in os.scandir(folder)):
        dataset = ImageFiles(folder, transform)
        if len(dataset) == 0:
            raise UserError(f"image folder {folder} holds no images and no class folders")
        return dataset
    return class_folders(folder, transform)


def shorter_side_to_32(width, height):
    """(height, width) of an image after T.Resize(32): the shorter side 32, the longer one scaled
    and truncated."""
    short, long = sorted((width, height))
    resized = int(32 * long / short)
    return (resized, 32) if width <= height else (32, resized)


def image_paths(dataset):
    """The image files of an image-folder data set (through Subset and cifar_interp's mixes), else
    []."""
    while isinstance(dataset, (Subset, InterpolatedPairs)):
        dataset = dataset.dataset if isinstance(dataset, Subset) else dataset.base
    if isinstance(dataset, ImageFiles):
        return dataset.paths
    return [path for path, _ in getattr(dataset, "samples", [])]


def odd_size_message(dataset):
    """The line for a folder whose images, their shorter side resized to 32 (CelebA's rule, which
    keeps the aspect ratio), differ in size: the first odd file and the size the first image set.
    Reads image headers only."""
    from PIL import Image
    expected, first = None, None
    for path in image_paths(dataset):
        with Image.open(path) as image:
            size = shorter_side_to_32(*image.size)
        if expected is None:
            expected, first = size, path
        elif size != expected:
            return (f"{path} is {size[1]}x{size[0]} pixels once its shorter side is resized to 32 "
                    f"(aspect kept, as the paper read CelebA), but {first} is "
                    f"{expected[1]}x{expected[0]}: a batch needs one size, so use a folder of "
                    "images of one shape (aligned CelebA: 178x218)")
    return "the images of the data set differ in size after resizing, so they cannot be batched"


def one_size_batches(loader):
    """The loader's batches; a folder of images that the resize leaves of different sizes stops with
    one line naming the first odd file instead of the collate function's traceback."""
    try:
        yield from loader
    except RuntimeError as e:
        if "stack expects each tensor to be equal size" not in str(e):
            raise
        raise UserError(odd_size_message(loader.dataset)) from None


def load_eval_dataset(name, data_root, sigma, celeba_root=None, interp_of="cifar_test",
                      normalize=True):
    """A test-time data set by any name evaluation accepts, with the test transform (noise `sigma`).

    Names: the keys of EVAL_SETS; `cifar_interp` (mixes of two images of the set named `interp_of`);
    `celeba` (the image folder `celeba_root`, the shorter side resized to 32); else the path of an
    image folder. normalize=False gives pixels in [0, 1] (see test_transform).
    """
    if name == "cifar_interp":
        if interp_of == "cifar_interp":
            raise UserError("cifar_interp mixes images of the in-distribution set (--dataset), "
                            "which cannot be cifar_interp itself")
        mixed = load_eval_dataset(interp_of, data_root, sigma, celeba_root, normalize=normalize)
        return InterpolatedPairs(mixed, sigma)

    if name in EVAL_SETS:
        base, train = EVAL_SETS[name]
        return load_dataset(base, data_root, train, test_transform(base, sigma, normalize))
    if name == "celeba":
        if celeba_root is None:
            raise UserError("celeba needs --celeba_root: a folder of CelebA images (loose, or in "
                            "sub-folders); their shorter side is resized to 32")
        return eval_image_folder(celeba_root,
                                 test_transform(celeba_root, sigma, normalize, keep_aspect=True))
    return eval_image_folder(name, test_transform(name, sigma, normalize))
