"""Where SGLD chains start: uniform noise (the paper) or per-class Gaussians fitted to the training
images (JEM++'s and SADA-JEM's "informative initialisation").

Both give a replay buffer's first images (`fill`) and the fresh starts that replace a buffer image
with probability reinit_freq (`sample`), so the buffer and the chain never ask which one they hold.
"""
import hashlib

import torch

from jem.errors import UserError

IMAGE_SHAPE = (3, 32, 32)
RIDGE = 1e-4  # added to each class covariance, as JEM++ does: the covariance of images is singular


def uniform_noise(n, device, shape=IMAGE_SHAPE):
    """Fresh chain starts: uniform in [-1, 1], the range of normalised pixels."""
    return torch.empty(n, *shape, device=device).uniform_(-1, 1)


class UniformNoise:
    """The paper's chain starts: uniform noise for the buffer and for every restart."""

    def fill(self, size, n_classes, device):
        return uniform_noise(size, device)

    def sample(self, n, device):
        return uniform_noise(n, device)

    def restart(self, starts, reinit):
        """starts with the rows where reinit is True replaced by fresh ones."""
        fresh = uniform_noise(len(starts), starts.device)
        return torch.where(reinit[:, None, None, None], fresh, starts)


class ClassGaussians:
    """One Gaussian N(mean_c, cov_c + RIDGE * I) per class c over flattened images, clamped to [-1,
    1].

    Held as the means (n_classes, D) and the Cholesky factors of the covariances (n_classes, D, D),
    so a sample is mean_c + L_c z with z ~ N(0, I).
    """

    def __init__(self, mean, scale_tril):
        self.mean, self.scale_tril = mean, scale_tril

    @property
    def n_classes(self):
        return len(self.mean)

    @classmethod
    def fit(cls, loader, n_classes):
        """The per-class mean and (biased, as JEM++) covariance of every image a loader yields."""
        images, labels = zip(*((x.flatten(1).float(), y) for x, y in loader))
        images, labels = torch.cat(images), torch.cat(labels)
        dim = images.shape[1]
        means = torch.zeros(n_classes, dim)
        covariances = torch.zeros(n_classes, dim, dim)
        for c in range(n_classes):  # one matrix product per class over all of its images
            members = images[labels == c]
            if len(members) == 0:
                raise UserError(f"class {c} has no training images, so --buffer_init informative "
                                "cannot fit its Gaussian; use --buffer_init uniform")
            means[c] = members.mean(0)
            centred = members - means[c]
            covariances[c] = centred.T @ centred / len(members)
        # float64: the ridge is 1e-4 next to eigenvalues in
        # the hundreds, too far apart for a float32 Cholesky
        ridge = RIDGE * torch.eye(dim, dtype=torch.float64)
        scale_tril = torch.stack([torch.linalg.cholesky(cov.double() + ridge).float()
                                  for cov in covariances])

        return cls(means, scale_tril)

    def to(self, device):
        return ClassGaussians(self.mean.to(device), self.scale_tril.to(device))

    def sample(self, n, device, classes=None):
        """n images, of the given classes or of uniformly random ones (as JEM++ restarts its
        chains)."""
        if classes is None:
            classes = torch.randint(0, self.n_classes, (n,), device=device)
        noise = torch.randn(n, self.mean.shape[1], device=device)
        images = self.mean[classes]
        for c in classes.unique():  # a loop over classes, each one batched product over its images
            members = classes == c
            images[members] += noise[members] @ self.scale_tril[c].T
        return images.clamp_(-1, 1).view(n, *IMAGE_SHAPE)

    def restart(self, starts, reinit):
        """starts with the rows where reinit is True replaced by fresh ones (of random classes, as
        JEM++ does for class-conditional chains too); only those are drawn: each class's draw reads
        its whole factor."""
        starts = starts.clone()
        starts[reinit] = self.sample(int(reinit.sum()), starts.device)
        return starts

    def fill(self, size, n_classes, device):
        """A buffer of size // n_classes images of each class in class order (the segments of
        class-conditional sampling), any remainder of random classes."""
        per_class = size // n_classes
        classes = torch.arange(n_classes, device=device).repeat_interleave(per_class)
        classes = torch.cat([classes,
                             torch.randint(0, n_classes, (size - len(classes),), device=device)])
        return self.sample(size, device, classes)

    def fingerprint(self):
        """SHA-256 of the fitted statistics: whether a refit (on --resume) gave the same numbers,
        bit for bit."""
        digest = hashlib.sha256()
        for tensor in (self.mean, self.scale_tril):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()
