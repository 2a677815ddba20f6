"""The typed settings of a training run, built once from the flags (jem/flags/train.py
settings_from_args). Each piece is defined beside the code that reads it (ChainSettings in
jem/sampler.py, Objective in jem/step.py, ...); the run's own are here, with the bundle.
"""
from dataclasses import dataclass

from jem.data import DataSettings
from jem.model import ModelSettings
from jem.optim import OptimizerSettings, Schedule
from jem.run.held_out import HeldOutSchedule
from jem.run.rollback import RollbackSettings
from jem.run.stopping import DivergenceCriterion
from jem.step import StepSettings


@dataclass(frozen=True)
class BufferSettings:
    size: int = 10000
    reinit_freq: float = 0.05
    init: str = "uniform"  # uniform | informative (per-class Gaussians, JEM++)
    conditional: bool = False  # class segments are needed (p(x, y), class-conditional samples)


@dataclass(frozen=True)
class RunSettings:
    """The run around the step: its length, what it writes and when."""

    save_dir: str = "./experiment"
    n_epochs: int = 200
    epoch_over: str = "px"  # px | labeled: the stream whose pass is an epoch (SADA-JEM: labeled)
    seed: int = 1
    print_every: int = 100
    plot_every: int = 100  # iterations between sample grids
    plot_uncond: bool = False
    plot_cond: bool = False
    ckpt_every: int = 10  # epochs
    ckpt_every_iters: int = 0
    keep_last: int = 0  # numbered checkpoints kept; 0: all
    fid_every: int = 0  # epochs between IS/FID of the buffer
    max_train_minutes: float = 0.0  # 0: no budget
    train_clock: str = "wall"  # wall | cpu
    compile: bool = False
    quiet: bool = False  # no progress bar (--print_to_log)


@dataclass(frozen=True)
class TrainSettings:
    model: ModelSettings
    data: DataSettings
    step: StepSettings
    optimizer: OptimizerSettings
    schedule: Schedule
    buffer: BufferSettings
    divergence: DivergenceCriterion
    rollback: RollbackSettings
    held_out: HeldOutSchedule
    run: RunSettings
