"""Training data: data sets, transforms, the validation split and the training loaders.

Pixels are normalised to [-1, 1] (mean 0.5, std 0.5) and, as in the paper, Gaussian noise of std
`sigma` is added to every image, train and test.

`--dataset` accepts the torchvision sets (cifar10, cifar100, svhn; downloaded when online), the
built-in `synthetic` set (no download, for the quickstart and the tests), or the path of an image
folder with `train/` and `test/` class sub-folders. Evaluation's data sets (out-of-distribution
sets, interpolations, loose image folders) are jem/eval/datasets.py's.
"""
import functools
import os
from dataclasses import dataclass
from typing import Optional
from urllib.error import URLError

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from jem.errors import UserError

TORCHVISION_SETS = {
    # name: (class, folder torchvision expects under --data_root, n_classes)
    "cifar10": (torchvision.datasets.CIFAR10, "cifar-10-batches-py", 10),
    "cifar100": (torchvision.datasets.CIFAR100, "cifar-100-python", 100),
    "svhn": (torchvision.datasets.SVHN, "train_32x32.mat / test_32x32.mat", 10),
}
VALID_SPLIT_SEED = 1234  # the paper's fixed shuffle for the validation split


@dataclass(frozen=True)
class DataSettings:
    """The training data: which set, its splits, noise, augmentation and batches."""

    dataset: str = "cifar10"  # a torchvision set, synthetic, or an image folder's path
    data_root: str = "../data"
    n_classes: int = 10
    n_valid: int = 5000  # training images held out for validation
    labels_per_class: int = -1  # labels kept per class for p(y|x); -1: all
    sigma: float = 0.03  # noise added to every training image
    test_sigma: Optional[float] = None  # noise of validation and test images (None: sigma)
    px_augment: bool = True  # crop and flip the p(x) batch too (SADA-JEM: no)
    batch_size: int = 64  # p(x) batch
    labeled_batch_size: Optional[int] = None  # classification batch (None: batch_size)
    seed: int = 1  # the shuffles' seed
    n_workers: Optional[int] = None  # loader processes (None: the device's default)


class AddGaussianNoise:
    """The paper's `x + sigma * randn_like(x)`, as a picklable class (works with spawned
    workers)."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, x):
        return x + self.sigma * torch.randn_like(x) if self.sigma > 0 else x

    def __repr__(self):
        return f"AddGaussianNoise(sigma={self.sigma})"


def _resize_for(dataset, keep_aspect=False):
    """Image folders may hold any size; everything else is 32x32 already.

    keep_aspect: the shorter side to 32 and the aspect ratio kept, as the paper's code read CelebA
    (the network's average pooling takes the top 8x8 of a taller feature map).
    """
    if not is_image_folder(dataset):
        return []
    return [T.Resize(32)] if keep_aspect else [T.Resize((32, 32))]


def train_transform(dataset, sigma):
    # digits are not mirror-symmetric
    flip = [] if dataset == "svhn" else [T.RandomHorizontalFlip()]
    return T.Compose(_resize_for(dataset) + [T.Pad(4, padding_mode="reflect"), T.RandomCrop(32)]
                     + flip
                     + [T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3), AddGaussianNoise(sigma)])


def test_transform(dataset, sigma, normalize=True, keep_aspect=False):
    """Pixels to [-1, 1] plus noise `sigma`; normalize=False stops at [0, 1] (what an attacker
    perturbs)."""
    to_model = [T.Normalize((0.5,) * 3, (0.5,) * 3), AddGaussianNoise(sigma)] if normalize else []
    return T.Compose(_resize_for(dataset, keep_aspect) + [T.ToTensor()] + to_model)


# --------------------------------------------------------------------------------------------------
# The built-in synthetic set: ten shape classes drawn in random colours on random gradients.

SYNTHETIC_CLASSES = ("disk", "square", "ring", "diamond", "hbar", "vbar", "plus", "cross",
                     "triangle", "frame")
SYNTHETIC_SIZES = {"train": 10000, "test": 1000}


def _shape_mask(label, dx, dy, r):
    ax, ay = np.abs(dx), np.abs(dy)
    box = np.maximum(ax, ay)
    masks = (dx ** 2 + dy ** 2 < r ** 2, box < r,
             (dx ** 2 + dy ** 2 < r ** 2) & (dx ** 2 + dy ** 2 > (0.55 * r) ** 2), ax + ay < r,
             (ay < 0.35 * r) & (ax < r), (ax < 0.35 * r) & (ay < r),
             ((ax < 0.3 * r) & (ay < r)) | ((ay < 0.3 * r) & (ax < r)),
             (np.abs(ax - ay) < 0.3 * r) & (box < r), (dy > -r) & (dy < r) & (ax < (dy + r) / 2),
             (box < r) & (box > 0.6 * r))
    return masks[label]


@functools.lru_cache(maxsize=2)
def make_synthetic(split):
    """Deterministic uint8 images (N, 32, 32, 3) and int64 labels; the same on every machine."""
    rng = np.random.RandomState(0 if split == "train" else 1)
    n = SYNTHETIC_SIZES[split]
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    images = np.empty((n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n) % len(SYNTHETIC_CLASSES)
    rng.shuffle(labels)
    for i, label in enumerate(labels):
        c0, c1 = rng.uniform(0, 1, size=(2, 3))
        angle = rng.uniform(0, 2 * np.pi)
        ramp = ((xx - 16) * np.cos(angle) + (yy - 16) * np.sin(angle)) / 45 + 0.5
        background = c0 + (c1 - c0) * ramp[..., None]
        colour = rng.uniform(0, 1, size=3)
        while np.abs(colour - background.mean((0, 1))).sum() < 0.6:  # keep the shape visible
            colour = rng.uniform(0, 1, size=3)
        r = rng.uniform(6, 11)
        cx, cy = rng.uniform(r, 32 - r, size=2)
        mask = _shape_mask(label, xx - cx, yy - cy, r)
        image = np.where(mask[..., None], colour, background) \
            + rng.normal(0, 0.03, size=(32, 32, 3))
        images[i] = np.clip(image * 255, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


class ArrayDataset(Dataset):
    """uint8 HWC images in memory, served as PIL images like torchvision's CIFAR10."""

    def __init__(self, images, targets, transform=None):
        self.images, self.targets, self.transform = images, list(targets), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        image = Image.fromarray(self.images[i])
        return (self.transform(image) if self.transform else image), self.targets[i]


# --------------------------------------------------------------------------------------------------
# Loading a named data set.

def is_image_folder(dataset):
    return dataset not in TORCHVISION_SETS and dataset != "synthetic"


def n_classes_of(dataset, data_root=None):
    if dataset in TORCHVISION_SETS:
        return TORCHVISION_SETS[dataset][2]
    if dataset == "synthetic":
        return len(SYNTHETIC_CLASSES)
    return len(_image_folder(dataset, "train").classes)


def _torchvision_set(name, root, train, transform):
    cls, folder, _ = TORCHVISION_SETS[name]
    split = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    try:
        return cls(root, transform=transform, download=False, **split)
    except RuntimeError:
        pass  # not on disk yet: try to download it
    try:
        return cls(root, transform=transform, download=True, **split)
    except (URLError, OSError, RuntimeError) as e:
        raise UserError(
            f"{name} is not in --data_root {root} (torchvision looks for "
            f"{os.path.join(root, folder)}) and downloading it failed ({e}); put the data set "
            "there or run once with internet access")


def _image_folder(path, split, transform=None):
    folder = os.path.join(path, split)
    if not os.path.isdir(folder):
        raise UserError(f"--dataset {path} is neither a known data set (cifar10, cifar100, svhn, "
                        f"synthetic) nor an image folder with a {split}/ sub-folder of class "
                        "folders")
    return class_folders(folder, transform)


def class_folders(folder, transform):
    """torchvision's ImageFolder (one sub-folder per class), or one line saying why it cannot be
    read."""
    try:
        return torchvision.datasets.ImageFolder(folder, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"cannot read image folder {folder}: {e}")


def load_dataset(name, data_root, train, transform):
    """The train or test split of `name` (see module docstring) with `transform` applied."""
    if name in TORCHVISION_SETS:
        return _torchvision_set(name, data_root, train, transform)
    if name == "synthetic":
        return ArrayDataset(*make_synthetic("train" if train else "test"), transform=transform)
    return _image_folder(name, "train" if train else "test", transform)


def targets_of(dataset):
    """Labels of every item without decoding images (SVHN calls them `labels`)."""
    targets = getattr(dataset, "targets", None)
    return np.asarray(dataset.labels if targets is None else targets)


def split_indices(labels, n_valid, labels_per_class, n_classes):
    """The paper's split: (train, labeled, valid) indices into the training set.

    A fixed seeded shuffle holds out the first n_valid images for validation; with labels_per_class
    > 0, only the first labels_per_class training images of each class keep their label.
    """
    order = list(range(len(labels)))
    # same order as the paper's np.random.seed(1234)
    np.random.RandomState(VALID_SPLIT_SEED).shuffle(order)
    if n_valid >= len(order):
        raise UserError(f"--n_valid {n_valid} leaves no training images ({len(order)} in the "
                        "training set); pass a smaller --n_valid")
    valid = np.array(order[:n_valid], dtype=np.int64)
    train = np.array(order[n_valid:], dtype=np.int64)
    if labels_per_class <= 0:
        return train, train, valid
    train_labels = labels[train]
    labeled = np.concatenate([train[train_labels == c][:labels_per_class]
                              for c in range(n_classes)])
    return train, labeled, valid


def make_loader(dataset, batch_size, train, device, workers, batch_sampler=None):
    """A DataLoader; with `batch_sampler` (training) it decides the batches and `batch_size` is
    unused.

    Every loader has its own generator, so starting an epoch never draws from the global torch RNG:
    the random numbers of a run do not depend on how many loaders were started (which a resumed run
    changes).
    """
    batching = dict(batch_sampler=batch_sampler) if batch_sampler is not None else \
        dict(batch_size=batch_size, shuffle=train, drop_last=train)
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, generator=torch.Generator(), **batching)


class ShuffledBatches(Sampler):
    """Full batches of a seeded shuffle, a new order every pass; replayable from any batch,
    shardable.

    The order of pass p comes from a generator seeded with (seed, p) alone, so a resumed run can
    replay pass p from batch b exactly (`start(p, b)`). With world_size > 1 each rank takes every
    world_size-th image of the order, as torch's DistributedSampler does, so the ranks see disjoint
    data.
    """

    def __init__(self, n, batch_size, seed, rank=0, world_size=1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.pass_, self.first_batch = 0, 0

    def start(self, pass_, first_batch=0):
        self.pass_, self.first_batch = pass_, first_batch

    def __len__(self):
        return (self.n // self.world_size) // self.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.pass_)
        order = torch.randperm(self.n, generator=generator)
        mine = order[self.rank:self.n - self.n % self.world_size:self.world_size]
        for b in range(self.first_batch, len(self)):
            yield mine[b * self.batch_size:(b + 1) * self.batch_size].tolist()


def default_workers(device):
    """SGLD dominates the iteration, so on a CPU workers would only compete with it for cores."""
    return min(4, os.cpu_count() or 1) if device.type == "cuda" else 0


def loader_workers(n_workers, device):
    """--n_workers, or the device's default when it is not given."""
    return n_workers if n_workers is not None else default_workers(device)


def train_loaders(data, device, rank=0, world_size=1):
    """Loaders for training: all training images (p(x)), the labeled ones, validation and test.

    The two training loaders shuffle with ShuffledBatches (seeded from --seed), each rank of a
    distributed run taking its own share; the others hold every image. The labeled batches are
    augmented (crop, flip); the p(x) batches too unless --no_px_augment (SADA-JEM). Training images
    get --sigma noise, validation and test images --test_sigma (default: --sigma; JEM++ evaluates
    clean images).
    """
    test_sigma = data.sigma if data.test_sigma is None else data.test_sigma
    train_set = load_dataset(data.dataset, data.data_root, True,
                             train_transform(data.dataset, data.sigma))
    eval_train_set = load_dataset(data.dataset, data.data_root, True,
                                  test_transform(data.dataset, test_sigma))
    test_set = load_dataset(data.dataset, data.data_root, False,
                            test_transform(data.dataset, test_sigma))
    train, labeled, valid = split_indices(targets_of(train_set), data.n_valid,
                                          data.labels_per_class, data.n_classes)
    labeled_batch_size = data.labeled_batch_size or data.batch_size
    if len(train) < data.batch_size * world_size:
        raise UserError(f"only {len(train)} training images for p(x) batches of {data.batch_size}"
                        f"{f' on each of {world_size} processes' if world_size > 1 else ''}: an "
                        "epoch would train nothing; use a smaller --batch_size or --n_valid")
    if len(labeled) < labeled_batch_size * world_size:
        raise UserError(f"only {len(labeled)} labeled training images for batches of "
                        f"{labeled_batch_size}"
                        f"{f' on each of {world_size} processes' if world_size > 1 else ''}; use a "
                        "smaller --batch_size (--labeled_batch_size) or more --labels_per_class")
    workers = loader_workers(data.n_workers, device)

    def shuffled(dataset, indices, batch_size, stream):
        batches = ShuffledBatches(len(indices), batch_size, data.seed * 2 + stream, rank,
                                  world_size)
        return make_loader(Subset(dataset, indices), None, True, device, workers,
                           batch_sampler=batches)

    px_set = train_set if data.px_augment else \
        load_dataset(data.dataset, data.data_root, True, test_transform(data.dataset, data.sigma))
    return {"train": shuffled(px_set, train, data.batch_size, 0),
            "labeled": shuffled(train_set, labeled, labeled_batch_size, 1),
            "valid": make_loader(Subset(eval_train_set, valid), 100, False, device, workers),
            "test": make_loader(test_set, 100, False, device, workers)}


def plain_training_images(data, device):
    """The training split (validation held out) as it is, without augmentation or noise, in
    batches: what --buffer_init informative fits its class Gaussians to, and --eval_train scores.
    Loaded only then."""

    dataset = load_dataset(data.dataset, data.data_root, True, test_transform(data.dataset, 0.0))
    train, _, _ = split_indices(targets_of(dataset), data.n_valid, data.labels_per_class,
                                data.n_classes)
    return make_loader(Subset(dataset, train), 500, False, device,
                       loader_workers(data.n_workers, device))


def batches_from(loader, first_batch):
    """Endless batches of a ShuffledBatches loader, starting at overall batch number `first_batch`.

    The labeled stream takes one batch per iteration, so after k iterations it resumes at batch k.
    """
    pass_, offset = divmod(first_batch, len(loader))
    while True:
        loader.batch_sampler.start(pass_, offset)
        yield from loader
        pass_, offset = pass_ + 1, 0

