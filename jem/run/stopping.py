"""Why a training run stops: a signal, its time budget, or a divergence (the loss, or SAM's second
loss, out of bounds or not finite). The training loop asks these; none of them writes anything.
"""
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


class Diverged(Exception):
    """Training diverged at a loss computed inside the update (SAM's, at its perturbed weights)."""

    def __init__(self, loss_value):
        super().__init__(loss_value)
        self.loss_value = loss_value


@dataclass(frozen=True)
class DivergenceCriterion:
    """When training has diverged: a loss that is not finite, or |the checked value| > threshold.
    The checked value is the whole loss (the paper: 1e8) or its p(x) part, p_x_weight * l_p_x (+ the
    energy penalty), as SADA-JEM's run stopped when it passed 1e5."""

    on: str = "loss"  # loss | p_x
    threshold: float = 1e8
    p_x_weight: float = 1.0
    energy_l2: float = 0.0


def has_diverged(loss_value, terms, criterion):
    checked = loss_value
    if criterion.on == "p_x" and "l_p_x" in terms:
        checked = criterion.p_x_weight * terms["l_p_x"].item() \
            + criterion.energy_l2 * float(terms.get("l_energy_l2", 0.0))
    return not (math.isfinite(loss_value) and abs(checked) <= criterion.threshold)


def weights_are_finite(state):
    return all(torch.isfinite(t).all() for t in state["model_state_dict"].values()
               if t.is_floating_point())



class StopSignals:
    """SIGTERM / SIGINT ask the run to stop after the current iteration (a second one stops at
    once)."""

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


class TrainingClock:
    """How long the run has trained: wall-clock and CPU seconds since the trainer was built, plus
    those of the runs it resumes; evaluations (`paused`) do not count. The CPU seconds are this
    process's, all threads: with one thread, a clock that a busy machine does not stretch."""

    def __init__(self, train_seconds=0.0, cpu_seconds=0.0):
        self.restart(train_seconds, cpu_seconds)

    def restart(self, train_seconds, cpu_seconds):
        self.before = {"train_seconds": train_seconds, "cpu_seconds": cpu_seconds}
        self.since = {"train_seconds": time.perf_counter(), "cpu_seconds": time.process_time()}

    def read(self):
        now = {"train_seconds": time.perf_counter(), "cpu_seconds": time.process_time()}
        return {k: self.before[k] + now[k] - self.since[k] for k in now}

    def minutes(self, clock):
        """Minutes of training on the clock --train_clock names: 'wall' or 'cpu'."""
        return self.read()["train_seconds" if clock == "wall" else "cpu_seconds"] / 60

    @contextmanager
    def paused(self):
        stopped_at = self.read()
        try:
            yield
        finally:
            self.restart(**stopped_at)
