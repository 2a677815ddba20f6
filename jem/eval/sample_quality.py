"""Inception Score, FID and KID of a set of samples, measured as the JEM papers report them.

The network and the statistics come from torch-fidelity (its port of the 2015 TensorFlow Inception,
`pt_inception-2015-12-05`, the one the original FID code uses, with TensorFlow's resize), so numbers
are comparable with published ones. This module only feeds it images and caches the reference side:
the mean, covariance and a subset of the pool features of the reference set, in one .npz per
(reference, image count, weights file, library version).
"""
import hashlib
import json
import os
import re

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import (URL_INCEPTION_V3,
                                                          FeatureExtractorInceptionV3)

from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from tqdm import tqdm

from jem.eval.datasets import load_eval_dataset, one_size_batches
from jem.errors import UserError

WEIGHTS_FILE = os.path.basename(URL_INCEPTION_V3)  # weights-inception-2015-12-05-6726825d.pth
# FID/KID features and IS logits, torch-fidelity's defaults
POOL, LOGITS = "2048", "logits_unbiased"
INCEPTION_BATCH_SIZE = 50  # images per Inception pass (299x299 inside: memory grows fast)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults
# reference features kept in the cache for KID (the whole set would be 400 MB)
KID_REFERENCE_SIZE = 10000
SEED = 2020  # torch-fidelity's seed for the IS shuffle and the KID subsets


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jem",
                        "inception_stats")


def add_sample_quality_flags(parser):
    """The flags every IS/FID measurement needs (evaluation mode and the training log share
    them)."""
    add = parser.add_argument_group("sample quality (Inception Score, FID, KID)").add_argument
    add("--inception_weights", type=str, default=None,
        help=f"local path of {WEIGHTS_FILE} (offline machines); default: torch "
             f"hub's cache, downloaded there from {URL_INCEPTION_V3} when missing")
    add("--fid_reference", type=str, default="cifar_train",
        help="reference set of FID/KID: any evaluation data set name or image folder (the papers: "
             "cifar_train, 50 000 images)")
    add("--fid_cache", type=str, default=None,
        help="folder of the cached reference statistics (default: "
             "$XDG_CACHE_HOME/jem/inception_stats, else ~/.cache/jem/inception_stats)")
    add("--is_splits", type=int, default=10,
        help="Inception Score: mean and std over this many splits")


# --------------------------------------------------------------------------------------------------
# The network.

def inception_weights_path(path=None):
    """The weights file: `path` if given, else torch hub's copy, downloaded there when missing.

    Never falls back to other weights: without the file the numbers would not be comparable.
    """
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"--inception_weights {path}: no such file (it should be "
                            f"{WEIGHTS_FILE})")
        return path
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)
    if not os.path.isfile(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            # The name's suffix is the start of the file's
            # SHA-256 (torch hub's convention): checked.
            torch.hub.download_url_to_file(URL_INCEPTION_V3, cached,
                                           hash_prefix=WEIGHTS_FILE.split("-")[-1][:8],
                                           progress=False)
        # no network, proxy, disk, wrong hash: all end the same way for the user
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"the FID Inception weights {WEIGHTS_FILE} are needed and could not be "
                            f"downloaded ({reason}): fetch {URL_INCEPTION_V3} on a machine with "
                            "network and pass --inception_weights PATH") from None
    return cached


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Inception:
    """torch-fidelity's TF-Inception on `device`: pool features and logits of uint8 images, any
    size."""

    def __init__(self, weights_path, device):
        try:
            # torch-fidelity loads the file with weights_only=False; load it safely
            # first, so a file that holds code is refused before the library touches it.
            torch.load(weights_path, map_location="cpu", weights_only=True)
            network = FeatureExtractorInceptionV3("inception-v3-compat", [POOL, LOGITS],
                                                  feature_extractor_weights_path=weights_path)
        except Exception as e:
            raise UserError(f"{weights_path} is not the Inception state dict {WEIGHTS_FILE} "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.network = network.to(device)
        self.device = device
        self.weights_path = weights_path
        self.weights_sha256 = sha256_of(weights_path)

    @torch.no_grad()
    def features(self, uint8_batches, total=None, desc="Inception", quiet=False):
        """(pool features (N, 2048), logits (N, 1008)), float64 on the CPU, of batches of uint8
        images."""
        pools, logits = [], []
        # float32 whatever the caller's autocast: bf16 features
        # would not be comparable with published numbers
        with torch.autocast(self.device.type, enabled=False):
            for batch in tqdm(uint8_batches, total=total, desc=desc, leave=False, disable=quiet):
                pool, logit = self.network(batch.to(self.device))
                pools.append(pool.double().cpu())
                logits.append(logit.double().cpu())
        return torch.cat(pools), torch.cat(logits)


# --------------------------------------------------------------------------------------------------
# Images.

def to_uint8(images):
    """Pixels in [-1, 1] (this project's buffers and data) as uint8 in [0, 255]."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def tensor_batches(images):
    """A tensor of images in [-1, 1], in uint8 batches."""
    for batch in images.split(INCEPTION_BATCH_SIZE):
        yield to_uint8(batch)


def dataset_batches(dataset):
    """A data set serving pixels in [0, 1] (load_eval_dataset(normalize=False)), in uint8
    batches."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=INCEPTION_BATCH_SIZE, shuffle=False)
    for x, _ in one_size_batches(loader):
        yield (x * 255).round().clamp(0, 255).to(torch.uint8)


def load_buffer_file(path):
    """The images of a buffer file written by uncond_samples / cond_samples (key replay_buffer)."""
    try:
        images = torch.load(path, map_location="cpu", weights_only=True).get("replay_buffer")
    except Exception as e:
        raise UserError(f"cannot read the buffer file {path} ({type(e).__name__}): it should be a "
                        "<mode>_buffer.pt written by uncond_samples or cond_samples") from None
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        raise UserError(f"{path}: its replay_buffer should be a tensor of images of shape (N, 3, "
                        "H, W)")
    return images


# --------------------------------------------------------------------------------------------------
# Reference statistics, cached.

def reference_from_features(pool):
    """What FID and KID need of the reference: mean and covariance, and a seeded subset of the
    features."""
    keep = np.sort(np.random.RandomState(SEED).permutation(len(pool))[:KID_REFERENCE_SIZE])
    return {**fid_features_to_statistics(pool), "kid_features": pool[keep].float().numpy()}


def reference_key(name, n_images, inception):
    """Everything that changes the reference statistics; the cache file is named after its hash."""
    return {"reference": os.path.abspath(name) if os.path.isdir(name) else name,
            "n_images": n_images,
            "weights_sha256": inception.weights_sha256,
            "torch_fidelity": torch_fidelity.__version__, "kid_reference_size": KID_REFERENCE_SIZE}


def cache_path(cache_dir, key):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(key["reference"])))
    return os.path.join(cache_dir, f"{stem}-{key['n_images']}-{digest}.npz")


def reference_statistics(inception, name, dataset, cache_dir, quiet=False):
    """{mu, sigma, kid_features, n_images, cache, cache_hit} of a reference data set (pixels in [0,
    1]).

    Read from the cache when this exact key was measured before, else measured and written there.
    """
    key = reference_key(name, len(dataset), inception)
    path = cache_path(cache_dir, key)
    if os.path.isfile(path):
        with np.load(path) as stored:
            if json.loads(str(stored["key"])) == key:
                return {"mu": stored["mu"], "sigma": stored["sigma"],
                        "kid_features": stored["kid_features"],
                        "n_images": len(dataset), "cache": path, "cache_hit": True}
    n_batches = -(-len(dataset) // INCEPTION_BATCH_SIZE)
    pool, _ = inception.features(dataset_batches(dataset), total=n_batches,
                                 desc=f"reference {name}", quiet=quiet)
    stats = reference_from_features(pool)
    os.makedirs(cache_dir, exist_ok=True)
    # written whole, then renamed: never a half file under the name
    partial = f"{path}.{os.getpid()}.tmp.npz"
    np.savez(partial, **stats, key=json.dumps(key))
    os.replace(partial, path)
    return {**stats, "n_images": len(dataset), "cache": path, "cache_hit": False}


def load_reference(inception, name, data_root, cache_dir, celeba_root=None, max_images=None,
                   quiet=False):
    """The reference statistics of the evaluation data set `name` (clean images; the first
    max_images), cached in `cache_dir` (None: the per-user default, decided here so that a resumed
    run follows the machine it runs on)."""
    dataset = load_eval_dataset(name, data_root, 0.0, celeba_root, normalize=False)
    if max_images is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
    return reference_statistics(inception, name, dataset, cache_dir or default_cache_dir(),
                                quiet=quiet)


# --------------------------------------------------------------------------------------------------
# The numbers.

def inception_score(logits, splits):
    """exp E_x KL(p(y|x) || p(y)) per split of the shuffled samples: (mean, std) over the splits."""
    score = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=SEED)
    return score["inception_score_mean"], score["inception_score_std"]


def frechet_distance(pool, reference):
    """FID: the Frechet distance between Gaussians fitted to the samples' and the reference's
    features."""
    return fid_statistics_to_metric(fid_features_to_statistics(pool), reference, verbose=False)[
        "frechet_inception_distance"]


def kernel_distance(pool, reference):
    """KID: the unbiased MMD^2 (cubic kernel) over random subsets; (mean, std, subset size)."""
    reference_features = torch.from_numpy(reference["kid_features"]).double()
    subset_size = min(KID_SUBSET_SIZE, len(pool), len(reference_features))
    kid = kid_features_to_metric(pool, reference_features, kid_subsets=KID_SUBSETS,
                                 kid_subset_size=subset_size, rng_seed=SEED, verbose=False)
    return kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"], subset_size


def score_sample_quality(pool, logits, reference, is_splits):
    """IS (mean and std over `is_splits` splits), FID and KID of samples' Inception outputs vs a
    reference."""
    if len(pool) < max(2, is_splits):
        raise UserError(f"{len(pool)} samples are too few for --is_splits {is_splits} (and FID "
                        "needs at least 2)")
    is_mean, is_std = inception_score(logits, is_splits)
    kid, kid_std, kid_subset_size = kernel_distance(pool, reference)
    return {"inception_score": is_mean, "inception_score_std": is_std,
            "fid": frechet_distance(pool, reference), "kid": kid, "kid_std": kid_std,
            "kid_subset_size": kid_subset_size}


# --------------------------------------------------------------------------------------------------
# During training.

class BufferQuality:
    """--fid_every: the IS, FID and KID of a replay buffer; the network and reference stay loaded
    between calls."""

    def __init__(self, inception, reference, is_splits):
        self.inception, self.reference, self.is_splits = inception, reference, is_splits

    @classmethod
    def if_weights_available(cls, weights, reference, data_root, cache_dir, is_splits, device,
                             log, quiet=False):
        """The meter of the `reference` set's statistics, or None after a warning line when the
        weights file is neither given nor downloadable."""
        try:
            weights = inception_weights_path(weights)
        except UserError as e:
            log.line(f"warning: --fid_every is skipped: {e}")
            return None
        inception = Inception(weights, device)
        statistics = load_reference(inception, reference, data_root, cache_dir, quiet=quiet)
        return cls(inception, statistics, is_splits)

    def __call__(self, images):
        pool, logits = self.inception.features(tensor_batches(images), quiet=True)
        return score_sample_quality(pool, logits, self.reference, self.is_splits)
