"""Langevin sampling from the JEM energy with a replay buffer (persistent contrastive divergence).

Two samplers, chosen by in_steps, each step following g = d score(x)/dx where score = -E:

- SGLD (the paper; in_steps = 0): x <- x + sgld_lr * g + sgld_std * N(0, I). The step size and the
  noise scale are decoupled on purpose, as in the paper (not the textbook sgld_lr/2 and
  sqrt(sgld_lr)).
- PYLD (JEM++; in_steps > 0): g clipped to [-eps, eps], then in_steps steps of pyld_lr along it,
  each followed by a clamp to [-1, 1]; see `pyld_step`.

Where chains start (uniform noise or per-class Gaussians) is chain_init.py's business.
"""
import weakref
from contextlib import contextmanager
from dataclasses import astuple, dataclass
from functools import partial

import torch

from jem.chain_init import UniformNoise


@dataclass(frozen=True)
class ChainSettings:
    """How a chain moves; the paper's SGLD by default, JEM++'s PYLD when in_steps > 0 and pyld_lr >
    0."""

    n_steps: int = 20  # Langevin steps per sample
    sgld_lr: float = 1.0  # step along the score's gradient (PYLD: an optional clipped first step)
    sgld_std: float = 0.01  # std of the Gaussian noise added each step
    in_steps: int = 0  # PYLD: inner steps along the clipped gradient (0: SGLD)
    pyld_lr: float = 0.2  # PYLD: inner step size (<= 0: no inner steps)
    eps: float = 1.0  # PYLD: the gradient is clipped to [-eps, eps]
    train_mode: bool = False  # the model in training mode (JEM++'s batch norm: batch statistics)
    cuda_graph: bool = False  # replay the chain as a captured CUDA graph (GPU only)

    @property
    def is_pyld(self):
        return self.in_steps > 0 and self.pyld_lr > 0


class ReplayBuffer:
    """A store of past SGLD samples that chains restart from.

    For class-conditional sampling the buffer is split into n_classes contiguous segments of
    size // n_classes images, segment y holding chains of class y. A size of 0 means no buffer:
    every chain starts from fresh noise (short-run sampling).
    """

    def __init__(self, size, n_classes, reinit_freq, device, images=None, chain_init=None):
        self.n_classes = n_classes
        self.reinit_freq = reinit_freq
        self.chain_init = chain_init or UniformNoise()
        self.images = self.chain_init.fill(size, n_classes, device) if images is None \
            else images.to(device)

    def __len__(self):
        return len(self.images)

    @property
    def device(self):
        return self.images.device

    def can_condition(self):
        return len(self) > 0 and len(self) % self.n_classes == 0

    def sample_start(self, n, y=None):
        """Chain starts for n chains (of classes y if given) and the buffer indices they came from.

        Each start is replaced by a fresh one (from chain_init) with probability reinit_freq.
        Indices are None when there is no buffer.
        """
        if len(self) == 0:
            return self.chain_init.sample(n, self.device), None
        if y is None:
            inds = torch.randint(0, len(self), (n,), device=self.device)
        else:
            segment = len(self) // self.n_classes
            inds = y.to(self.device) * segment + torch.randint(0, segment, (n,), device=self.device)
        reinit = torch.rand(n, device=self.device) < self.reinit_freq
        return self.chain_init.restart(self.images[inds], reinit), inds

    def write(self, inds, samples):
        """Store samples at their start indices; where an index was drawn twice, the later chain
        wins.

        A plain `images[inds] = samples` with repeated indices may interleave the pixels of both
        chains (the write order is undefined), so each index is written once.
        """
        if inds is None:
            return
        unique, position = torch.unique(inds, return_inverse=True)
        order = torch.arange(len(inds), device=inds.device)
        last = torch.zeros_like(unique).scatter_reduce_(0, position, order, reduce="amax")
        self.images[unique] = samples.detach()[last].to(self.images.dtype)


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


def sgld_step(x, grad, sgld_lr, sgld_std):
    """The paper's step, in place."""
    # The step is summed before it is added, as in the paper, so that samples round alike.
    x.add_(torch.randn_like(x).mul_(sgld_std).add_(grad, alpha=sgld_lr))


def pyld_step(x, grad, sgld_lr, sgld_std, in_steps, pyld_lr, eps):
    """JEM++'s step, in place, in their order: an optional clipped outer step of sgld_lr and a
    clamp, in_steps inner steps of pyld_lr each followed by a clamp, then noise of sgld_std (not
    clamped).

    Their inner steps re-differentiate only the first convolution, <conv1(x), p> with p the score's
    gradient at conv1's output. The convolution is linear, so that gradient is conv1^T p = grad at
    every inner iterate (tests/test_sampler.py checks it): the inner steps cost no network pass
    here.
    """
    clipped = grad.clamp(-eps, eps)
    # Each step is multiplied out before it is added, as theirs: add_(alpha=) fuses the two into one
    # FMA on AVX2/AVX-512, an ulp per pixel that batch norm magnifies over iterations.
    if sgld_lr > 0:
        x.add_(clipped * sgld_lr).clamp_(-1, 1)
    inner_step = clipped * pyld_lr
    for _ in range(in_steps):
        x.add_(inner_step).clamp_(-1, 1)
    if sgld_std > 0:
        x.add_(torch.randn_like(x), alpha=sgld_std)


def sgld(score_fn, x, chain):
    """chain.n_steps of Langevin ascent on score_fn (per-example scores, shape (N,)); returns
    detached samples. SGLD steps, or PYLD steps for chain.is_pyld (JEM++ turns its inner steps off
    for a pyld_lr <= 0)."""
    if chain.is_pyld:
        step = partial(pyld_step, sgld_lr=chain.sgld_lr, sgld_std=chain.sgld_std,
                       in_steps=chain.in_steps, pyld_lr=chain.pyld_lr, eps=chain.eps)
    else:
        step = partial(sgld_step, sgld_lr=chain.sgld_lr, sgld_std=chain.sgld_std)
    x = x.detach().clone().requires_grad_(True)
    with uncached_autocast(x.device.type):
        for _ in range(chain.n_steps):
            grad, = torch.autograd.grad(score_fn(x).sum(), x)
            with torch.no_grad():
                step(x, grad)
    return x.detach()


def uncached_autocast(device_type):
    """The caller's autocast (on or off, same dtype) without its cache of low-precision copies.

    Autocast keeps the bf16 copy of a leaf tensor that requires grad, by identity, until its
    outermost region ends. The chain's x is such a leaf and moves in place every step: with the
    cache, every step after the first would see the chain's start again, and a bf16 chain would
    climb along its first gradient only (docs/performance.md, "bf16 that learns").
    """
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                          enabled=torch.is_autocast_enabled(device_type), cache_enabled=False)


class CapturedChain:
    """The SGLD chain for one batch shape captured once as a CUDA graph, then replayed.

    A replay launches all n_steps forward and input-gradient passes without Python, which is what
    bounds small networks on a GPU. The graph reads the parameters where they live, so in-place
    optimizer updates are seen; it is only valid while they stay there (no `.to()`, no
    `load_state_dict(assign=True)` afterwards). The generator's state is put back after warm-up and
    capture, so replays draw the SGLD noise that the eager chain would have drawn.
    """

    WARMUP_CHAINS = 2  # cuDNN autotuning, lazy set-up and torch.compile happen before capture

    def __init__(self, model, starts, y, settings):
        self.starts = starts.clone()
        self.y = None if y is None else y.clone()  # labels are read from here on every replay

        def chain():
            return sgld(lambda x: model(x, self.y), self.starts, settings)

        rng_state = torch.cuda.get_rng_state(starts.device)
        side_stream = torch.cuda.Stream(starts.device)
        side_stream.wait_stream(torch.cuda.current_stream(starts.device))
        with torch.cuda.stream(side_stream):
            for _ in range(self.WARMUP_CHAINS):
                chain()
        torch.cuda.current_stream(starts.device).wait_stream(side_stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.samples = chain()
        torch.cuda.set_rng_state(rng_state, starts.device)

    def __call__(self, starts, y):
        self.starts.copy_(starts)
        if y is not None:
            self.y.copy_(y)
        self.graph.replay()
        return self.samples.clone()  # the next replay overwrites self.samples


# model -> {chain shape and settings: CapturedChain}. Weak keys: a chain holds no reference to its
# model, so the graphs and their memory go when the model does.
_captured_chains = weakref.WeakKeyDictionary()


def captured_chain(model, starts, y, chain):
    """The CUDA graph of this chain for this model, captured on first use."""
    key = (tuple(starts.shape), y is None, *astuple(chain), torch.is_autocast_enabled("cuda"),
           torch.get_autocast_dtype("cuda"))
    chains = _captured_chains.setdefault(model, {})
    if key not in chains:
        chains[key] = CapturedChain(model, starts, y, chain)
    return chains[key]


def sample_q(model, replay_buffer, n, y=None, chain=ChainSettings()):
    """Draw n samples from the model (class-conditional when y is given) and update the buffer.

    The chain runs with frozen parameters, the model in eval mode as in the paper, or in training
    mode with chain.train_mode (JEM++'s batch norm: statistics of the chain's own batch); the
    previous mode and parameter flags are restored afterwards. chain.cuda_graph replays a captured
    chain (see CapturedChain) when the buffer is on a GPU; elsewhere it is ignored.
    """
    starts, inds = replay_buffer.sample_start(n, y)
    was_training = model.training
    model.train(chain.train_mode)
    with frozen_parameters(model):
        if chain.cuda_graph and starts.is_cuda:
            samples = captured_chain(model, starts, y, chain)(starts, y)
        else:
            samples = sgld(lambda x: model(x, y), starts, chain)
    model.train(was_training)
    replay_buffer.write(inds, samples)
    return samples
