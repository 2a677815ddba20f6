import os

import numpy as np
import pytest
import torch
from PIL import Image
import torchvision.transforms as T
from torch.utils.data import ConcatDataset, DataLoader, Subset

from jem.data import (load_dataset, make_synthetic, n_classes_of, split_indices, train_loaders,
                      train_transform)
from jem.eval.datasets import (load_eval_dataset, odd_size_message, one_size_batches,
                               shorter_side_to_32)
# (a name starting with test_ would be collected)
from jem.data import test_transform as eval_transform
from train_wrn_ebm import parse_args as parse_train_args
from jem.errors import UserError

SHARED_CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "cifar10_subset")


def test_synthetic_is_deterministic_and_balanced():
    images, labels = make_synthetic("test")
    assert images.shape == (1000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [100] * 10
    make_synthetic.cache_clear()
    again, again_labels = make_synthetic("test")
    assert np.array_equal(images, again) and np.array_equal(labels, again_labels)
    assert not np.array_equal(make_synthetic("train")[0][:1000], images)


def test_transforms_normalise_to_minus_one_one_and_add_noise():
    image = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))
    clean = eval_transform("cifar10", 0.0)(image)
    assert clean.shape == (3, 32, 32) and torch.all(clean == 1.0)
    torch.manual_seed(0)
    noisy = eval_transform("cifar10", 0.03)(image)
    assert (noisy - 1.0).std().item() == pytest.approx(0.03, rel=0.1)
    assert train_transform("cifar10", 0.0)(image).shape == (3, 32, 32)
    assert "RandomHorizontalFlip" not in repr(train_transform("svhn", 0.0))
    assert "RandomHorizontalFlip" in repr(train_transform("cifar10", 0.0))


def test_training_sets_load_in_spawned_workers(tiny_image_folder):
    """Spawned workers (the start method on macOS and Windows) receive the data set pickled: no
    lambda may hide in a data set or its transforms."""
    sets = [load_dataset(name, None, True, train_transform(name, 0.03))
            for name in ("synthetic", tiny_image_folder)]
    loader = DataLoader(ConcatDataset(sets), batch_size=2, sampler=[0, len(sets[0])], num_workers=1,
                        multiprocessing_context="spawn")
    x, y = next(iter(loader))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [sets[0][0][1], sets[1][0][1]]


def test_split_is_the_papers_seeded_shuffle():
    labels = np.arange(100) % 10
    train, labeled, valid = split_indices(labels, 20, -1, 10)
    order = list(range(100))
    np.random.seed(1234)
    np.random.shuffle(order)  # what the paper's code did, with the global generator
    assert valid.tolist() == order[:20] and train.tolist() == order[20:]
    assert labeled is train


def test_labels_per_class_keeps_that_many_per_class():
    labels = np.arange(200) % 10
    train, labeled, valid = split_indices(labels, 50, 3, 10)
    assert len(labeled) == 30 and np.bincount(labels[labeled]).tolist() == [3] * 10
    assert set(labeled) <= set(train) and not set(valid) & set(train)


def test_too_large_validation_split_is_a_user_error():
    with pytest.raises(UserError, match="--n_valid"):
        split_indices(np.zeros(10), 10, -1, 10)


def test_image_folder_resized_to_32(tmp_path):
    for split in ("train", "test"):
        for name in ("a", "b", "c"):
            os.makedirs(tmp_path / split / name)
            Image.new("RGB", (20, 28), (10, 20, 30)).save(tmp_path / split / name / "0.png")
    assert n_classes_of(str(tmp_path)) == 3
    x, y = load_dataset(str(tmp_path), None, False, eval_transform(str(tmp_path), 0.0))[2]
    assert x.shape == (3, 32, 32) and y == 2


@pytest.mark.parametrize("size", [(178, 218), (218, 178), (33, 100), (64, 64), (31, 47)])
def test_the_odd_size_rule_is_torchvisions_resize_of_the_shorter_side(size):
    resized = T.Resize(32)(Image.new("RGB", size))
    assert shorter_side_to_32(*size) == (resized.height, resized.width)


def test_images_of_mixed_shapes_resized_as_celeba_are_one_line_naming_the_first_odd_file(tmp_path):
    for i, size in enumerate([(178, 218), (178, 218), (200, 200), (178, 218)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
    celeba = load_eval_dataset("celeba", None, 0.0, celeba_root=str(tmp_path))
    with pytest.raises(RuntimeError, match="equal size"):  # what torch's collate says
        next(iter(DataLoader(celeba, batch_size=4)))
    message = odd_size_message(Subset(celeba, range(4)))
    assert f"{tmp_path / '2.png'} is 32x32 pixels" in message
    assert f"{tmp_path / '0.png'} is 32x39" in message



def test_every_reader_of_a_mixed_shape_folder_stops_with_the_odd_size_line(tmp_path):
    from jem.eval import sample_quality
    for i, size in enumerate([(178, 218), (178, 218), (200, 200)]):
        Image.new("RGB", size).save(tmp_path / f"{i}.png")
    celeba = load_eval_dataset("celeba", None, 0.0, celeba_root=str(tmp_path), normalize=False)

    def eval_and_attack():
        return list(one_size_batches(DataLoader(Subset(celeba, [0, 2]), batch_size=2)))

    for reader in (eval_and_attack, lambda: list(sample_quality.dataset_batches(celeba))):
        with pytest.raises(UserError, match="2.png is 32x32 pixels"):
            reader()
    # one size: batched
    assert len(list(one_size_batches(DataLoader(Subset(celeba, [0, 1]), batch_size=2)))) == 1


def test_missing_data_names_the_folder_and_flag(tmp_path, monkeypatch):
    from jem import data
    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(data.torchvision.datasets.utils, "download_url", offline)
    monkeypatch.setattr(data.torchvision.datasets.utils, "download_and_extract_archive", offline)
    for name, folder in (("cifar10", "cifar-10-batches-py"), ("svhn", "test_32x32.mat")):
        with pytest.raises(UserError, match="--data_root") as err:
            load_dataset(name, str(tmp_path), False, None)
        assert folder in str(err.value)
    with pytest.raises(UserError, match="image folder"):
        load_dataset(str(tmp_path / "nowhere"), None, True, None)


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR), reason="shared CIFAR-10 subset not present")
def test_shared_cifar_subset_loads_as_an_image_folder():
    assert n_classes_of(SHARED_CIFAR) == 10
    test_set = load_dataset(SHARED_CIFAR, None, False, eval_transform(SHARED_CIFAR, 0.0))
    assert len(test_set) == 846 and test_set[0][0].shape == (3, 32, 32)


def first_batch_twice(loader):
    """The first batch of pass 0, drawn twice (the same images, through the transform again)."""
    batches = []
    for _ in range(2):
        loader.batch_sampler.start(0)
        batches.append(next(iter(loader)))
    return batches


def test_no_px_augment_serves_plain_p_x_batches_and_augmented_labeled_ones(tiny_image_folder):
    args = parse_train_args(["--dataset", tiny_image_folder, "--n_valid", "8", "--sigma", "0",
                             "--batch_size", "4",
                             "--labeled_batch_size", "8", "--n_workers", "0", "--no_px_augment"])
    args.n_classes = 10
    torch.manual_seed(0)
    loaders = train_loaders(args, torch.device("cpu"))
    (x_data, _), (again, _) = first_batch_twice(loaders["train"])
    assert x_data.shape == (4, 3, 32, 32) and torch.equal(x_data, again)
    plain = load_dataset(tiny_image_folder, None, True, eval_transform(tiny_image_folder, 0.0))
    subset = loaders["train"].dataset
    first = [subset.indices[i] for i in next(iter(loaders["train"].batch_sampler))]
    assert torch.equal(x_data, torch.stack([plain[i][0] for i in first]))  # the images as they are
    (x_lab, y_lab), (x_lab_again, y_lab_again) = first_batch_twice(loaders["labeled"])
    assert x_lab.shape == (8, 3, 32, 32) and torch.equal(y_lab, y_lab_again)
    assert not torch.equal(x_lab, x_lab_again)  # cropped and flipped anew

    args.px_augment = True  # the paper's default: p(x) batches are augmented too
    (x_data, _), (again, _) = first_batch_twice(train_loaders(args, torch.device("cpu"))["train"])
    assert not torch.equal(x_data, again)


@pytest.mark.parametrize("recipe, noisy_eval", [("jem", True), ("jempp", False)])
def test_jempp_evaluates_clean_images_while_its_training_images_keep_their_noise(tiny_image_folder,
                                                                                 recipe,
                                                                                   noisy_eval):
    """JEM++'s transform_test adds no noise; the paper's test transform adds --sigma's."""
    args = parse_train_args(["--recipe", recipe, "--dataset", tiny_image_folder, "--n_valid", "8",
                             "--sigma", "0.5", "--batch_size", "4", "--n_workers", "0"])
    args.n_classes = 10
    loaders = train_loaders(args, torch.device("cpu"))
    clean = load_dataset(tiny_image_folder, None, False, eval_transform(tiny_image_folder, 0.0))
    x_test, _ = next(iter(loaders["test"]))
    assert torch.equal(x_test, torch.stack([clean[i][0] for i in range(len(x_test))])) != noisy_eval
    x_valid, _ = next(iter(loaders["valid"]))
    assert (x_valid.abs().max() > 1) == noisy_eval  # noise of std 0.5 leaves [-1, 1]
    x_data, _ = next(iter(loaders["train"]))
    assert x_data.abs().max() > 1  # the training images keep --sigma
