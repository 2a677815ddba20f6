"""Train a Joint Energy Model (JEM) on CIFAR-10/100, SVHN, an image folder or the built-in synthetic
set.

The paper's CIFAR-10 run (WRN-28-10, days on one GPU):

    python train_wrn_ebm.py --lr .0001 --optimizer adam --p_x_weight 1.0 --p_y_given_x_weight 1.0 \
        --p_x_y_weight 0.0 --sigma .03 --width 10 --depth 28 --save_dir ./experiment --plot_uncond \
        --warmup_iters 1000

The later recipes, JEM++ and SADA-JEM, as their authors published them (docs/recipes.md):

    python train_wrn_ebm.py --recipe jempp --plot_uncond --save_dir runs/jempp
    python train_wrn_ebm.py --recipe sadajem --plot_uncond --save_dir runs/sadajem

A quickstart that needs no download and runs on a CPU in a few minutes (JEM++'s sampler, batch norm
and chain starts, with Adam):

    python train_wrn_ebm.py --recipe jempp --dataset synthetic --depth 10 --width 1 \
        --optimizer adam --lr 1e-3 \
        --weight_decay 0 --warmup_iters 0 --n_steps 5 --batch_size 32 --n_epochs 2 --n_valid 500 \
        --buffer_size 1000 --print_every 20 --plot_uncond --save_dir runs/quickstart

Each iteration maximises log p(y|x) on a labeled batch and, with samples x_q that Langevin chains
draw from the replay buffer, log p(x) on a data batch (and optionally log p(x, y)): jem/step.py. The
loop is jem/trainer.py; this script turns the flags into typed settings and runs it.
"""
import os
from contextlib import nullcontext

import torch

from jem.checkpoint import require_checkpoint_file, seed_everything
from jem.data import n_classes_of
from jem.errors import UserError
from jem.eval.sample_quality import BufferQuality
from jem.flags.train import check_args, parse_args, resumed_args, settings_from_args
from jem.run.device import describe_hardware, resolve_amp, select_device
from jem.run.distributed import device_for, init_from_torchrun, shutdown
from jem.run.log import RunLog, SilentLog, write_json
from jem.trainer import Trainer
from utils import run_cli, save_dir_removed_on_failure


def main(argv=None):
    args, resume_state, changed = parse_args(argv), None, {}
    if args.resume:
        if args.load_path:
            raise UserError("--resume continues a run (weights, optimizer, buffer, position); "
                            "--load_path starts a new one from weights: use one of them")
        args, resume_state, changed = resumed_args(argv)
    elif args.load_path:
        args.load_path = require_checkpoint_file(args.load_path)  # a folder: its last_ckpt.pt
    topology = init_from_torchrun(args.device)
    scratch = ("log.txt", "metrics.jsonl")  # what a command that failed before training leaves
    try:
        owner = save_dir_removed_on_failure(args.save_dir, scratch) if topology.is_main \
            else nullcontext()  # rank 0 makes the save dir
        with owner:
            train(args, resume_state, changed, topology)
    finally:
        shutdown(topology)


def train(args, resume_state, changed, topology):
    """Check the flags, build the run, train it, and say how it ended."""
    args.n_classes = n_classes_of(args.dataset, args.data_root)
    check_resumed_classes(args, resume_state)
    check_args(args, topology.world_size)
    device = device_for(topology, select_device(args.device))
    args.device = str(device)
    seed_everything(args.seed + topology.rank)
    first_step = resume_state["iteration"] if resume_state else 0
    log = RunLog(args.save_dir, quiet=args.print_to_log, append=bool(args.resume),
                 tensorboard=args.tensorboard, first_step=first_step) \
        if topology.is_main else SilentLog()
    if changed:
        log.line("flags changed from the stored run: " + ", ".join(
            f"--{k} {stored} -> {now}" for k, (stored, now) in sorted(changed.items())))
    args.amp = resolve_amp(args.amp, device, log.line)
    args.hardware = describe_hardware(device)
    meter = buffer_quality(args, device, log, topology)
    trainer = Trainer(settings_from_args(args), vars(args), topology, device, log, resume_state,
                      load_path=args.load_path, buffer_quality=meter)
    finished = trainer.finished() if resume_state is not None else None
    if finished:
        log.line(f"{args.resume}: nothing left to train, {finished}; extend it with a larger "
                 "--n_epochs or --max_train_minutes")
        log.close()
        return
    start(args, trainer, log, topology)
    outcome = trainer.fit()
    if topology.is_main:
        summarize(args, trainer, outcome, log)
    log.close()


def check_resumed_classes(args, resume_state):
    stored = (resume_state or {}).get("args", {}).get("n_classes")
    if stored is not None and stored != args.n_classes:
        raise UserError(f"--dataset {args.dataset} now has {args.n_classes} classes, but "
                        f"{args.resume} was trained on {stored}: the class count cannot change "
                        "within a run")


def buffer_quality(args, device, log, topology):
    """--fid_every's meter of the replay buffer's IS and FID (rank 0), or None."""
    if not args.fid_every or not topology.is_main:
        return None
    return BufferQuality.if_weights_available(args.inception_weights, args.fid_reference,
                                              args.data_root, args.fid_cache, args.is_splits,
                                              device, log, quiet=args.print_to_log)


def start(args, trainer, log, topology):
    """args.json, the run record and the line that says what trains on what."""
    if topology.is_main:
        write_json(os.path.join(args.save_dir, "args.json"), vars(args))
    log.record(kind="run", hardware=args.hardware, amp=args.amp, compile=args.compile,
               torch=torch.__version__, world_size=topology.world_size)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    processes = f" x {topology.world_size} processes" if topology.distributed else ""
    log.line(f"WRN-{args.depth}-{args.width} ({n_params:,} parameters) on {args.hardware}"
             f"{', bf16 mixed precision (--amp)' if args.amp else ''}{processes}; "
             f"{len(trainer.loaders['train'].dataset)} training images, "
             f"{len(trainer.loaders['labeled'].dataset)} labeled")


def summarize(args, trainer, outcome, log):
    """The end of the run in a few lines: what it did, where it wrote, what to type next."""
    clock = trainer.clock.read()
    last = trainer.last_evaluation or {}
    held_out = ", ".join(f"{split} {last[f'{split}_acc']:.4f}" for split in ("valid", "test")
                         if f"{split}_acc" in last)
    checkpoint = os.path.join(args.save_dir, "last_ckpt.pt")
    lines = [f"{'done' if outcome == 'done' else 'stopped'}: {trainer.iteration} iterations, "
             f"epoch {trainer.epoch}, {clock['train_seconds'] / 60:.1f} minutes of training "
             f"({clock['cpu_seconds'] / 60:.1f} CPU minutes)",
             f"best validation accuracy {trainer.best_valid_acc:.4f}"
             + (f"; last held-out accuracy: {held_out}" if held_out else ""),
             f"checkpoints, log.txt, metrics.jsonl and sample grids in {args.save_dir}",
             f"evaluate: python eval_wrn_ebm.py --load_path {checkpoint} --eval test_clf "
             f"--dataset {args.dataset}"]
    if outcome != "done" or trainer.epoch < args.n_epochs:
        lines.append(f"continue: python train_wrn_ebm.py --resume {args.save_dir}")
    for line in lines:
        log.line(line)


if __name__ == "__main__":
    run_cli(main)
