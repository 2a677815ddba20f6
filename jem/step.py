"""The JEM training step, shared by train_wrn_ebm.py (which loops over it) and bench.py (which times it).

One iteration, given a data batch x_data for p(x) and a labeled batch (x_lab, y_lab):

    loss, terms, samples = iteration_loss(model, replay_buffer, x_data, x_lab, y_lab, args)
    # the loop checks the loss for divergence here
    update(model, optimizer, loss, samples, x_data, x_lab, y_lab, args)

`iteration_loss` draws the samples (`draw_samples`: the Langevin chains from the replay buffer) and computes
the JEM loss on them (`jem_loss`), under `--amp`'s autocast; `update` backpropagates and steps the
optimizer (SAM: a second loss pass on the same samples). The rest are the pieces around the step that the
loop and the benchmark build alike: the model on its device, the optimizer, the learning-rate schedule.
"""
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from jem.optim import frozen_running_stats, optimizer_step, sam_over_sgd
from jem.run.device import autocast
from jem.sampler import sample_q


def chain_settings(args):
    """The chain flags as sample_q takes them."""
    return dict(n_steps=args.n_steps, sgld_lr=args.sgld_lr, sgld_std=args.sgld_std, in_steps=args.in_steps,
                pyld_lr=args.pyld_lr, eps=args.eps)


def has_batch_norm(model):
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def can_fuse_forward(model):
    """One forward pass over all batches equals separate passes unless a norm couples the examples."""
    return not has_batch_norm(model) and \
        all(m.initialized.item() for m in model.modules() if hasattr(m, "initialized"))


def forward_heads(model, batches, heads):
    """(logits, log p(x) score) for each batch, in one concatenated pass where that is exact.

    `heads` computes them (the model's own `heads`, or its DistributedDataParallel wrapper).
    """
    if can_fuse_forward(model):
        logits, scores = heads(torch.cat(batches))
        sizes = [len(b) for b in batches]
        return list(zip(logits.split(sizes), scores.split(sizes)))
    return [heads(b) for b in batches]


def iteration_loss(model, replay_buffer, x_data, x_lab, y_lab, args, heads=None):
    """(loss, its terms, the samples) of one iteration: the chains, then the loss, in --amp's precision."""
    with autocast(x_data.device, args.amp):
        samples, data_heads = draw_samples(model, replay_buffer, x_data, y_lab, args, heads)
        loss, terms = jem_loss(model, samples, x_data, x_lab, y_lab, args, heads, data_heads)
    return loss, terms, samples


def draw_samples(model, replay_buffer, x_data, y_lab, args, heads=None):
    """This iteration's samples, by the term they serve ('p_x' for x_data, 'p_x_y' for y_lab), and the data
    batch's (logits, score) when they had to come first (else None).

    The samples are drawn once per iteration, apart from the loss, so that a second loss pass (SAM's) sees the
    same ones. With batch norm, as JEM++ ("alltrain1"), the data batch goes through the network in training
    mode before the chain, so the chain starts from statistics of real images, and the chain runs in training
    mode too; the loss reuses that pass.
    """
    batch_norm = has_batch_norm(model)
    chain = dict(chain_settings(args), train_mode=batch_norm, cuda_graph=args.cuda_graph)
    samples, data_heads = {}, None
    if args.p_x_weight > 0:
        y_q = None
        if args.class_cond_p_x_sample:
            y_q = torch.randint(0, args.n_classes, (len(x_data),), device=x_data.device)
        if batch_norm:
            data_heads = (heads or model.heads)(x_data)
        samples["p_x"] = sample_q(model, replay_buffer, len(x_data), y_q, **chain)
    if args.p_x_y_weight > 0:
        samples["p_x_y"] = sample_q(model, replay_buffer, len(y_lab), y_lab, **chain)
    return samples, data_heads


def jem_loss(model, samples, x_data, x_lab, y_lab, args, heads=None, data_heads=None):
    """The JEM loss of one iteration, given its samples (`draw_samples`), and its terms (as tensors, for logging).

    L = w_px * -(mean score(x_data) - mean score(x_q))
      + w_pyx * CE(f(x_lab), y_lab)
      + w_pxy * -(mean f(x_lab)[y_lab] - mean f(x_q|y_lab)[y_lab])
      + energy_l2 * (mean E(x_data)^2 + mean E(x_q)^2)      (0 in the paper)

    `data_heads`: the data batch's (logits, score) when draw_samples computed them before the chain (batch
    norm); else the data batch goes through the network here with the others.
    """
    heads = heads or model.heads
    outputs, batches, terms = [], [], {}
    if args.p_x_weight > 0:
        if data_heads is not None:
            outputs.append(data_heads)
        else:
            batches.append(x_data)
        batches.append(samples["p_x"])
    if args.p_y_given_x_weight > 0 or args.p_x_y_weight > 0:
        batches.append(x_lab)
    if args.p_x_y_weight > 0:
        batches.append(samples["p_x_y"])

    outputs = iter(outputs + forward_heads(model, batches, heads))
    loss = 0.0
    if args.p_x_weight > 0:
        (_, score_data), (_, score_q) = next(outputs), next(outputs)
        terms["f_data"], terms["f_q"] = score_data.mean(), score_q.mean()
        terms["l_p_x"] = -(terms["f_data"] - terms["f_q"])
        loss = loss + args.p_x_weight * terms["l_p_x"]
        if args.energy_l2 > 0:
            terms["l_energy_l2"] = score_data.pow(2).mean() + score_q.pow(2).mean()
            loss = loss + args.energy_l2 * terms["l_energy_l2"]
    if args.p_y_given_x_weight > 0 or args.p_x_y_weight > 0:
        logits_lab, _ = next(outputs)
        terms["acc"] = (logits_lab.argmax(1) == y_lab).float().mean()
    if args.p_y_given_x_weight > 0:
        terms["l_p_y_given_x"] = F.cross_entropy(logits_lab, y_lab)
        loss = loss + args.p_y_given_x_weight * terms["l_p_y_given_x"]
    if args.p_x_y_weight > 0:
        logits_q_lab, _ = next(outputs)
        terms["f_xy_data"] = logits_lab.float().gather(1, y_lab[:, None]).mean()
        terms["f_xy_q"] = logits_q_lab.float().gather(1, y_lab[:, None]).mean()
        terms["l_p_x_y"] = -(terms["f_xy_data"] - terms["f_xy_q"])
        loss = loss + args.p_x_y_weight * terms["l_p_x_y"]
    return loss, terms


def update(model, optimizer, loss, samples, x_data, x_lab, y_lab, args, heads=None, check_loss=None):
    """Backpropagate the iteration's loss and step the optimizer.

    SAM takes a second gradient at its perturbed weights, from the same batches and samples; batch norm's
    running statistics stay frozen for it (the first pass already counted this batch). `check_loss(loss, terms)`
    sees that second loss before its backward pass, as the loop checks the first: it raises to stop the update
    (SAM then puts the weights back and does not step).
    """

    def loss_again():
        with autocast(loss.device, args.amp), frozen_running_stats(model):
            perturbed_loss, terms = jem_loss(model, samples, x_data, x_lab, y_lab, args, heads)
        if check_loss is not None:
            check_loss(perturbed_loss, terms)
        perturbed_loss.backward()

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(optimizer, loss_again)


@torch.no_grad()
def evaluate_classifier(model, loader, device):
    """(accuracy, mean cross-entropy) over a loader, in float32 whatever --amp; None for an empty loader."""
    was_training = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model.classify(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
    model.train(was_training)
    return (correct / n, loss / n) if n else None


# --------------------------------------------------------------------------------------------------
# What the loop and the benchmark build around the step.

def to_training_device(model, device):
    """The model on `device`, its convolution weights channels-last (NHWC).

    oneDNN on CPUs and cuDNN on GPUs run NHWC convolutions without reordering every input and
    output, and a channels-last weight makes every activation after the first convolution NHWC.
    """
    return model.to(device, memory_format=torch.channels_last)


def make_optimizer(model, args):
    params = model.class_output.parameters() if args.clf_only else model.parameters()
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    if args.optimizer == "sam":
        return sam_over_sgd(params, lr=args.lr, weight_decay=args.weight_decay, rho=args.rho)
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


def scheduled_lr(args, epoch, iteration, lr_scale=1.0):
    """--lr, times --decay_rate for each of --decay_epochs reached, ramped up over --warmup_iters."""
    lr = args.lr * lr_scale * args.decay_rate ** sum(epoch >= e for e in args.decay_epochs)
    if iteration <= args.warmup_iters and args.warmup_iters > 0:  # 0 or -1: no warm-up
        lr *= iteration / args.warmup_iters
    return lr


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
