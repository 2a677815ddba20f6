"""Train a Joint Energy Model (JEM) on CIFAR-10/100, SVHN, an image folder or the built-in synthetic set.

The paper's CIFAR-10 run (WRN-28-10, days on one GPU):

    python train_wrn_ebm.py --lr .0001 --optimizer adam --p_x_weight 1.0 --p_y_given_x_weight 1.0 \
        --p_x_y_weight 0.0 --sigma .03 --width 10 --depth 28 --save_dir ./experiment --plot_uncond \
        --warmup_iters 1000

A quickstart that needs no download and runs on a CPU in a few minutes:

    python train_wrn_ebm.py --dataset synthetic --depth 10 --width 1 --n_steps 5 --batch_size 32 \
        --n_epochs 2 --n_valid 500 --print_every 20 --buffer_size 1000 --save_dir runs/quickstart --plot_uncond

Each iteration maximises log p(y|x) on a labeled batch and, with SGLD samples x_q from the replay
buffer, log p(x) on a data batch (and optionally log p(x, y)); see `jem_loss`.
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import load_checkpoint, load_model_state, save_checkpoint
from data import TORCHVISION_SETS, cycle, n_classes_of, train_loaders
from models import build_model
from plotting import class_rows, save_grid
from sampler import ReplayBuffer, sample_q
from utils import (RunLog, UserError, add_model_flags, add_sampler_flags, add_system_flags, autocast,
                   prepare_save_dir, run_cli, seed_everything, select_device, write_json)

DIVERGENCE_THRESHOLD = 1e8  # |L| above this means the energies ran away (the paper's runs crashed here)
PLOT_EVERY = 100  # iterations between sample grids with --plot_uncond / --plot_cond


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a JEM (Grathwohl et al., ICLR 2020).")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=str, default="cifar10",
                      help=f"{' | '.join(TORCHVISION_SETS)} | synthetic | PATH of an image folder with "
                           "train/ and test/ class sub-folders")
    data.add_argument("--data_root", type=str, default="../data", help="where torchvision data sets live")
    data.add_argument("--n_valid", type=int, default=5000, help="training images held out for validation")
    data.add_argument("--labels_per_class", type=int, default=-1,
                      help="keep this many labels per class for p(y|x) (semi-supervised); -1: all")
    data.add_argument("--sigma", type=float, default=3e-2, help="std of Gaussian noise added to every image")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    optim.add_argument("--lr", type=float, default=1e-4)
    optim.add_argument("--decay_epochs", nargs="+", type=int, default=[160, 180],
                       help="multiply the learning rate by --decay_rate at the start of these epochs")
    optim.add_argument("--decay_rate", type=float, default=0.3)
    optim.add_argument("--warmup_iters", type=int, default=-1,
                       help="linear learning-rate warm-up over this many iterations (-1: none)")
    optim.add_argument("--batch_size", type=int, default=64)
    optim.add_argument("--n_epochs", type=int, default=200)
    optim.add_argument("--weight_decay", type=float, default=0.0)
    optim.add_argument("--clf_only", action="store_true",
                       help="optimise only the classification head (class_output), as the paper's flag")

    objective = parser.add_argument_group("objective")
    objective.add_argument("--p_x_weight", type=float, default=1.0, help="weight of the log p(x) term")
    objective.add_argument("--p_y_given_x_weight", type=float, default=1.0, help="weight of the CE term")
    objective.add_argument("--p_x_y_weight", type=float, default=0.0, help="weight of the log p(x, y) term")
    objective.add_argument("--class_cond_p_x_sample", action="store_true",
                           help="draw the p(x) term's samples from p(y)p(x|y) with uniform random y")

    add_model_flags(parser).add_argument("--dropout_rate", type=float, default=0.0)
    add_sampler_flags(parser, n_steps=20, buffer_size=10000)

    io = parser.add_argument_group("logging and checkpoints")
    io.add_argument("--save_dir", type=str, default="./experiment")
    io.add_argument("--load_path", type=str, default=None,
                    help="start from this checkpoint's model (and replay buffer); the paper's files work")
    io.add_argument("--ckpt_every", type=int, default=10, help="write ckpt_{epoch}.pt every this many epochs")
    io.add_argument("--eval_every", type=int, default=1, help="validation/test accuracy every this many epochs")
    io.add_argument("--plot_uncond", action="store_true", help=f"save unconditional samples every {PLOT_EVERY} its")
    io.add_argument("--plot_cond", action="store_true", help=f"save class-conditional samples every {PLOT_EVERY} its")
    add_system_flags(parser).add_argument(
        "--cuda_graph", action="store_true",
        help="capture the SGLD chain as a CUDA graph and replay it (GPU only; fewer kernel launches)")
    return parser.parse_args(argv)


def check_args(args):
    """Impossible flag combinations, reported before any data or model is built."""
    conditional = args.p_x_y_weight > 0 or args.class_cond_p_x_sample or args.plot_cond
    if args.uncond and conditional:
        raise UserError("--uncond cannot sample class-conditionally: drop --class_cond_p_x_sample, "
                        "--p_x_y_weight and --plot_cond, or drop --uncond")
    if conditional and args.buffer_size % args.n_classes != 0:
        raise UserError(f"--buffer_size {args.buffer_size} must divide by the {args.n_classes} classes for "
                        "class-conditional sampling (one buffer segment per class)")
    for flag in ("batch_size", "n_epochs", "print_every", "ckpt_every", "eval_every"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.n_steps < 0 or args.buffer_size < 0:
        raise UserError("--n_steps and --buffer_size cannot be negative")


# --------------------------------------------------------------------------------------------------
# The objective.

def can_fuse_forward(model):
    """One forward pass over all batches equals separate passes unless a norm couples the examples."""
    return not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()) and \
        all(m.initialized.item() for m in model.modules() if hasattr(m, "initialized"))


def forward_heads(model, batches):
    """(logits, log p(x) score) for each batch, in one concatenated pass where that is exact."""
    if can_fuse_forward(model):
        logits, scores = model.heads(torch.cat(batches))
        sizes = [len(b) for b in batches]
        return list(zip(logits.split(sizes), scores.split(sizes)))
    return [model.heads(b) for b in batches]


def jem_loss(model, replay_buffer, x_data, x_lab, y_lab, args):
    """The JEM loss of one iteration and its terms (as tensors, for logging).

    L = w_px * -(mean score(x_data) - mean score(x_q))
      + w_pyx * CE(f(x_lab), y_lab)
      + w_pxy * -(mean f(x_lab)[y_lab] - mean f(x_q|y_lab)[y_lab])
    """
    sgld = dict(n_steps=args.n_steps, sgld_lr=args.sgld_lr, sgld_std=args.sgld_std,
                cuda_graph=getattr(args, "cuda_graph", False))
    batches, terms = [], {}
    if args.p_x_weight > 0:
        y_q = None
        if args.class_cond_p_x_sample:
            y_q = torch.randint(0, args.n_classes, (len(x_data),), device=x_data.device)
        batches += [x_data, sample_q(model, replay_buffer, len(x_data), y_q, **sgld)]
    if args.p_y_given_x_weight > 0 or args.p_x_y_weight > 0:
        batches.append(x_lab)
    if args.p_x_y_weight > 0:
        batches.append(sample_q(model, replay_buffer, len(y_lab), y_lab, **sgld))

    outputs = iter(forward_heads(model, batches))
    loss = 0.0
    if args.p_x_weight > 0:
        (_, score_data), (_, score_q) = next(outputs), next(outputs)
        terms["f_data"], terms["f_q"] = score_data.mean(), score_q.mean()
        terms["l_p_x"] = -(terms["f_data"] - terms["f_q"])
        loss = loss + args.p_x_weight * terms["l_p_x"]
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
    return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def start_from_checkpoint(model, args, device, log):
    """--load_path: the model's weights and, if the file has one, its replay buffer."""
    ckpt = load_checkpoint(args.load_path)
    load_model_state(model, ckpt["model_state_dict"], args.load_path)
    buffer = ckpt.get("replay_buffer")
    log.line(f"loaded model from {args.load_path}"
             + (f" with its replay buffer of {len(buffer)} images" if buffer is not None else ""))
    if buffer is not None and len(buffer) > 0:
        return ReplayBuffer(0, args.n_classes, args.reinit_freq, device, images=buffer)
    return None


def plot_samples(model, replay_buffer, args, epoch, iteration):
    sgld = dict(n_steps=args.n_steps, sgld_lr=args.sgld_lr, sgld_std=args.sgld_std)
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

def main(argv=None):
    args = parse_args(argv)
    prepare_save_dir(args.save_dir)
    args.n_classes = n_classes_of(args.dataset, args.data_root)
    check_args(args)
    device = select_device(args.device)
    args.device = str(device)
    seed_everything(args.seed)

    log = RunLog(args.save_dir, quiet=args.print_to_log)
    write_json(os.path.join(args.save_dir, "args.json"), vars(args))
    loaders = train_loaders(args, device)
    model = build_model(args).to(device)
    replay_buffer = None
    if args.load_path:
        replay_buffer = start_from_checkpoint(model, args, device, log)
    if replay_buffer is None:
        replay_buffer = ReplayBuffer(args.buffer_size, args.n_classes, args.reinit_freq, device)
    if args.compile:
        model.f.compile()  # in place, so state-dict keys stay those of the paper
    optimizer = make_optimizer(model, args)
    n_params = sum(p.numel() for p in model.parameters())
    log.line(f"WRN-{args.depth}-{args.width} ({n_params:,} parameters) on {device}; "
             f"{len(loaders['train'].dataset)} training images, {len(loaders['labeled'].dataset)} labeled")

    labeled = cycle(loaders["labeled"])
    iteration, best_valid_acc, lr = 0, 0.0, args.lr
    for epoch in range(args.n_epochs):
        if epoch in args.decay_epochs:
            lr *= args.decay_rate
            set_lr(optimizer, lr)
            log.line(f"epoch {epoch}: learning rate decayed to {lr:.2e}")
        bar = tqdm(loaders["train"], desc=f"epoch {epoch}", leave=False, disable=args.print_to_log)
        tick = time.time()
        for x_data, _ in bar:
            if iteration <= args.warmup_iters:
                set_lr(optimizer, lr * iteration / args.warmup_iters)
            x_data = x_data.to(device, non_blocking=True)
            x_lab, y_lab = (t.to(device, non_blocking=True) for t in next(labeled))
            with autocast(device, args.amp):
                loss, terms = jem_loss(model, replay_buffer, x_data, x_lab, y_lab, args)
            loss_value = loss.item()
            if not abs(loss_value) <= DIVERGENCE_THRESHOLD:  # also catches NaN
                stop_diverged(model, replay_buffer, args, epoch, iteration, loss_value, log)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            terms = {k: v.item() for k, v in terms.items()}
            bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{terms.get('acc', float('nan')):.3f}")
            if iteration % args.print_every == 0:
                seconds = (time.time() - tick) / (1 if iteration == 0 else args.print_every)
                tick = time.time()
                current_lr = optimizer.param_groups[0]["lr"]
                log.line(format_terms(epoch, iteration, terms, current_lr), console_writer=tqdm.write)
                log.record(kind="train", epoch=epoch, iteration=iteration, lr=current_lr, loss=loss_value,
                           seconds_per_iteration=seconds, **terms)
            if (args.plot_uncond or args.plot_cond) and iteration % PLOT_EVERY == 0:
                plot_samples(model, replay_buffer, args, epoch, iteration)
            iteration += 1
        bar.close()

        if epoch % args.eval_every == 0 and (args.p_y_given_x_weight > 0 or args.p_x_y_weight > 0):
            best_valid_acc = evaluate_and_keep_best(model, replay_buffer, loaders, args, epoch, iteration,
                                                    best_valid_acc, log, device)
        extra = dict(args=vars(args), epoch=epoch, iteration=iteration, best_valid_acc=best_valid_acc,
                     optimizer_state_dict=optimizer.state_dict())
        if epoch % args.ckpt_every == 0:
            save_checkpoint(os.path.join(args.save_dir, f"ckpt_{epoch}.pt"), model, replay_buffer, **extra)
        save_checkpoint(os.path.join(args.save_dir, "last_ckpt.pt"), model, replay_buffer, **extra)
    log.line(f"done: {iteration} iterations, best validation accuracy {best_valid_acc:.4f}")
    log.close()


def evaluate_and_keep_best(model, replay_buffer, loaders, args, epoch, iteration, best_valid_acc, log, device):
    valid, test = (evaluate_classifier(model, loaders[split], device) for split in ("valid", "test"))
    record = dict(kind="eval", epoch=epoch, iteration=iteration)
    message = [f"epoch {epoch}"]
    for name, result in (("valid", valid), ("test", test)):
        if result is not None:
            record[f"{name}_acc"], record[f"{name}_loss"] = result
            message.append(f"{name} acc {result[0]:.4f} loss {result[1]:.4f}")
    if valid is not None and valid[0] > best_valid_acc:
        best_valid_acc = valid[0]
        message.append("new best")
        save_checkpoint(os.path.join(args.save_dir, "best_valid_ckpt.pt"), model, replay_buffer,
                        args=vars(args), epoch=epoch, iteration=iteration, best_valid_acc=best_valid_acc)
    log.line(" | ".join(message), console_writer=tqdm.write)
    log.record(**record)
    return best_valid_acc


def stop_diverged(model, replay_buffer, args, epoch, iteration, loss_value, log):
    """Keep the pre-divergence weights in their own file (no checkpoint is overwritten), then stop."""
    path = os.path.join(args.save_dir, "last_good_before_divergence.pt")
    save_checkpoint(path, model, replay_buffer, args=vars(args), epoch=epoch, iteration=iteration)
    message = (f"training diverged at epoch {epoch} iteration {iteration} (loss {loss_value:.3g}); the weights "
               f"before this update are in {path}: restart from them with --load_path {path} and a new --seed, "
               "or lower --lr / raise --n_steps")
    log.line(message)
    log.record(kind="diverged", epoch=epoch, iteration=iteration, loss=loss_value)
    raise UserError(message)


if __name__ == "__main__":
    run_cli(main)
