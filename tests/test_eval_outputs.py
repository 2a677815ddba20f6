"""What the evaluation and training scripts take and leave, run as a user runs them (a subprocess on
tiny data): --load_path of a run folder, results that do not overwrite each other, figures that name
what they show, and no empty folder after a failure."""
import json
import os
import subprocess
import sys

import pytest
from matplotlib.figure import Figure
from PIL import Image

import eval_wrn_ebm
from jem.data import SYNTHETIC_CLASSES
from jem.eval import attack, plots
from utils import run_cli, save_dir_removed_on_failure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *flags):
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def evaluate(load_path, save_dir, *flags):
    """eval_wrn_ebm.py from a shell, on the CPU and few images; the completed process."""
    return run_script("eval_wrn_ebm.py", "--load_path", str(load_path), "--save_dir", str(save_dir),
                      "--device", "cpu", "--n_workers", "0", "--max_images", "20", *flags)


def evaluate_here(load_path, save_dir, *flags):
    """The same command in this process (quicker than a subprocess: no imports); its exit status."""
    argv = ["--load_path", str(load_path), "--save_dir", str(save_dir), "--device", "cpu",
            "--n_workers", "0", "--max_images", "20", "--print_to_log", *flags]
    try:
        run_cli(eval_wrn_ebm.main, argv)
    except SystemExit as e:
        return e.code
    return 0


def read_json(path):
    with open(path) as fh:
        return json.load(fh)


def one_error_line(done):
    return done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


# --load_path takes a run folder -------------------------------------------------------------------

def test_eval_load_path_takes_a_run_folder(tiny_checkpoint, tmp_path):
    run_folder = os.path.dirname(tiny_checkpoint)
    done = evaluate(run_folder, tmp_path / "eval", "--eval", "test_clf", "--dataset", "synthetic",
                    "--print_to_log")
    assert done.returncode == 0, done.stderr
    assert read_json(tmp_path / "eval" / "test_clf.json")["args"]["load_path"] == tiny_checkpoint


def test_train_load_path_takes_a_run_folder(tiny_checkpoint, tiny_image_folder, tmp_path):
    done = run_script("train_wrn_ebm.py", "--load_path", os.path.dirname(tiny_checkpoint),
                      "--dataset", tiny_image_folder, "--depth", "10", "--width", "1",
                      "--n_steps", "1", "--batch_size", "16", "--n_epochs", "1", "--n_valid", "8",
                      "--buffer_size", "100",
                      "--n_workers", "0", "--device", "cpu", "--save_dir", str(tmp_path / "run"),
                      "--print_to_log")
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "run" / "log.txt") as fh:
        assert "with its replay buffer of 100 images" in fh.read()  # the folder's last_ckpt.pt


@pytest.mark.parametrize("script", ["eval_wrn_ebm.py", "train_wrn_ebm.py"])
def test_a_folder_without_a_checkpoint_says_what_load_path_takes(script, tmp_path):
    (tmp_path / "empty_run").mkdir()
    done = run_script(script, "--load_path", str(tmp_path / "empty_run"), "--dataset", "synthetic",
                      "--device", "cpu", "--save_dir", str(tmp_path / "out"))
    assert one_error_line(done), done.stderr
    assert "a checkpoint file, or a run's save dir that holds last_ckpt.pt" in done.stderr
    assert not (tmp_path / "out").exists()


# Outputs that do not overwrite each other ---------------------------------------------------------

def test_ood_runs_of_other_scores_and_sets_keep_their_results(tiny_checkpoint, tiny_image_folder,
                                                              tmp_path):
    done = evaluate(tiny_checkpoint, tmp_path, "--eval", "OOD", "--dataset", "synthetic",
                    "--ood_dataset", "cifar_interp", "--score_fn", "px", "--print_to_log")
    assert done.returncode == 0, done.stderr
    assert evaluate_here(tiny_checkpoint, tmp_path, "--eval", "OOD", "--dataset", "synthetic",
                         "--ood_dataset", tiny_image_folder, "--score_fn", "py") == 0
    first = read_json(tmp_path / "OOD_px_cifar_interp.json")
    second = read_json(tmp_path / f"OOD_py_{os.path.basename(tiny_image_folder)}.json")
    assert (first["score_fn"], first["ood_dataset"]) == ("px", "cifar_interp")
    assert (second["score_fn"], second["ood_dataset"]) == ("py", tiny_image_folder)
    assert read_json(tmp_path / "OOD.json") == second  # the last run, as the study scripts read it


def test_cond_samples_writes_n_grids_with_class_names_and_the_buffer_only_when_asked(
        tiny_checkpoint, tmp_path):
    done = evaluate(tiny_checkpoint, tmp_path, "--eval", "cond_samples", "--n_grids", "1",
                    "--print_to_log")
    assert done.returncode == 0, done.stderr
    result = read_json(tmp_path / "cond_samples.json")
    # the checkpoint's training set: an image folder of the synthetic classes (ImageFolder's order)
    assert result["class_names"] == sorted(SYNTHETIC_CLASSES)
    assert [os.path.basename(p) for p in result["grids"]] == ["cond_samples_000.png"]
    assert sorted(os.listdir(tmp_path)) == ["cond_samples.json", "cond_samples_000.png", "log.txt",
                                            "metrics.jsonl"]
    assert result["buffer"] is None
    width, height = Image.open(tmp_path / "cond_samples_000.png").size
    assert height == 342 and width > 342 + 30  # ten rows of 34 pixels, and a column of names

    assert evaluate_here(tiny_checkpoint, tmp_path, "--eval", "cond_samples", "--save_buffer") == 0
    assert (tmp_path / "cond_samples_buffer.pt").exists()


def test_class_names_come_from_the_training_set_else_indices(tiny_image_folder):
    from jem.eval.sampling import class_names
    assert class_names("cifar10", 10)[:3] == ["airplane", "automobile", "bird"]
    assert class_names("cifar_test", 10)[-1] == "truck"
    assert class_names(tiny_image_folder, 10) == sorted(SYNTHETIC_CLASSES)
    assert class_names("cifar100", 100)[:2] == ["0", "1"]
    assert class_names("cifar10", 100)[99] == "99"  # a model of another number of classes


# Figures a reader can read ------------------------------------------------------------------------

def test_logp_hist_prints_each_sets_mean_under_its_short_name(tiny_checkpoint, tiny_image_folder,
                                                             tmp_path):
    folder = os.path.join(tiny_image_folder, "test")
    done = evaluate(tiny_checkpoint, tmp_path, "--eval", "logp_hist", "--dataset", "synthetic",
                    "--datasets", "synthetic", folder)
    assert done.returncode == 0, done.stderr
    short = f"{os.path.basename(tiny_image_folder)}/test"
    summary = done.stdout.strip().splitlines()[-1]
    assert "logp_hist:" in summary and "mean_synthetic" in summary and f"mean_{short}" in summary
    result = read_json(tmp_path / "logp_hist.json")
    assert result[f"mean_{short}"] == pytest.approx(result["datasets"][folder]["mean"])


def test_short_names_keep_a_folders_name_and_tell_equal_ones_apart():
    assert plots.short_names(["../shared/data/cifar10_subset", "svhn"]) == {
        "../shared/data/cifar10_subset": "cifar10_subset", "svhn": "svhn"}
    assert plots.short_names(["runs/ood/mnist/"])["runs/ood/mnist/"] == "mnist"
    assert plots.short_names(["a/noise", "b/noise"]) == {"a/noise": "a/noise", "b/noise": "b/noise"}


def test_reliability_bins_of_few_images_are_hatched_and_every_bin_shows_its_count(tmp_path,
                                                                                monkeypatch):
    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kwargs: drawn.append(fig))
    plots.save_reliability_diagram(str(tmp_path / "r.png"), [0, 0.5], [0.5, 1], [0.4, 0.9], 0.1,
                                   "cifar10_subset", bin_count=[3, 200])
    ax = drawn[0].axes[0]
    hatched = [bar for bar in ax.patches if bar.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_x() == 0
    assert {text.get_text() for text in ax.texts} == {"3", "200"}
    assert any("fewer than" in text.get_text() for text in ax.get_legend().get_texts())


def test_the_attack_legend_names_the_models_sampler():
    settings = {"n_steps_refine": 1, "n_dup_chains": 5, "in_steps": 5, "pyld_lr": 0.2}
    assert attack.run_label({"settings": settings}) == "1 PYLD steps, 5 chains"
    assert attack.run_label({"settings": {**settings, "in_steps": 0}}) == "1 SGLD steps, 5 chains"
    assert attack.run_label({"settings": {"n_steps_refine": 0, "n_dup_chains": 1}}) == \
        "0 SGLD steps, 1 chain"


# No empty folder after a failure ------------------------------------------------------------------

def test_a_failed_evaluation_leaves_no_new_save_dir(tiny_checkpoint, tmp_path):
    done = evaluate(tiny_checkpoint, tmp_path / "new" / "eval", "--eval", "test_clf", "--dataset",
                    str(tmp_path / "no_such_folder"))
    assert one_error_line(done), done.stderr
    assert os.listdir(tmp_path) == []  # neither eval/ nor the new/ above it

    (tmp_path / "kept").mkdir()
    assert evaluate_here(tiny_checkpoint, tmp_path / "kept", "--eval", "test_clf", "--dataset",
                         str(tmp_path / "no_such_folder")) == 2
    assert (tmp_path / "kept").is_dir()  # it was there before


def test_the_save_dir_guard_keeps_a_folder_that_holds_results(tmp_path):
    with pytest.raises(KeyError):
        with save_dir_removed_on_failure(str(tmp_path / "a" / "run"), scratch=("log.txt",)):
            (tmp_path / "a" / "run" / "log.txt").write_text("started\n")
            (tmp_path / "a" / "run" / "ckpt_0.pt").write_text("")
            raise KeyError("failed later")
    assert sorted(os.listdir(tmp_path / "a" / "run")) == ["ckpt_0.pt", "log.txt"]
    with save_dir_removed_on_failure(str(tmp_path / "b")):
        pass
    assert (tmp_path / "b").is_dir()  # kept after success
