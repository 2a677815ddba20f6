"""SGLD sampling from the JEM energy with a replay buffer (persistent contrastive divergence).

The chain is x <- x + sgld_lr * d score(x)/dx + sgld_std * N(0, I), where score = -E. The step size and
the noise scale are decoupled on purpose, as in the paper (not the textbook sgld_lr/2 and sqrt(sgld_lr)).
"""
from contextlib import contextmanager

import torch

IMAGE_SHAPE = (3, 32, 32)


def uniform_noise(n, device, shape=IMAGE_SHAPE):
    """Fresh chain starts: uniform in [-1, 1], the range of normalised pixels."""
    return torch.empty(n, *shape, device=device).uniform_(-1, 1)


class ReplayBuffer:
    """A store of past SGLD samples that chains restart from.

    For class-conditional sampling the buffer is split into n_classes contiguous segments of
    size // n_classes images, segment y holding chains of class y. A size of 0 means no buffer:
    every chain starts from fresh noise (short-run sampling).
    """

    def __init__(self, size, n_classes, reinit_freq, device, images=None):
        self.n_classes = n_classes
        self.reinit_freq = reinit_freq
        self.images = uniform_noise(size, device) if images is None else images.to(device)

    def __len__(self):
        return len(self.images)

    @property
    def device(self):
        return self.images.device

    def can_condition(self):
        return len(self) > 0 and len(self) % self.n_classes == 0

    def sample_start(self, n, y=None):
        """Chain starts for n chains (of classes y if given) and the buffer indices they came from.

        Each start is replaced by fresh noise with probability reinit_freq. Indices are None when
        there is no buffer.
        """
        if len(self) == 0:
            return uniform_noise(n, self.device), None
        if y is None:
            inds = torch.randint(0, len(self), (n,), device=self.device)
        else:
            segment = len(self) // self.n_classes
            inds = y.to(self.device) * segment + torch.randint(0, segment, (n,), device=self.device)
        reinit = torch.rand(n, device=self.device) < self.reinit_freq
        starts = torch.where(reinit[:, None, None, None], uniform_noise(n, self.device), self.images[inds])
        return starts, inds

    def write(self, inds, samples):
        if inds is not None:
            self.images[inds] = samples.detach().to(self.images.dtype)


@contextmanager
def frozen_parameters(model):
    """Parameters stop requiring gradients: the chain needs d/dx only, so autograd keeps less."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def sgld(score_fn, x, n_steps, sgld_lr, sgld_std):
    """n_steps of SGLD ascent on score_fn (per-example scores, shape (N,)); returns detached samples."""
    x = x.detach().clone().requires_grad_(True)
    for _ in range(n_steps):
        grad, = torch.autograd.grad(score_fn(x).sum(), x)
        with torch.no_grad():
            x.add_(grad, alpha=sgld_lr).add_(torch.randn_like(x), alpha=sgld_std)
    return x.detach()


def sample_q(model, replay_buffer, n, y=None, n_steps=20, sgld_lr=1.0, sgld_std=0.01):
    """Draw n samples from the model (class-conditional when y is given) and update the buffer.

    The model runs in eval mode with frozen parameters during the chain; its previous mode and
    parameter flags are restored afterwards.
    """
    starts, inds = replay_buffer.sample_start(n, y)
    was_training = model.training
    model.eval()
    with frozen_parameters(model):
        samples = sgld(lambda x: model(x, y), starts, n_steps, sgld_lr, sgld_std)
    model.train(was_training)
    replay_buffer.write(inds, samples)
    return samples
