"""The training run: what it holds (model, optimizer, replay buffer, data, position, random state)
and the loop over epochs. One iteration is `Trainer.iterate`; logging, held-out evaluation,
divergence rollback and stopping are small objects of jem/run/ that the loop calls.

`state_dict()` is the whole training state, so a checkpoint resumes exactly and a divergence rolls
back to the last one.
"""
import copy
import glob
import math
import os
import time
from dataclasses import replace

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from jem.chain_init import ClassGaussians, UniformNoise
from jem.checkpoint import (checkpoint_state, load_checkpoint, load_model_state, restore_rng_states,
                            rng_states, seed_everything, write_checkpoint)
from jem.data import batches_from, plain_training_images, train_loaders
from jem.eval.plots import class_rows, save_grid
from jem.model import Heads, build_model
from jem.optim import make_optimizer, set_lr
from jem.run.distributed import any_rank, broadcast, gather, gather_objects, shard
from jem.run.held_out import EvaluationTimer, evaluate_classifier
from jem.run.log import format_terms
from jem.run.position import batches_done_in_epoch, epoch_batch_size
from jem.run.rollback import Rollback
from jem.run.stopping import Diverged, StopSignals, TrainingClock, has_diverged
from jem.sampler import ReplayBuffer, sample_q
from jem.step import Batch, iteration_loss, to_training_device, update
from jem.errors import UserError


class Trainer:
    """A run and its loop; `flags` (the command line, a plain dict) go into every checkpoint."""

    def __init__(self, settings, flags, topology, device, log, resume_state=None, load_path=None,
                 buffer_quality=None):
        self.settings, self.flags, self.topology, self.device, self.log = \
            settings, flags, topology, device, log
        run = settings.run
        self.save_dir, self.seed = run.save_dir, run.seed
        trained = (resume_state or {}).get
        self.clock = TrainingClock(trained("train_seconds", 0.0), trained("cpu_seconds", 0.0))
        self.loaders = train_loaders(settings.data, device, topology.rank, topology.world_size)
        if settings.held_out.on_training_split:
            self.loaders["train_clean"] = plain_training_images(settings.data, device)
        self.model = to_training_device(build_model(settings.model), device)
        self.gaussians_fingerprint = None
        self.chain_init = self.make_chain_init(resume_state)
        self.replay_buffer = ReplayBuffer(settings.buffer.size // topology.world_size,
                                          settings.model.n_classes, settings.buffer.reinit_freq,
                                          device, chain_init=self.chain_init)
        if load_path:
            self.start_from_weights(load_path)
        if run.compile:
            self.model.f.compile()  # in place, so state-dict keys stay those of the paper
        self.heads = self.model.heads
        if topology.distributed:
            # DDP averages the gradients of the loss pass; SGLD chains use the bare model (no sync).
            # Unused parameters: `f.linear` always, one of the two heads depending on --uncond.
            self.heads = DistributedDataParallel(Heads(self.model), find_unused_parameters=True)
        self.optimizer = make_optimizer(self.model, settings.optimizer)
        self.epoch = self.batch_in_epoch = self.iteration = self.rollbacks = 0
        self.best_valid_acc, self.lr_scale = 0.0, 1.0
        self.last_evaluation = None  # the last held-out record, for the end-of-run summary
        if resume_state is not None:
            self.load_state_dict(resume_state)
            log.line(f"resumed {flags['resume']} at epoch {self.epoch}, iteration {self.iteration}")
        self.clock.restart(**self.clock.before)  # the set-up (data, Gaussians) is not training
        self.evaluations = EvaluationTimer(settings.held_out, self.clock)
        self.rollback = Rollback(self, settings.rollback)
        self.buffer_quality = buffer_quality

    # ---- state -----------------------------------------------------------------------------------

    def make_chain_init(self, resume_state):
        """Uniform noise, or the per-class Gaussians of the training images, fitted by rank 0 and
        sent to every rank. They are not saved (380 MB for CIFAR-10): --resume fits them again and
        checks the fit against the fingerprint in the checkpoint."""
        if self.settings.buffer.init == "uniform":
            return UniformNoise()
        gaussians, n_classes = None, self.settings.model.n_classes
        if self.topology.is_main:
            tick = time.time()
            images = plain_training_images(self.settings.data, self.device)
            gaussians = ClassGaussians.fit(images, n_classes)
            self.gaussians_fingerprint = gaussians.fingerprint()
            stored = resume_state.get("class_gaussians_sha256") if resume_state else None
            if stored is None:
                refit = ""
            elif stored == self.gaussians_fingerprint:
                refit = " (the same numbers as when the run started)"
            else:
                refit = (": they differ in rounding from those the run started with (another "
                         "machine or thread count?), so this run will not repeat an uninterrupted "
                         "one bit for bit")
            self.log.line(f"fitted {n_classes} class Gaussians to the training images in "
                          f"{time.time() - tick:.1f}s{refit}")
        return broadcast(gaussians, self.topology).to(self.device)

    def start_from_weights(self, path):
        """--load_path: the model's weights and, if the file has one, its replay buffer."""
        ckpt = load_checkpoint(path)
        load_model_state(self.model, ckpt["model_state_dict"], path)
        images = ckpt.get("replay_buffer")
        if images is not None and len(images) > 0:
            self.replay_buffer = self.buffer_from(images)
        with_buffer = "" if images is None else f" with its replay buffer of {len(images)} images"
        self.log.line(f"loaded model from {path}{with_buffer}")

    def buffer_from(self, images):
        buffer = ReplayBuffer(0, self.settings.model.n_classes, self.settings.buffer.reinit_freq,
                              self.device, images=shard(images, self.topology).float(),
                              chain_init=self.chain_init)
        if self.settings.buffer.conditional and not buffer.can_condition():
            raise UserError(f"the loaded replay buffer shard of {len(buffer)} images does not "
                            f"divide by the {self.settings.model.n_classes} classes needed for "
                            "class-conditional sampling")
        return buffer

    def state_dict(self):
        """The whole training state, copied to the CPU (every rank calls this: buffers are
        gathered)."""
        return checkpoint_state(
            {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            gather(self.replay_buffer.images, self.topology),
            optimizer_state_dict=copy.deepcopy(self.optimizer.state_dict()),
            rng_states=gather_objects(rng_states(), self.topology),
            args=self.flags, world_size=self.topology.world_size,
            epoch=self.epoch, batch_in_epoch=self.batch_in_epoch, iteration=self.iteration,
            best_valid_acc=self.best_valid_acc, lr_scale=self.lr_scale, rollbacks=self.rollbacks,
            class_gaussians_sha256=self.gaussians_fingerprint, **self.clock.read())

    def load_state_dict(self, state):
        load_model_state(self.model, state["model_state_dict"],
                         self.flags.get("resume") or "the last good state")
        self.replay_buffer = self.buffer_from(state["replay_buffer"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        for key in ("epoch", "iteration", "best_valid_acc", "lr_scale", "rollbacks"):
            setattr(self, key, state[key])
        self.batch_in_epoch = batches_done_in_epoch(state, epoch_batch_size(self.flags),
                                                    self.topology.world_size)
        if self.batch_in_epoch >= len(self.epoch_streams()[0]):  # saved at the end of an epoch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if state["world_size"] == self.topology.world_size:
            restore_rng_states(state["rng_states"][self.topology.rank])
        else:  # other ranks, other chains: continue with fresh, still seeded, random streams
            seed_everything(self.seed + 1000 * self.iteration + self.topology.rank)

    def save(self, name):
        """Write the training state as `name` in the save dir (rank 0); it is the rollback point."""
        state = self.state_dict()
        self.rollback.keep(state)
        if self.topology.is_main:
            write_checkpoint(os.path.join(self.save_dir, name), state)
            if name.startswith("ckpt_"):
                self.drop_old_checkpoints()

    def drop_old_checkpoints(self):
        """--keep_last N: only the N newest numbered checkpoints (ckpt_*.pt) stay on disk."""
        keep = self.settings.run.keep_last
        if keep < 1:
            return
        numbered = sorted(glob.glob(os.path.join(self.save_dir, "ckpt_*.pt")), key=os.path.getmtime)
        for path in numbered[:-keep]:
            os.remove(path)

    # ---- the loop --------------------------------------------------------------------------------

    def finished(self):
        """Why a resumed run has nothing left to train (its epochs or its budget), or None."""
        run = self.settings.run
        if self.epoch >= run.n_epochs:
            return f"it has trained its {run.n_epochs} epochs (--n_epochs)"
        if self.budget_used():
            return (f"it has used its budget of {run.max_train_minutes:g} minutes "
                    "(--max_train_minutes)")
        return None

    def budget_used(self):
        run = self.settings.run
        return bool(run.max_train_minutes) and \
            self.clock.minutes(run.train_clock) >= run.max_train_minutes

    def fit(self):
        """Epochs until --n_epochs, a signal or the budget; returns 'done', 'budget' or 'signal'."""
        with StopSignals() as signals:
            while self.epoch < self.settings.run.n_epochs:
                outcome = self.train_epoch(signals)
                if outcome == "finished":
                    self.end_epoch()
                elif outcome == "stopped":
                    if self.settings.run.max_train_minutes and self.topology.is_main:
                        self.evaluate(end_of_epoch=False)  # the accuracy the budget bought
                    self.save("last_ckpt.pt")
                reason = self.stop_reason(signals)
                if outcome == "stopped" or self.any_rank_stops(reason):
                    return self.stop(reason)
        self.record(kind="end", reason="done")
        return "done"

    def any_rank_stops(self, reason):
        """Whether this or another process has a reason to stop (every process must ask)."""
        return bool(any_rank(float(reason is not None), self.topology, self.device))

    def stop(self, reason):
        self.log.line(f"{reason or 'another process asked to stop'}: stopped after "
                      f"{self.iteration} iterations; continue with --resume {self.save_dir}")
        ended = "budget" if reason and reason.startswith("--max_train") else "signal"
        self.record(kind="end", reason=ended)
        return ended

    def stop_reason(self, signals):
        """Why this process should stop after the current iteration (a signal, the budget), or
        None."""
        if signals.received is None and self.budget_used():
            return f"--max_train_minutes {self.settings.run.max_train_minutes:g} used"
        return signals.received

    def epoch_streams(self):
        """(the loader an epoch passes over, the loader cycled alongside it): the p(x) and the
        labeled batches, or the other way round with --epoch_over labeled (SADA-JEM)."""
        px, labeled = self.loaders["train"], self.loaders["labeled"]
        return (px, labeled) if self.settings.run.epoch_over == "px" else (labeled, px)

    def epoch_batches(self, loader):
        """(p(x) batch, labeled batch) pairs to the end of the epoch, each stream's batch drawn in
        the authors' order (their augmentations draw random numbers)."""
        alongside = batches_from(self.epoch_streams()[1], self.iteration)
        for batch in loader:
            if self.settings.run.epoch_over == "px":
                yield batch, next(alongside)
            else:
                yield next(alongside), batch

    def train_epoch(self, signals):
        """Iterations to the end of the epoch: 'finished', 'stopped' or 'rolled back'."""
        loader = self.epoch_streams()[0]
        loader.batch_sampler.start(self.epoch, self.batch_in_epoch)
        quiet = self.settings.run.quiet or not self.topology.is_main
        bar = tqdm(loader, desc=f"epoch {self.epoch}", initial=self.batch_in_epoch,
                   total=len(loader), leave=False, disable=quiet)
        self.tick = time.time()
        with bar:
            for px_batch, labeled_batch in self.epoch_batches(bar):
                outcome = self.iterate(px_batch, labeled_batch, signals, bar)
                if outcome == "rolled back":
                    return outcome
                self.after_iteration()
                # asked to stop at the last batch: the epoch finishes first
                if outcome == "stop" and self.batch_in_epoch < len(loader):
                    return "stopped"
        return "finished"

    def iterate(self, px_batch, labeled_batch, signals, bar):
        """One iteration: 'ok', 'stop' (asked to stop after it) or 'rolled back' (it diverged)."""
        lr = self.settings.schedule.lr_at(self.epoch, self.iteration, self.lr_scale)
        set_lr(self.optimizer, lr)
        batch = Batch(px_batch[0].to(self.device, non_blocking=True),
                      *(t.to(self.device, non_blocking=True) for t in labeled_batch))
        loss, terms, samples = iteration_loss(self.model, self.replay_buffer, batch,
                                              self.settings.step, self.heads)
        loss_value = loss.item()
        diverged = has_diverged(loss_value, terms, self.settings.divergence)
        stop = self.stop_reason(signals) is not None
        # One agreement per iteration: 2 = a rank diverged, 1 = a rank was asked to stop.
        verdict = any_rank(2.0 if diverged else 1.0 if stop else 0.0, self.topology, self.device)
        if verdict == 2:
            self.rollback.recover(loss_value)
            return "rolled back"
        try:
            update(self.model, self.optimizer, loss, samples, batch, self.settings.step, self.heads,
                   check_loss=self.check_perturbed_loss)
        except Diverged as inside:
            self.rollback.recover(inside.loss_value, "SAM's loss at its perturbed weights")
            return "rolled back"
        self.iteration, self.batch_in_epoch = self.iteration + 1, self.batch_in_epoch + 1
        if self.topology.is_main:
            self.report(self.iteration - 1, lr, loss_value, terms, bar)
        return "stop" if verdict == 1 else "ok"

    def after_iteration(self):
        """Learning-curve evaluations and iteration checkpoints that are due."""
        if self.evaluations.due(self.iteration):
            if self.topology.is_main:
                self.evaluate(end_of_epoch=False)
            self.evaluations.mark_done()
        every = self.settings.run.ckpt_every_iters
        if every and self.iteration % every == 0:
            self.save(f"ckpt_iter_{self.iteration}.pt")
            self.save("last_ckpt.pt")

    def report(self, it, lr, loss_value, terms, bar):
        """The progress bar, and every --print_every iterations a log line and a metrics record; the
        sample grids every plot_every iterations."""
        run = self.settings.run
        energies = {name: terms.pop(name) for name in ("energy_data", "energy_q") if name in terms}
        terms = {k: v.item() for k, v in terms.items()}
        bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{terms.get('acc', float('nan')):.3f}")
        if it % run.print_every == 0:
            seconds = (time.time() - self.tick) / (1 if it == 0 else run.print_every)
            self.tick = time.time()
            self.log.line(format_terms(self.epoch, it, terms, lr), console_writer=tqdm.write)
            self.record(kind="train", iteration=it, lr=lr, loss=loss_value,
                        seconds_per_iteration=seconds, **terms)
            self.log.histograms(it, **{f"energy/{name[len('energy_'):]}": values.float()
                                       for name, values in energies.items()})
        if (run.plot_uncond or run.plot_cond) and it % run.plot_every == 0:
            self.plot_samples(it)

    def end_epoch(self):
        """Evaluation, checkpoints and buffer quality at the end of an epoch."""
        run, objective = self.settings.run, self.settings.step.objective
        if self.epoch % self.settings.held_out.every_epochs == 0 and objective.uses_labels:
            valid_acc = self.evaluate() if self.topology.is_main else -math.inf
            valid_acc = any_rank(valid_acc, self.topology, self.device)  # rank 0's decides
            if valid_acc > self.best_valid_acc:
                self.best_valid_acc = valid_acc
                self.save("best_valid_ckpt.pt")
        if self.epoch % run.ckpt_every == 0:
            self.save(f"ckpt_{self.epoch}.pt")
        self.save("last_ckpt.pt")
        if self.buffer_quality is not None and self.epoch % run.fid_every == 0:
            self.log_buffer_quality()
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def evaluate(self, end_of_epoch=True):
        """Validation and test accuracy (and with --eval_train the training split's), logged;
        returns the validation accuracy (-inf without a split). The training clock stops
        meanwhile."""
        splits = {"valid": "valid", "test": "test"}
        if self.settings.held_out.on_training_split:
            splits["train"] = "train_clean"
        with self.clock.paused():
            results = {split: evaluate_classifier(self.model, self.loaders[loader], self.device)
                       for split, loader in splits.items()}
        record = dict(kind="eval", end_of_epoch=end_of_epoch)
        message = [f"epoch {self.epoch}" if end_of_epoch else f"epoch {self.epoch} it "
                                                              f"{self.iteration}"]
        for split, result in results.items():
            if result is not None:
                record[f"{split}_acc"], record[f"{split}_loss"] = result
                message.append(f"{split} acc {result[0]:.4f} loss {result[1]:.4f}")
        valid = results["valid"][0] if results["valid"] is not None else -math.inf
        if end_of_epoch and valid > self.best_valid_acc:
            message.append("new best")
        self.log.line(" | ".join(message), console_writer=tqdm.write)
        self.record(**record)
        self.last_evaluation = record
        return valid

    def log_buffer_quality(self):
        """--fid_every: IS, FID and KID of the replay buffer, into metrics.jsonl."""
        with self.clock.paused():
            scores = self.buffer_quality(self.replay_buffer.images)
        reference = self.flags.get("fid_reference")
        self.log.line(f"epoch {self.epoch} | buffer IS {scores['inception_score']:.3f} FID "
                      f"{scores['fid']:.2f} KID {scores['kid']:.4f} ({len(self.replay_buffer)} "
                      f"images vs {reference})", console_writer=tqdm.write)
        self.record(kind="sample_quality", n_samples=len(self.replay_buffer), reference=reference,
                    **scores)

    def plot_samples(self, iteration):
        """Grids of fresh samples: unconditional, and one row per class
        (--plot_uncond/--plot_cond)."""
        run, objective = self.settings.run, self.settings.step.objective
        chain = replace(self.settings.step.chain, cuda_graph=False)
        device = self.replay_buffer.device
        n, prefix = self.settings.data.batch_size, os.path.join(self.save_dir, "x_q")
        if run.plot_uncond:
            y = None
            if objective.class_cond_p_x_sample:
                y = torch.randint(0, objective.n_classes, (n,), device=device)
            x_q = sample_q(self.model, self.replay_buffer, n, y, chain)
            save_grid(f"{prefix}_{self.epoch}_{iteration:06d}.png", x_q)
            self.log.images("samples/x_q", x_q, iteration)
        if run.plot_cond:
            y = class_rows(objective.n_classes, objective.n_classes).to(device)
            x_q = sample_q(self.model, self.replay_buffer, len(y), y, chain)
            save_grid(f"{prefix}_y_{self.epoch}_{iteration:06d}.png", x_q, nrow=objective.n_classes)
            self.log.images("samples/x_q_y", x_q, iteration, nrow=objective.n_classes)

    def record(self, **fields):
        """A metrics.jsonl record at this point of the run: epoch, iteration, clock, then
        `fields`."""
        self.log.record(**{"epoch": self.epoch, "iteration": self.iteration, **self.clock.read(),
                           **fields})

    def check_perturbed_loss(self, loss, terms):
        """SAM's second loss, checked as the first before it is backpropagated (all ranks raise)."""
        loss_value = loss.item()
        diverged = has_diverged(loss_value, terms, self.settings.divergence)
        if any_rank(float(diverged), self.topology, self.device):
            raise Diverged(loss_value)


