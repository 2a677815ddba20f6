"""Inception Score, FID and KID: the formulas on known features, and the sample_quality mode end to
end with a randomly initialised Inception network of torch-fidelity's own class, saved as the
standard weights file."""
import hashlib
import json
import os
import subprocess
import sys
from unittest import mock
from urllib.error import URLError

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image

import eval_wrn_ebm
import train_wrn_ebm
from jem.checkpoint import load_checkpoint
from jem.data import make_synthetic
from conftest import ROOT
from jem.eval.sample_quality import (Inception, WEIGHTS_FILE, frechet_distance, inception_score,
                                     reference_from_features, tensor_batches)
from jem.errors import UserError

N_IMAGES = 6  # Inception runs at 299x299: a third of a second per image on one CPU core


class RandomInception(tf_inception.FeatureExtractorInceptionV3):
    """The library's network, keeping its random initialisation instead of loading weights."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A state dict in the standard weights format (what --inception_weights takes), random but not
    degenerate."""
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {}):
        network = RandomInception("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for module in network.modules():
        # keeps activations from vanishing
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
    torch.save(network.state_dict(), path)
    return str(path)


def gaussian_features(n, dim, shift=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) + shift


def direct_fid(a, b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), with scipy's matrix square root."""
    a, b = a.numpy(), b.numpy()
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a + s_b - 2 * root))


# --------------------------------------------------------------------------------------------------
# The formulas.

def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    features = gaussian_features(500, 16)
    reference = reference_from_features(features)
    assert abs(frechet_distance(features, reference)) < 1e-6
    fids = [frechet_distance(features + shift, reference) for shift in (0.5, 1.0, 2.0)]
    # a mean shift s in every one of 16 dimensions adds 16 s^2 and nothing else
    np.testing.assert_allclose(fids, [16 * 0.25, 16 * 1.0, 16 * 4.0], rtol=1e-6)


def test_fid_matches_a_direct_scipy_computation_on_the_same_features():
    samples = gaussian_features(200, 8, seed=1) * torch.linspace(0.5, 2.0, 8) + 0.3
    mixing = torch.randn(8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference_features = gaussian_features(300, 8, seed=2) @ mixing
    fid = frechet_distance(samples, reference_from_features(reference_features))
    assert fid > 1
    assert fid == pytest.approx(direct_fid(samples, reference_features), rel=1e-6)


def test_inception_score_is_one_for_uniform_and_the_class_count_for_confident_balanced():
    uniform = torch.zeros(100, 1008, dtype=torch.float64)
    assert inception_score(uniform, splits=10) == pytest.approx((1.0, 0.0))
    n_classes = 7
    confident = 50.0 * torch.eye(1008, dtype=torch.float64)[torch.arange(700) % n_classes]
    assert inception_score(confident, splits=1)[0] == pytest.approx(n_classes, rel=1e-6)
    # ten random splits of 70 images are not exactly
    # balanced: each scores a little under the class count
    assert n_classes - 1 < inception_score(confident, splits=10)[0] < n_classes


# --------------------------------------------------------------------------------------------------
# The weights file.

def test_missing_weights_offline_is_one_line_naming_the_file_and_the_flag(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch_home"),
           "https_proxy": "http://127.0.0.1:9",
           # an empty hub cache and a proxy that refuses: no network
           "HTTPS_PROXY": "http://127.0.0.1:9"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "eval_wrn_ebm.py"), "--eval",
                             "sample_quality",
                             "--load_path", str(tmp_path / "never_read.pt"), "--save_dir",
                             str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert WEIGHTS_FILE in lines[0] and "--inception_weights" in lines[0]
    assert "Traceback" not in result.stderr


def test_a_file_that_is_not_the_inception_state_dict_is_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="is not the Inception state dict"):
        Inception(str(path), torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# The mode end to end.

@pytest.fixture(scope="module")
def small_buffer_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's weights with its replay buffer cut to N_IMAGES images (the paper's two
    keys)."""
    ckpt = load_checkpoint(tiny_checkpoint)
    buffer = ckpt["replay_buffer"][:N_IMAGES].clone()
    path = tmp_path_factory.mktemp("small_buffer") / "ckpt.pt"
    torch.save({"model_state_dict": ckpt["model_state_dict"], "replay_buffer": buffer}, path)
    return str(path), buffer


def run_sample_quality(checkpoint, save_dir, weights, cache, *flags):
    eval_wrn_ebm.main(["--eval", "sample_quality", "--load_path", checkpoint, "--save_dir",
                       str(save_dir),
                       "--device", "cpu", "--print_to_log", "--inception_weights", weights,
                       "--fid_cache",
                       str(cache), "--fid_reference", "synthetic", "--max_images", str(N_IMAGES),
                       "--is_splits", "2", *flags])
    with open(os.path.join(save_dir, "sample_quality.json")) as fh:
        return json.load(fh)


def test_sample_quality_scores_the_whole_buffer_and_caches_the_reference(small_buffer_checkpoint,
                                                                         inception_weights,
                                                                         tmp_path):
    checkpoint, buffer = small_buffer_checkpoint
    cache = tmp_path / "cache"
    first = run_sample_quality(checkpoint, tmp_path / "first", inception_weights, cache)
    assert not first["reference_cache_hit"]
    assert os.listdir(cache) == [os.path.basename(first["reference_cache"])]
    assert (first["n_samples"], first["n_reference"], first["is_splits"]) == (N_IMAGES, N_IMAGES, 2)
    assert first["reference"] == "synthetic" and first["samples"] == "buffer"
    with open(inception_weights, "rb") as fh:
        assert first["inception_weights_sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert first["args"]["inception_weights"] == inception_weights
    assert first["inception_score"] >= 1 - 1e-9
    assert np.isfinite(first["fid"]) and np.isfinite(first["kid"])

    # the FID is that of the buffer's own features against the reference's, computed directly
    inception = Inception(inception_weights, torch.device("cpu"))
    pool, _ = inception.features(tensor_batches(buffer), quiet=True)
    with np.load(first["reference_cache"]) as stored:
        reference = {"mu": stored["mu"], "sigma": stored["sigma"]}
    assert first["fid"] == pytest.approx(frechet_distance(pool, reference), rel=1e-9)

    second = run_sample_quality(checkpoint, tmp_path / "second", inception_weights, cache)
    assert second["reference_cache_hit"] and second["reference_cache"] == first["reference_cache"]
    for key in ("inception_score", "inception_score_std", "fid", "kid"):
        assert second[key] == first[key]

    # another reference (fewer images) gets its own statistics, never the cached ones
    other = run_sample_quality(checkpoint, tmp_path / "other", inception_weights, cache,
                               "--max_images", "4")
    assert not other["reference_cache_hit"] and other["n_reference"] == 4
    assert len(os.listdir(cache)) == 2


def test_sample_quality_reads_a_buffer_file(small_buffer_checkpoint, inception_weights, tmp_path):
    checkpoint, buffer = small_buffer_checkpoint
    buffer_file = tmp_path / "uncond_samples_buffer.pt"
    torch.save({"replay_buffer": buffer[:4]}, buffer_file)
    result = run_sample_quality(checkpoint, tmp_path / "out", inception_weights, tmp_path / "cache",
                                "--samples", str(buffer_file), "--max_images", "2")
    assert result["n_samples"] == 4 and result["samples"] == str(buffer_file)
    assert result["kid_subset_size"] == 2


# --------------------------------------------------------------------------------------------------
# During training: --fid_every.

def loose_images(folder, n):
    """A folder of n loose PNG images (a reference set with no class folders)."""
    images, _ = make_synthetic("test")
    os.makedirs(folder)
    for i in range(n):
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    return str(folder)


def train_tiny(folder, save_dir, *flags):
    """One epoch of a WRN-10-1 JEM on the tiny folder, logging its 8-image buffer's sample quality
    against 4 reference images; returns the metrics records."""
    reference = loose_images(save_dir.parent / "reference", 4)
    train_wrn_ebm.main(["--dataset", folder, "--depth", "10", "--width", "1", "--n_steps", "1",
                        "--batch_size", "16",
                        "--n_epochs", "1", "--n_valid", "8", "--buffer_size", "8", "--n_workers",
                        "0",
                        "--device", "cpu", "--save_dir", str(save_dir), "--print_to_log",
                        "--fid_every", "1",
                        "--fid_reference", reference, "--is_splits", "2", *flags])
    with open(save_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def test_fid_every_logs_the_buffer_sample_quality_into_metrics_jsonl(tiny_image_folder,
                                                                     inception_weights, tmp_path):
    records = train_tiny(tiny_image_folder, tmp_path / "run", "--inception_weights",
                         inception_weights, "--fid_cache", str(tmp_path / "cache"))
    quality = [r for r in records if r["kind"] == "sample_quality"]
    assert len(quality) == 1 and quality[0]["epoch"] == 0 and quality[0]["n_samples"] == 8
    assert np.isfinite(quality[0]["fid"]) and quality[0]["inception_score"] >= 1 - 1e-9


def test_fid_every_without_weights_warns_and_trains_on(tiny_image_folder, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    records = train_tiny(tiny_image_folder, tmp_path / "run")
    assert not [r for r in records if r["kind"] == "sample_quality"]
    assert (tmp_path / "run" / "last_ckpt.pt").exists()
    with open(tmp_path / "run" / "log.txt") as fh:
        warnings = [line for line in fh if "warning: --fid_every is skipped" in line]
    assert len(warnings) == 1
    assert WEIGHTS_FILE in warnings[0] and "--inception_weights" in warnings[0]

