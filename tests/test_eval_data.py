"""The data sets evaluation names: interpolations, image folders, CelebA folders."""
import os

import pytest
import torch
from PIL import Image

from jem.data import make_synthetic
from jem.eval.datasets import InterpolatedPairs, NO_LABEL, load_eval_dataset
from jem.errors import UserError


def test_synthetic_and_the_paper_names_map_to_test_splits():
    dataset = load_eval_dataset("synthetic", None, 0.0)
    assert len(dataset) == len(make_synthetic("test")[0])
    x, y = dataset[0]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 and 0 <= y < 10


def test_unnormalized_sets_serve_the_same_images_in_pixel_space(tiny_image_folder):
    for name in ("synthetic", tiny_image_folder):
        pixels, label = load_eval_dataset(name, None, 0.5, normalize=False)[3]  # no noise either
        model_input, same_label = load_eval_dataset(name, None, 0.0)[3]
        assert 0 <= pixels.min() and pixels.max() <= 1 and label == same_label
        torch.testing.assert_close(pixels * 2 - 1, model_input)


def test_cifar_interp_averages_two_different_images_of_the_in_distribution_set():
    base = load_eval_dataset("synthetic", None, 0.0)
    interp = load_eval_dataset("cifar_interp", None, 0.0, interp_of="synthetic")
    assert len(interp) == len(base)
    partners = [int(p) for p in interp.partner]
    assert all(p != i for i, p in enumerate(partners))
    assert sorted(partners) == list(range(len(base)))

    x, label = interp[7]
    torch.testing.assert_close(x, (base[7][0] + base[partners[7]][0]) / 2)
    assert label == NO_LABEL
    again = InterpolatedPairs(base, 0.0)
    assert list(again.partner) == partners  # the pairing is fixed, whatever the global seed


def test_cifar_interp_mixes_noisy_test_images_and_adds_the_noise_again_as_the_paper():
    """The paper mixes two test images that carry the sigma noise, then adds sigma noise: in all,
    noise of std sigma * sqrt(1/4 + 1/4 + 1) (0.5 here: 0.61, where noise added once after mixing
    would be 0.5)."""
    noisy = load_eval_dataset("cifar_interp", None, 0.5, interp_of="synthetic")
    clean = load_eval_dataset("cifar_interp", None, 0.0, interp_of="synthetic")
    noise = torch.stack([noisy[i][0] - clean[i][0] for i in range(4)])
    assert noise.std() == pytest.approx(0.5 * 1.5 ** 0.5, rel=0.03)


def test_image_folder_with_test_split_flat_class_tree_and_loose_images(tiny_image_folder, tmp_path):
    with_split = load_eval_dataset(tiny_image_folder, None, 0.0)
    assert len(with_split) == 20 and sorted(set(with_split.targets)) == list(range(10))
    flat = load_eval_dataset(os.path.join(tiny_image_folder, "train"), None, 0.0)
    assert len(flat) == 40
    # CelebA's aligned size, width x height
    Image.new("RGB", (178, 218)).save(tmp_path / "000001.jpg")
    loose = load_eval_dataset("celeba", None, 0.0, celeba_root=str(tmp_path))
    x, y = loose[0]
    # the shorter side to 32, the aspect kept; unlabeled
    assert x.shape == (3, 39, 32) and y == NO_LABEL
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (178, 218)).save(other / "000001.jpg")
    # other folders: 32x32
    assert load_eval_dataset(str(other), None, 0.0)[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name, kwargs, message", [
    ("not_a_set", {}, "no data set 'not_a_set'"),
    ("celeba", {}, "--celeba_root"),
    ("cifar_interp", {"interp_of": "cifar_interp"}, "cannot be cifar_interp"),
])
def test_unusable_names_are_user_errors(name, kwargs, message):
    with pytest.raises(UserError, match=message):
        load_eval_dataset(name, None, 0.0, **kwargs)


def test_an_empty_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="holds no images"):
        load_eval_dataset(str(tmp_path), None, 0.0)
