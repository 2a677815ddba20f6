"""Held-out accuracy during training: when to measure it (every epoch, every N iterations, every N
minutes of training) and the measurement itself, in float32 with the training clock paused."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class HeldOutSchedule:
    every_epochs: int = 1  # best_valid_ckpt.pt is chosen by these evaluations
    every_iters: int = 0  # learning curves; 0: off
    every_minutes: float = 0.0  # of training on `clock`; 0: off
    clock: str = "wall"  # wall | cpu
    on_training_split: bool = False  # also the clean training images (--eval_train)


class EvaluationTimer:
    """Answers whether a learning-curve evaluation is due after an iteration (`due`), and is told
    when the minutes it counts have been evaluated (`mark_done`)."""

    def __init__(self, schedule, clock):
        self.schedule, self.clock = schedule, clock
        # a resumed run goes on from the periods it had evaluated
        self.periods_done = self.period() if schedule.every_minutes else 0

    def period(self):
        return int(self.clock.minutes(self.schedule.clock) // self.schedule.every_minutes)

    def due(self, iteration):
        if self.schedule.every_iters and iteration % self.schedule.every_iters == 0:
            return True
        return bool(self.schedule.every_minutes) and self.period() > self.periods_done

    def mark_done(self):
        if self.schedule.every_minutes:
            self.periods_done = self.period()


@torch.no_grad()
def evaluate_classifier(model, loader, device):
    """(accuracy, mean cross-entropy) over a loader, in float32 whatever --amp; None when empty."""
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
