"""Chain initialisation: the per-class Gaussians of --buffer_init informative."""
import numpy as np
import torch

from jem.chain_init import ClassGaussians, RIDGE, UniformNoise
from jem.sampler import ReplayBuffer

D = 3 * 32 * 32


def test_fit_matches_numpy_means_and_covariances():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(30, 3, 32, 32, generator=gen) * 0.2 \
        + torch.linspace(-0.5, 0.5, 3)[:, None, None]

    labels = torch.arange(30) % 3
    loader = [(images[:16], labels[:16]), (images[16:], labels[16:])]  # any iterable of batches
    gaussians = ClassGaussians.fit(loader, n_classes=3)
    for c in range(3):
        members = images[labels == c].flatten(1).double().numpy()
        np.testing.assert_allclose(gaussians.mean[c].numpy(), members.mean(0), atol=1e-6)
        factor = gaussians.scale_tril[c].double()
        expected = np.cov(members, rowvar=False, bias=True) + RIDGE * np.eye(D)
        np.testing.assert_allclose((factor @ factor.T).numpy(), expected, atol=1e-5)


def test_samples_have_the_fitted_moments():
    """Two correlated pixels per class; everything small enough that the clamp to [-1, 1] never
    bites."""
    mean = torch.zeros(2, D)
    mean[0, :2], mean[1, :2] = torch.tensor([0.3, -0.2]), torch.tensor([-0.4, 0.1])
    cov = torch.eye(D) * 1e-4
    cov[:2, :2] = torch.tensor([[0.01, 0.008], [0.008, 0.02]])
    gaussians = ClassGaussians(mean, torch.linalg.cholesky(cov).repeat(2, 1, 1))
    torch.manual_seed(0)
    classes = torch.arange(2).repeat_interleave(2000)
    samples = gaussians.sample(4000, "cpu", classes).flatten(1)[:, :2]
    for c in range(2):
        drawn = samples[classes == c].double()
        torch.testing.assert_close(drawn.mean(0), mean[c, :2].double(), atol=0.01, rtol=0)
        torch.testing.assert_close(drawn.T.cov(), cov[:2, :2].double(), atol=2e-3, rtol=0)


def test_informative_buffer_holds_class_segments_and_restarts_draw_from_the_gaussians():
    # class c: every pixel near its own level
    mean = torch.linspace(-0.8, 0.8, 4)[:, None].repeat(1, D)
    gaussians = ClassGaussians(mean, (torch.eye(D) * 1e-3).repeat(4, 1, 1))
    torch.manual_seed(0)
    buffer = ReplayBuffer(40, 4, reinit_freq=1.0, device="cpu", chain_init=gaussians)
    levels = buffer.images.flatten(1).mean(1)
    torch.testing.assert_close(levels, mean[:, 0].repeat_interleave(10), atol=1e-3, rtol=0)
    buffer.images.fill_(5.0)  # never a Gaussian draw: shows which starts were restarted
    starts, _ = buffer.sample_start(200)
    assert starts.abs().max() <= 1  # all restarted (reinit_freq 1), clamped to [-1, 1]
    drawn_levels = starts.flatten(1).mean(1)
    nearest = (drawn_levels[:, None] - mean[:, 0]).abs().argmin(1)
    assert set(nearest.tolist()) == {0, 1, 2, 3}  # random classes


def test_uniform_restart_keeps_the_buffer_rows_it_does_not_restart():
    starts = torch.full((6, 3, 32, 32), 5.0)
    reinit = torch.tensor([True, False, True, False, False, False])
    out = UniformNoise().restart(starts, reinit)
    assert (out[~reinit] == 5).all() and out[reinit].abs().max() <= 1


def test_the_fingerprint_tells_a_refit_of_other_numbers():
    gaussians = ClassGaussians(torch.zeros(2, D), torch.eye(D).repeat(2, 1, 1))
    same = ClassGaussians(torch.zeros(2, D), torch.eye(D).repeat(2, 1, 1))
    assert gaussians.fingerprint() == same.fingerprint()
    same.scale_tril[1, 5, 3] = 1e-7  # one number off in its last digits
    assert gaussians.fingerprint() != same.fingerprint()


def quick_fit(loader, n_classes):
    """A stand-in for ClassGaussians.fit where the fit's cost (ten float64 Cholesky factorisations
    of 3072 x 3072, seconds on one core) buys a test nothing: the class means of the images, and a
    small isotropic spread."""
    images, labels = zip(*((x.flatten(1), y) for x, y in loader))
    images, labels = torch.cat(images), torch.cat(labels)
    means = torch.stack([images[labels == c].mean(0) for c in range(n_classes)])
    return ClassGaussians(means, (0.1 * torch.eye(D)).expand(n_classes, D, D))
