"""train_wrn_ebm.py end to end on the built-in synthetic set with a tiny network."""
import json
import os
import subprocess
import sys

import pytest
import torch

from jem.flags import train as train_flags
import train_wrn_ebm
from jem import step
from jem.optim import Schedule
from jem.recipes import PAPER_SAMPLER
from jem.checkpoint import load_checkpoint
from jem.model import JEM
from utils import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_valid", "20", "--depth", "10", "--width", "1", "--batch_size", "16", "--n_steps", "2",
        "--buffer_size", "100", "--n_epochs", "1", "--print_every", "2", "--print_to_log", "--lr",
        "1e-3"]


@pytest.fixture
def tiny(small_image_folder):
    """Flags of a tiny run on 100 training images (6 iterations an epoch)."""
    return ["--dataset", small_image_folder] + TINY


def train(tiny, save_dir, *flags):
    train_wrn_ebm.main(tiny + ["--save_dir", str(save_dir)] + list(flags))
    return save_dir


def test_quick_run_on_the_synthetic_set(tiny, tmp_path):
    # 100 training images (9900 of 10000 held out for validation) keep the epoch short.
    train(tiny, tmp_path, "--dataset", "synthetic", "--n_valid", "9900", "--plot_uncond")
    assert (tmp_path / "last_ckpt.pt").is_file() and (tmp_path / "x_q_0_000000.png").is_file()
    assert [r["epoch"] for r in records(tmp_path) if r["kind"] == "eval"] == [0]


def records(save_dir):
    with open(save_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def test_default_jem_run_writes_everything(tiny, tmp_path):
    train(tiny, tmp_path, "--n_epochs", "2", "--ckpt_every", "1", "--plot_uncond", "--plot_cond")
    for name in ("args.json", "log.txt", "metrics.jsonl", "ckpt_0.pt", "ckpt_1.pt", "last_ckpt.pt",
                 "best_valid_ckpt.pt", "x_q_0_000000.png", "x_q_y_0_000000.png"):
        assert (tmp_path / name).is_file(), name
    args = json.loads((tmp_path / "args.json").read_text())
    assert args["p_x_weight"] == 1.0 and args["n_classes"] == 10 and args["depth"] == 10
    log = (tmp_path / "log.txt").read_text()
    assert ("P(x) f(x_data)=" in log and "f(x_q)=" in log and "P(y|x) loss=" in log
            and "valid acc" in log)
    rows = records(tmp_path)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["iteration"] for r in train_rows] == [0, 2, 4, 6, 8, 10]  # 6 iterations an epoch
    for key in ("epoch", "lr", "loss", "l_p_x", "l_p_y_given_x", "f_data", "f_q", "acc",
                "seconds_per_iteration"):
        assert key in train_rows[0], key
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1] and 0 <= evals[0]["test_acc"] <= 1
    ckpt = load_checkpoint(str(tmp_path / "last_ckpt.pt"))
    assert (ckpt["replay_buffer"].shape == (100, 3, 32, 32) and ckpt["epoch"] == 1
            and ckpt["iteration"] == 12)
    model = JEM(depth=10, width=1)
    model.load_state_dict(ckpt["model_state_dict"])  # strict: the paper's layout


def test_loss_terms_match_the_logged_loss(tiny, tmp_path):
    train(tiny, tmp_path, "--p_x_y_weight", "0.5", "--class_cond_p_x_sample", "--p_x_weight", "2")
    row = [r for r in records(tmp_path) if r["kind"] == "train"][0]
    expected = 2 * row["l_p_x"] + row["l_p_y_given_x"] + 0.5 * row["l_p_x_y"]
    assert row["loss"] == pytest.approx(expected, rel=1e-5)
    assert row["l_p_x"] == pytest.approx(row["f_q"] - row["f_data"], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("flags", [
    ["--uncond"], ["--norm", "batch", "--optimizer", "sgd"], ["--labels_per_class", "2"],
    ["--p_x_weight", "0", "--warmup_iters", "3", "--decay_epochs", "0"],
    ["--norm", "act", "--dropout_rate", "0.1"], ["--buffer_size", "0"],
    ["--optimizer", "sam", "--rho", "0.05", "--no_px_augment", "--labeled_batch_size", "8"]])
def test_variants_train(tiny, tmp_path, flags):
    train(tiny, tmp_path, *flags)
    assert (tmp_path / "last_ckpt.pt").is_file()


def test_warmup_and_decay_set_the_learning_rate(tiny, tmp_path):
    train(tiny, tmp_path, "--warmup_iters", "4", "--n_epochs", "2", "--decay_epochs", "1",
          "--decay_rate", "0.5")
    lrs = {r["iteration"]: r["lr"] for r in records(tmp_path) if r["kind"] == "train"}
    assert lrs[0] == 0 and lrs[2] == pytest.approx(1e-3 * 2 / 4) and lrs[4] == pytest.approx(1e-3)
    assert lrs[6] == pytest.approx(5e-4)  # epoch 1 starts at iteration 6


@pytest.mark.parametrize("warmup_iters", ["0", "-1"])
def test_no_warmup_trains_at_the_full_learning_rate_from_the_first_iteration(warmup_iters):
    args = train_wrn_ebm.parse_args(["--warmup_iters", warmup_iters, "--lr", "0.1"])
    schedule = Schedule(args.lr, tuple(args.decay_epochs), args.decay_rate, args.warmup_iters)
    assert [schedule.lr_at(0, it) for it in (0, 1, 1000)] == [0.1, 0.1, 0.1]


def test_clf_only_trains_only_the_classifier_head(tiny, tmp_path):
    first = train(tiny, tmp_path / "a")
    before = load_checkpoint(str(first / "last_ckpt.pt"))["model_state_dict"]
    train(tiny, tmp_path / "b", "--load_path", str(first / "last_ckpt.pt"), "--clf_only")
    after = load_checkpoint(str(tmp_path / "b" / "last_ckpt.pt"))["model_state_dict"]
    assert torch.equal(before["f.conv1.weight"], after["f.conv1.weight"])
    assert not torch.equal(before["class_output.weight"], after["class_output.weight"])


def test_load_path_accepts_the_papers_two_key_file(tiny, tmp_path):
    torch.manual_seed(0)
    model = JEM(depth=10, width=1)
    buffer = torch.rand(100, 3, 32, 32) * 2 - 1
    torch.save({"model_state_dict": model.state_dict(), "replay_buffer": buffer},
               tmp_path / "paper.pt")
    train(tiny, tmp_path / "run", "--load_path", str(tmp_path / "paper.pt"), "--lr", "0")
    ckpt = load_checkpoint(str(tmp_path / "run" / "last_ckpt.pt"))
    torch.testing.assert_close(ckpt["model_state_dict"]["f.conv1.weight"],
                               model.state_dict()["f.conv1.weight"])
    assert (ckpt["replay_buffer"].shape == buffer.shape
            and not torch.equal(ckpt["replay_buffer"], buffer))


def test_divergence_stops_without_touching_checkpoints(tiny, tmp_path, monkeypatch, capsys):
    real_loss = step.jem_loss
    calls = []

    def diverging_loss(*args, **kwargs):
        calls.append(1)
        loss, terms = real_loss(*args, **kwargs)
        return (loss * 1e9 if len(calls) == 9 else loss), terms  # iteration 8, in epoch 1

    monkeypatch.setattr(step, "jem_loss", diverging_loss)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_wrn_ebm.main, tiny + ["--save_dir", str(tmp_path), "--n_epochs", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged" in err and "--load_path" in err
    assert load_checkpoint(str(tmp_path / "last_ckpt.pt"))["epoch"] == 0
    saved = load_checkpoint(str(tmp_path / "last_good_before_divergence.pt"))
    assert saved["iteration"] == 8 and all(
        torch.isfinite(t).all() for t in saved["model_state_dict"].values() if t.is_floating_point()
    )


@pytest.mark.parametrize("flags, message", [
    (["--depth", "12"], "6n+4"),
    (["--p_x_y_weight", "1", "--buffer_size", "105"], "--buffer_size 105"),
    (["--uncond", "--class_cond_p_x_sample"], "--uncond"),
    (["--uncond", "--p_x_y_weight", "1"], "--uncond"),
    (["--dataset", "/no/such/folder"], "image folder"),
    (["--n_valid", "120"], "--n_valid"),
    (["--load_path", "/no/such/ckpt.pt"], "no checkpoint"),
    (["--optimizer", "sam", "--rho", "-1"], "--rho"),
    (["--labeled_batch_size", "200"], "--labeled_batch_size"),
    (["--lr", "-1"], "--lr -1.0: it must be a number of at least 0"),
    (["--sigma", "nan"], "--sigma nan"),
    (["--reinit_freq", "1.5"], "from 0 to 1"),
    (["--decay_epochs", "5", "-1"], "--decay_epochs -1"),
    (["--seed", "-1"], "--seed"),
    (["--recipe", "sadajem", "--optimizer", "adam"], "drop --optimizer adam"),
    (["--recipe", "sadajem", "--sgld_std", "0.01"], "pass --sgld_std 0"),
    (["--recipe", "sadajem", "--sgld_lr", "1", "--pyld_lr", "1"], "give one of them"),
    (["--batch_size", "200", "--labeled_batch_size", "8"], "an epoch would train nothing"),
    (["--norm", "bacth"], "invalid norm value: 'bacth'"),  # argparse's own errors are one line too
    (["--n_epochs", "ten"], "invalid int value"),
])
def test_bad_input_is_one_line(tiny, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_wrn_ebm.main, tiny + ["--save_dir", str(tmp_path)] + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_a_missing_starting_checkpoint_makes_no_save_dir(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(train_wrn_ebm.main, tiny + ["--save_dir", str(tmp_path / "run"), "--load_path",
                                             str(tmp_path / "x.pt")])
    assert ("no checkpoint at --load_path" in capsys.readouterr().err
            and not (tmp_path / "run").exists())


def test_sam_second_pass_sees_the_same_batches_and_leaves_batch_norm_statistics(tiny, tmp_path,
                                                                                monkeypatch):
    """Each iteration calls the loss twice (at w, then at w + e) on the same inputs and samples;
    only the first call moves batch norm's running statistics."""
    real_loss, calls = step.jem_loss, []

    def recording_loss(model, samples, batch, objective, heads=None, data_heads=None):
        before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        weights = model.f.conv1.weight.detach().clone()
        result = real_loss(model, samples, batch, objective, heads, data_heads)
        moved = any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        calls.append(dict(inputs=(samples["p_x"], *batch), weights=weights, stats_moved=moved))
        return result

    monkeypatch.setattr(step, "jem_loss", recording_loss)
    train(tiny, tmp_path, "--optimizer", "sam", "--norm", "batch", "--n_epochs", "1",
          "--lr", "0.01")
    assert len(calls) == 2 * 6
    for first, second in zip(calls[::2], calls[1::2]):
        assert all(a is b for a, b in zip(first["inputs"], second["inputs"]))
        assert not torch.equal(first["weights"], second["weights"])  # the second pass runs at w + e
        assert first["stats_moved"] and not second["stats_moved"]
    state = load_checkpoint(str(tmp_path / "last_ckpt.pt"))["optimizer_state_dict"]
    assert state["param_groups"][0]["rho"] == 2.0 and state["param_groups"][0]["adaptive"]
    assert all("momentum_buffer" in s for s in state["state"].values())


def test_sada_jem_flag_names_are_aliases():
    args = train_wrn_ebm.parse_args(["--px", "0.5", "--pyx", "2"])
    assert (args.p_x_weight, args.p_y_given_x_weight) == (0.5, 2.0)
    defaults = train_wrn_ebm.parse_args([])
    assert (defaults.optimizer, defaults.px_augment, defaults.labeled_batch_size) == \
        ("adam", True, None)


def test_checkpoint_of_another_network_is_one_line(tiny, tmp_path, capsys):
    torch.save({"model_state_dict": JEM(depth=16, width=2).state_dict()}, tmp_path / "wrn16.pt")
    with pytest.raises(SystemExit):
        run_cli(train_wrn_ebm.main, tiny + ["--save_dir", str(tmp_path / "run"), "--load_path",
                                             str(tmp_path / "wrn16.pt")])
    assert "--depth 16 --width 2" in capsys.readouterr().err


def test_unwritable_save_dir_is_refused_before_training(tiny, tmp_path):
    (tmp_path / "file").write_text("")
    result = subprocess.run(
        [sys.executable, "train_wrn_ebm.py"] + tiny + ["--save_dir", str(tmp_path / "file" / "x")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (result.stderr.strip().splitlines() == [result.stderr.strip()]
            and "--save_dir" in result.stderr)
    assert "Traceback" not in result.stderr


SPEC_TRAIN_FLAGS = """\
--dataset --data_root --lr --decay_epochs --decay_rate --clf_only --labels_per_class --optimizer
--batch_size --n_epochs --warmup_iters --p_x_weight --p_y_given_x_weight --p_x_y_weight \
--dropout_rate --sigma
--weight_decay --norm --n_steps --width --depth --uncond --class_cond_p_x_sample --buffer_size \
--reinit_freq
--sgld_lr --sgld_std --save_dir --ckpt_every --eval_every --print_every --load_path \
--print_to_log --plot_cond
--plot_uncond --n_valid --device --seed""".split()


def test_help_lists_every_flag_of_the_paper(capsys):
    with pytest.raises(SystemExit):
        train_wrn_ebm.parse_args(["--help"])
    help_text = capsys.readouterr().out
    missing = [flag for flag in SPEC_TRAIN_FLAGS if flag not in help_text]
    assert not missing


def test_paper_defaults():
    args = train_wrn_ebm.parse_args([])
    assert (args.dataset, args.lr, args.decay_epochs, args.decay_rate, args.labels_per_class) == \
        ("cifar10", 1e-4, [160, 180], 0.3, -1)
    assert (args.optimizer, args.batch_size, args.n_epochs, args.warmup_iters) == \
        ("adam", 64, 200, -1)
    assert (args.p_x_weight, args.p_y_given_x_weight, args.p_x_y_weight, args.sigma) == \
        (1.0, 1.0, 0.0, 0.03)
    assert (args.norm, args.n_steps, args.width, args.depth, args.buffer_size) == \
        (None, 20, 10, 28, 10000)
    assert (args.reinit_freq, args.sgld_lr, args.sgld_std, args.n_valid) == (0.05, 1.0, 0.01, 5000)
    assert (args.ckpt_every, args.eval_every, args.print_every, args.save_dir) == \
        (10, 1, 100, "./experiment")


@pytest.mark.slow
def test_plain_classifier_learns_synthetic_far_above_chance(tmp_path):
    train_wrn_ebm.main(["--dataset", "synthetic", "--n_valid", "500", "--depth", "10", "--width",
                        "1", "--p_x_weight", "0", "--lr", "1e-3", "--batch_size", "32",
                        "--n_epochs", "3", "--print_to_log", "--save_dir", str(tmp_path)])
    test_acc = [r for r in records(tmp_path) if r["kind"] == "eval"][-1]["test_acc"]
    assert test_acc > 0.5


# --------------------------------------------------------------------------------------------------
# Recipes.

# JEM++'s published command (scripts/jempp_cifar10.sh of sndnyang/JEMPP), its script name dropped.
JEMPP_COMMAND = """\
--dataset=cifar10 --lr=.1 --optimizer=sgd --p_x_weight=1.0 --p_y_given_x_weight=1.0
    --p_x_y_weight=0.0 --sigma=.03 --width=10 --depth=28 --plot_uncond --warmup_iters=1000
    --log_arg=JEMPP-n_steps-in_steps-pyld_lr --model=yopo --norm batch --print_every=100 \
--n_epochs=150
    --decay_epochs 50 100 125 --n_steps=10 --in_steps=5 --pyld_lr=0.2 --gpu-id=3""".split()


def test_the_jempp_published_command_gives_their_sampler():
    args = train_wrn_ebm.parse_args(JEMPP_COMMAND)
    assert args.recipe == "jempp"  # from --model=yopo
    assert (args.n_steps, args.in_steps, args.pyld_lr, args.eps, args.sgld_lr, args.sgld_std) == \
        (10, 5, 0.2, 1, 0, 0)
    assert (args.buffer_init, args.norm, args.optimizer, args.lr, args.weight_decay) == \
        ("informative", "batch", "sgd", 0.1, 4e-4)
    assert (args.decay_epochs == [50, 100, 125] and args.decay_rate == 0.2
            and args.device == "cuda:3")


def test_recipe_defaults_yield_to_flags_given():
    paper = train_wrn_ebm.parse_args([])
    assert (paper.recipe, paper.in_steps, paper.sgld_lr, paper.buffer_init) == \
        ("jem", 0, 1.0, "uniform")
    sada = train_wrn_ebm.parse_args(["--recipe", "sadajem", "--n_steps", "7", "--rho=0.05"])
    assert (sada.n_steps, sada.rho, sada.sgld_lr, sada.sgld_std, sada.norm, sada.lr) == \
        (7, 0.05, 0.0, 0.0, "batch", 0.1)
    assert (sada.in_steps, sada.pyld_lr, sada.eps, sada.n_epochs, sada.decay_epochs) == \
        (1, 1.0, 1.0, 200, [60, 120, 180])
    assert (sada.optimizer, sada.px_augment, sada.labeled_batch_size, sada.epoch_over) == \
        ("sam", False, 128, "labeled")
    assert (sada.diverge_on, sada.diverge_threshold, sada.test_sigma) == ("p_x", 1e5, None)
    # their published command without its data path
    jempp = train_wrn_ebm.parse_args(["--recipe", "jempp"])
    assert (jempp.norm, jempp.optimizer, jempp.lr, jempp.warmup_iters, jempp.decay_epochs) == \
        ("batch", "sgd", 0.1, 1000, [50, 100, 125])
    assert (jempp.test_sigma, jempp.sigma, jempp.epoch_over, jempp.diverge_on) == \
        (0.0, 0.03, "px", "loss")
    assert train_wrn_ebm.parse_args(["--recipe", "jempp",
                                     "--buffer_init", "uniform"]).buffer_init == "uniform"
    # an explicit recipe wins
    assert train_wrn_ebm.parse_args(["--model", "yopo", "--recipe", "jem"]).in_steps == 0


# JEM++ as a slow test: its resume from a shell is tested by default (test_long_runs.py)
@pytest.mark.parametrize("recipe", [pytest.param("jempp", marks=pytest.mark.slow), "sadajem"])
def test_recipe_runs_end_to_end_and_resume_fits_the_same_gaussians_again(tiny, tmp_path, recipe):
    train(tiny, tmp_path, "--recipe", recipe, "--n_valid", "20", "--warmup_iters", "2",
          "--n_workers", "0", "--device", "cpu", "--plot_uncond", "--labeled_batch_size", "16")
    args = json.loads((tmp_path / "args.json").read_text())
    assert (args["recipe"] == recipe and args["buffer_init"] == "informative"
            and args["n_steps"] == 2)
    assert (args["norm"], args["optimizer"], args["px_augment"],
            args["epoch_over"]) == {"jempp": ("batch", "sgd", True, "px"),
                                    "sadajem": ("batch", "sam", False, "labeled")}[recipe]
    # 380 MB for CIFAR-10: fitted again, not stored
    assert not (tmp_path / "class_gaussians.pt").exists()
    fingerprint = load_checkpoint(str(tmp_path / "last_ckpt.pt"))["class_gaussians_sha256"]
    assert len(fingerprint) == 64
    train_wrn_ebm.main(["--resume", str(tmp_path), "--n_epochs", "2"])
    log = (tmp_path / "log.txt").read_text()
    assert (log.count("fitted 10 class Gaussians") == 2
            and "(the same numbers as when the run started)" in log)
    final = load_checkpoint(str(tmp_path / "last_ckpt.pt"))
    assert final["iteration"] == 12 and final["class_gaussians_sha256"] == fingerprint


def test_every_numeric_flag_has_its_range_checked():
    numeric = {a.dest for a in train_flags.build_parser()._actions if a.type in (int, float)}
    assert numeric == set(train_flags.FLAG_RANGES)


# SADA-JEM's published command (scripts/sadajem_cifar10.sh of sndnyang/SADAJEM), its script name
# dropped.
SADAJEM_COMMAND = """\
--dataset cifar10 --lr .1 --optimizer sgd --px 1.0 --pyx 1.0 --sigma .0 --width 10 --depth 28
    --plot_uncond --warmup_iters 1000 --model wrn --norm batch --print_every 100 --n_epochs 200
    --decay_epochs 60 120 180 --n_steps 5 --sgld_lr 1 --sgld_std 0.0 --gpu-id 0""".split()


def test_the_sadajem_published_command_after_the_recipe_means_what_it_meant_in_their_code():
    args = train_wrn_ebm.parse_args(["--recipe", "sadajem"] + SADAJEM_COMMAND)
    # SGD, wrapped in SAM
    assert (args.optimizer, args.rho, args.lr, args.weight_decay) == ("sam", 2.0, 0.1, 5e-4)
    # their step x <- clamp(x + 1 * clamp(g, -1, 1), -1, 1), once per step: one PYLD inner step, no
    # outer one
    assert (args.n_steps, args.in_steps, args.pyld_lr, args.eps, args.sgld_lr, args.sgld_std) == \
        (5, 1, 1.0, 1.0, 0, 0)
    # their epochs are passes over the labeled batches of 128
    assert (args.n_epochs, args.decay_epochs, args.epoch_over, args.labeled_batch_size) == \
        (200, [60, 120, 180], "labeled", 128)
    assert (args.diverge_on, args.diverge_threshold, args.px_augment, args.sigma) == \
        ("p_x", 1e5, False, 0.0)
    recipe_alone = train_wrn_ebm.parse_args(["--recipe", "sadajem"])
    args.n_classes = recipe_alone.n_classes = 10
    assert train_flags.settings_from_args(args).step.chain == \
        train_flags.settings_from_args(recipe_alone).step.chain


def test_cuda_graph_refuses_batch_norm(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli(train_wrn_ebm.main, tiny + ["--save_dir", str(tmp_path), "--norm", "batch",
                                             "--cuda_graph"])
    assert "--cuda_graph cannot capture a batch-norm chain" in capsys.readouterr().err


def test_the_paper_sampler_that_evaluation_assumes_is_the_training_default():
    """Evaluation samples a recipe's model with the recipe's values over jem/recipes.py's
    PAPER_SAMPLER: those are the training flags' defaults."""
    defaults = vars(train_flags.parse_args([]))
    assert {flag: defaults[flag] for flag in PAPER_SAMPLER} == PAPER_SAMPLER
