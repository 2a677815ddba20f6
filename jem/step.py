"""One JEM training iteration, shared by train_wrn_ebm.py (which loops over it) and bench.py (which
times it). Given a data batch x_data for p(x) and a labeled batch (x_lab, y_lab):

    loss, terms, samples = iteration_loss(model, replay_buffer, batch, settings)
    # the loop checks the loss for divergence here
    update(model, optimizer, loss, samples, batch, settings)

`iteration_loss` draws the samples (`draw_samples`: Langevin chains from the replay buffer) and
computes the JEM loss on them (`jem_loss`), under --amp's autocast; `update` backpropagates and
steps the optimizer (SAM: a second loss pass on the same samples).

A new loss term is a weight in `Objective`, its value in `jem_loss`, and a flag in
jem/flags/train.py.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from jem.optim import frozen_running_stats, optimizer_step
from jem.run.device import autocast
from jem.sampler import ChainSettings, sample_q


@dataclass(frozen=True)
class Objective:
    """The weights of the JEM loss (the paper: p(x) 1, p(y|x) 1, p(x, y) 0, no energy penalty)."""

    p_x_weight: float = 1.0
    p_y_given_x_weight: float = 1.0
    p_x_y_weight: float = 0.0
    energy_l2: float = 0.0  # the authors' suggested stabiliser, about 0.1
    class_cond_p_x_sample: bool = False  # p(x)'s samples from p(y)p(x|y), y uniform
    n_classes: int = 10

    @property
    def uses_labels(self):
        return self.p_y_given_x_weight > 0 or self.p_x_y_weight > 0


@dataclass(frozen=True)
class StepSettings:
    objective: Objective = Objective()
    chain: ChainSettings = ChainSettings()
    amp: bool = False  # bf16 autocast (jem/run/device.py decides whether it is on)


class Batch(NamedTuple):
    x_data: torch.Tensor  # images for the p(x) term
    x_lab: torch.Tensor  # labeled images for p(y|x) and p(x, y)
    y_lab: torch.Tensor


def has_batch_norm(model):
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def can_fuse_forward(model):
    """One forward pass over all batches equals separate passes unless a norm couples the
    examples."""
    return not has_batch_norm(model) and \
        all(m.initialized.item() for m in model.modules() if hasattr(m, "initialized"))


def forward_heads(model, batches, heads):
    """{name: (logits, log p(x) score)} for each named batch, in one concatenated pass where that is
    exact. `heads` computes them (the model's own, or its DistributedDataParallel wrapper)."""
    if can_fuse_forward(model):
        logits, scores = heads(torch.cat(list(batches.values())))
        sizes = [len(b) for b in batches.values()]
        return dict(zip(batches, zip(logits.split(sizes), scores.split(sizes))))
    return {name: heads(b) for name, b in batches.items()}


def iteration_loss(model, replay_buffer, batch, settings, heads=None):
    """(loss, its terms, the samples) of one iteration: the chains, then the loss, in --amp's
    precision."""
    with autocast(batch.x_data.device, settings.amp):
        samples, data_heads = draw_samples(model, replay_buffer, batch, settings, heads)
        loss, terms = jem_loss(model, samples, batch, settings.objective, heads, data_heads)
    return loss, terms, samples


def draw_samples(model, replay_buffer, batch, settings, heads=None):
    """This iteration's samples by the term they serve ('p_x', 'p_x_y'), and the data batch's
    (logits, score) when they had to come first (else None).

    The samples are drawn once per iteration, apart from the loss, so that a second loss pass
    (SAM's) sees the same ones. With batch norm, as JEM++ ("alltrain1"), the data batch goes through
    the network in training mode before the chain, so the chain starts from statistics of real
    images; the loss reuses that pass.
    """
    objective, x_data = settings.objective, batch.x_data
    samples, data_heads = {}, None
    if objective.p_x_weight > 0:
        y_q = None
        if objective.class_cond_p_x_sample:
            y_q = torch.randint(0, objective.n_classes, (len(x_data),), device=x_data.device)
        if has_batch_norm(model):
            data_heads = (heads or model.heads)(x_data)
        samples["p_x"] = sample_q(model, replay_buffer, len(x_data), y_q, settings.chain)
    if objective.p_x_y_weight > 0:
        samples["p_x_y"] = sample_q(model, replay_buffer, len(batch.y_lab), batch.y_lab,
                                    settings.chain)
    return samples, data_heads


def jem_loss(model, samples, batch, objective, heads=None, data_heads=None):
    """The JEM loss of one iteration given its samples, and its terms (tensors, for logging; the
    per-example energies of data and samples are `energy_data` and `energy_q`):

    L = w_px  * -(mean score(x_data) - mean score(x_q))                       l_p_x
      + w_pyx * CE(f(x_lab), y_lab)                                           l_p_y_given_x
      + w_pxy * -(mean f(x_lab)[y_lab] - mean f(x_q|y_lab)[y_lab])            l_p_x_y
      + energy_l2 * (mean E(x_data)^2 + mean E(x_q)^2)       (0 in the paper)  l_energy_l2

    `data_heads`: the data batch's (logits, score) when draw_samples computed them (batch norm).
    """
    out = forward_heads(model, batches_to_score(samples, batch, objective, data_heads),
                        heads or model.heads)
    if data_heads is not None:
        out["data"] = data_heads
    terms = {}
    if objective.p_x_weight > 0:
        score_data, score_q = out["data"][1], out["q"][1]
        terms["f_data"], terms["f_q"] = score_data.mean(), score_q.mean()
        terms["energy_data"], terms["energy_q"] = -score_data.detach(), -score_q.detach()
        terms["l_p_x"] = -(terms["f_data"] - terms["f_q"])
        if objective.energy_l2 > 0:
            terms["l_energy_l2"] = score_data.pow(2).mean() + score_q.pow(2).mean()
    if objective.uses_labels:
        logits_lab = out["lab"][0]
        terms["acc"] = (logits_lab.argmax(1) == batch.y_lab).float().mean()
    if objective.p_y_given_x_weight > 0:
        terms["l_p_y_given_x"] = F.cross_entropy(logits_lab, batch.y_lab)
    if objective.p_x_y_weight > 0:
        terms["f_xy_data"] = class_logit(logits_lab, batch.y_lab).mean()
        terms["f_xy_q"] = class_logit(out["q_y"][0], batch.y_lab).mean()
        terms["l_p_x_y"] = -(terms["f_xy_data"] - terms["f_xy_q"])
    weights = {"l_p_x": objective.p_x_weight, "l_energy_l2": objective.energy_l2,
               "l_p_y_given_x": objective.p_y_given_x_weight, "l_p_x_y": objective.p_x_y_weight}
    loss = sum(weight * terms[name] for name, weight in weights.items() if name in terms)
    return loss, terms


def batches_to_score(samples, batch, objective, data_heads):
    """The batches the loss passes through the network, by name, in the order of one fused pass."""
    batches = {}
    if objective.p_x_weight > 0:
        if data_heads is None:
            batches["data"] = batch.x_data
        batches["q"] = samples["p_x"]
    if objective.uses_labels:
        batches["lab"] = batch.x_lab
    if objective.p_x_y_weight > 0:
        batches["q_y"] = samples["p_x_y"]
    return batches


def class_logit(logits, y):
    return logits.float().gather(1, y[:, None])


def update(model, optimizer, loss, samples, batch, settings, heads=None, check_loss=None):
    """Backpropagate the iteration's loss and step the optimizer.

    SAM takes a second gradient at its perturbed weights, from the same batches and samples; batch
    norm's running statistics stay frozen for it (the first pass already counted this batch).
    `check_loss(loss, terms)` sees that second loss before its backward pass, as the loop checks the
    first: it raises to stop the update (SAM then puts the weights back and does not step).
    """

    def loss_again():
        with autocast(loss.device, settings.amp), frozen_running_stats(model):
            perturbed_loss, terms = jem_loss(model, samples, batch, settings.objective, heads)
        if check_loss is not None:
            check_loss(perturbed_loss, terms)
        perturbed_loss.backward()

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(optimizer, loss_again)


def to_training_device(model, device):
    """The model on `device`, its convolution weights channels-last (NHWC).

    oneDNN on CPUs and cuDNN on GPUs run NHWC convolutions without reordering every input and
    output, and a channels-last weight makes every activation after the first convolution NHWC.
    """
    return model.to(device, memory_format=torch.channels_last)
