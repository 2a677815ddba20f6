"""--tensorboard through RunLog: what TensorBoard's own reader finds in the event files equals what
metrics.jsonl holds; a resumed log continues the curves; a missing package is one line."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from jem.errors import UserError
from jem.run.log import RunLog, SilentLog, read_metrics

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(save_dir):
    accumulator = event_accumulator.EventAccumulator(
        os.path.join(save_dir, "tensorboard"), size_guidance={"scalars": 0, "histograms": 0,
                                                             "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalar_curve(accumulator, tag):
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def as_float32(value):
    return float(np.float32(value))  # TensorBoard stores a scalar as a float32


def train_record(iteration):
    return dict(kind="train", epoch=0, iteration=iteration, lr=1e-4, loss=2.5 - 0.01 * iteration,
                l_p_x=-0.1 * iteration, l_p_y_given_x=2.3 + 0.001 * iteration,
                f_data=1.0 + 0.37 * iteration, f_q=0.5 + 0.11 * iteration,
                acc=0.1 + iteration / 100, seconds_per_iteration=0.2,
                train_seconds=0.2 * iteration, cpu_seconds=0.3 * iteration)


def write_run(save_dir, iterations, append=False, first_step=0):
    log = RunLog(str(save_dir), quiet=True, append=append, tensorboard=True, first_step=first_step)
    log.record(kind="run", hardware="a test CPU", amp=False, world_size=1)
    for iteration in iterations:
        log.record(**train_record(iteration))
        if iteration % 4 == 0:
            log.record(kind="eval", epoch=0, iteration=iteration, end_of_epoch=False,
                       valid_acc=0.2 + iteration / 50, valid_loss=2.0, test_acc=0.25, test_loss=1.9,
                       train_seconds=0.2 * iteration, cpu_seconds=0.3 * iteration)
    return log


def test_event_files_hold_the_values_of_metrics_jsonl(tmp_path):
    log = write_run(tmp_path, range(10))
    log.record(kind="sample_quality", epoch=0, iteration=9, inception_score=1.5, fid=300.25,
               kid=0.125, n_samples=100, reference="test", train_seconds=1.8, cpu_seconds=2.7)
    log.record(kind="diverged", epoch=0, iteration=9, loss=float("inf"), what="the loss",
               train_seconds=1.8, cpu_seconds=2.7)
    f_data, f_q = torch.randn(64) + 3, torch.randn(64)
    log.histograms(9, **{"energy/data": f_data, "energy/samples": torch.cat([f_q, f_q.new_full(
        (1,), float("nan"))])})
    log.images("samples/x_q", torch.rand(16, 3, 32, 32) * 2 - 1, 9)
    log.record(kind="end", epoch=1, iteration=10, reason="done", train_seconds=2.0, cpu_seconds=3.0)
    log.close()

    events = read_events(tmp_path)
    records = read_metrics(tmp_path)
    compared = 0
    for record in records:
        if "iteration" not in record:
            continue
        for field, value in record.items():
            if field in ("kind", "iteration") or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):
                continue
            curve = dict(scalar_curve(events, f"{record['kind']}/{field}"))
            assert curve[record["iteration"]] == as_float32(value), (record["kind"], field)
            compared += 1
    assert compared > 100
    train = [r for r in records if r["kind"] == "train"]
    assert scalar_curve(events, "train/energy_gap") == [
        (r["iteration"], as_float32(r["f_data"] - r["f_q"])) for r in train]
    assert [step for step, _ in scalar_curve(events, "eval/valid_acc")] == [0, 4, 8]
    assert scalar_curve(events, "sample_quality/fid") == [(9, 300.25)]
    assert not any(tag.endswith("/iteration") or tag.endswith("end_of_epoch")
                   for tag in events.Tags()["scalars"])

    data_histogram, = events.Histograms("energy/data")
    assert data_histogram.step == 9 and data_histogram.histogram_value.num == 64
    assert data_histogram.histogram_value.sum == pytest.approx(f_data.sum().item(), rel=1e-5)
    assert events.Histograms("energy/samples")[0].histogram_value.num == 64  # the NaN left out
    image, = events.Images("samples/x_q")
    assert image.step == 9 and (image.width, image.height) == (4 * 34 + 2, 4 * 34 + 2)

    end_text, = events.Tensors("end/text_summary")
    assert json.loads(end_text.tensor_proto.string_val[0])["reason"] == "done"


def test_a_resumed_log_continues_the_curves_without_a_second_line(tmp_path):
    write_run(tmp_path, range(10)).close()  # the first start: iterations 0..9
    # The checkpoint was at iteration 6: the second start goes on from there, and logs 6.. again.
    write_run(tmp_path, range(6, 14), append=True, first_step=6).close()

    events = read_events(tmp_path)
    loss = scalar_curve(events, "train/loss")
    assert [step for step, _ in loss] == list(range(14))  # once each, in order
    train = {r["iteration"]: r for r in read_metrics(tmp_path) if r["kind"] == "train"}
    assert loss == [(i, as_float32(train[i]["loss"])) for i in range(14)]
    assert [step for step, _ in scalar_curve(events, "eval/valid_acc")] == [0, 4, 8, 12]

    # A new run in the same folder starts the curves again, as it starts metrics.jsonl again.
    write_run(tmp_path, range(3)).close()
    assert [step for step, _ in scalar_curve(read_events(tmp_path), "train/loss")] == [0, 1, 2]


def test_a_rollback_drops_the_abandoned_stretch_and_keeps_the_divergence(tmp_path):
    log = write_run(tmp_path, range(8))
    log.record(kind="diverged", epoch=0, iteration=8, loss=1e9, what="the loss")
    log.rewind(5)  # back to the snapshot of iteration 5
    for iteration in range(5, 9):
        log.record(**train_record(iteration))
    log.close()

    events = read_events(tmp_path)
    assert [step for step, _ in scalar_curve(events, "train/loss")] == list(range(9))
    assert scalar_curve(events, "diverged/loss") == [(8, 1e9)]


def test_without_the_sink_the_methods_do_nothing(tmp_path):
    for log in (RunLog(str(tmp_path)), SilentLog()):
        log.record(kind="train", iteration=0, loss=1.0)
        log.histograms(0, **{"energy/data": torch.zeros(3)})
        log.images("samples/x_q", torch.zeros(4, 3, 8, 8), 0)
        log.rewind(0)
        log.close()
    assert not os.path.exists(tmp_path / "tensorboard")


def test_without_the_package_one_line_says_what_to_install(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")
                 or m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed: import fails
    with pytest.raises(UserError) as error:
        RunLog(str(tmp_path), tensorboard=True)
    message = str(error.value)
    assert "\n" not in message and "pip install tensorboard" in message
    assert not os.path.exists(tmp_path / "metrics.jsonl")  # nothing of an earlier run overwritten


def test_a_training_run_with_tensorboard_writes_its_metrics_energies_and_grids(small_image_folder,
                                                                               tmp_path):
    """train_wrn_ebm.py --tensorboard from a shell, then resumed: one curve per value, equal to
    metrics.jsonl, energy histograms at the logged iterations, the sample grids."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = str(tmp_path / "run")
    flags = ["--dataset", small_image_folder, "--depth", "10", "--width", "1", "--n_steps", "2",
             "--batch_size", "16", "--n_valid", "20", "--buffer_size", "100", "--print_every", "1",
             "--n_workers", "0", "--device", "cpu", "--print_to_log", "--plot_uncond"]
    for argv in ([*flags, "--n_epochs", "1", "--tensorboard", "--save_dir", run],
                 ["--resume", run, "--n_epochs", "2"]):
        done = subprocess.run([sys.executable, "train_wrn_ebm.py", *argv], cwd=root, text=True,
                              capture_output=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
    events = read_events(run)
    train = [r for r in read_metrics(run) if r["kind"] == "train"]
    assert [step for step, _ in scalar_curve(events, "train/loss")] == list(range(12))
    assert scalar_curve(events, "train/loss") == \
        [(r["iteration"], as_float32(r["loss"])) for r in train]
    assert {"eval/valid_acc", "train/energy_gap"} <= set(events.Tags()["scalars"])
    assert {"energy/data", "energy/q"} <= set(events.Tags()["histograms"])
    assert "samples/x_q" in events.Tags()["images"]
