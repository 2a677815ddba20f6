"""Fixtures shared by the test files: a tiny offline image folder and a tiny checkpoint trained on
it."""
import os
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the scripts are top-level modules; this makes `pytest` work from any folder
sys.path.insert(0, ROOT)

import train_wrn_ebm  # noqa: E402  (needs the path above)
from jem.data import SYNTHETIC_CLASSES, make_synthetic  # noqa: E402


def write_image_folder(root, train_per_class, test_per_class):
    """An image folder train/<class>/ and test/<class>/ of synthetic images (offline, fast to train
    on)."""
    images, labels = make_synthetic("test")
    for split, per_class, offset in (("train", train_per_class, 0),
                                     ("test", test_per_class, train_per_class)):
        for label, name in enumerate(SYNTHETIC_CLASSES):
            os.makedirs(root / split / name)
            for i in (labels == label).nonzero()[0][offset:offset + per_class]:
                Image.fromarray(images[i]).save(root / split / name / f"{i:05d}.png")
    return str(root)


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory):
    """train/ with 4 images per class, test/ with 2."""
    return write_image_folder(tmp_path_factory.mktemp("tiny_folder"), 4, 2)


@pytest.fixture(scope="session")
def small_image_folder(tmp_path_factory):
    """train/ with 12 images per class (6 iterations of 16 after a validation split of 20), test/
    with 2."""
    return write_image_folder(tmp_path_factory.mktemp("small_folder"), 12, 2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_image_folder, tmp_path_factory):
    """Path of last_ckpt.pt of a WRN-10-1 JEM trained for two iterations by train_wrn_ebm (CPU,
    seconds)."""
    save_dir = tmp_path_factory.mktemp("tiny_run")
    train_wrn_ebm.main(["--dataset", tiny_image_folder, "--depth", "10", "--width", "1",
                        "--n_steps", "2", "--batch_size", "16", "--n_epochs", "1", "--n_valid", "8",
                        "--buffer_size", "100", "--n_workers", "0", "--device", "cpu", "--save_dir",
                        str(save_dir), "--print_to_log"])
    return str(save_dir / "last_ckpt.pt")
