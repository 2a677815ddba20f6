"""SGLD sampling from the JEM energy with a replay buffer (persistent contrastive divergence).

The chain is x <- x + sgld_lr * d score(x)/dx + sgld_std * N(0, I), where score = -E. The step size and
the noise scale are decoupled on purpose, as in the paper (not the textbook sgld_lr/2 and sqrt(sgld_lr)).
"""
import weakref
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
        """Store samples at their start indices; where an index was drawn twice, the later chain wins.

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


def sgld(score_fn, x, n_steps, sgld_lr, sgld_std):
    """n_steps of SGLD ascent on score_fn (per-example scores, shape (N,)); returns detached samples."""
    x = x.detach().clone().requires_grad_(True)
    for _ in range(n_steps):
        grad, = torch.autograd.grad(score_fn(x).sum(), x)
        with torch.no_grad():
            # The step is summed before it is added, as in the paper, so that samples round alike.
            x.add_(torch.randn_like(x).mul_(sgld_std).add_(grad, alpha=sgld_lr))
    return x.detach()


class CapturedChain:
    """The SGLD chain for one batch shape captured once as a CUDA graph, then replayed.

    A replay launches all n_steps forward and input-gradient passes without Python, which is what
    bounds small networks on a GPU. The graph reads the parameters where they live, so in-place
    optimizer updates are seen; it is only valid while they stay there (no `.to()`, no
    `load_state_dict(assign=True)` afterwards). The generator's state is put back after warm-up and
    capture, so replays draw the SGLD noise that the eager chain would have drawn.
    """

    WARMUP_CHAINS = 2  # cuDNN autotuning, lazy initialisation and torch.compile happen before capture

    def __init__(self, model, starts, y, n_steps, sgld_lr, sgld_std):
        self.starts = starts.clone()
        self.y = None if y is None else y.clone()  # labels are read from here on every replay

        def chain():
            return sgld(lambda x: model(x, self.y), self.starts, n_steps, sgld_lr, sgld_std)

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


def captured_chain(model, starts, y, n_steps, sgld_lr, sgld_std):
    """The CUDA graph of this chain for this model, captured on first use."""
    key = (tuple(starts.shape), y is None, n_steps, sgld_lr, sgld_std, torch.is_autocast_enabled("cuda"),
           torch.get_autocast_dtype("cuda"))
    chains = _captured_chains.setdefault(model, {})
    if key not in chains:
        chains[key] = CapturedChain(model, starts, y, n_steps, sgld_lr, sgld_std)
    return chains[key]


def sample_q(model, replay_buffer, n, y=None, n_steps=20, sgld_lr=1.0, sgld_std=0.01, cuda_graph=False):
    """Draw n samples from the model (class-conditional when y is given) and update the buffer.

    The model runs in eval mode with frozen parameters during the chain; its previous mode and
    parameter flags are restored afterwards. cuda_graph=True replays a captured chain (see
    CapturedChain) when the buffer is on a GPU; elsewhere it is ignored.
    """
    starts, inds = replay_buffer.sample_start(n, y)
    was_training = model.training
    model.eval()
    with frozen_parameters(model):
        if cuda_graph and starts.is_cuda:
            samples = captured_chain(model, starts, y, n_steps, sgld_lr, sgld_std)(starts, y)
        else:
            samples = sgld(lambda x: model(x, y), starts, n_steps, sgld_lr, sgld_std)
    model.train(was_training)
    replay_buffer.write(inds, samples)
    return samples
