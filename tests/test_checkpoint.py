import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_wrn_ebm
from jem.checkpoint import (FORMAT_VERSION, checkpoint_state, describe_state_dict, load_checkpoint,
                            load_model_state, restore_rng_states, write_checkpoint)
from jem.model import JEM
from jem.sampler import ReplayBuffer
from jem.errors import UserError
from utils import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_trip_keeps_weights_buffer_and_extras(tmp_path):
    torch.manual_seed(0)
    model = JEM(depth=10, width=1)
    buffer = ReplayBuffer(30, 10, 0.05, "cpu")
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path,
                     checkpoint_state(model.state_dict(), buffer.images, epoch=3,
                                      args={"depth": 10}))
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    ckpt = load_checkpoint(str(path))
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["epoch"] == 3
    assert ckpt["args"] == {"depth": 10}
    torch.testing.assert_close(ckpt["replay_buffer"], buffer.images)
    restored = JEM(depth=10, width=1)
    load_model_state(restored, ckpt["model_state_dict"], str(path))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(restored.classify(x), model.classify(x))


def test_the_buffer_is_copied_even_when_it_is_on_the_cpu_already():
    buffer = ReplayBuffer(4, 2, 0.05, "cpu")
    saved = checkpoint_state({}, buffer.images)["replay_buffer"]
    before = saved.clone()
    buffer.images.zero_()  # what later chains' write-backs do to the live buffer
    assert torch.equal(saved, before)


@pytest.mark.parametrize("zip_format", [True, False])  # the legacy format of torch < 1.6 too
def test_papers_two_key_file_loads_and_gives_the_same_logits(tmp_path, zip_format):
    torch.manual_seed(1)
    model = JEM(depth=16, width=2).eval()
    path = tmp_path / "paper.pt"
    torch.save({"model_state_dict": model.state_dict(), "replay_buffer": torch.rand(10, 3, 32, 32)},
               path, _use_new_zipfile_serialization=zip_format)
    ckpt = load_checkpoint(str(path))
    restored = JEM(depth=16, width=2).eval()
    load_model_state(restored, ckpt["model_state_dict"], str(path))
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(restored.classify(x), model.classify(x))
    assert describe_state_dict(ckpt["model_state_dict"]) == {"depth": 16, "width": 2,
                                                             "n_classes": 10, "norm": None}


def test_wrong_architecture_names_the_right_flags(tmp_path):
    path = tmp_path / "wrn16.pt"
    torch.save({"model_state_dict": JEM(depth=16, width=2).state_dict()}, path)
    with pytest.raises(UserError, match="--depth 16 --width 2"):
        load_model_state(JEM(depth=10, width=1), load_checkpoint(str(path))["model_state_dict"],
                         str(path))


def test_keys_that_do_not_fit_get_a_short_line_that_says_what_the_file_holds(tmp_path):
    model = JEM(depth=10, width=1)
    # as nn.DataParallel saves them
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as error:
        load_model_state(JEM(depth=10, width=1), wrapped, "wrapped.pt")
    message = str(error.value)
    n_keys = len(model.state_dict())
    assert "\n" not in message and len(message) < 400, message
    assert f"{n_keys} keys missing from the file, first f.conv1.weight" in message
    assert f"{n_keys} keys this model lacks, first module.f.conv1.weight" in message
    assert "this model is a WRN-10-1 with 10 classes" in message


def test_a_checkpoint_of_a_newer_format_is_refused_in_one_line_naming_its_version(tmp_path):
    path = tmp_path / "future.pt"
    torch.save(checkpoint_state(JEM(depth=10, width=1).state_dict(), torch.zeros(0, 3, 32, 32),
                                format_version=FORMAT_VERSION + 1), path)
    with pytest.raises(UserError) as error:
        load_checkpoint(str(path))
    message = str(error.value)
    assert "\n" not in message and f"format {FORMAT_VERSION + 1}" in message and "newer" in message


def authors_state_dict(model, yopo):
    """`model`'s weights as JEM++'s (yopo=True) or SADA-JEM's code saves them: no f.linear; JEM++'s
    network also registers conv1 as f.layer_one and the stages and the last norm as
    f.other_layers.{0,1,2,3}."""
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("f.linear.")}
    if yopo:
        for name, alias in (("f.conv1.", "f.layer_one."), ("f.layer1.", "f.other_layers.0."),
                            ("f.layer2.", "f.other_layers.1."), ("f.layer3.", "f.other_layers.2."),
                            ("f.bn1.", "f.other_layers.3.")):
            state.update({alias + k[len(name):]: v for k, v in state.items() if k.startswith(name)})
    return state


@pytest.mark.parametrize("yopo", [True, False], ids=["jempp", "sadajem"])
def test_the_authors_layouts_of_jempp_and_sadajem_load_and_give_the_same_logits(yopo):
    torch.manual_seed(2)
    theirs = JEM(depth=10, width=2, norm="batch").train()
    theirs(torch.randn(16, 3, 32, 32))  # running statistics away from their initial values
    state = authors_state_dict(theirs.eval(), yopo)
    assert not any(k.startswith("f.linear.") for k in state)
    assert describe_state_dict(state) == {"depth": 10, "width": 2, "n_classes": 10, "norm": "batch"}
    ours = JEM(depth=10, width=2, norm="batch").eval()
    load_model_state(ours, state, "theirs.pt")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ours.classify(x), theirs.classify(x), rtol=0, atol=0)
    # a norm the keys tell is named in the line
    with pytest.raises(UserError, match="--norm batch"):
        load_model_state(JEM(depth=10, width=2), state, "theirs.pt")


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_foreign_files_are_user_errors(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"weights": torch.zeros(1)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError):
        load_checkpoint(str(path))
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))


# --------------------------------------------------------------------------------------------------
# Safe loading: checkpoints hold tensors and plain values only.

def test_a_training_checkpoint_loads_with_plain_torch_load(tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint)  # torch's default since 2.6: weights_only=True
    assert ckpt["format_version"] == FORMAT_VERSION
    assert {"optimizer_state_dict", "rng_states", "args", "epoch"} <= set(ckpt)
    np_state = np.random.get_state()
    # and the plain numpy state still restores numpy's generator
    restore_rng_states(ckpt["rng_states"][0])
    assert np.random.get_state()[2] == ckpt["rng_states"][0]["numpy"]["pos"]
    np.random.set_state(np_state)


def format_1_checkpoint(new_checkpoint, path):
    """A checkpoint as format 1 wrote it: the same state, with numpy's RNG state pickled as numpy
    objects."""
    ckpt = torch.load(new_checkpoint, weights_only=True)
    for states in ckpt["rng_states"]:
        states["numpy"] = np.random.get_state()
        states["python"] = random.getstate()
    ckpt["format_version"] = 1
    torch.save(ckpt, path)
    return ckpt


def test_a_format_1_checkpoint_is_refused_in_one_line_that_names_the_converter(tiny_checkpoint,
                                                                               tmp_path, capsys):
    old = tmp_path / "old.pt"
    format_1_checkpoint(tiny_checkpoint, old)
    with pytest.raises(SystemExit) as stop:
        run_cli(train_wrn_ebm.main, ["--resume", str(old)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "could run code" in err and f"python scripts/convert_checkpoint.py {old} NEW.pt" in err


def test_a_converted_format_1_checkpoint_keeps_its_state_and_resumes(tiny_checkpoint, tmp_path):
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    written = format_1_checkpoint(tiny_checkpoint, old)
    done = subprocess.run([sys.executable, "scripts/convert_checkpoint.py", str(old), str(new)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    converted = torch.load(new, weights_only=True)
    assert converted["format_version"] == FORMAT_VERSION
    for key in ("epoch", "iteration", "batch_in_epoch", "args", "world_size"):
        assert converted[key] == written[key]
    assert torch.equal(converted["replay_buffer"], written["replay_buffer"])
    restore_rng_states(converted["rng_states"][0])
    name, key, pos, has_gauss, cached = np.random.get_state()
    assert np.array_equal(key, written["rng_states"][0]["numpy"][1])
    assert pos == written["rng_states"][0]["numpy"][2]

    assert random.getstate() == written["rng_states"][0]["python"]

    train_wrn_ebm.main(["--resume", str(new), "--n_epochs", "2", "--save_dir", str(tmp_path)])
    resumed = load_checkpoint(str(tmp_path / "last_ckpt.pt"))
    assert resumed["epoch"] == 1 and resumed["iteration"] > written["iteration"]
