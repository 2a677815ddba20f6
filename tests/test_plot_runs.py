"""scripts/plot_runs.py: the curves of two tiny training runs as one PNG; a folder without
metrics.jsonl is one line naming it."""
import os
import subprocess
import sys

import pytest

import train_wrn_ebm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--depth", "10", "--width", "1", "--n_steps", "2", "--batch_size", "16",
            "--n_epochs", "1", "--n_valid", "20", "--buffer_size", "100", "--print_every", "1",
            "--n_workers", "0", "--device", "cpu", "--print_to_log"]


def run(command, timeout=300):
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable] + command, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=environment)


@pytest.fixture(scope="module")
def two_runs(small_image_folder, tmp_path_factory):
    """Save dirs of two tiny JEM runs (6 iterations each; the plot script is what runs from a
    shell here)."""
    runs = []
    for seed in ("1", "2"):
        save_dir = str(tmp_path_factory.mktemp(f"seed{seed}"))
        train_wrn_ebm.main(["--dataset", small_image_folder, "--seed", seed, "--save_dir", save_dir]
                           + TINY_RUN)
        runs.append(save_dir)
    return runs


@pytest.mark.parametrize("x_axis", ["iteration", "minutes"])
def test_two_runs_make_one_png(two_runs, tmp_path, x_axis):
    out = str(tmp_path / "figures" / f"runs_{x_axis}.png")
    result = run(["scripts/plot_runs.py", *two_runs, "--labels", "seed 1", "seed 2",
                  "--x", x_axis, "--out", out])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    with open(out, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 20_000  # four panels of curves, not an empty canvas


def test_a_folder_without_metrics_is_one_line_naming_it(tmp_path):
    empty = str(tmp_path / "not_a_run")
    os.makedirs(empty)
    result = run(["scripts/plot_runs.py", empty, "--out", str(tmp_path / "x.png")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no metrics.jsonl in {empty}: "
                                                  "give the --save_dir of a train_wrn_ebm.py run"]
    assert not os.path.exists(tmp_path / "x.png")
