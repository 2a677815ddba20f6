"""scripts/gpu_check.py end to end with --tiny on a CPU: every step runs, and OUT holds the JSON,
logs and PNGs it promises and no checkpoint; bad input is one line."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from jem.run.device import native_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
PNG = b"\x89PNG\r\n\x1a\n"


def run(*argv):
    return subprocess.run([sys.executable, SCRIPT, *argv], cwd=ROOT, capture_output=True, text=True)


def read(path):
    with open(path) as fh:
        return json.load(fh)


def is_png(path):
    with open(path, "rb") as fh:
        return fh.read(8) == PNG


@pytest.mark.slow  # half a minute: run it (pytest -m slow) before spending GPU time
def test_tiny_gpu_check_writes_the_bench_the_time_to_accuracy_and_the_evaluations(
        tiny_image_folder, tmp_path):
    out = tmp_path / "check"
    result = run(str(out), "--tiny", "--device", "cpu", "--data", tiny_image_folder,
                 "--seeds", "1", "--configs", "jem")
    assert result.returncode == 0, result.stdout + result.stderr

    environment = read(out / "environment.json")
    assert "bf16" in environment["hardware"] and environment["torch"] and environment["gpu"] is None
    assert environment["data"] == os.path.abspath(tiny_image_folder)

    bench = read(out / "bench.json")
    (config,) = bench["results"]
    # the tiny fast side is --amp alone: a CPU without native bf16 runs float32, the project side
    fast = {"fast"} if native_bf16(torch.device("cpu")) else set()
    assert config["config"] == "wrn-10-1" and set(config["sides"]) == {"paper", "project", *fast}
    for side in config["sides"].values():
        assert side["flops_per_iter"] > 1e9 and side["flops_per_s"] > 0 < side["share_of_peak"]
    sides = config["sides"]
    assert sides["paper"]["flops_per_iter"] == sides["project"]["flops_per_iter"]
    assert "measured" in config["peaks"]["float32"]["source"]
    table = (out / "bench.txt").read_text()
    assert "GFLOP/s" in table and "% peak" in table and "peak float32" in table

    assert read(out / "tta" / "results.json")["summary"]["jem"]["seeds"] == [1]
    assert is_png(out / "tta" / "time_to_accuracy.png")
    assert "jem" in (out / "tta" / "report.txt").read_text()

    evaluations = out / "eval" / "jem" / "seed1"
    for mode in ("test_clf", "calibration", "OOD", "cond_samples"):
        assert read(evaluations / f"{mode}.json")["args"]["load_path"].endswith("last_ckpt.pt")
    assert is_png(evaluations / "reliability_diagram.png")
    assert is_png(evaluations / "cond_samples_000.png")
    assert glob.glob(str(out / "**" / "*.pt"), recursive=True) == []  # JSON, logs and PNGs only

    summary = read(out / "summary.json")
    assert summary["failed"] == [] and {"bench_jem", "time_to_accuracy"} <= set(summary["steps"])
    model = summary["models"]["jem"]["1"]
    assert 0 <= model["test_accuracy"] <= 1 and 0 <= model["ece"] <= 1
    assert 0 <= model["ood_auroc_cifar_interp"] <= 1 and is_png(model["sample_grid"])
    assert all(side["share_of_peak"] > 0 for side in summary["bench"][0]["sides"].values())
    assert set(summary["bench"][0]["sides"]) == set(config["sides"])
    assert summary["time_to_accuracy"]["configs"]["jem"]["seeds"] == [1]


def test_a_missing_data_folder_and_an_unwritable_out_are_one_line(tmp_path):
    result = run(str(tmp_path / "out"), "--data", str(tmp_path / "no_such_folder"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no data folder at" in result.stderr and "--data" in result.stderr
    assert not (tmp_path / "out").exists()

    (tmp_path / "data" / "train").mkdir(parents=True)
    result = run(str(tmp_path / "out"), "--data", str(tmp_path / "data"))
    assert result.returncode == 2 and "has no test/ folder" in result.stderr

    (tmp_path / "data" / "test").mkdir()
    (tmp_path / "a_file").write_text("")
    result = run(str(tmp_path / "a_file" / "out"), "--data", str(tmp_path / "data"))
    assert result.returncode == 2 and result.stderr.startswith("error: cannot write to ")
    assert result.stderr.count("\n") == 1
