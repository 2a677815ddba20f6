"""eval_wrn_ebm.py end to end on the synthetic set, with a tiny checkpoint written by
train_wrn_ebm."""
from dataclasses import asdict
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jem.eval import sampling
from jem.flags import evaluate as evaluate_flags
import eval_wrn_ebm
import train_wrn_ebm
from jem.eval.datasets import load_eval_dataset
from jem.chain_init import ClassGaussians
from jem.model import JEM
from test_chain_init import quick_fit
from test_checkpoint import authors_state_dict
from utils import run_cli

SHARED_CIFAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                            "cifar10_subset")
N_IMAGES = 20


def run_eval(checkpoint, save_dir, *flags):
    """main() in-process on the CPU with few images; returns the mode's JSON as written."""
    argv = ["--load_path", checkpoint, "--save_dir", str(save_dir), "--device", "cpu",
            "--n_workers", "0", "--max_images", str(N_IMAGES), "--print_to_log", *flags]
    eval_wrn_ebm.main(argv)
    mode = argv[argv.index("--eval") + 1]
    with open(os.path.join(save_dir, f"{mode}.json")) as fh:
        return json.load(fh)


def count_chains(monkeypatch):
    """Record the (n, y) of every sample_q call the sampling modes make."""
    calls = []

    def recording_sample_q(model, replay_buffer, n, y=None, chain=None):
        calls.append((n, None if y is None else y.cpu()))
        return sample_q(model, replay_buffer, n, y, chain)

    sample_q = sampling.sample_q
    monkeypatch.setattr(sampling, "sample_q", recording_sample_q)
    return calls


def test_test_clf_matches_a_direct_forward_pass_and_takes_the_model_from_the_checkpoint(
        tiny_checkpoint, tmp_path):
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", "test_clf", "--dataset", "synthetic",
                      "--sigma", "0")
    args = result["args"]
    # not the paper's 28/10 defaults
    assert (args["depth"], args["width"], args["n_classes"]) == (10, 1, 10)

    model = JEM(depth=10, width=1)
    model.load_state_dict(torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"])
    dataset = load_eval_dataset("synthetic", None, 0.0)
    x = torch.stack([dataset[i][0] for i in range(N_IMAGES)])
    y = torch.tensor([dataset[i][1] for i in range(N_IMAGES)])
    with torch.no_grad():
        losses = F.cross_entropy(model.eval().classify(x), y, reduction="none")

    vals = torch.load(tmp_path / "vals.pt", weights_only=True)
    assert set(vals) == {"losses", "corrects", "pys"} and len(vals["losses"]) == N_IMAGES
    torch.testing.assert_close(vals["losses"], losses, rtol=1e-4, atol=1e-5)
    assert result["n_images"] == N_IMAGES
    assert result["loss"] == pytest.approx(losses.mean().item(), rel=1e-4)
    assert result["accuracy"] == pytest.approx(vals["corrects"].mean().item())
    assert torch.all((vals["pys"] >= 0.1 - 1e-6) & (vals["pys"] <= 1))  # max softmax of 10 classes


def test_test_clf_sgld_refinement_moves_the_inputs_deterministically_under_the_seed(
        tiny_checkpoint, tmp_path):
    flags = ["--eval", "test_clf", "--dataset", "synthetic", "--n_steps", "2", "--sgld_lr", "100",
             "--seed", "3"]
    runs = []
    for name in ("a", "b"):
        run_eval(tiny_checkpoint, tmp_path / name, *flags)
        runs.append(torch.load(tmp_path / name / "vals.pt", weights_only=True)["losses"])
    run_eval(tiny_checkpoint, tmp_path / "plain", "--eval", "test_clf", "--dataset", "synthetic",
             "--seed", "3")
    plain = torch.load(tmp_path / "plain" / "vals.pt", weights_only=True)["losses"]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], plain)


def test_calibration_agrees_with_test_clf_and_draws_the_reliability_diagram(tiny_checkpoint,
                                                                            tmp_path):
    flags = ["--dataset", "synthetic", "--sigma", "0"]
    clf = run_eval(tiny_checkpoint, tmp_path, "--eval", "test_clf", *flags)
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", "calibration", *flags)
    vals = torch.load(tmp_path / "vals.pt", weights_only=True)
    ece, _ = eval_wrn_ebm.expected_calibration_error(vals["pys"].numpy(), vals["corrects"].numpy())
    assert result["accuracy"] == pytest.approx(clf["accuracy"])
    assert result["ece"] == pytest.approx(ece)
    assert len(result["bins"]) == 15 and sum(b["count"] for b in result["bins"]) == N_IMAGES
    assert Image.open(result["figure"]).size[0] > 100


@pytest.mark.parametrize("score_fn", ["px", "py", "pxgrad"])
def test_ood_scores_in_distribution_against_interpolations(tiny_checkpoint, tmp_path, score_fn):
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", "OOD", "--dataset", "synthetic",
                      "--ood_dataset", "cifar_interp", "--score_fn", score_fn)
    assert (result["n_in"], result["n_out"]) == (N_IMAGES, N_IMAGES)
    for metric in ("auroc", "aupr", "fpr_at_95_tpr"):
        assert 0 <= result[metric] <= 1
    if score_fn == "pxgrad":
        assert result["mean_score_in"] < 0  # minus a gradient norm


def test_ood_reads_image_folders_and_a_celeba_folder_of_loose_images(tiny_checkpoint,
                                                                     tiny_image_folder, tmp_path):
    celeba = tmp_path / "img_align_celeba"
    celeba.mkdir()
    for i in range(3):
        # CelebA's size
        Image.new("RGB", (178, 218), (40 * i, 90, 200)).save(celeba / f"{i:06d}.jpg")
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", "OOD", "--dataset", tiny_image_folder,
                      "--ood_dataset", "celeba", "--celeba_root", str(celeba))
    assert (result["n_in"], result["n_out"]) == (N_IMAGES, 3)


def test_logp_hist_saves_png_and_pdf(tiny_checkpoint, tmp_path):
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", "logp_hist", "--dataset", "synthetic",
                      "--datasets", "synthetic", "cifar_interp")
    assert sorted(os.path.basename(p) for p in result["figures"]) == \
        ["logp_hist.pdf", "logp_hist.png"]
    assert all(os.path.getsize(p) > 1000 for p in result["figures"])
    assert set(result["datasets"]) == {"synthetic", "cifar_interp"}


def test_logp_hist_of_pxgrad_plots_minus_log_the_gradient_norm_as_the_paper(tiny_checkpoint,
                                                                            tmp_path):
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", "logp_hist", "--dataset", "synthetic",
                      "--datasets", "synthetic", "--score_fn", "pxgrad", "--sigma", "0")
    model = JEM(depth=10, width=1).eval()
    model.load_state_dict(torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"])
    dataset = load_eval_dataset("synthetic", None, 0.0)
    x = torch.stack([dataset[i][0] for i in range(N_IMAGES)]).requires_grad_(True)
    grad, = torch.autograd.grad(model(x).sum(), x)
    expected = -grad.flatten(1).norm(dim=1).log()
    assert result["datasets"]["synthetic"]["mean"] == \
        pytest.approx(expected.mean().item(), rel=1e-4)


@pytest.mark.parametrize("mode", [["uncond_samples"],
                                  ["cond_samples", "--fresh_samples", "--save_buffer"]])
def test_sampling_modes_take_buffer_size_0_as_fresh_short_run_chains_every_round(
        tiny_checkpoint, tmp_path, monkeypatch, mode):
    calls = count_chains(monkeypatch)
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", *mode, "--buffer_size", "0", "--n_steps",
                      "1", "--n_sample_steps", "3", "--batch_size", "4")
    assert calls == [(4, None)] * 3
    assert result["n_samples"] == 12  # every round's chains, kept
    assert torch.load(result["buffer"], weights_only=True)["replay_buffer"].shape == (12, 3, 32, 32)


def test_uncond_samples_advances_one_batch_of_chains_a_round(tiny_checkpoint, tmp_path,
                                                             monkeypatch):
    calls = count_chains(monkeypatch)
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", "uncond_samples", "--buffer_size", "20",
                      "--n_steps", "1", "--n_sample_steps", "3", "--print_every", "2",
                      "--batch_size", "8")
    assert calls == [(8, None)] * 3  # the paper's rounds: batch_size chains from the buffer
    assert [os.path.basename(p) for p in result["grids"]] == ["uncond_samples_000000.png",
                                                              "uncond_samples_000002.png"]
    assert os.path.isfile(result["final_grid"])
    assert torch.load(result["buffer"], weights_only=True)["replay_buffer"].shape == (20, 3, 32, 32)


def grid_rows(path):
    """Rows of 32x32 images in a save_grid PNG (2-pixel padding)."""
    return (Image.open(path).size[1] - 2) // 34


def test_cond_samples_from_the_checkpoint_buffer_draws_one_row_per_class(tiny_checkpoint, tmp_path):
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", "cond_samples", "--save_buffer")
    # the training buffer
    assert result["buffer_source"] == "checkpoint" and result["n_samples"] == 100
    assert sum(result["class_counts"]) == 100
    assert len(result["grids"]) == -(-max(result["class_counts"]) // 10)
    width, height = Image.open(result["grids"][0]).size
    # names on the left
    assert height == 342 and width > 342 and grid_rows(result["grids"][0]) == 10
    saved = torch.load(result["buffer"], weights_only=True)
    assert torch.bincount(saved["predicted_class"], minlength=10).tolist() == result["class_counts"]


def test_cond_samples_fresh_samples_builds_a_buffer_as_uncond_samples(tiny_checkpoint, tmp_path,
                                                                      monkeypatch):
    calls = count_chains(monkeypatch)
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", "cond_samples", "--fresh_samples",
                      "--buffer_size", "20", "--n_steps", "1", "--n_sample_steps", "2",
                      "--batch_size", "8")
    assert calls == [(8, None)] * 2
    assert (result["buffer_source"] == "fresh" and result["n_samples"] == 20
            and sum(result["class_counts"]) == 20)


def test_a_checkpoint_in_the_papers_two_key_format_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    original = JEM(depth=10, width=2, n_classes=7).eval()
    path = str(tmp_path / "paper.pt")
    torch.save({"model_state_dict": original.state_dict(),
                "replay_buffer": torch.rand(14, 3, 32, 32) * 2 - 1}, path)
    # no --depth/--width: read from the weights
    args = eval_wrn_ebm.parse_args(["--load_path", path])
    model, replay_buffer = eval_wrn_ebm.load_jem(args, torch.device("cpu"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.classify(x), original.classify(x), rtol=0, atol=0)
    assert (args.depth, args.width, args.n_classes, args.norm, args.uncond) == \
        (10, 2, 7, None, False)
    assert len(replay_buffer) == 14 and not model.training

    result = run_eval(path, tmp_path, "--eval", "cond_samples")  # its buffer, no conversion step
    assert sum(result["class_counts"]) == 14 and grid_rows(result["grids"][0]) == 7


def test_a_checkpoint_that_does_not_fit_gets_one_line_and_no_traceback(tiny_checkpoint, tmp_path):
    command = [sys.executable, "eval_wrn_ebm.py", "--load_path", tiny_checkpoint, "--depth", "16",
               "--eval", "test_clf", "--dataset", "synthetic", "--device", "cpu", "--save_dir",
               str(tmp_path)]
    done = subprocess.run(command, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "does not fit" in done.stderr and "--depth 10 --width 1" in done.stderr


def test_a_file_that_is_no_checkpoint_gets_one_line(tmp_path, capsys):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(SystemExit) as stop:
        run_cli(eval_wrn_ebm.main, ["--load_path", str(path), "--save_dir", str(tmp_path),
                                    "--device", "cpu"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("flags, message", [
    (["--ood_dataset", "no/such/folder"], "no data set 'no/such/folder'"),
    (["--ood_dataset", "celeba"], "--celeba_root"),
])
def test_a_missing_data_set_gets_one_line_before_any_scoring(tiny_checkpoint, tmp_path, capsys,
                                                              monkeypatch, flags, message):
    monkeypatch.setattr(eval_wrn_ebm, "score_dataset", lambda *a: pytest.fail("scored before "
                                                                              "checking data"))
    argv = ["--load_path", tiny_checkpoint, "--save_dir", str(tmp_path), "--device", "cpu",
            "--eval", "OOD", "--dataset", "synthetic", "--print_to_log", *flags]
    with pytest.raises(SystemExit) as stop:
        run_cli(eval_wrn_ebm.main, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err


def test_a_celeba_folder_of_mixed_shapes_is_one_line_naming_the_odd_file(tiny_checkpoint, tmp_path,
                                                                         capsys):
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, size in enumerate([(178, 218)] * 3 + [(100, 100)]):
        Image.new("RGB", size).save(folder / f"{i}.png")
    with pytest.raises(SystemExit):
        run_cli(eval_wrn_ebm.main,
                ["--load_path", tiny_checkpoint, "--save_dir", str(tmp_path), "--device", "cpu",
                 "--eval", "OOD", "--dataset", "synthetic", "--ood_dataset", "celeba",
                 "--celeba_root", str(folder), "--max_images", "8", "--print_to_log"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{folder / '3.png'} is 32x32 pixels" in err and "32x39" in err


def test_a_missing_checkpoint_is_one_line_and_makes_no_save_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(eval_wrn_ebm.main,
                ["--load_path", str(tmp_path / "gone.pt"), "--eval", "calibration", "--save_dir",
                 str(tmp_path / "eval"), "--device", "cpu"])
    assert ("no checkpoint at --load_path" in capsys.readouterr().err
            and not (tmp_path / "eval").exists())


def test_classification_needs_labels_of_the_models_classes(tiny_checkpoint, tmp_path, capsys):
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (32, 32)).save(loose / "a.png")  # a folder of images without classes
    with pytest.raises(SystemExit):
        run_cli(eval_wrn_ebm.main,
                ["--load_path", tiny_checkpoint, "--save_dir", str(tmp_path), "--device", "cpu",
                 "--eval", "test_clf", "--dataset", str(loose)])
    assert "needs a labeled --dataset" in capsys.readouterr().err


def test_every_mode_has_the_shared_signature_and_attack_is_a_choice():
    assert set(eval_wrn_ebm.MODES) == {"test_clf", "OOD", "logp_hist", "uncond_samples",
                                       "cond_samples", "calibration", "attack", "sample_quality"}
    args = eval_wrn_ebm.parse_args(["--load_path", "x.pt", "--eval", "attack"])
    assert args.eval == "attack"
    defaults = eval_wrn_ebm.parse_args(["--load_path", "x.pt"])
    expected = dict(eval="OOD", score_fn="px", ood_dataset="svhn", dataset="cifar_test",
                    datasets=[], batch_size=64, sigma=0.03, n_steps=0, buffer_size=0,
                    reinit_freq=0.05, sgld_lr=1.0, sgld_std=0.01, print_every=100,
                    n_sample_steps=100, fresh_samples=False)
    assert {k: getattr(defaults, k) for k in expected} == expected


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR), reason="needs ../shared/data/cifar10_subset")
def test_real_cifar_subset_as_an_image_folder(tiny_checkpoint, tmp_path):
    result = run_eval(tiny_checkpoint, tmp_path, "--eval", "OOD", "--dataset", SHARED_CIFAR,
                      "--ood_dataset", "cifar_interp")
    assert result["n_in"] == N_IMAGES and 0 <= result["auroc"] <= 1


# --------------------------------------------------------------------------------------------------
# Models of the later recipes are sampled as they were trained.

@pytest.fixture(scope="module")
def jempp_checkpoint(tiny_image_folder, tmp_path_factory):
    """A WRN-10-1 trained for two iterations with --recipe jempp (batch norm, PYLD, informative
    starts)."""
    save_dir = tmp_path_factory.mktemp("jempp_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClassGaussians, "fit", staticmethod(quick_fit))
        train_wrn_ebm.main(["--recipe", "jempp", "--dataset", tiny_image_folder, "--depth", "10",
                            "--width", "1", "--n_steps", "1", "--batch_size", "16", "--n_epochs",
                            "1", "--n_valid", "8", "--buffer_size", "20", "--n_workers", "0",
                            "--device", "cpu", "--save_dir", str(save_dir), "--print_to_log"])
    return str(save_dir / "last_ckpt.pt")


def chain_settings_of_every_call(monkeypatch):
    calls = []

    def recording_sample_q(model, replay_buffer, n, y=None, chain=None):
        settings = {k: v for k, v in asdict(chain).items() if k != "cuda_graph"}  # GPU only
        calls.append({**settings, "training": model.training,
                      "restarts": type(replay_buffer.chain_init).__name__})
        return sample_q(model, replay_buffer, n, y, chain)

    sample_q = sampling.sample_q
    monkeypatch.setattr(sampling, "sample_q", recording_sample_q)
    return calls


def test_a_jempp_model_samples_with_its_training_sampler_and_keeps_its_statistics(
        jempp_checkpoint, tmp_path, monkeypatch):
    calls = chain_settings_of_every_call(monkeypatch)
    fitted = []

    def recording_fit(loader, n_classes):
        fitted.append(loader)
        return quick_fit(loader, n_classes)

    monkeypatch.setattr(ClassGaussians, "fit", staticmethod(recording_fit))
    statistics = {
        k: v
        for k, v in torch.load(jempp_checkpoint, weights_only=True)["model_state_dict"].items()
        if "running" in k
    }
    real_load_jem, loaded = eval_wrn_ebm.load_jem, []
    monkeypatch.setattr(eval_wrn_ebm, "load_jem",
                        lambda *a: loaded.append(real_load_jem(*a)) or loaded[-1])
    result = run_eval(jempp_checkpoint, tmp_path, "--eval", "uncond_samples", "--buffer_size", "20",
                      "--n_steps", "2", "--n_sample_steps", "2", "--batch_size", "8")
    expected = dict(n_steps=2, sgld_lr=0.0, sgld_std=0.0, in_steps=5, pyld_lr=0.2, eps=1.0,
                    train_mode=True, training=True, restarts="ClassGaussians")
    # PYLD on batch statistics, fresh chains from the class Gaussians
    assert calls == [expected] * 2
    args = result["args"]
    assert (args["recipe"], args["sigma"], args["norm"], args["buffer_init"]) == \
        ("jempp", 0.03, "batch", "informative")
    model = loaded[0][0]
    assert not model.training and all(torch.equal(model.state_dict()[k], v)
                                      for k, v in statistics.items())
    # its training split: 40 images, 8 held out
    assert len(fitted) == 1 and len(fitted[0].dataset) == 32

    calls.clear()  # a flag given wins over the training's
    run_eval(jempp_checkpoint, tmp_path, "--eval", "uncond_samples", "--buffer_size", "20",
             "--n_steps", "1", "--n_sample_steps", "1", "--batch_size", "8", "--in_steps", "2",
             "--buffer_init", "uniform")
    assert (calls[0]["in_steps"], calls[0]["pyld_lr"], calls[0]["restarts"]) == \
        (2, 0.2, "UniformNoise")


def test_the_papers_model_keeps_the_papers_evaluation_sampler(tiny_checkpoint, tmp_path,
                                                               monkeypatch):
    calls = chain_settings_of_every_call(monkeypatch)
    run_eval(tiny_checkpoint, tmp_path, "--eval", "uncond_samples", "--buffer_size", "20",
             "--n_steps", "1", "--n_sample_steps", "1", "--batch_size", "8")
    assert calls == [dict(n_steps=1, sgld_lr=1.0, sgld_std=0.01, in_steps=0, pyld_lr=0.2, eps=1.0,
                          train_mode=False, training=False, restarts="UniformNoise")]


@pytest.mark.parametrize("recipe, yopo, sampler", [
    ("jempp", True, dict(in_steps=5, pyld_lr=0.2, sgld_lr=0.0, sgld_std=0.0, sigma=0.03)),
    ("sadajem", False, dict(in_steps=1, pyld_lr=1.0, sgld_lr=0.0, sgld_std=0.0, sigma=0.0))])
def test_a_published_jempp_or_sadajem_file_evaluates_with_its_recipe(tmp_path, recipe, yopo,
                                                                     sampler):
    """Their two keys in their layout (no f.linear; JEM++'s yopo aliases), batch norm found from the
    keys."""
    torch.manual_seed(0)
    theirs = JEM(depth=10, width=1, norm="batch")
    theirs(torch.randn(8, 3, 32, 32))  # running statistics of a batch
    path = str(tmp_path / f"{recipe}.pt")
    torch.save({"model_state_dict": authors_state_dict(theirs.eval(), yopo),
                "replay_buffer": torch.rand(20, 3, 32, 32) * 2 - 1}, path)
    result = run_eval(path, tmp_path, "--eval", "test_clf", "--dataset", "synthetic",
                      "--recipe", recipe)
    args = result["args"]
    assert (args["norm"], args["depth"], args["width"]) == ("batch", 10, 1)
    assert {k: args[k] for k in sampler} == sampler and args["chains_in_train_mode"]
    dataset = load_eval_dataset("synthetic", None, 0.0)
    x = torch.stack([dataset[i][0] for i in range(N_IMAGES)])
    if sampler["sigma"] == 0:  # their test images without noise: the logits of a direct pass
        y = torch.tensor([dataset[i][1] for i in range(N_IMAGES)])
        with torch.no_grad():
            expected = F.cross_entropy(theirs.classify(x), y)
        assert result["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_sample_quality_of_a_folder_needs_no_checkpoint(tiny_image_folder, tmp_path, monkeypatch,
                                                        capsys):
    seen = []
    monkeypatch.setattr(evaluate_flags, "inception_weights_path", lambda path: "weights.pth")
    monkeypatch.setitem(eval_wrn_ebm.MODES, "sample_quality",
                        lambda *a: seen.append(a[1:3]) or {"fid": 1.0})
    eval_wrn_ebm.main(["--eval", "sample_quality", "--samples", tiny_image_folder, "--save_dir",
                       str(tmp_path), "--device", "cpu", "--print_to_log"])
    assert seen == [(None, None)]  # no model, no buffer
    for argv in (["--eval", "sample_quality"], ["--eval", "test_clf"]):
        with pytest.raises(SystemExit):
            run_cli(eval_wrn_ebm.main, argv + ["--save_dir", str(tmp_path), "--device", "cpu"])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs --load_path MODEL.pt" in err


@pytest.mark.parametrize("flags, message", [
    (["--sigma", "nan"], "--sigma nan"), (["--reinit_freq", "2"], "from 0 to 1"),
    (["--n_dup_chains", "0"], "--n_dup_chains 0")])
def test_numbers_out_of_range_are_one_line(tiny_checkpoint, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        run_cli(eval_wrn_ebm.main, ["--load_path", tiny_checkpoint, "--save_dir", str(tmp_path),
                                    *flags])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_every_numeric_flag_has_its_range_checked():
    numeric = {a.dest for a in eval_wrn_ebm.build_parser()._actions if a.type in (int, float)}
    assert numeric == set(eval_wrn_ebm.EVAL_FLAG_RANGES)
