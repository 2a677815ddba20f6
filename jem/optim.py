"""The optimizers training can choose beyond torch's own: sharpness-aware minimisation (SAM) and its
adaptive variant (ASAM), which SADA-JEM trains with.

SAM (Foret et al., ICLR 2021) takes two gradients per update. With g the gradient at the weights w,
it moves to w + e, where the loss is about the highest within a ball of radius rho, takes the
gradient there, goes back to w and lets the base optimizer step with that second gradient:

    e = rho * T^2 g / ||T g||        T = 1 (SAM), or |w| elementwise (ASAM, Kwon et al., ICML 2021)

ASAM's ball scales with each weight's size, so its rho is far larger (SADA-JEM: 2.0). Both follow
the SADA-JEM authors' code (sndnyang/SADAJEM, sam.py): one norm over every parameter, 1e-12 added to
it, and the weights put back by copy before the base step (so weight decay acts on w, not on w + e).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn.modules.batchnorm import _BatchNorm

# SADA-JEM's rule: rho >= 0.5 means the adaptive variant (ASAM's scale of rho)
ADAPTIVE_FROM_RHO = 0.5


@dataclass(frozen=True)
class OptimizerSettings:
    name: str = "adam"  # adam (betas 0.9, 0.999) | sgd (momentum 0.9) | sam (SAM over that SGD)
    lr: float = 1e-4
    weight_decay: float = 0.0
    rho: float = 2.0  # SAM's radius (adaptive from 0.5)
    clf_only: bool = False  # optimise only the classification head


@dataclass(frozen=True)
class Schedule:
    """The learning rate: lr, times decay_rate at each of decay_epochs, ramped up over
    warmup_iters."""

    lr: float = 1e-4
    decay_epochs: tuple = (160, 180)
    decay_rate: float = 0.3
    warmup_iters: int = -1  # 0 or -1: no warm-up

    def lr_at(self, epoch, iteration, scale=1.0):
        lr = self.lr * scale * self.decay_rate ** sum(epoch >= e for e in self.decay_epochs)
        if iteration <= self.warmup_iters and self.warmup_iters > 0:
            lr *= iteration / self.warmup_iters
        return lr


def make_optimizer(model, settings):
    params = model.class_output.parameters() if settings.clf_only else model.parameters()
    if settings.name == "adam":
        return torch.optim.Adam(params, lr=settings.lr, betas=(0.9, 0.999),
                                weight_decay=settings.weight_decay)
    if settings.name == "sam":
        return sam_over_sgd(params, lr=settings.lr, weight_decay=settings.weight_decay,
                            rho=settings.rho)
    return torch.optim.SGD(params, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class SAM(torch.optim.Optimizer):
    """SAM around a base optimizer, torch.optim-style: `SAM(params, torch.optim.SGD, rho=2.0,
    adaptive=True, lr=0.1, momentum=0.9)` (keyword arguments after `adaptive` go to the base
    optimizer).

    Use: backpropagate the loss at w, then `step(closure)`, where closure() computes the loss on the
    same batch at the current weights and backpropagates it (it runs once, at w + e). The param
    groups are the base optimizer's, so learning-rate changes reach it; the state dict is the base
    optimizer's (its momentum buffers, and rho and adaptive in each group), so a run resumes
    exactly.
    """

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **base_kwargs):
        if rho < 0:
            raise ValueError(f"SAM's rho must be non-negative, not {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def step(self, closure):
        """One update from the gradients at w (already in .grad); returns what closure returns.

        Should the closure raise (the training loop's check of a diverged loss), the weights go back
        to w and the base optimizer does not step.
        """
        weights = self.climb()
        self.zero_grad()
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            for p, w in weights:
                p.copy_(w)
        self.base_optimizer.step()
        return loss

    def climb(self):
        """Move every parameter with a gradient to w + e; returns (parameter, copy of w) pairs."""
        scaled = [(torch.abs(p) if group["adaptive"] else 1.0) * p.grad
                  for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms = torch.stack([torch.linalg.vector_norm(g) for g in scaled])
        grad_norm = torch.linalg.vector_norm(norms)
        weights = []
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                weights.append((p, p.clone()))
                p.add_((p.square() if group["adaptive"] else 1.0) * p.grad * scale.to(p))
        return weights

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups  # loading replaced the group dicts


def sam_over_sgd(params, lr, weight_decay, rho):
    """SADA-JEM's optimizer: SAM over SGD with momentum 0.9, adaptive (ASAM) when rho >= 0.5."""
    return SAM(params, torch.optim.SGD, rho=rho, adaptive=rho >= ADAPTIVE_FROM_RHO, lr=lr,
               momentum=0.9, weight_decay=weight_decay)


def optimizer_step(optimizer, recompute_loss):
    """optimizer.step() on the gradients already computed; SAM calls recompute_loss() at its
    perturbed weights."""
    if isinstance(optimizer, SAM):
        optimizer.step(recompute_loss)
    else:
        optimizer.step()


@contextmanager
def frozen_running_stats(model):
    """Batch norm still normalises training batches by their own statistics but leaves its running
    statistics (and batch count) as they are: SAM's second pass sees the same batch again, at
    weights never kept.

    SADA-JEM sets the momentum to 0 for this; not tracking gives the same normalisation and also
    keeps num_batches_tracked.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
