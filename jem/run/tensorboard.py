"""--tensorboard: the run's records, energy histograms and sample grids as TensorBoard event files.

RunLog (jem/run/log.py) imports this module only when the flag is on, so a run without it needs no
tensorboard package; the run log stays the one place that writes records. Curves are keyed by the
training iteration, so a resumed run continues them, and TensorBoard's "relative" axis shows time.
"""
import glob
import json
import os

import torch
import torchvision

from jem.errors import UserError

FOLDER = "tensorboard"  # under --save_dir: `tensorboard --logdir SAVE_DIR` finds every run below it
FLUSH_SECONDS = 10  # how stale the curves may get while the run trains (SummaryWriter's: 120)


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError(f"--tensorboard needs the tensorboard package ({e}): "
                        "pip install tensorboard (it is in requirements.txt)") from None
    return SummaryWriter


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_scalars(record):
    """(tag, value) pairs of a metrics.jsonl record: each number as "<kind>/<field>" (the iteration
    aside: it is the step), and "<kind>/energy_gap" = f_data - f_q where the record has both."""
    kind = record["kind"]
    pairs = [(f"{kind}/{field}", float(value)) for field, value in sorted(record.items())
             if field != "iteration" and is_number(value)]
    if is_number(record.get("f_data")) and is_number(record.get("f_q")):
        pairs.append((f"{kind}/energy_gap", float(record["f_data"] - record["f_q"])))
    return pairs


def grid(images, nrow=None):
    """Images in [-1, 1] as one [0, 1] grid, square by default (as the PNGs of jem.eval.plots)."""
    images = torch.nan_to_num(images.detach().float().cpu()).clamp(-1, 1)
    nrow = nrow or max(1, int(len(images) ** 0.5))
    return torchvision.utils.make_grid((images + 1) / 2, nrow=nrow)


class TensorBoardSink:
    """Event files in save_dir/tensorboard/.

    A fresh run (append=False) removes the event files of an earlier run in the same folder, as
    metrics.jsonl is started again. A resumed one (append=True) adds a file whose first event tells
    TensorBoard to drop what earlier files hold at steps from `first_step` on (SummaryWriter's
    purge_step), so the curves go on from the checkpoint without a second line or stale points.
    """

    def __init__(self, save_dir, first_step=0, append=False):
        self.summary_writer = summary_writer_class()
        self.log_dir = os.path.join(save_dir, FOLDER)
        if not append:
            for path in glob.glob(os.path.join(self.log_dir, "events.out.tfevents.*")):
                os.remove(path)
        self.start_step = first_step
        self.diverged = []  # this process's diverged records, written again after a rewind
        self.writer = self.open(first_step if append else None)

    def open(self, purge_step):
        return self.summary_writer(self.log_dir, purge_step=purge_step, flush_secs=FLUSH_SECONDS)

    def record(self, fields):
        """Scalars at step fields["iteration"]; the string fields of a record (the run's hardware,
        why it ended, what diverged) as one text entry of its JSON. A record without an iteration
        (the "run" record of each start) goes at the step the start begins at."""
        if fields["kind"] == "diverged":
            self.diverged.append(fields)
        step = fields.get("iteration", self.start_step)
        for tag, value in record_scalars(fields):
            self.writer.add_scalar(tag, value, step)
        if any(isinstance(value, str) for key, value in fields.items() if key != "kind"):
            self.writer.add_text(fields["kind"], json.dumps(fields, sort_keys=True), step)

    def histograms(self, step, values_by_tag):
        """One histogram per tag of a tensor's finite values (a diverging batch has inf or NaN)."""
        for tag, values in values_by_tag.items():
            values = torch.as_tensor(values).detach().float().cpu().flatten()
            values = values[torch.isfinite(values)]
            if len(values):
                self.writer.add_histogram(tag, values, step)

    def images(self, tag, images, step, nrow=None):
        self.writer.add_image(tag, grid(images, nrow), step)

    def rewind(self, step):
        """A rollback: the curves go on from `step` and what was written at later steps is dropped,
        except the diverged/* points, written again, that show where and why the run rolled back."""
        self.writer.close()
        self.start_step, self.writer = step, self.open(step)
        diverged, self.diverged = self.diverged, []
        for fields in diverged:
            if fields.get("iteration", step) >= step:
                self.record(fields)
            else:
                self.diverged.append(fields)

    def close(self):
        self.writer.close()
