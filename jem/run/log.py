"""The run's records: readable lines (log.txt), machine-readable records (metrics.jsonl), JSON files."""
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
    """

    def __init__(self, save_dir, quiet=False, append=False):
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
        self.metrics.write(json.dumps(fields, sort_keys=True) + "\n")

    def close(self):
        self.text.close()
        self.metrics.close()


def read_metrics(save_dir):
    """The records of a run's metrics.jsonl in order; where a resumed run logged an iteration again, the later
    record of each kind wins."""
    latest = {}
    with open(os.path.join(save_dir, "metrics.jsonl")) as fh:
        for line in fh:
            record = json.loads(line)
            latest[(record["kind"], record.get("iteration"), record.get("end_of_epoch"))] = record
    return sorted(latest.values(), key=lambda r: (r.get("iteration") or 0, r.get("train_seconds") or 0))


def run_ended(save_dir, reasons=("done", "budget")):
    """Whether the run in save_dir reached its end: its last start ended with one of `reasons` ('done': every
    epoch; 'budget': --max_train_minutes; 'signal': stopped early, to be resumed)."""
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

    def close(self):
        pass
