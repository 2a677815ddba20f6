"""The run's records: readable lines (log.txt), machine-readable records (metrics.jsonl), JSON
files."""
import json
import os
import time


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    os.replace(tmp, path)


class RunLog:
    """Readable lines to the console and `log.txt`; machine-readable records to `metrics.jsonl`.

    With quiet=True (`--print_to_log`) lines go to log.txt only, as the paper's flag did.

    With tensorboard=True (`--tensorboard`) every record goes to TensorBoard event files in
    save_dir/tensorboard/ too, and `histograms` and `images` write there (without it they do
    nothing). `first_step` is the iteration a resumed run (append=True) goes on from: TensorBoard
    drops what the earlier starts wrote from that step on, so the curves go on as one line.
    """

    def __init__(self, save_dir, quiet=False, append=False, tensorboard=False, first_step=0):
        self.tensorboard = None
        if tensorboard:  # first: without the package, nothing of an earlier run is overwritten
            from jem.run.tensorboard import TensorBoardSink  # the package only with --tensorboard
            self.tensorboard = TensorBoardSink(save_dir, first_step, append)
        mode = "a" if append else "w"
        self.text = open(os.path.join(save_dir, "log.txt"), mode, buffering=1)
        self.metrics = open(os.path.join(save_dir, "metrics.jsonl"), mode, buffering=1)
        self.quiet = quiet
        self.start = time.time()

    def line(self, message, console_writer=print):
        stamped = f"[{time.time() - self.start:8.1f}s] {message}"
        self.text.write(stamped + "\n")
        if not self.quiet:
            console_writer(stamped)

    def record(self, **fields):
        """One metrics.jsonl record; with --tensorboard each number also as the scalar
        "<kind>/<field>" at step fields["iteration"], and train/energy_gap = f_data - f_q."""
        self.metrics.write(json.dumps(fields, sort_keys=True) + "\n")
        if self.tensorboard:
            self.tensorboard.record(fields)

    def histograms(self, step, **values_by_tag):
        """--tensorboard: one histogram per tag of a tensor's values, e.g.
        `log.histograms(it, **{"energy/data": f_data, "energy/samples": f_q})`."""
        if self.tensorboard:
            self.tensorboard.histograms(step, values_by_tag)

    def images(self, tag, images, step, nrow=None):
        """--tensorboard: images in [-1, 1] as one grid (square unless nrow), e.g. "samples/x_q"."""
        if self.tensorboard:
            self.tensorboard.images(tag, images, step, nrow)

    def rewind(self, step):
        """--tensorboard, after a rollback to iteration `step`: the curves go on from there, what
        they hold at later steps dropped (the diverged/* points kept)."""
        if self.tensorboard:
            self.tensorboard.rewind(step)

    def close(self):
        self.text.close()
        self.metrics.close()
        if self.tensorboard:
            self.tensorboard.close()


def read_metrics(save_dir):
    """The records of a run's metrics.jsonl in order; where a resumed run logged an iteration again,
    the later record of each kind wins."""
    latest = {}
    with open(os.path.join(save_dir, "metrics.jsonl")) as fh:
        for line in fh:
            record = json.loads(line)
            latest[(record["kind"], record.get("iteration"), record.get("end_of_epoch"))] = record
    return sorted(latest.values(),
                  key=lambda r: (r.get("iteration") or 0, r.get("train_seconds") or 0))


def run_ended(save_dir, reasons=("done", "budget")):
    """Whether the run in save_dir reached its end: its last start ended with one of `reasons`
    ('done': every epoch; 'budget': --max_train_minutes; 'signal': stopped early, to be resumed)."""
    path = os.path.join(save_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        kinds = [json.loads(line) for line in fh]
    ends = [r for r in kinds if r["kind"] in ("run", "end")]
    return bool(ends) and ends[-1]["kind"] == "end" and ends[-1]["reason"] in reasons


class SilentLog:
    """The log of ranks other than 0 in a distributed run: rank 0 alone writes."""

    def line(self, message, console_writer=print):
        pass

    def record(self, **fields):
        pass

    def histograms(self, step, **values_by_tag):
        pass

    def images(self, tag, images, step, nrow=None):
        pass

    def rewind(self, step):
        pass

    def close(self):
        pass


def format_terms(epoch, iteration, terms, lr):
    """The log line of a training record."""
    parts = [f"epoch {epoch} it {iteration}"]
    if "l_p_x" in terms:
        parts.append(f"P(x) f(x_data)={terms['f_data']:.6f} f(x_q)={terms['f_q']:.6f} "
                     f"d={terms['f_data'] - terms['f_q']:.6f}")
    if "l_p_y_given_x" in terms:
        parts.append(f"P(y|x) loss={terms['l_p_y_given_x']:.6f} acc={terms['acc']:.4f}")
    if "l_p_x_y" in terms:
        parts.append(f"P(x|y) f(x_data,y)={terms['f_xy_data']:.6f} f(x_q,y)={terms['f_xy_q']:.6f} "
                     f"d={terms['f_xy_data'] - terms['f_xy_q']:.6f}")
    parts.append(f"lr={lr:.2e}")
    return " | ".join(parts)


def summary_line(mode, results):
    """'mode: key value, ...' over the scalar results and lists of numbers (tables stay in the
    JSON)."""
    def shown(value):
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, list):
            return "/".join(f"{v:.4g}" for v in value)
        return str(value)

    def is_shown(value):
        return isinstance(value, (int, float, str)) or (
            isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value))

    return f"{mode}: " + ", ".join(f"{k} {shown(v)}" for k, v in results.items() if is_shown(v))
