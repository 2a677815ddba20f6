"""What a run does when training diverges: stop and keep the last good weights (the paper's way), or
roll back to the last checkpoint with new random numbers (what the paper's authors did by hand)."""
import copy
import os
from dataclasses import dataclass

from jem.checkpoint import seed_everything, write_checkpoint
from jem.errors import UserError
from jem.run.stopping import weights_are_finite


@dataclass(frozen=True)
class RollbackSettings:
    on_diverge: str = "stop"  # stop | rollback
    max_rollbacks: int = 3
    lr_scale: float = 1.0  # the learning rate is multiplied by this at each rollback


class Rollback:
    """Keeps the snapshot a divergence returns to (the state at the last checkpoint) and
    recovers."""

    def __init__(self, trainer, settings):
        self.trainer, self.settings = trainer, settings
        self.snapshot = trainer.state_dict()  # until the first checkpoint: the start

    def keep(self, state):
        self.snapshot = state

    def recover(self, loss_value, what="the loss"):
        """Back to the snapshot with new random numbers, or (--on_diverge stop, or too many
        rollbacks) a UserError that says what to do."""
        trainer, settings = self.trainer, self.settings
        where = f"epoch {trainer.epoch} iteration {trainer.iteration} ({what} {loss_value:.3g})"
        trainer.record(kind="diverged", loss=loss_value, what=what, rollbacks=trainer.rollbacks)
        if settings.on_diverge == "stop":
            raise UserError(self.keep_last_good(where))
        if trainer.rollbacks >= settings.max_rollbacks:
            message = (f"training diverged at {where} after {trainer.rollbacks} rollbacks "
                       "(--max_rollbacks); lower --lr, raise --n_steps or add --energy_l2 0.1, "
                       f"then --resume {trainer.save_dir}")
            trainer.log.line(message)
            raise UserError(message)
        rollbacks, lr_scale = trainer.rollbacks + 1, trainer.lr_scale * settings.lr_scale
        # A copy: the loaded tensors may share storage with the live buffer and optimizer, which the
        # next iterations change in place, and a later rollback needs the snapshot as it was.
        trainer.load_state_dict(copy.deepcopy(self.snapshot))
        trainer.log.rewind(trainer.iteration)  # the curves go on from the snapshot
        trainer.rollbacks, trainer.lr_scale = rollbacks, lr_scale
        seed_everything(trainer.seed + 7919 * rollbacks + trainer.topology.rank)  # new chains
        trainer.log.line(f"training diverged at {where}; rollback {rollbacks}/"
                         f"{settings.max_rollbacks} to epoch {trainer.epoch} iteration "
                         f"{trainer.iteration}, learning rate scale {lr_scale:g}")

    def keep_last_good(self, where):
        """Write last_good_before_divergence.pt: the weights before the diverging update or, should
        they be no longer finite (a step whose loss was finite), the snapshot's; the line to
        show."""
        trainer = self.trainer
        candidates = (trainer.state_dict(), self.snapshot)
        good = next((state for state in candidates if weights_are_finite(state)), None)
        path = os.path.join(trainer.save_dir, "last_good_before_divergence.pt")
        if good is None:
            message = (f"training diverged at {where}, and no state with finite weights is left to "
                       "keep: start again with a lower --lr or more --n_steps")
        else:
            if trainer.topology.is_main:
                write_checkpoint(path, good)
            message = (f"training diverged at {where}; the last good weights (iteration "
                       f"{good['iteration']}) are in {path}: restart from them with --load_path "
                       f"{path} and a new --seed, or lower --lr / raise --n_steps, or use "
                       "--on_diverge rollback")
        trainer.log.line(message)
        return message
