"""Long runs: exact resume, SIGTERM, checkpoint cadence, divergence rollback, energy penalty,
torchrun (SAM too)."""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval_wrn_ebm
import train_wrn_ebm
from jem import step
from jem.chain_init import ClassGaussians
from jem.checkpoint import load_checkpoint
from jem import trainer
from jem.flags.train import settings_from_args
from jem.run.rollback import Rollback
from jem.run.stopping import has_diverged
from test_chain_init import quick_fit
from utils import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_valid", "20", "--depth", "10", "--width", "1", "--batch_size", "16", "--n_steps", "2",
        "--buffer_size", "100", "--n_epochs", "2", "--print_every", "1", "--print_to_log", "--lr",
        "1e-3", "--n_workers", "0", "--device", "cpu", "--plot_cond"]


@pytest.fixture
def tiny(small_image_folder):
    """A 2-epoch run of 6 iterations an epoch on 100 training images."""
    return ["--dataset", small_image_folder] + TINY


def records(save_dir):
    with open(os.path.join(save_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def interrupt_at(monkeypatch, calls_before_signal):
    """Make the training loss send this process SIGTERM during its n-th call."""
    real_loss, calls = step.jem_loss, []

    def loss_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == calls_before_signal:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(step, "jem_loss", loss_then_signal)


def assert_same_state(a, b):
    for key in a["model_state_dict"]:
        assert torch.equal(a["model_state_dict"][key], b["model_state_dict"][key]), key
    assert torch.equal(a["replay_buffer"], b["replay_buffer"])
    for pa, pb in zip(a["optimizer_state_dict"]["state"].values(),
                      b["optimizer_state_dict"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert (a["epoch"], a["iteration"], a["best_valid_acc"]) == \
        (b["epoch"], b["iteration"], b["best_valid_acc"])


@pytest.mark.parametrize("stop_at", [3, 8])  # inside epoch 0, inside epoch 1
def test_sigterm_then_resume_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch, stop_at):
    train_wrn_ebm.main(tiny + ["--save_dir", str(tmp_path / "straight")])

    interrupt_at(monkeypatch, stop_at)
    # returns cleanly after the signal
    train_wrn_ebm.main(tiny + ["--save_dir", str(tmp_path / "split")])
    stopped = load_checkpoint(str(tmp_path / "split" / "last_ckpt.pt"))
    assert stopped["iteration"] == stop_at  # the iteration in flight was finished, then saved
    assert "SIGTERM: stopped" in (tmp_path / "split" / "log.txt").read_text()
    monkeypatch.undo()
    train_wrn_ebm.main(["--resume", str(tmp_path / "split")])

    assert_same_state(load_checkpoint(str(tmp_path / "straight" / "last_ckpt.pt")),
                      load_checkpoint(str(tmp_path / "split" / "last_ckpt.pt")))
    straight = [r for r in records(tmp_path / "straight") if r["kind"] == "train"]
    split = [r for r in records(tmp_path / "split") if r["kind"] == "train"]
    assert [r["iteration"] for r in split] == list(range(12))  # appended, no gap, no repeat
    assert [r["loss"] for r in split] == [r["loss"] for r in straight]


def test_sam_run_with_batch_norm_resumes_exactly(tiny, tmp_path, monkeypatch):
    """SADA-JEM's pieces: SAM's momentum, batch norm's statistics, the plain p(x) stream and epochs
    over the labeled batches all resume."""
    sada = tiny + ["--optimizer", "sam", "--norm", "batch", "--no_px_augment",
                   "--labeled_batch_size", "16", "--batch_size", "8", "--epoch_over", "labeled"]
    train_wrn_ebm.main(sada + ["--save_dir", str(tmp_path / "straight")])
    # SAM calls the loss twice an iteration: stop in iteration 8
    interrupt_at(monkeypatch, 2 * 8 + 1)
    train_wrn_ebm.main(sada + ["--save_dir", str(tmp_path / "split")])
    assert load_checkpoint(str(tmp_path / "split" / "last_ckpt.pt"))["iteration"] == 9
    monkeypatch.undo()
    train_wrn_ebm.main(["--resume", str(tmp_path / "split")])
    assert_same_state(load_checkpoint(str(tmp_path / "straight" / "last_ckpt.pt")),
                      load_checkpoint(str(tmp_path / "split" / "last_ckpt.pt")))
    straight = [r["loss"] for r in records(tmp_path / "straight") if r["kind"] == "train"]
    assert [r["loss"] for r in records(tmp_path / "split") if r["kind"] == "train"] == straight


def test_resume_refuses_a_file_without_training_state(tiny, tmp_path, capsys):
    torch.save({"model_state_dict": {}, "replay_buffer": torch.zeros(0)}, tmp_path / "paper.pt")
    with pytest.raises(SystemExit):
        run_cli(train_wrn_ebm.main, ["--resume", str(tmp_path / "paper.pt")])
    assert "--load_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(train_wrn_ebm.main, ["--resume", str(tmp_path / "nothing_here")])
    assert "no checkpoint there" in capsys.readouterr().err


def test_iteration_checkpoints_and_keep_last(tiny, tmp_path):
    train_wrn_ebm.main(tiny + ["--save_dir", str(tmp_path), "--ckpt_every_iters", "4",
                               "--keep_last", "2", "--ckpt_every", "1"])
    numbered = sorted(p for p in os.listdir(tmp_path) if p.startswith("ckpt_"))
    # written: iter 4, 8, epoch 0, iter 12, epoch 1
    assert numbered == ["ckpt_1.pt", "ckpt_iter_12.pt"]
    assert load_checkpoint(str(tmp_path / "ckpt_iter_12.pt"))["iteration"] == 12
    assert not any(p.endswith(".tmp") for p in os.listdir(tmp_path))


def diverge_at(monkeypatch, iterations):
    """Blow the loss up (x1e9) at the given 1-based call numbers of jem_loss."""
    real_loss, calls = step.jem_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value, terms = real_loss(*args, **kwargs)
        return (value * 1e9 if len(calls) in iterations else value), terms

    monkeypatch.setattr(step, "jem_loss", loss)


def test_rollback_recovers_from_an_injected_divergence(tiny, tmp_path, monkeypatch):
    diverge_at(monkeypatch, {9})  # iteration 8, in epoch 1: rolls back to the end of epoch 0
    train_wrn_ebm.main(tiny + ["--save_dir", str(tmp_path), "--on_diverge", "rollback",
                               "--rollback_lr_scale", "0.5"])
    rows = records(tmp_path)
    assert [r["iteration"] for r in rows if r["kind"] == "diverged"] == [8]
    replayed = [r for r in rows[rows.index(next(r for r in rows if r["kind"] == "diverged")):]
                if r["kind"] == "train"]
    assert [r["iteration"] for r in replayed] == [6, 7, 8, 9, 10, 11]
    assert all(r["lr"] == pytest.approx(5e-4) for r in replayed)
    assert "rollback 1/3" in (tmp_path / "log.txt").read_text()
    final = load_checkpoint(str(tmp_path / "last_ckpt.pt"))
    assert final["iteration"] == 12 and final["rollbacks"] == 1


def test_each_rollback_restores_the_last_checkpoint_byte_for_byte(tiny, tmp_path, monkeypatch):
    """Buffer, weights and optimizer after a rollback are those of the checkpoint written last, also
    after a second rollback to the same checkpoint (on a CPU, where copies to the CPU are no
    copies)."""
    # iterations 8 and then 7 (replayed): both roll back to the end of epoch 0
    diverge_at(monkeypatch, {9, 11})
    restored = []
    recover = Rollback.recover

    def recover_and_record(self, loss_value):
        recover(self, loss_value)
        restored.append(copy.deepcopy(self.trainer.state_dict()))

    monkeypatch.setattr(Rollback, "recover", recover_and_record)
    train_wrn_ebm.main(tiny + ["--save_dir", str(tmp_path), "--on_diverge", "rollback",
                               "--ckpt_every", "1"])
    last_good = load_checkpoint(str(tmp_path / "ckpt_0.pt"))
    assert len(restored) == 2
    for state in restored:
        assert state["iteration"] == last_good["iteration"] == 6
        assert state["replay_buffer"].numpy().tobytes() == \
            last_good["replay_buffer"].numpy().tobytes()
        for key, weights in last_good["model_state_dict"].items():
            assert torch.equal(state["model_state_dict"][key], weights), key
        for saved, now in zip(last_good["optimizer_state_dict"]["state"].values(),
                              state["optimizer_state_dict"]["state"].values()):
            assert all(torch.equal(saved[k], now[k]) for k in saved)


def test_rollback_gives_up_after_max_rollbacks(tiny, tmp_path, monkeypatch, capsys):
    diverge_at(monkeypatch, set(range(4, 100)))
    with pytest.raises(SystemExit) as stop:
        run_cli(train_wrn_ebm.main, tiny + ["--save_dir", str(tmp_path), "--on_diverge", "rollback",
                                            "--max_rollbacks", "2"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "after 2 rollbacks" in err and len(err.splitlines()) == 1
    assert len([r for r in records(tmp_path) if r["kind"] == "diverged"]) == 3


def nan_at(monkeypatch, calls_to_spoil):
    """Make jem_loss return NaN at the given 1-based call numbers (SAM calls it twice an
    iteration)."""
    real_loss, calls = step.jem_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value, terms = real_loss(*args, **kwargs)
        return (value * float("nan") if len(calls) in calls_to_spoil else value), terms

    monkeypatch.setattr(step, "jem_loss", loss)


def test_a_nan_in_sams_second_loss_stops_before_it_reaches_the_weights(tiny, tmp_path, monkeypatch,
                                                                       capsys):
    nan_at(monkeypatch, {2 * 8})  # the second pass of iteration 7
    with pytest.raises(SystemExit):
        run_cli(train_wrn_ebm.main, tiny + ["--save_dir", str(tmp_path), "--optimizer", "sam",
                                             "--lr", "0.01"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SAM's loss at its perturbed weights nan" in err
    kept = load_checkpoint(str(tmp_path / "last_good_before_divergence.pt"))
    assert (kept["iteration"] == 7
            and all(torch.isfinite(t).all() for t in kept["model_state_dict"].values()))


def test_a_nan_in_sams_second_loss_rolls_back_like_any_divergence(tiny, tmp_path, monkeypatch):
    nan_at(monkeypatch, {2 * 8})
    train_wrn_ebm.main(tiny + ["--save_dir", str(tmp_path), "--optimizer", "sam", "--lr", "0.01",
                               "--on_diverge", "rollback"])
    diverged = [r for r in records(tmp_path) if r["kind"] == "diverged"]
    assert [(r["iteration"], r["what"]) for r in diverged] == [(7, "SAM's loss at its perturbed "
                                                                   "weights")]
    final = load_checkpoint(str(tmp_path / "last_ckpt.pt"))
    assert final["iteration"] == 12 and final["rollbacks"] == 1


def test_weights_that_a_finite_loss_left_not_finite_are_never_kept_as_good(tiny, tmp_path,
                                                                           monkeypatch, capsys):
    """A step can turn the weights to NaN while its loss was finite (the next loss shows it): the
    run then keeps the last checkpoint's state, not the NaN weights."""
    real_update, calls = trainer.update, []

    def update_then_spoil(model, *args, **kwargs):
        real_update(model, *args, **kwargs)
        calls.append(1)
        if len(calls) == 8:  # iteration 7, in epoch 1
            with torch.no_grad():
                model.f.conv1.weight.fill_(float("nan"))

    monkeypatch.setattr(trainer, "update", update_then_spoil)
    with pytest.raises(SystemExit):
        run_cli(train_wrn_ebm.main, tiny + ["--save_dir", str(tmp_path)])
    assert "(iteration 6)" in capsys.readouterr().err
    kept = load_checkpoint(str(tmp_path / "last_good_before_divergence.pt"))
    assert (kept["iteration"] == 6
            and all(torch.isfinite(t).all() for t in kept["model_state_dict"].values()))


def criterion(argv):
    args = train_wrn_ebm.parse_args(argv)
    args.n_classes = 10
    return settings_from_args(args).divergence


def test_the_p_x_criterion_checks_the_p_x_part_of_the_loss_against_its_threshold():
    sada, paper = (criterion(argv) for argv in (["--recipe", "sadajem"], []))
    terms = {"l_p_x": torch.tensor(-2e5), "l_p_y_given_x": torch.tensor(1.0)}
    # |p_x_weight * l_p_x| > 1e5, as SADA-JEM's run stopped
    assert has_diverged(-2e5 + 1, terms, sada)
    assert not has_diverged(-2e5 + 1, terms, paper)  # the paper's: |L| <= 1e8
    assert not has_diverged(5e7, {"l_p_x": torch.tensor(3.0), "l_p_y_given_x": torch.tensor(5e7)},
                            sada)
    assert has_diverged(float("nan"), {"l_p_x": torch.tensor(3.0)}, sada)  # NaN always
    assert has_diverged(1e9, {}, paper)


def test_nan_counts_as_divergence(tiny, tmp_path, monkeypatch, capsys):
    real_loss = step.jem_loss
    monkeypatch.setattr(step, "jem_loss", lambda *a,
                        **k: (lambda loss,
                              terms: (loss * float("nan"), terms))(*real_loss(*a, **k)))
    with pytest.raises(SystemExit):
        run_cli(train_wrn_ebm.main, tiny + ["--save_dir", str(tmp_path)])
    assert "diverged" in capsys.readouterr().err


def test_energy_l2_adds_the_squared_energies(tiny, tmp_path):
    train_wrn_ebm.main(tiny + ["--save_dir", str(tmp_path), "--energy_l2", "0.1",
                               "--n_epochs", "1"])
    row = [r for r in records(tmp_path) if r["kind"] == "train"][0]
    assert row["l_energy_l2"] >= row["f_data"] ** 2  # mean of squares >= square of mean
    assert row["loss"] == pytest.approx(row["l_p_x"] + row["l_p_y_given_x"]
                                        + 0.1 * row["l_energy_l2"], rel=1e-5)


RANKS_AGREE = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
import train_wrn_ebm

fit = train_wrn_ebm.Trainer.fit


def fit_then_compare_ranks(self):
    fit(self)
    weights = torch.cat([p.detach().flatten() for p in self.model.parameters()])
    every_rank = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(every_rank, weights)
    if dist.get_rank() == 0:
        print("ranks agree:", all(torch.equal(weights, w) for w in every_rank))


train_wrn_ebm.Trainer.fit = fit_then_compare_ranks
train_wrn_ebm.main(sys.argv[1:])
"""


def test_two_process_sam_run_keeps_the_ranks_equal(tiny, tmp_path):
    """Both SAM passes average their gradients over the ranks: the weights stay the same on every
    rank."""
    script = tmp_path / "ranks_agree.py"
    script.write_text(RANKS_AGREE.format(root=ROOT))
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                "2",
                str(script)] + tiny + ["--save_dir", str(tmp_path / "run"), "--batch_size", "8",
                                       "--n_epochs", "1", "--optimizer", "sam", "--lr", "0.01"])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ranks agree: True" in done.stdout


def test_two_process_gloo_run_finishes_and_its_checkpoint_evaluates(tiny, tmp_path):
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                "2",
                "train_wrn_ebm.py"] + tiny + ["--save_dir", str(tmp_path), "--batch_size", "8",
                                              "--ckpt_every_iters", "3"])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = load_checkpoint(str(tmp_path / "last_ckpt.pt"))
    assert ckpt["world_size"] == 2 and ckpt["replay_buffer"].shape == (100, 3, 32, 32)
    assert len(ckpt["rng_states"]) == 2
    assert ckpt["iteration"] == 2 * 6  # 100 images / 2 ranks / batch 8 = 6 iterations an epoch
    log = (tmp_path / "log.txt").read_text()
    assert log.count("epoch 0 it 0 ") == 1  # rank 0 alone logs
    result = eval_wrn_ebm.main(["--load_path", str(tmp_path / "last_ckpt.pt"), "--eval", "test_clf",
                                "--dataset", tiny[1], "--device", "cpu", "--save_dir",
                                str(tmp_path / "eval"), "--print_to_log"])
    assert 0 <= result["accuracy"] <= 1
    # A single process resumes it, re-sharding the two buffer shards into one. Its position inside
    # the epoch is counted in images: 3 batches of 8 on each of 2 processes are 6 batches of 8 on
    # one.
    train_wrn_ebm.main(["--resume", str(tmp_path / "ckpt_iter_3.pt"), "--save_dir",
                        str(tmp_path / "one"), "--n_epochs", "1", "--device", "cpu"])
    assert "at epoch 0, iteration 3" in (tmp_path / "one" / "log.txt").read_text()
    rows = [r for r in records(tmp_path / "one") if r["kind"] == "train"]
    # the 6 batches of 8 left of 12, no more
    assert [r["iteration"] for r in rows] == [3, 4, 5, 6, 7, 8]
    # resumed at the end of epoch 1 (6 batches of 8 per process), one process goes on with epoch 2
    train_wrn_ebm.main(["--resume", str(tmp_path), "--n_epochs", "3", "--device", "cpu"])
    final = load_checkpoint(str(tmp_path / "last_ckpt.pt"))
    assert final["epoch"] == 2 and final["iteration"] == 12 + 12 and final["world_size"] == 1


QUICK_FIT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import train_wrn_ebm
from jem.chain_init import ClassGaussians
from test_chain_init import quick_fit

ClassGaussians.fit = staticmethod(quick_fit)  # the real fit costs seconds per run; \
its refit is tested elsewhere
train_wrn_ebm.main(sys.argv[1:])
"""


@pytest.mark.slow  # torchrun twice; the gloo test above covers torchrun by default
def test_two_process_run_with_informative_starts_resumes_with_the_same_gaussians(tiny, tmp_path):
    """Rank 0 fits the class Gaussians and sends them to rank 1; a resumed two-process run fits them
    again and finds the fingerprint its checkpoint holds."""
    script = tmp_path / "quick_fit.py"
    script.write_text(QUICK_FIT.format(root=ROOT, tests=os.path.join(ROOT, "tests")))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", str(script)]
    flags = tiny + ["--save_dir", str(tmp_path / "run"), "--batch_size", "8", "--buffer_init",
                    "informative", "--n_epochs", "1"]
    for command in (torchrun + flags,
                    torchrun + ["--resume", str(tmp_path / "run"), "--n_epochs", "2"]):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert (log.count("fitted 10 class Gaussians") == 2
            and "(the same numbers as when the run started)" in log)
    assert "resumed" in log and "at epoch 1, iteration 6" in log
    final = load_checkpoint(str(tmp_path / "run" / "last_ckpt.pt"))
    assert (final["world_size"], final["iteration"], len(final["rng_states"])) == (2, 12, 2)
    assert final["args"]["buffer_init"] == "informative"


@pytest.fixture
def quick_gaussians():
    """ClassGaussians.fit stubbed (test_chain_init.quick_fit) by a patch of its own, which
    monkeypatch.undo() leaves in place: the run and its resume fit alike."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClassGaussians, "fit", staticmethod(quick_fit))
        yield


def test_batch_norm_jempp_run_trains_evaluates_and_resumes_exactly(tiny, tmp_path, monkeypatch,
                                                                   quick_gaussians):
    """JEM++'s batch-norm recipe (training-mode passes, PYLD, informative starts): a run stopped by
    SIGTERM and resumed ends bit for bit where an uninterrupted one does, running statistics
    included."""
    flags = tiny + ["--recipe", "jempp", "--norm", "batch", "--optimizer", "sgd", "--lr", "0.05",
                    "--warmup_iters", "3"]
    train_wrn_ebm.main(flags + ["--save_dir", str(tmp_path / "straight")])
    interrupt_at(monkeypatch, 8)
    train_wrn_ebm.main(flags + ["--save_dir", str(tmp_path / "split")])
    monkeypatch.undo()
    train_wrn_ebm.main(["--resume", str(tmp_path / "split")])

    straight = load_checkpoint(str(tmp_path / "straight" / "last_ckpt.pt"))
    assert_same_state(straight, load_checkpoint(str(tmp_path / "split" / "last_ckpt.pt")))
    running_var = straight["model_state_dict"]["f.bn1.running_var"]
    # the statistics were trained
    assert not torch.allclose(running_var, torch.ones_like(running_var))
    losses = [r["loss"] for r in records(tmp_path / "straight") if r["kind"] == "train"]
    assert len(losses) == 12 and all(abs(v) < 1e3 for v in losses)
    result = eval_wrn_ebm.main(["--load_path", str(tmp_path / "straight" / "last_ckpt.pt"),
                                "--eval", "test_clf", "--dataset", tiny[1], "--device", "cpu",
                                "--norm", "batch", "--save_dir", str(tmp_path / "eval"),
                                "--print_to_log"])
    assert 0 <= result["accuracy"] <= 1


def train_from_shell(flags, cwd=ROOT):
    """train_wrn_ebm.py run as a user types it (argv read from the command line, not passed to
    main)."""
    done = subprocess.run([sys.executable, "train_wrn_ebm.py", *flags], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def finished_run(small_image_folder, tmp_path_factory):
    """A 1-epoch run of the paper's recipe trained from a shell, at its end. Tests that change it
    work on a copy (`copy_of`)."""
    run = str(tmp_path_factory.mktemp("finished") / "run")
    train_from_shell(["--dataset", small_image_folder, *TINY, "--n_epochs", "1", "--save_dir", run])
    return run


def copy_of(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


@pytest.mark.parametrize("recipe", ["jem", "jempp", "sadajem"])
def test_flags_typed_with_resume_win_for_every_recipe(tiny, finished_run, tmp_path, recipe):
    """`--resume DIR --n_epochs 2` from a shell trains the second epoch, whatever recipe the run
    has."""
    if recipe == "jem":
        run = copy_of(finished_run, tmp_path)
    else:
        run = str(tmp_path / "run")
        first = [*tiny, "--recipe", recipe, "--buffer_init", "uniform", "--n_epochs", "1",
                 "--save_dir", run]
        if recipe == "sadajem":
            first += ["--labeled_batch_size", "16", "--n_valid", "20"]
        train_from_shell(first)
    assert load_checkpoint(os.path.join(run, "last_ckpt.pt"))["epoch"] == 0
    train_from_shell(["--resume", str(run), "--n_epochs", "2"])
    ckpt = load_checkpoint(os.path.join(run, "last_ckpt.pt"))
    assert ckpt["epoch"] == 1 and ckpt["args"]["n_epochs"] == 2 and ckpt["args"]["recipe"] == recipe
    # a copied run resumes in its own folder and leaves the one it was copied from alone
    assert load_checkpoint(os.path.join(finished_run, "last_ckpt.pt"))["epoch"] == 0


def test_a_finished_run_stays_finished_and_a_typed_flag_extends_it(finished_run, tmp_path):
    """--resume of a run at its last epoch trains nothing and leaves last_ckpt.pt alone; --n_epochs
    typed now extends it, the log names the changed flag, and the summary says how to go on."""
    run = str(copy_of(finished_run, tmp_path))
    log = open(os.path.join(run, "log.txt")).read()
    assert "evaluate: python eval_wrn_ebm.py --load_path" in log
    # the iterations the log prints (0 to 5) and the count the summary and checkpoint give agree
    assert "epoch 0 it 5 |" in log and "done: 6 iterations" in log
    checkpoint = os.path.join(run, "last_ckpt.pt")
    assert load_checkpoint(checkpoint)["iteration"] == 6
    before = os.path.getmtime(checkpoint)
    train_from_shell(["--resume", run])
    assert os.path.getmtime(checkpoint) == before
    assert "nothing left to train" in open(os.path.join(run, "log.txt")).read()
    train_from_shell(["--resume", run, "--n_epochs", "2"])
    log = open(os.path.join(run, "log.txt")).read()
    assert "flags changed from the stored run: --n_epochs 1 -> 2" in log
    assert load_checkpoint(checkpoint)["epoch"] == 1


def test_a_flag_fixed_within_a_run_is_refused_naming_its_stored_value(finished_run):
    """The refusal comes before anything is written: the run is the shared one, untouched."""
    listing = sorted(os.listdir(finished_run))
    for flag, value, stored in (("--depth", "16", "10"), ("--norm", "batch", "None")):
        done = subprocess.run([sys.executable, "train_wrn_ebm.py", "--resume", finished_run, flag,
                               value], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
        assert f"{flag} cannot change within a run" in done.stderr
        assert f"{flag} {stored}" in done.stderr
    assert sorted(os.listdir(finished_run)) == listing


def test_the_set_up_before_the_first_iteration_is_not_training_time(tiny, tmp_path):
    """Fitting the class Gaussians (here a stand-in that takes 3 s) is left out of train_seconds."""
    def slow_fit(loader, n_classes):
        time.sleep(3)
        return quick_fit(loader, n_classes)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClassGaussians, "fit", staticmethod(slow_fit))
        started = time.perf_counter()
        train_wrn_ebm.main([*tiny, "--n_epochs", "1", "--buffer_init", "informative",
                            "--save_dir", str(tmp_path)])
        wall = time.perf_counter() - started
    end = [r for r in records(str(tmp_path)) if r["kind"] == "end"][-1]
    assert end["train_seconds"] < wall - 3
