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
import copy
import glob
import math
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from jem.chain_init import ClassGaussians, UniformNoise
from jem.checkpoint import checkpoint_state, load_checkpoint, load_model_state, require_checkpoint_file, restore_rng_states, rng_states, write_checkpoint
from jem.data import batches_from, n_classes_of, plain_training_images, train_loaders
from jem.run.distributed import any_rank, broadcast, device_for, gather, gather_objects, init_from_torchrun, shard, shutdown
from jem.model import Heads, build_model
from jem.eval.plots import class_rows, save_grid
from jem.run.device import describe_hardware, resolve_amp
from jem.eval.sample_quality import BufferQuality
from jem.sampler import ReplayBuffer, sample_q
from jem.run.stopping import Diverged, StopSignals, TrainingClock, has_diverged, weights_are_finite
from jem.flags.train import PLOT_EVERY, check_args, needs_conditional_buffer, parse_args, resumed_args
from jem.step import chain_settings, evaluate_classifier, has_batch_norm, iteration_loss, make_optimizer, scheduled_lr, set_lr, to_training_device, update
from jem.checkpoint import seed_everything
from jem.errors import UserError
from jem.run.device import select_device
from jem.run.log import RunLog, SilentLog, write_json
from utils import prepare_save_dir, run_cli


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
        self.clock = TrainingClock(*(resume_state.get(k, 0.0) for k in ("train_seconds", "cpu_seconds"))
                                   if resume_state else ())
        # --eval_every_minutes: the periods of the clock evaluated so far (a resumed run goes on from its own)
        self.eval_period = int(self.clock.minutes(args.train_clock) // args.eval_every_minutes) \
            if args.eval_every_minutes else 0
        self.loaders = train_loaders(args, device, topology.rank, topology.world_size)
        if args.eval_train:
            self.loaders["train_clean"] = plain_training_images(args, device)
        self.model = to_training_device(build_model(args), device)
        self.gaussians_fingerprint = None
        self.chain_init = self.make_chain_init(resume_state)
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

    def make_chain_init(self, resume_state):
        """--buffer_init: uniform noise, or the per-class Gaussians of the training images, fitted by rank 0 and
        sent to every rank. They are not saved (380 MB for CIFAR-10, ten times that for CIFAR-100): --resume fits
        them again, and checks against the fingerprint in the checkpoint that the fit gave the same numbers."""
        if self.args.buffer_init == "uniform":
            return UniformNoise()
        gaussians = None
        if self.topology.is_main:
            tick = time.time()
            gaussians = ClassGaussians.fit(plain_training_images(self.args, self.device), self.args.n_classes)
            self.gaussians_fingerprint = gaussians.fingerprint()
            stored = resume_state.get("class_gaussians_sha256") if resume_state else None
            if stored is None:
                refit = ""
            elif stored == self.gaussians_fingerprint:
                refit = " (the same numbers as when the run started)"
            else:
                refit = (": they differ in rounding from those the run started with (another machine or thread "
                         "count?), so this run will not repeat an uninterrupted one bit for bit")
            self.log.line(f"fitted {self.args.n_classes} class Gaussians to the training images in "
                          f"{time.time() - tick:.1f}s{refit}")
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
            best_valid_acc=self.best_valid_acc, lr_scale=self.lr_scale, rollbacks=self.rollbacks,
            class_gaussians_sha256=self.gaussians_fingerprint, **self.clock.read())

    def load_state_dict(self, state):
        load_model_state(self.model, state["model_state_dict"], self.args.resume or "the last good state")
        self.replay_buffer = self.buffer_from(state["replay_buffer"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        for key in ("epoch", "iteration", "best_valid_acc", "lr_scale", "rollbacks"):
            setattr(self, key, state[key])
        self.batch_in_epoch = batches_done_in_epoch(state, epoch_batch_size(vars(self.args)),
                                                    self.topology.world_size)
        if self.batch_in_epoch >= len(self.epoch_streams()[0]):  # saved at the end of an epoch
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
                    if self.args.max_train_minutes and self.topology.is_main:
                        self.evaluate(end_of_epoch=False)  # the accuracy the budget bought
                    self.save("last_ckpt.pt")
                stop = outcome == "stopped" or any_rank(float(self.stop_reason(signals) is not None), self.topology,
                                                        self.device)
                if stop:
                    reason = self.stop_reason(signals)
                    self.log.line(f"{reason or 'another process asked to stop'}: stopped after "
                                  f"iteration {self.iteration - 1}; continue with --resume {self.args.save_dir}")
                    self.record(kind="end", reason="budget" if reason and reason.startswith("--max_train") else
                                "signal")
                    return
        self.log.line(f"done: {self.iteration} iterations, best validation accuracy {self.best_valid_acc:.4f}")
        self.record(kind="end", reason="done")

    def stop_reason(self, signals):
        """Why this process should stop after the current iteration (a signal, the time budget), or None."""
        budget = self.args.max_train_minutes
        if signals.received is None and budget and self.clock.minutes(self.args.train_clock) >= budget:
            return f"--max_train_minutes {budget:g} used"
        return signals.received

    def held_out_eval_due(self):
        """--eval_every_iters / --eval_every_minutes: a learning-curve evaluation after this iteration?"""
        every_iters, every_minutes = self.args.eval_every_iters, self.args.eval_every_minutes
        if every_iters and self.iteration % every_iters == 0:
            return True
        if every_minutes:
            period = int(self.clock.minutes(self.args.train_clock) // every_minutes)
            due, self.eval_period = period > self.eval_period, period
            return due
        return False

    def epoch_streams(self):
        """(the loader an epoch passes over, the loader cycled alongside it): the p(x) and the labeled batches, or
        the other way round with --epoch_over labeled (SADA-JEM)."""
        px, labeled = self.loaders["train"], self.loaders["labeled"]
        return (px, labeled) if self.args.epoch_over == "px" else (labeled, px)

    def train_epoch(self, signals):
        """Iterations to the end of the epoch: 'finished', 'stopped' (a signal) or 'rolled back'."""
        args, device = self.args, self.device
        loader, cycled = self.epoch_streams()
        loader.batch_sampler.start(self.epoch, self.batch_in_epoch)
        alongside = batches_from(cycled, self.iteration)
        bar = tqdm(loader, desc=f"epoch {self.epoch}", initial=self.batch_in_epoch, total=len(loader),
                   leave=False, disable=args.print_to_log or not self.topology.is_main)
        tick = time.time()
        for batch in bar:  # each stream's batch drawn in the authors' order (their augmentations draw random numbers)
            px_batch, labeled_batch = (batch, next(alongside)) if args.epoch_over == "px" else (next(alongside), batch)
            lr = scheduled_lr(args, self.epoch, self.iteration, self.lr_scale)
            set_lr(self.optimizer, lr)
            x_data = px_batch[0].to(device, non_blocking=True)
            x_lab, y_lab = (t.to(device, non_blocking=True) for t in labeled_batch)
            loss, terms, samples = iteration_loss(self.model, self.replay_buffer, x_data, x_lab, y_lab, args,
                                                  self.heads)
            loss_value = loss.item()
            diverged = has_diverged(loss_value, terms, args)
            # One agreement per iteration: 2 = a rank diverged, 1 = a rank was asked to stop.
            stop = self.stop_reason(signals) is not None
            verdict = any_rank(2.0 if diverged else 1.0 if stop else 0.0, self.topology, device)
            if verdict == 2:
                self.recover_from_divergence(loss_value)
                return "rolled back"
            try:
                update(self.model, self.optimizer, loss, samples, x_data, x_lab, y_lab, args, self.heads,
                       check_loss=self.check_perturbed_loss)
            except Diverged as diverged_inside:
                self.recover_from_divergence(diverged_inside.loss_value, "SAM's loss at its perturbed weights")
                return "rolled back"

            it = self.iteration
            self.iteration, self.batch_in_epoch = it + 1, self.batch_in_epoch + 1
            if self.topology.is_main:
                terms = {k: v.item() for k, v in terms.items()}
                bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{terms.get('acc', float('nan')):.3f}")
                if it % args.print_every == 0:
                    seconds = (time.time() - tick) / (1 if it == 0 else args.print_every)
                    tick = time.time()
                    self.log.line(format_terms(self.epoch, it, terms, lr), console_writer=tqdm.write)
                    self.record(kind="train", iteration=it, lr=lr, loss=loss_value, seconds_per_iteration=seconds,
                                **terms)
                if (args.plot_uncond or args.plot_cond) and it % PLOT_EVERY == 0:
                    plot_samples(self.model, self.replay_buffer, args, self.epoch, it)
            if self.held_out_eval_due() and self.topology.is_main:
                self.evaluate(end_of_epoch=False)
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

    def evaluate(self, end_of_epoch=True):
        """Validation and test accuracy (and with --eval_train the training split's), logged; returns the
        validation accuracy (-inf without a split).

        Its time is not training time: the clock stops meanwhile."""
        splits = {"valid": "valid", "test": "test", **({"train": "train_clean"} if self.args.eval_train else {})}
        with self.clock.paused():
            results = {split: evaluate_classifier(self.model, self.loaders[loader], self.device)
                       for split, loader in splits.items()}
        record = dict(kind="eval", end_of_epoch=end_of_epoch)
        message = [f"epoch {self.epoch}" if end_of_epoch else f"epoch {self.epoch} it {self.iteration}"]
        for split, result in results.items():
            if result is not None:
                record[f"{split}_acc"], record[f"{split}_loss"] = result
                message.append(f"{split} acc {result[0]:.4f} loss {result[1]:.4f}")
        if end_of_epoch and results["valid"] is not None and results["valid"][0] > self.best_valid_acc:
            message.append("new best")
        self.log.line(" | ".join(message), console_writer=tqdm.write)
        self.record(**record)
        return results["valid"][0] if results["valid"] is not None else -math.inf

    def log_buffer_quality(self):
        """--fid_every: IS, FID and KID of the replay buffer against --fid_reference, into metrics.jsonl."""
        with self.clock.paused():
            scores = self.buffer_quality(self.replay_buffer.images)
        self.log.line(f"epoch {self.epoch} | buffer IS {scores['inception_score']:.3f} FID {scores['fid']:.2f} "
                      f"KID {scores['kid']:.4f} ({len(self.replay_buffer)} images vs {self.args.fid_reference})",
                      console_writer=tqdm.write)
        self.record(kind="sample_quality", n_samples=len(self.replay_buffer), reference=self.args.fid_reference,
                    **scores)

    def stop_after_divergence(self, where):
        """Keep the last good state in last_good_before_divergence.pt: the weights before the diverging update or,
        should they be no longer finite (a step whose loss was finite), the last checkpoint's; the line to show."""
        good = next((state for state in (self.state_dict(), self.snapshot) if weights_are_finite(state)), None)
        path = os.path.join(self.args.save_dir, "last_good_before_divergence.pt")
        if good is None:
            message = (f"training diverged at {where}, and no state with finite weights is left to keep: start "
                       "again with a lower --lr or more --n_steps")
        else:
            if self.topology.is_main:
                write_checkpoint(path, good)
            message = (f"training diverged at {where}; the last good weights (iteration {good['iteration']}) are in "
                       f"{path}: restart from them with --load_path {path} and a new --seed, or lower --lr / raise "
                       "--n_steps, or use --on_diverge rollback")
        self.log.line(message)
        return message

    def record(self, **fields):
        """A metrics.jsonl record at this point of the run: its epoch, iteration and training clock, then `fields`."""
        self.log.record(**{"epoch": self.epoch, "iteration": self.iteration, **self.clock.read(), **fields})

    def check_perturbed_loss(self, loss, terms):
        """SAM's second loss, checked as the first before it is backpropagated (every rank raises together)."""
        loss_value = loss.item()
        if any_rank(float(has_diverged(loss_value, terms, self.args)), self.topology, self.device):
            raise Diverged(loss_value)

    def recover_from_divergence(self, loss_value, what="the loss"):
        """--on_diverge rollback: back to the last good state with new random numbers; else stop."""
        args = self.args
        where = f"epoch {self.epoch} iteration {self.iteration} ({what} {loss_value:.3g})"
        self.record(kind="diverged", loss=loss_value, what=what)
        if args.on_diverge == "stop":
            raise UserError(self.stop_after_divergence(where))
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


def epoch_batch_size(flags):
    """Images per batch of the stream an epoch passes over, from a dict of flags (this run's or a checkpoint's)."""
    if flags.get("epoch_over", "px") == "labeled":
        return flags.get("labeled_batch_size") or flags["batch_size"]
    return flags["batch_size"]


def batches_done_in_epoch(state, batch_size, world_size):
    """A saved position inside its epoch, in per-process batches of this run.

    The position is saved in batches of the run that wrote it: with another process count or batch size
    it is converted through the images seen. Every process count reads the same seeded order of the
    epoch (see data.ShuffledBatches), so the first images seen are the same images; a partial batch is
    trained again rather than skipped.
    """
    images_seen = state["batch_in_epoch"] * epoch_batch_size(state["args"]) * state["world_size"]
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
        args, resume_state = resumed_args(argv)
    elif args.load_path:
        require_checkpoint_file(args.load_path)
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
        resolve_amp(args, device, log.line)
        args.hardware = describe_hardware(device)
        if topology.is_main:
            write_json(os.path.join(args.save_dir, "args.json"), vars(args))
        log.record(kind="run", hardware=args.hardware, amp=args.amp, compile=args.compile, torch=torch.__version__,
                   world_size=topology.world_size)
        trainer = Trainer(args, topology, device, log, resume_state)
        n_params = sum(p.numel() for p in trainer.model.parameters())
        log.line(f"WRN-{args.depth}-{args.width} ({n_params:,} parameters) on {args.hardware}"
                 f"{', bf16 mixed precision (--amp)' if args.amp else ''}"
                 f"{f' x {topology.world_size} processes' if topology.distributed else ''}; "
                 f"{len(trainer.loaders['train'].dataset)} training images, "
                 f"{len(trainer.loaders['labeled'].dataset)} labeled")
        trainer.fit()
        log.close()
    finally:
        shutdown(topology)


if __name__ == "__main__":
    run_cli(main)
