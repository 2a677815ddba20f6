"""Every script takes its flags spelled in full: argparse's prefix matching is off, so `--ood` is
not silently `--ood_dataset` and `--n_epoch` is not `--n_epochs`."""
import os
import subprocess
import sys

import pytest

from test_docs import command_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("argv, prefix", [
    (["eval_wrn_ebm.py", "--load_path", "M.pt", "--eval", "OOD", "--ood", "cifar_interp"], "--ood"),
    (["train_wrn_ebm.py", "--dataset", "synthetic", "--n_epoch", "1"], "--n_epoch"),
])
def test_a_prefix_of_a_flag_is_one_error_line_from_the_shell(argv, prefix, tmp_path):
    done = run_script(*argv, "--save_dir", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"unrecognized arguments: {prefix}" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script, argv", [
    ("eval_wrn_ebm.py", ["--load_path", "M.pt", "--score", "py"]),
    ("train_wrn_ebm.py", ["--p_x_weigh", "1"]),
    ("bench.py", ["--iter", "3"]),
    ("scripts/small_scale_study.py", ["--data", "D", "--minute", "1"]),
    ("scripts/time_to_accuracy.py", ["--data", "D", "--minute", "1"]),
    ("scripts/idx_to_folder.py", ["images", "labels", "out", "--max_image", "5"]),
    ("scripts/noise_folder.py", ["out", "--n_image", "5"]),
    ("scripts/plot_attack.py", ["run", "--label", "a"]),
])
def test_no_script_takes_a_flag_by_its_prefix(script, argv):
    error = command_error(script, argv)
    assert error is not None and "unrecognized arguments" in error


def test_the_full_flags_still_parse():
    assert command_error("eval_wrn_ebm.py", ["--load_path", "M.pt", "--ood_dataset", "svhn"]) \
        is None
    assert command_error("train_wrn_ebm.py", ["--n_epochs", "1", "--p_x_weight", "1"]) is None
    assert command_error("bench.py", ["--iters", "3"]) is None
