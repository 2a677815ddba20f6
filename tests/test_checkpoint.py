import pytest
import torch

from checkpoint import checkpoint_state, describe_state_dict, load_checkpoint, load_model_state, write_checkpoint
from models import JEM
from sampler import ReplayBuffer
from utils import UserError


def test_round_trip_keeps_weights_buffer_and_extras(tmp_path):
    torch.manual_seed(0)
    model = JEM(depth=10, width=1)
    buffer = ReplayBuffer(30, 10, 0.05, "cpu")
    path = tmp_path / "ckpt.pt"
    write_checkpoint(path, checkpoint_state(model.state_dict(), buffer.images, epoch=3, args={"depth": 10}))
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    ckpt = load_checkpoint(str(path))
    assert ckpt["format_version"] == 1 and ckpt["epoch"] == 3 and ckpt["args"] == {"depth": 10}
    torch.testing.assert_close(ckpt["replay_buffer"], buffer.images)
    restored = JEM(depth=10, width=1)
    load_model_state(restored, ckpt["model_state_dict"], str(path))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(restored.classify(x), model.classify(x))


def test_papers_two_key_file_loads_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(1)
    model = JEM(depth=16, width=2).eval()
    path = tmp_path / "paper.pt"
    torch.save({"model_state_dict": model.state_dict(), "replay_buffer": torch.rand(10, 3, 32, 32)}, path)
    ckpt = load_checkpoint(str(path))
    restored = JEM(depth=16, width=2).eval()
    load_model_state(restored, ckpt["model_state_dict"], str(path))
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(restored.classify(x), model.classify(x))
    assert describe_state_dict(ckpt["model_state_dict"]) == {"depth": 16, "width": 2, "n_classes": 10}


def test_wrong_architecture_names_the_right_flags(tmp_path):
    path = tmp_path / "wrn16.pt"
    torch.save({"model_state_dict": JEM(depth=16, width=2).state_dict()}, path)
    with pytest.raises(UserError, match="--depth 16 --width 2"):
        load_model_state(JEM(depth=10, width=1), load_checkpoint(str(path))["model_state_dict"], str(path))


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
