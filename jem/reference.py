"""The paper's training iteration, written afresh the way its code ran it (`PaperIteration`), beside
the project's (`ProjectIteration`, the loop's own step), on identical inputs from one seed: what
bench.py times against each other and the tests compare.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jem.chain_init import ClassGaussians, UniformNoise
from jem.flags.train import parse_args as parse_train_args
from jem.flags.train import settings_from_args
from jem.model import JEM, build_model
from jem.optim import make_optimizer
from jem.sampler import ReplayBuffer
from jem.step import Batch, iteration_loss, to_training_device, update

REINIT_FREQ, SGLD_LR, SGLD_STD = 0.05, 1.0, 0.01  # the paper's


@dataclass(frozen=True)
class Config:
    depth: int
    width: int
    batch_size: int
    n_steps: int  # the paper's side; a recipe's side takes its own chain length
    recipe: str = "jem"  # train_wrn_ebm.py's --recipe of the project's side


CONFIGS = {
    "wrn-10-1": Config(depth=10, width=1, batch_size=32, n_steps=5),
    "wrn-16-2": Config(depth=16, width=2, batch_size=32, n_steps=10),
    "wrn-28-2": Config(depth=28, width=2, batch_size=64, n_steps=20),
    "wrn-28-10": Config(depth=28, width=10, batch_size=64, n_steps=20),  # the paper's
    # the later recipes against the paper's step of 20 SGLD steps on the same network and batch
    "jempp-wrn-10-1": Config(depth=10, width=1, batch_size=32, n_steps=20, recipe="jempp"),
    "sadajem-wrn-10-1": Config(depth=10, width=1, batch_size=32, n_steps=20, recipe="sadajem"),
    "jempp-wrn-28-10": Config(depth=28, width=10, batch_size=64, n_steps=20, recipe="jempp"),
    "sadajem-wrn-28-10": Config(depth=28, width=10, batch_size=64, n_steps=20, recipe="sadajem"),
}


# the paper's; the paper's side moves its starts and samples across each iteration
BUFFER_SIZE = 10000


N_CLASSES = 10


def make_inputs(config, device, seed):
    """(model on the CPU, buffer images on the CPU, (x_data, x_lab, y_lab) on the device)."""
    torch.manual_seed(seed)
    model = JEM(config.depth, config.width, n_classes=N_CLASSES)
    generator = torch.Generator().manual_seed(seed)
    buffer_images = torch.rand(BUFFER_SIZE, 3, 32, 32, generator=generator) * 2 - 1
    n = config.batch_size
    x_data = torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1
    x_lab = torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1
    y_lab = torch.randint(0, N_CLASSES, (n,), generator=generator)
    return model, buffer_images, tuple(t.to(device) for t in (x_data, x_lab, y_lab))


class PaperIteration:
    """The paper's train_wrn_ebm.py iteration (p(x) and p(y|x) terms, Adam), written afresh.

    Random numbers are drawn in the project's order (buffer indices, reinit mask, noise starts, then
    SGLD noise every step) so that both sides see the same numbers from one seed. The paper draws
    the start's randomness on the CPU, where its buffer lives; `rng_device` moves those draws to the
    training device, which only the equality check on a GPU uses (the project draws them there).
    """

    def __init__(self, model, buffer_images, config, device, rng_device="cpu"):
        self.model = model.to(device)
        self.replay_buffer = buffer_images.clone().cpu()
        self.config, self.device, self.rng_device = config, device, rng_device
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4, betas=(0.9, 0.999))

    def sample_start(self, n):
        inds = torch.randint(0, len(self.replay_buffer), (n,), device=self.rng_device).cpu()
        reinit = torch.rand(n, device=self.rng_device) < REINIT_FREQ
        choose_random = reinit.float().cpu()[:, None, None, None]
        random_samples = torch.empty(n, 3, 32, 32, device=self.rng_device).uniform_(-1, 1).cpu()
        starts = choose_random * random_samples + (1 - choose_random) * self.replay_buffer[inds]
        return starts.to(self.device), inds

    def sample_q(self):
        self.model.eval()
        starts, inds = self.sample_start(self.config.batch_size)
        x = starts.requires_grad_(True)
        for _ in range(self.config.n_steps):
            grad = torch.autograd.grad(self.model(x).sum(), [x], retain_graph=True)[0]
            with torch.no_grad():  # the paper writes `x.data += ...`
                x += SGLD_LR * grad + SGLD_STD * torch.randn_like(x)
        self.model.train()
        samples = x.detach()
        self.replay_buffer[inds] = samples.cpu()
        return samples

    def step(self, x_data, x_lab, y_lab):
        x_q = self.sample_q()
        l_p_x = -(self.model(x_data).mean() - self.model(x_q).mean())
        l_p_y_given_x = F.cross_entropy(self.model.classify(x_lab), y_lab)
        loss = l_p_x + l_p_y_given_x
        if loss.abs().item() > 1e8:  # the paper's divergence check, a device sync
            raise RuntimeError("the paper's step diverged")
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def buffer_images(self):
        return self.replay_buffer


class ProjectIteration:
    """The project's iteration, as train_wrn_ebm's loop (`Trainer.train_epoch`) runs it, with the
    given flags."""

    def __init__(self, model, buffer_images, config, device, flags=()):
        self.settings = settings_from_args(project_args(config, flags))
        self.device = device
        if config.recipe != "jem":  # the recipe's own network (batch norm), from the same seed
            torch.manual_seed(0)
            model = build_model(self.settings.model)
        self.model = to_training_device(model, device)
        if self.settings.run.compile:
            self.model.f.compile()
        self.replay_buffer = ReplayBuffer(0, N_CLASSES, REINIT_FREQ, device,
                                          images=buffer_images.clone(),
                                          chain_init=chain_init(self.settings.buffer.init, device))
        self.optimizer = make_optimizer(self.model, self.settings.optimizer)

    def step(self, x_data, x_lab, y_lab):
        batch = Batch(x_data, x_lab, y_lab)
        loss, _, samples = iteration_loss(self.model, self.replay_buffer, batch, self.settings.step)
        loss.item()  # the loop's divergence check, a device sync
        update(self.model, self.optimizer, loss, samples, batch, self.settings.step)
        return loss.detach()

    def buffer_images(self):
        return self.replay_buffer.images


def project_args(config, flags=()):
    """train_wrn_ebm.py's flags of the project's side: the paper's sampler settings, or the recipe's
    own."""
    argv = ["--depth", str(config.depth), "--width", str(config.width), "--batch_size",
            str(config.batch_size),
            "--buffer_size", str(BUFFER_SIZE), "--reinit_freq", str(REINIT_FREQ), "--recipe",
            config.recipe]
    if config.recipe == "jem":
        argv += ["--n_steps", str(config.n_steps), "--sgld_lr", str(SGLD_LR), "--sgld_std",
                 str(SGLD_STD)]
    args = parse_train_args(argv + [f"--{flag}" for flag in flags])
    args.n_classes = N_CLASSES
    return args


def chain_init(buffer_init, device):
    """Where restarted chains come from: the paper's uniform noise, or (informative starts) class
    Gaussians of the right size, here of made-up moments: a restart costs the same whatever the
    data."""
    if buffer_init == "uniform":
        return UniformNoise()
    dim = 3 * 32 * 32
    return ClassGaussians(torch.zeros(N_CLASSES, dim),
                          0.5 * torch.eye(dim).expand(N_CLASSES, dim, dim).clone()) \
        .to(device)
