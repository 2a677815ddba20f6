"""The time-to-accuracy benchmark end to end on tiny data, and the training flags it stands on: a
time budget that stops a run (with an evaluation at the stop) and a training clock that resumes with
the run."""
import importlib.util
import json
import os

import numpy as np

import train_wrn_ebm
from jem.run.log import run_ended

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = importlib.util.spec_from_file_location("time_to_accuracy",
                                              os.path.join(ROOT, "scripts", "time_to_accuracy.py"))
tta = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(tta)

TINY = ["--depth", "10", "--width", "1", "--n_steps", "1", "--batch_size", "8", "--n_valid", "8",
        "--buffer_size", "40", "--n_epochs", "1000", "--device", "cpu", "--print_to_log"]


def records(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_a_time_budget_stops_the_run_evaluates_it_and_the_clocks_resume(tiny_image_folder,
                                                                        tmp_path):
    run = str(tmp_path / "run")
    # the CPU clock: a busy machine (CI's, a developer's) does not take the budget's iterations away
    train_wrn_ebm.main(["--dataset", tiny_image_folder, *TINY, "--max_train_minutes", "0.05",
                        "--train_clock", "cpu",
                        "--eval_every_iters", "3", "--eval_train", "--save_dir", run])
    first = records(run)
    assert first[0]["kind"] == "run" and "bf16" in first[0]["hardware"]
    evals = [r for r in first if r["kind"] == "eval"]
    assert any(r["iteration"] % 3 == 0 and not r["end_of_epoch"] for r in evals)
    last = max((r for r in first if r["kind"] not in ("run", "end")),
               key=lambda r: r["train_seconds"])
    # the weights the budget bought are evaluated: at the
    # stop, or at the end of the epoch the stop came in
    assert last["kind"] == "eval" and "test_acc" in last and 2 <= last["cpu_seconds"] < 30
    assert last["iteration"] == max(r["iteration"] for r in first
                                    if r["kind"] not in ("run", "end"))
    # --eval_train: the training split's accuracy too
    assert all(0 <= r["train_acc"] <= 1 for r in evals)
    assert all(r["cpu_seconds"] > 0 for r in first if "cpu_seconds" in r)
    with open(os.path.join(run, "log.txt")) as fh:
        assert "--max_train_minutes 0.05 used" in fh.read()
    assert first[-1] == {**first[-1], "kind": "end", "reason": "budget"} and run_ended(run)

    # the same run continued, with evaluations by time, for 3 more seconds than
    # it has used (however far a busy machine made it overshoot the first budget)
    budget = last["cpu_seconds"] / 60 + 0.05
    train_wrn_ebm.main(["--resume", run, "--max_train_minutes", f"{budget}", "--eval_every_minutes",
                        "0.005", "--eval_every_iters", "0"])
    second = records(run)[len(first):]
    resumed = [r for r in second if r["kind"] not in ("run", "end")]
    assert min(r["train_seconds"] for r in resumed) >= last["train_seconds"]
    assert max(r["iteration"] for r in resumed) > last["iteration"]
    by_time = [r for r in resumed if r["kind"] == "eval" and not r["end_of_epoch"]]
    assert len(by_time) >= 3
    # it stops at the first check past the budget; the epoch's
    # last evaluation may come a moment before that check
    assert second[-1] == {**second[-1], "kind": "end", "reason": "budget"}
    assert second[-1]["cpu_seconds"] >= budget * 60


def test_a_run_has_ended_when_its_last_start_got_to_its_end(tmp_path):
    def write(*records):
        with open(tmp_path / "metrics.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)

    start, train = {"kind": "run"}, {"kind": "train", "iteration": 0}
    assert not run_ended(str(tmp_path))  # nothing there yet
    write(start, train, {"kind": "end", "reason": "signal"})
    assert not run_ended(str(tmp_path))  # stopped early: to be resumed
    write(start, train, {"kind": "end", "reason": "signal"}, start,
          {"kind": "end", "reason": "done"})
    assert run_ended(str(tmp_path))
    # resumed with a larger budget, not ended yet
    write(start, {"kind": "end", "reason": "budget"}, start, train)
    assert not run_ended(str(tmp_path))


def test_curves_step_to_the_latest_value_and_end_at_the_budget():
    grid = np.array([0.0, 1.0, 2.0, 3.0])
    # the last eval a moment past the budget
    curve = tta.on_grid([0.5, 2.0, 3.02], [0.1, 0.4, 0.6], grid)
    assert np.isnan(curve[0]) and curve[1:].tolist() == [0.1, 0.4, 0.6]


def test_time_to_accuracy_end_to_end_two_configs_two_seeds(tiny_image_folder, tmp_path, capsys):
    out = str(tmp_path / "tta")
    flags = ["--data", tiny_image_folder, "--out", out, "--configs", "jem", "clf", "--seeds", "1",
             "2",
             "--minutes", "0.02", "--evals", "4", "--base_flags", " ".join(TINY[:-3]), "--device",
             "cpu"]
    summary = tta.main(flags)
    printed = capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as fh:
        results = json.load(fh)
    assert set(results["summary"]) == {"jem", "clf"} and set(results["runs"]["jem"]) == {"1", "2"}
    for config in ("jem", "clf"):
        s = results["summary"][config]
        assert s["seeds"] == [1, 2]
        assert 0 <= s["final_min"] <= s["final_mean"] <= s["final_max"] <= 1
        assert s["iterations_per_minute"] > 0 and config in printed
        assert all(run["accuracy"] and max(run["minutes"]) >= 0.9 * 0.02
                   for run in results["runs"][config].values())

    # the baseline's mean at the end
    assert results["target"] == results["summary"]["jem"]["final_mean"]
    assert summary["jem"]["speedup_to_target"] == 1.0
    assert "bf16" in results["hardware"] and results["hardware"] in printed
    with open(os.path.join(out, "time_to_accuracy.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    metrics = os.path.join(out, "jem", "seed1", "metrics.jsonl")
    stamp = os.path.getmtime(metrics)
    tta.main(flags)  # a run that reached its budget is not trained again
    assert os.path.getmtime(metrics) == stamp
