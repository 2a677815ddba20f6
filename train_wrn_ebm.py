"""Train a Joint Energy Model (JEM) on CIFAR-10/100, SVHN, an image folder or the built-in synthetic set.

The paper's CIFAR-10 run (WRN-28-10, days on one GPU):

    python train_wrn_ebm.py --lr .0001 --optimizer adam --p_x_weight 1.0 --p_y_given_x_weight 1.0 \
        --p_x_y_weight 0.0 --sigma .03 --width 10 --depth 28 --save_dir ./experiment --plot_uncond \
        --warmup_iters 1000

The later recipes, JEM++ and SADA-JEM, as their authors published them (docs/recipes.md):

    python train_wrn_ebm.py --recipe jempp --plot_uncond --save_dir runs/jempp
    python train_wrn_ebm.py --recipe sadajem --plot_uncond --save_dir runs/sadajem

A quickstart that needs no download and runs on a CPU in a few minutes (JEM++'s sampler, batch norm and
chain starts, with Adam):

    python train_wrn_ebm.py --recipe jempp --dataset synthetic --depth 10 --width 1 --optimizer adam --lr 1e-3 \
        --weight_decay 0 --warmup_iters 0 --n_steps 5 --batch_size 32 --n_epochs 2 --n_valid 500 \
        --buffer_size 1000 --print_every 20 --plot_uncond --save_dir runs/quickstart

Each iteration maximises log p(y|x) on a labeled batch and, with samples x_q that Langevin chains draw from
the replay buffer (`draw_samples`), log p(x) on a data batch (and optionally log p(x, y)); see `jem_loss`.
"""
import argparse
import copy
import glob
import math
import os
import signal
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from chain_init import ClassGaussians, UniformNoise
from checkpoint import (checkpoint_state, find_resume_checkpoint, load_checkpoint, load_model_state,
                        restore_rng_states, rng_states, write_checkpoint)
from data import TORCHVISION_SETS, batches_from, n_classes_of, plain_training_images, train_loaders
from distributed import (any_rank, broadcast, device_for, gather, gather_objects, init_from_torchrun, shard,
                         shutdown)
from models import Heads, build_model
from optimizers import frozen_running_stats, optimizer_step, sam_over_sgd
from plotting import class_rows, save_grid
from sample_quality import BufferQuality, add_sample_quality_flags
from sampler import ReplayBuffer, sample_q
from utils import (RunLog, SilentLog, UserError, add_model_flags, add_sampler_flags, add_system_flags, autocast,
                   prepare_save_dir, run_cli, seed_everything, select_device, write_json)

DIVERGENCE_THRESHOLD = 1e8  # |L| above this means the energies ran away (the paper's runs crashed here)
PLOT_EVERY = 100  # iterations between sample grids with --plot_uncond / --plot_cond
GAUSSIANS_FILE = "class_gaussians.pt"  # --buffer_init informative: the fitted Gaussians, in the save dir

# --recipe: each later paper's training as its authors published it (the command of their README and
# scripts/, over their code's defaults: JEMPP's train_jempp.py, SADAJEM's train_sadajem.py) for the flags that
# exist here; a flag given on the command line wins.
RECIPES = {
    "jem": {},
    "jempp": dict(norm="batch", optimizer="sgd", lr=0.1, weight_decay=4e-4, warmup_iters=1000, n_epochs=150,
                  decay_epochs=[50, 100, 125], decay_rate=0.2, n_steps=10, in_steps=5, pyld_lr=0.2, eps=1.0,
                  sgld_lr=0.0, sgld_std=0.0, buffer_init="informative", model="yopo"),
    # SADA-JEM's chain step, x <- clamp(x + clamp(g, -1, 1), -1, 1), is one PYLD inner step of 1 (their
    # --sgld_lr 1). Their epoch is a pass over the labeled batches of 128, half of ours over the p(x) batches
    # of 64: their 200 epochs with decays at 60/120/180 are our 100 with decays at 30/60/90.
    "sadajem": dict(norm="batch", optimizer="sam", rho=2.0, lr=0.1, weight_decay=5e-4, warmup_iters=1000,
                    n_epochs=100, decay_epochs=[30, 60, 90], decay_rate=0.2, sigma=0.0, n_valid=0,
                    px_augment=False, labeled_batch_size=128, n_steps=5, in_steps=1, pyld_lr=1.0, eps=1.0,
                    sgld_lr=0.0, sgld_std=0.0, buffer_init="informative"),
}


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    given = flags_given(parser, argv)
    if "recipe" not in given and args.model == "yopo":
        args.recipe = "jempp"  # JEM++'s flag; their published command names no recipe
    for flag, value in RECIPES[args.recipe].items():
        if flag not in given:
            setattr(args, flag, value)
    if args.gpu_id is not None and "device" not in given:
        args.device = f"cuda:{args.gpu_id}"
    return args


def flags_given(parser, argv=None):
    """The destinations of the flags on the command line: argparse fills in a default only for a name
    the namespace lacks, so a namespace of placeholders keeps them where nothing was given."""
    placeholder = object()
    names = vars(parser.parse_args(argv))
    probe = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, placeholder)))
    return {name for name, value in vars(probe).items() if value is not placeholder}


def build_parser():
    parser = argparse.ArgumentParser(description="Train a JEM (Grathwohl et al., ICLR 2020).")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="jem",
                        help="defaults of the paper (jem), JEM++ (jempp, Yang & Ji 2021) or SADA-JEM (sadajem, "
                             "Yang et al. 2023) for every flag not given; see docs/recipes.md")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=str, default="cifar10",
                      help=f"{' | '.join(TORCHVISION_SETS)} | synthetic | PATH of an image folder with "
                           "train/ and test/ class sub-folders")
    data.add_argument("--data_root", type=str, default="../data", help="where torchvision data sets live")
    data.add_argument("--n_valid", type=int, default=5000, help="training images held out for validation")
    data.add_argument("--labels_per_class", type=int, default=-1,
                      help="keep this many labels per class for p(y|x) (semi-supervised); -1: all")
    data.add_argument("--sigma", type=float, default=3e-2, help="std of Gaussian noise added to every image")
    data.add_argument("--no_px_augment", dest="px_augment", action="store_false",
                      help="serve the p(x) data batch without crop and flip, as SADA-JEM (the classification "
                           "batch keeps them)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=["adam", "sgd", "sam"], default="adam",
                       help="adam | sgd (momentum 0.9) | sam: SAM over SGD with momentum 0.9, adaptive (ASAM) when "
                            "--rho >= 0.5, as SADA-JEM")
    optim.add_argument("--rho", type=float, default=2.0,
                       help="--optimizer sam: radius of the weight perturbation (SADA-JEM: 2.0, adaptive)")
    optim.add_argument("--lr", type=float, default=1e-4)
    optim.add_argument("--decay_epochs", nargs="+", type=int, default=[160, 180],
                       help="multiply the learning rate by --decay_rate at the start of these epochs")
    optim.add_argument("--decay_rate", type=float, default=0.3)
    optim.add_argument("--warmup_iters", type=int, default=-1,
                       help="linear learning-rate warm-up over this many iterations (-1: none)")
    optim.add_argument("--batch_size", type=int, default=64)
    optim.add_argument("--labeled_batch_size", type=int, default=None,
                       help="images per classification batch (default: --batch_size; SADA-JEM: 128)")
    optim.add_argument("--n_epochs", type=int, default=200)
    optim.add_argument("--weight_decay", type=float, default=0.0)
    optim.add_argument("--clf_only", action="store_true",
                       help="optimise only the classification head (class_output), as the paper's flag")

    objective = parser.add_argument_group("objective")
    objective.add_argument("--p_x_weight", "--px", type=float, default=1.0, help="weight of the log p(x) term")
    objective.add_argument("--p_y_given_x_weight", "--pyx", type=float, default=1.0, help="weight of the CE term")
    objective.add_argument("--p_x_y_weight", type=float, default=0.0, help="weight of the log p(x, y) term")
    objective.add_argument("--class_cond_p_x_sample", action="store_true",
                           help="draw the p(x) term's samples from p(y)p(x|y) with uniform random y")
    objective.add_argument("--energy_l2", type=float, default=0.0,
                           help="add this times mean(E(x_data)^2 + E(x_q)^2), a stabiliser the authors suggest "
                                "(about 0.1); 0: the paper's objective")

    divergence = parser.add_argument_group("divergence")
    divergence.add_argument("--on_diverge", choices=["stop", "rollback"], default="stop",
                            help="when |L| > 1e8 or NaN: stop (as the paper) or roll back to the last checkpoint "
                                 "with new random numbers")
    divergence.add_argument("--max_rollbacks", type=int, default=3, help="give up after this many rollbacks")
    divergence.add_argument("--rollback_lr_scale", type=float, default=1.0,
                            help="multiply the learning rate by this at each rollback (e.g. 0.5)")

    model = add_model_flags(parser)
    model.add_argument("--dropout_rate", type=float, default=0.0)
    model.add_argument("--model", choices=["wrn", "yopo"], default="wrn",
                       help="JEM++'s flag: yopo implies --recipe jempp (the network is the same Wide-ResNet)")
    sampler = add_sampler_flags(parser, n_steps=20, buffer_size=10000)
    sampler.add_argument("--in_steps", type=int, default=0,
                         help="JEM++'s PYLD: inner steps of --pyld_lr along the clipped gradient per step (0: SGLD)")
    sampler.add_argument("--pyld_lr", type=float, default=0.2, help="PYLD inner step size (<= 0: no inner steps)")
    sampler.add_argument("--eps", type=float, default=1.0, help="PYLD clips the gradient to [-eps, eps]")
    sampler.add_argument("--buffer_init", choices=["uniform", "informative"], default="uniform",
                         help="chain starts and restarts: uniform noise (the paper) or per-class Gaussians fitted to "
                              f"the training images (JEM++), cached in the save dir as {GAUSSIANS_FILE}")

    io = parser.add_argument_group("logging and checkpoints")
    io.add_argument("--save_dir", type=str, default="./experiment")
    io.add_argument("--load_path", type=str, default=None,
                    help="start a new run from this checkpoint's model (and replay buffer); the paper's files work")
    io.add_argument("--resume", type=str, default=None,
                    help="continue a run exactly where it stopped: its save dir or one of its checkpoints")
    io.add_argument("--ckpt_every", type=int, default=10, help="write ckpt_{epoch}.pt every this many epochs")
    io.add_argument("--ckpt_every_iters", type=int, default=0,
                    help="also write ckpt_iter_{iteration}.pt (and last_ckpt.pt) every this many iterations; 0: off")
    io.add_argument("--keep_last", type=int, default=0,
                    help="keep only this many numbered checkpoints (ckpt_*.pt) on disk; 0: keep all")
    io.add_argument("--eval_every", type=int, default=1, help="validation/test accuracy every this many epochs")
    io.add_argument("--plot_uncond", action="store_true", help=f"save unconditional samples every {PLOT_EVERY} its")
    io.add_argument("--plot_cond", action="store_true", help=f"save class-conditional samples every {PLOT_EVERY} its")
    io.add_argument("--log_arg", type=str, default=None,
                    help="JEM++'s run-name flag: accepted and recorded in args.json (the run goes to --save_dir)")
    io.add_argument("--fid_every", type=int, default=0,
                    help="log the IS and FID of the replay buffer (rank 0's shard) every this many epochs; 0: off")
    add_sample_quality_flags(parser)
    add_system_flags(parser).add_argument(
        "--cuda_graph", action="store_true",
        help="capture the SGLD chain as a CUDA graph and replay it (GPU only; fewer kernel launches)")
    parser.add_argument("--gpu-id", dest="gpu_id", type=int, default=None,
                        help="JEM++'s flag: the same as --device cuda:N")
    return parser


def needs_conditional_buffer(args):
    return args.p_x_y_weight > 0 or args.class_cond_p_x_sample or args.plot_cond


def check_args(args, world_size=1):
    """Impossible flag combinations, reported before any data or model is built."""
    if args.uncond and needs_conditional_buffer(args):
        raise UserError("--uncond cannot sample class-conditionally: drop --class_cond_p_x_sample, "
                        "--p_x_y_weight and --plot_cond, or drop --uncond")
    if args.buffer_size % world_size != 0:
        raise UserError(f"--buffer_size {args.buffer_size} must divide by the {world_size} processes (each keeps "
                        "an equal shard)")
    if needs_conditional_buffer(args) and (args.buffer_size // world_size) % args.n_classes != 0:
        raise UserError(f"--buffer_size {args.buffer_size} must divide by the {args.n_classes} classes"
                        f"{f' times {world_size} processes' if world_size > 1 else ''} for class-conditional "
                        "sampling (one buffer segment per class)")
    for flag in ("batch_size", "n_epochs", "print_every", "ckpt_every", "eval_every", "max_rollbacks"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.labeled_batch_size is not None and args.labeled_batch_size < 1:
        raise UserError("--labeled_batch_size must be at least 1")
    if min(args.n_steps, args.in_steps, args.buffer_size, args.ckpt_every_iters, args.keep_last, args.energy_l2,
           args.rho, args.fid_every) < 0:
        raise UserError("--n_steps, --in_steps, --buffer_size, --ckpt_every_iters, --keep_last, --energy_l2, --rho "
                        "and --fid_every cannot be negative")
    if args.cuda_graph and args.norm == "batch":
        raise UserError("--cuda_graph cannot capture a batch-norm chain (its warm-up would move the running "
                        "statistics): drop --cuda_graph or --norm batch")
    if args.fid_every and not 1 <= args.is_splits <= args.buffer_size // world_size:
        raise UserError(f"--fid_every scores the replay buffer in --is_splits {args.is_splits} splits: it needs "
                        "1 <= --is_splits <= --buffer_size (per process)")


# --------------------------------------------------------------------------------------------------
# The objective.

def chain_settings(args):
    """The chain flags as sample_q takes them."""
    return dict(n_steps=args.n_steps, sgld_lr=args.sgld_lr, sgld_std=args.sgld_std, in_steps=args.in_steps,
                pyld_lr=args.pyld_lr, eps=args.eps)


def has_batch_norm(model):
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
        terms["f_xy_data"] = logits_lab.gather(1, y_lab[:, None]).mean()
        terms["f_xy_q"] = logits_q_lab.gather(1, y_lab[:, None]).mean()
        terms["l_p_x_y"] = -(terms["f_xy_data"] - terms["f_xy_q"])
        loss = loss + args.p_x_y_weight * terms["l_p_x_y"]
    return loss, terms


def update(model, optimizer, loss, samples, x_data, x_lab, y_lab, args, heads=None):
    """Backpropagate the iteration's loss and step the optimizer.

    SAM takes a second gradient at its perturbed weights, from the same batches and samples; batch norm's
    running statistics stay frozen for it (the first pass already counted this batch).
    """

    def loss_again():
        with autocast(loss.device, args.amp), frozen_running_stats(model):
            perturbed_loss, _ = jem_loss(model, samples, x_data, x_lab, y_lab, args, heads)
        perturbed_loss.backward()

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer_step(optimizer, loss_again)


@torch.no_grad()
def evaluate_classifier(model, loader, device):
    """(accuracy, mean cross-entropy) over a loader; None for an empty loader."""
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
# Set-up helpers.

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


def resumed_args(args, given):
    """(flags, training state) of the run that --resume continues; the flags given now (the names in `given`)
    win over the stored ones.

    The device and the loader processes belong to this machine, not to the run, so they are not taken over.
    """
    path = find_resume_checkpoint(args.resume)
    ckpt = load_checkpoint(path)
    stored = ckpt.get("args")
    if not isinstance(stored, dict) or "optimizer_state_dict" not in ckpt:
        raise UserError(f"{path} holds no resumable training state (a file of the paper's code?); "
                        "start from its weights with --load_path instead")
    defaults = vars(parse_args([]))
    given = {k: getattr(args, k) for k in given}
    stored = {k: v for k, v in stored.items() if k not in ("device", "n_workers")}
    merged = {**defaults, "save_dir": os.path.dirname(path) or ".", **stored, **given, "resume": path}
    return argparse.Namespace(**merged), ckpt


class StopSignals:
    """SIGTERM / SIGINT ask the run to stop after the current iteration (a second one stops at once)."""

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def format_terms(epoch, iteration, terms, lr):
    parts = [f"epoch {epoch} it {iteration}"]
    if "l_p_x" in terms:
        d = terms["f_data"] - terms["f_q"]
        parts.append(f"P(x) f(x_data)={terms['f_data']:.6f} f(x_q)={terms['f_q']:.6f} d={d:.6f}")
    if "l_p_y_given_x" in terms:
        parts.append(f"P(y|x) loss={terms['l_p_y_given_x']:.6f} acc={terms['acc']:.4f}")
    if "l_p_x_y" in terms:
        d = terms["f_xy_data"] - terms["f_xy_q"]
        parts.append(f"P(x|y) f(x_data,y)={terms['f_xy_data']:.6f} f(x_q,y)={terms['f_xy_q']:.6f} d={d:.6f}")
    parts.append(f"lr={lr:.2e}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------------
# The run.

class Trainer:
    """Everything a run holds (model, optimizer, replay buffer, data, position, RNG) and the loop over it.

    `state_dict()` is the whole training state, so a checkpoint resumes exactly and a divergence can be
    rolled back to the last one.
    """

    def __init__(self, args, topology, device, log, resume_state=None):
        self.args, self.topology, self.device, self.log = args, topology, device, log
        self.loaders = train_loaders(args, device, topology.rank, topology.world_size)
        self.model = to_training_device(build_model(args), device)
        self.chain_init = self.make_chain_init()
        shard_size = args.buffer_size // topology.world_size
        self.replay_buffer = ReplayBuffer(shard_size, args.n_classes, args.reinit_freq, device,
                                          chain_init=self.chain_init)
        if args.load_path:
            self.start_from_weights(args.load_path)
        if args.compile:
            self.model.f.compile()  # in place, so state-dict keys stay those of the paper
        self.heads = self.model.heads
        if topology.distributed:
            # DDP averages the gradients of the loss pass; SGLD chains use the bare model (no gradient sync).
            # Unused parameters: `f.linear` always, one of the two heads depending on --uncond.
            self.heads = DistributedDataParallel(Heads(self.model), find_unused_parameters=True)
        self.optimizer = make_optimizer(self.model, args)
        self.epoch = self.batch_in_epoch = self.iteration = self.rollbacks = 0
        self.best_valid_acc, self.lr_scale = 0.0, 1.0
        if resume_state is not None:
            self.load_state_dict(resume_state)
            log.line(f"resumed {args.resume} at epoch {self.epoch}, iteration {self.iteration}")
        self.snapshot = self.state_dict()  # what a divergence rolls back to, until the first checkpoint
        self.buffer_quality = BufferQuality.if_weights_available(args, device, log) \
            if args.fid_every and topology.is_main else None

    # ---- state -----------------------------------------------------------------------------------

    def make_chain_init(self):
        """--buffer_init: uniform noise, or the per-class Gaussians of the training images: fitted by rank 0
        (read from the save dir on --resume, where the first run left them) and sent to every rank."""
        if self.args.buffer_init == "uniform":
            return UniformNoise()
        path = os.path.join(self.args.save_dir, GAUSSIANS_FILE)
        gaussians = None
        if self.topology.is_main:
            if self.args.resume and os.path.exists(path):
                gaussians = ClassGaussians.load(path, self.args.n_classes)
            else:
                tick = time.time()
                gaussians = ClassGaussians.fit(plain_training_images(self.args, self.device), self.args.n_classes)
                gaussians.save(path)
                self.log.line(f"fitted {self.args.n_classes} class Gaussians to the training images in "
                              f"{time.time() - tick:.1f}s; saved {path}")
        gaussians = broadcast(gaussians, self.topology)
        return gaussians.to(self.device)

    def start_from_weights(self, path):
        """--load_path: the model's weights and, if the file has one, its replay buffer (the paper's files too)."""
        ckpt = load_checkpoint(path)
        load_model_state(self.model, ckpt["model_state_dict"], path)
        images = ckpt.get("replay_buffer")
        if images is not None and len(images) > 0:
            self.replay_buffer = self.buffer_from(images)
        self.log.line(f"loaded model from {path}"
                      + (f" with its replay buffer of {len(images)} images" if images is not None else ""))

    def buffer_from(self, images):
        buffer = ReplayBuffer(0, self.args.n_classes, self.args.reinit_freq, self.device,
                              images=shard(images, self.topology).float(), chain_init=self.chain_init)
        if needs_conditional_buffer(self.args) and not buffer.can_condition():
            raise UserError(f"the loaded replay buffer shard of {len(buffer)} images does not divide by the "
                            f"{self.args.n_classes} classes needed for class-conditional sampling")
        return buffer

    def state_dict(self):
        """The whole training state, copied to the CPU (every rank must call this: buffers are gathered)."""
        return checkpoint_state(
            {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            gather(self.replay_buffer.images, self.topology),
            optimizer_state_dict=copy.deepcopy(self.optimizer.state_dict()),
            rng_states=gather_objects(rng_states(), self.topology),
            args=vars(self.args), world_size=self.topology.world_size,
            epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, iteration=self.iteration,
            best_valid_acc=self.best_valid_acc, lr_scale=self.lr_scale, rollbacks=self.rollbacks)

    def load_state_dict(self, state):
        load_model_state(self.model, state["model_state_dict"], self.args.resume or "the last good state")
        self.replay_buffer = self.buffer_from(state["replay_buffer"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        for key in ("epoch", "iteration", "best_valid_acc", "lr_scale", "rollbacks"):
            setattr(self, key, state[key])
        self.batch_in_epoch = batches_done_in_epoch(state, self.args.batch_size, self.topology.world_size)
        if self.batch_in_epoch >= len(self.loaders["train"]):  # saved at the end of an epoch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if state["world_size"] == self.topology.world_size:
            restore_rng_states(state["rng_states"][self.topology.rank])
        else:  # other ranks, other chains: continue with fresh, still seeded, random streams
            seed_everything(self.args.seed + 1000 * self.iteration + self.topology.rank)

    def save(self, name):
        """Write the training state as `name` in the save dir (rank 0) and keep it as the rollback point."""
        self.snapshot = self.state_dict()
        if self.topology.is_main:
            write_checkpoint(os.path.join(self.args.save_dir, name), self.snapshot)
            if name.startswith("ckpt_"):
                self.drop_old_checkpoints()

    def drop_old_checkpoints(self):
        """--keep_last N: only the N newest numbered checkpoints (ckpt_*.pt) stay on disk."""
        if self.args.keep_last < 1:
            return
        numbered = sorted(glob.glob(os.path.join(self.args.save_dir, "ckpt_*.pt")), key=os.path.getmtime)
        for path in numbered[:-self.args.keep_last]:
            os.remove(path)

    # ---- the loop --------------------------------------------------------------------------------

    def fit(self):
        with StopSignals() as signals:
            while self.epoch < self.args.n_epochs:
                outcome = self.train_epoch(signals)
                if outcome == "finished":
                    self.end_epoch()  # writes last_ckpt.pt
                elif outcome == "stopped":
                    self.save("last_ckpt.pt")
                stop = outcome == "stopped" or any_rank(float(signals.received is not None), self.topology,
                                                        self.device)
                if stop:
                    self.log.line(f"{signals.received or 'a signal'}: stopped after iteration {self.iteration - 1};"
                                  f" continue with --resume {self.args.save_dir}")
                    return
        self.log.line(f"done: {self.iteration} iterations, best validation accuracy {self.best_valid_acc:.4f}")

    def train_epoch(self, signals):
        """Iterations to the end of the epoch: 'finished', 'stopped' (a signal) or 'rolled back'."""
        args, device = self.args, self.device
        loader = self.loaders["train"]
        loader.batch_sampler.start(self.epoch, self.batch_in_epoch)
        labeled = batches_from(self.loaders["labeled"], self.iteration)
        bar = tqdm(loader, desc=f"epoch {self.epoch}", initial=self.batch_in_epoch, total=len(loader),
                   leave=False, disable=args.print_to_log or not self.topology.is_main)
        tick = time.time()
        for x_data, _ in bar:
            lr = scheduled_lr(args, self.epoch, self.iteration, self.lr_scale)
            set_lr(self.optimizer, lr)
            x_data = x_data.to(device, non_blocking=True)
            x_lab, y_lab = (t.to(device, non_blocking=True) for t in next(labeled))
            with autocast(device, args.amp):
                samples, data_heads = draw_samples(self.model, self.replay_buffer, x_data, y_lab, args, self.heads)
                loss, terms = jem_loss(self.model, samples, x_data, x_lab, y_lab, args, self.heads, data_heads)
            loss_value = loss.item()
            diverged = not abs(loss_value) <= DIVERGENCE_THRESHOLD  # also NaN
            # One agreement per iteration: 2 = a rank diverged, 1 = a rank was asked to stop.
            verdict = any_rank(2.0 if diverged else 1.0 if signals.received else 0.0, self.topology, device)
            if verdict == 2:
                self.recover_from_divergence(loss_value)
                return "rolled back"
            update(self.model, self.optimizer, loss, samples, x_data, x_lab, y_lab, args, self.heads)

            it = self.iteration
            self.iteration, self.batch_in_epoch = it + 1, self.batch_in_epoch + 1
            if self.topology.is_main:
                terms = {k: v.item() for k, v in terms.items()}
                bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{terms.get('acc', float('nan')):.3f}")
                if it % args.print_every == 0:
                    seconds = (time.time() - tick) / (1 if it == 0 else args.print_every)
                    tick = time.time()
                    self.log.line(format_terms(self.epoch, it, terms, lr), console_writer=tqdm.write)
                    self.log.record(kind="train", epoch=self.epoch, iteration=it, lr=lr, loss=loss_value,
                                    seconds_per_iteration=seconds, **terms)
                if (args.plot_uncond or args.plot_cond) and it % PLOT_EVERY == 0:
                    plot_samples(self.model, self.replay_buffer, args, self.epoch, it)
            if args.ckpt_every_iters and self.iteration % args.ckpt_every_iters == 0:
                self.save(f"ckpt_iter_{self.iteration}.pt")
                self.save("last_ckpt.pt")
            if verdict == 1 and self.batch_in_epoch < len(loader):  # at the end, the epoch finishes first
                bar.close()
                return "stopped"
        bar.close()
        return "finished"

    def end_epoch(self):
        args = self.args
        if self.epoch % args.eval_every == 0 and (args.p_y_given_x_weight > 0 or args.p_x_y_weight > 0):
            valid_acc = self.evaluate() if self.topology.is_main else -math.inf
            valid_acc = any_rank(valid_acc, self.topology, self.device)  # rank 0's decides for all
            if valid_acc > self.best_valid_acc:
                self.best_valid_acc = valid_acc
                self.save("best_valid_ckpt.pt")
        if self.epoch % args.ckpt_every == 0:
            self.save(f"ckpt_{self.epoch}.pt")
        self.save("last_ckpt.pt")
        if self.buffer_quality is not None and self.epoch % args.fid_every == 0:
            self.log_buffer_quality()
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def evaluate(self):
        """Validation and test accuracy, logged; returns the validation accuracy (-inf without a split)."""
        results = {split: evaluate_classifier(self.model, self.loaders[split], self.device)
                   for split in ("valid", "test")}
        record = dict(kind="eval", epoch=self.epoch, iteration=self.iteration)
        message = [f"epoch {self.epoch}"]
        for split, result in results.items():
            if result is not None:
                record[f"{split}_acc"], record[f"{split}_loss"] = result
                message.append(f"{split} acc {result[0]:.4f} loss {result[1]:.4f}")
        if results["valid"] is not None and results["valid"][0] > self.best_valid_acc:
            message.append("new best")
        self.log.line(" | ".join(message), console_writer=tqdm.write)
        self.log.record(**record)
        return results["valid"][0] if results["valid"] is not None else -math.inf

    def log_buffer_quality(self):
        """--fid_every: IS, FID and KID of the replay buffer against --fid_reference, into metrics.jsonl."""
        scores = self.buffer_quality(self.replay_buffer.images)
        self.log.line(f"epoch {self.epoch} | buffer IS {scores['inception_score']:.3f} FID {scores['fid']:.2f} "
                      f"KID {scores['kid']:.4f} ({len(self.replay_buffer)} images vs {self.args.fid_reference})",
                      console_writer=tqdm.write)
        self.log.record(kind="sample_quality", epoch=self.epoch, iteration=self.iteration,
                        n_samples=len(self.replay_buffer), reference=self.args.fid_reference, **scores)

    def recover_from_divergence(self, loss_value):
        """--on_diverge rollback: back to the last good state with new random numbers; else stop."""
        args = self.args
        where = f"epoch {self.epoch} iteration {self.iteration} (loss {loss_value:.3g})"
        self.log.record(kind="diverged", epoch=self.epoch, iteration=self.iteration, loss=loss_value)
        if args.on_diverge == "stop":
            self.save("last_good_before_divergence.pt")
            path = os.path.join(args.save_dir, "last_good_before_divergence.pt")
            message = (f"training diverged at {where}; the weights before this update are in {path}: restart "
                       f"from them with --load_path {path} and a new --seed, or lower --lr / raise --n_steps, "
                       "or use --on_diverge rollback")
            self.log.line(message)
            raise UserError(message)
        if self.rollbacks >= args.max_rollbacks:
            message = (f"training diverged at {where} after {self.rollbacks} rollbacks (--max_rollbacks); "
                       f"lower --lr, raise --n_steps or add --energy_l2 0.1, then --resume {args.save_dir}")
            self.log.line(message)
            raise UserError(message)
        rollbacks, lr_scale = self.rollbacks + 1, self.lr_scale * args.rollback_lr_scale
        # A copy: the loaded tensors may share storage with the live buffer and optimizer, which the
        # next iterations change in place, and a later rollback needs the snapshot as it was.
        self.load_state_dict(copy.deepcopy(self.snapshot))
        self.rollbacks, self.lr_scale = rollbacks, lr_scale
        seed_everything(args.seed + 7919 * rollbacks + self.topology.rank)  # new chains, not the same again
        self.log.line(f"training diverged at {where}; rollback {rollbacks}/{args.max_rollbacks} to epoch "
                      f"{self.epoch} iteration {self.iteration}, learning rate scale {lr_scale:g}")


def batches_done_in_epoch(state, batch_size, world_size):
    """A saved position inside its epoch, in per-process batches of this run.

    The position is saved in batches of the run that wrote it: with another process count or batch size
    it is converted through the images seen. Every process count reads the same seeded order of the
    epoch (see data.ShuffledBatches), so the first images seen are the same images; a partial batch is
    trained again rather than skipped.
    """
    images_seen = state["batch_in_epoch"] * state["args"]["batch_size"] * state["world_size"]
    return images_seen // (batch_size * world_size)


def plot_samples(model, replay_buffer, args, epoch, iteration):
    sgld = dict(chain_settings(args), train_mode=has_batch_norm(model))
    if args.plot_uncond:
        y = None
        if args.class_cond_p_x_sample:
            y = torch.randint(0, args.n_classes, (args.batch_size,), device=replay_buffer.device)
        x_q = sample_q(model, replay_buffer, args.batch_size, y, **sgld)
        save_grid(os.path.join(args.save_dir, f"x_q_{epoch}_{iteration:06d}.png"), x_q)
    if args.plot_cond:
        y = class_rows(args.n_classes, args.n_classes).to(replay_buffer.device)
        x_q = sample_q(model, replay_buffer, len(y), y, **sgld)
        save_grid(os.path.join(args.save_dir, f"x_q_y_{epoch}_{iteration:06d}.png"), x_q, nrow=args.n_classes)


# --------------------------------------------------------------------------------------------------

def main(argv=None):
    args, resume_state = parse_args(argv), None
    if args.resume:
        if args.load_path:
            raise UserError("--resume continues a run (weights, optimizer, buffer, position); --load_path starts a "
                            "new one from weights: use one of them")
        args, resume_state = resumed_args(args, flags_given(build_parser(), argv))
    topology = init_from_torchrun(args.device)
    try:
        if topology.is_main:
            prepare_save_dir(args.save_dir)
        args.n_classes = n_classes_of(args.dataset, args.data_root)
        check_args(args, topology.world_size)
        device = device_for(topology, select_device(args.device))
        args.device = str(device)
        seed_everything(args.seed + topology.rank)
        log = RunLog(args.save_dir, quiet=args.print_to_log, append=bool(args.resume)) if topology.is_main \
            else SilentLog()
        if topology.is_main:
            write_json(os.path.join(args.save_dir, "args.json"), vars(args))
        trainer = Trainer(args, topology, device, log, resume_state)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        log.line(f"WRN-{args.depth}-{args.width} ({n_params:,} parameters) on {device}"
                 f"{f' x {topology.world_size} processes' if topology.distributed else ''}; "
                 f"{len(trainer.loaders['train'].dataset)} training images, "
                 f"{len(trainer.loaders['labeled'].dataset)} labeled")
        trainer.fit()
        log.close()
    finally:
        shutdown(topology)


if __name__ == "__main__":
    run_cli(main)
