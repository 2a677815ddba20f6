"""The small-scale study's driver and report: runs continue where they stopped, cells give the mean
and range over seeds, and reliability bins pool over seeds as one set of predictions would."""
import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = load_script("small_scale_study")
report = load_script("study_report")


def test_a_run_is_trained_once_and_continued_from_its_checkpoint_when_cut_short(tmp_path,
                                                                                monkeypatch):
    args = study.parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--epochs",
                             "3", "--seeds", "1", "2", "--amp"])
    save_dir = report.run_dir(args.out, "clf", 2)
    os.makedirs(save_dir)
    commands, endings = [], ["signal", "done"]  # the first run is stopped early, the second ends

    def fake_training(cmd, log, cwd=None):
        commands.append(cmd)
        with open(os.path.join(save_dir, "metrics.jsonl"), "a") as fh:
            end = {"kind": "end", "reason": endings.pop(0)}
            fh.write(json.dumps({"kind": "run"}) + "\n" + json.dumps(end) + "\n")
        return 60.0

    monkeypatch.setattr(study, "run", fake_training)
    # nothing there: from the start, cut short
    with pytest.raises(RuntimeError, match="run the study again"):
        study.train_to_the_end(args, "clf", 2, os.path.join(save_dir, "driver.log"))
    fresh = commands[-1]
    assert fresh[fresh.index("--n_epochs") + 1] == "3" and fresh[fresh.index("--seed") + 1] == "2"
    assert "--amp" in fresh and "--eval_train" in fresh and "--max_train_minutes" not in fresh
    # 0.8, 0.9 of 3
    assert fresh[fresh.index("--decay_epochs") + 1:fresh.index("--decay_epochs") + 3] == ["2", "3"]
    open(os.path.join(save_dir, "last_ckpt.pt"), "w").close()  # cut short: continue it
    assert study.train_to_the_end(args, "clf", 2, os.path.join(save_dir, "driver.log"))[1] == 60.0
    assert commands[-1][2:4] == ["--resume", save_dir]
    command, seconds = study.train_to_the_end(args, "clf", 2, os.path.join(save_dir, "driver.log"))
    # done: nothing more, and no time that would replace the real one
    assert len(commands) == 2 and seconds is None
    # the command that reproduces the run
    assert command.startswith("python ") and "--resume" not in command


def test_without_epochs_each_run_gets_the_time_budget(tmp_path):
    args = study.parse_args(["--data", str(tmp_path), "--minutes", "6", "--seed", "1"])
    cmd = study.train_command(args, "jem", 1)
    assert args.seeds == [1] and cmd[cmd.index("--max_train_minutes") + 1] == "6"


def test_cells_show_the_mean_and_the_range_over_seeds():
    assert report.cell([0.5, 0.7, None, 0.6], 3) == "0.600 (0.500–0.700)"
    assert report.cell([0.25], 2) == "0.25" and report.cell([None, None], 3) == "—"


def write_run(out, name, seed, bins, evals):
    save_dir = report.run_dir(out, name, seed)
    os.makedirs(os.path.join(save_dir, "eval", "calibration"))
    with open(os.path.join(save_dir, "eval", "calibration", "calibration.json"), "w") as fh:
        json.dump({"bins": bins}, fh)
    with open(os.path.join(save_dir, "metrics.jsonl"), "w") as fh:
        for record in evals:
            fh.write(json.dumps(record) + "\n")
    return save_dir


def test_reliability_bins_pool_over_seeds_as_one_set_of_predictions(tmp_path):
    one = [{"lower": 0.0, "upper": 0.5, "count": 10, "accuracy": 0.2, "confidence": 0.4},
           {"lower": 0.5, "upper": 1.0, "count": 30, "accuracy": 0.9, "confidence": 0.8}]
    two = [{"lower": 0.0, "upper": 0.5, "count": 30, "accuracy": 0.4, "confidence": 0.4},
           {"lower": 0.5, "upper": 1.0, "count": 0, "accuracy": None, "confidence": None}]
    dirs = [write_run(str(tmp_path), "jem", s, bins, []) for s, bins in ((1, one), (2, two))]
    pooled = report.pooled_bins(dirs)
    assert pooled["count"].tolist() == [40, 30]
    np.testing.assert_allclose(pooled["accuracy"], [(10 * 0.2 + 30 * 0.4) / 40, 0.9])
    # ECE of the 70 predictions: bin 1 |0.35 - 0.4| * 40/70, bin 2 |0.9 - 0.8| * 30/70
    assert pooled["ece"] == pytest.approx(0.05 * 40 / 70 + 0.1 * 30 / 70)


def test_the_table_reads_every_seed_and_the_figures_are_drawn(tmp_path):
    out = str(tmp_path)
    bins = [{"lower": 0.0, "upper": 1.0, "count": 5, "accuracy": 0.6, "confidence": 0.7}]
    for seed, acc in ((1, 0.5), (2, 0.7)):
        write_run(out, "clf", seed, bins,
                  [{"kind": "train", "iteration": 0, "train_seconds": 1.0, "cpu_seconds": 1.0},
                   {"kind": "eval", "iteration": 65, "end_of_epoch": True, "train_seconds": 60.0,
                    "cpu_seconds": 60.0, "valid_acc": acc, "test_acc": acc, "train_acc": 1.0},
                    {"kind": "eval", "iteration": 130, "end_of_epoch": True, "train_seconds": 130.0,
                     "cpu_seconds": 120.0, "valid_acc": acc, "test_acc": acc, "train_acc": 1.0}])
    args = study.parse_args(["--data", out, "--out", out, "--seeds", "1", "2", "--figs_dir",
                             str(tmp_path / "figs")])
    table, numbers = report.build_table(args, ["clf"], ["cifar_interp"])
    assert numbers["clf"]["valid_acc"] == [0.5, 0.7] and numbers["clf"]["epochs"] == [2, 2]
    assert "| validation accuracy (last epoch) | 0.600 (0.500–0.700) |" in table
    assert "| training minutes (one CPU thread, evaluations left out) | 2.0 (2.0–2.0) |" in table
    # no test_clf evaluation ran: a dash, not an error
    assert numbers["clf"]["test_acc"] == [None, None]
    assert report.reliability_figure(args, ["clf"], str(tmp_path / "r.png"))
    assert report.accuracy_time_figure(args, ["clf"], str(tmp_path / "a.png"))
    assert all(os.path.getsize(tmp_path / f) > 0 for f in ("r.png", "a.png"))


def test_report_only_trains_nothing_and_keeps_the_earlier_steps_times_and_commands(tmp_path,
                                                                                   monkeypatch):
    data, out = tmp_path / "data", tmp_path / "out"
    for split in ("train", "test"):
        os.makedirs(data / split)
    os.makedirs(out / "ood" / "noise")  # made by an earlier invocation; MNIST was never made
    bins = [{"lower": 0.0, "upper": 1.0, "count": 5, "accuracy": 0.6, "confidence": 0.7}]
    write_run(str(out), "clf", 3, bins, [{"kind": "eval", "iteration": 65, "end_of_epoch": True,
                                          "train_seconds": 60.0, "cpu_seconds": 60.0,
                                          "valid_acc": 0.4}])
    with open(out / "results.json", "w") as fh:  # what the invocation that trained seed 3 wrote
        json.dump({"seconds": {"clf/seed3/train": 61.0},
                   "commands": {"clf/seed3": ["python train_wrn_ebm.py"]},
                   "total_seconds": 75.0}, fh)


    def no_running(*a, **k):
        raise AssertionError("--report_only ran a command")

    monkeypatch.setattr(study, "run", no_running)
    assert study.main(["--data", str(data), "--out", str(out), "--seeds", "1", "3", "--report_only",
                       "--models", "clf", "jem", "--mnist_raw", str(tmp_path / "none"),
                       "--figs_dir", str(tmp_path / "figs")]) == 0
    with open(out / "results.json") as fh:
        written = json.load(fh)
    # nothing made, not even the test split's link
    assert sorted(os.listdir(out / "ood")) == ["noise"]
    assert written["args"]["report_only"] and written["seconds"] == {"clf/seed3/train": 61.0}
    assert written["total_seconds"] == 75.0
    assert written["commands"] == {"clf/seed3": ["python train_wrn_ebm.py"]}
    assert written["numbers"]["clf"]["valid_acc"] == [None, 0.4] and "jem" not in written["numbers"]
    with open(out / "results.md") as fh:
        assert "| validation accuracy (last epoch) | 0.400 |" in fh.read()


def test_train_per_class_trains_on_the_first_images_of_each_class(tmp_path):
    data = tmp_path / "data"
    for name in ("cat", "dog"):
        os.makedirs(data / "train" / name)
        for i in range(4):
            (data / "train" / name / f"{i}.png").write_bytes(b"")
    os.makedirs(data / "test")
    args = study.parse_args(["--data", str(data), "--out", str(tmp_path / "out"),
                             "--train_per_class", "3"])
    study.make_training_folder(args)
    folder = study.training_folder(args)
    assert sorted(os.listdir(os.path.join(folder, "train", "dog"))) == ["0.png", "1.png", "2.png"]
    assert os.path.realpath(os.path.join(folder, "test")) == os.path.realpath(data / "test")
    cmd = study.train_command(args, "clf", 1)
    assert cmd[cmd.index("--dataset") + 1] == folder
    too_many = study.parse_args(["--data", str(data), "--out", str(tmp_path / "other"),
                                 "--train_per_class", "5"])
    with pytest.raises(SystemExit, match="fewer than --train_per_class 5"):
        study.make_training_folder(too_many)
    assert not os.path.exists(study.training_folder(too_many))  # nothing half made


def test_the_footer_names_the_models_with_fewer_seeds():
    numbers = {"clf": {"test_acc": [0.4, 0.5, 0.6]}, "jem": {"test_acc": [0.3, None, 0.35]},
               "sadajem": {"test_acc": [0.4, None, None], "ece": [0.1, None, None]}}
    assert report.fewer_seeds(numbers, [1, 2, 3]) == \
        "; over seeds 1, 3 for JEM; over seed 1 for SADA-JEM"
    assert report.fewer_seeds({"clf": {"test_acc": [0.4, 0.5]}}, [1, 2]) == ""
