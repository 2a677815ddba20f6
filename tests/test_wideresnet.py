import pytest
import torch

from jem.model import JEM
from wideresnet import Wide_ResNet, check_depth


def paper_keys(n_blocks=4):
    """The state-dict layout of the paper's WRN-(6n+4) JEM with no norm, written out by hand."""
    keys = ["f.conv1.weight", "f.conv1.bias"]
    for stage in (1, 2, 3):
        for i in range(n_blocks):
            for conv in ("conv1", "conv2"):
                keys += [f"f.layer{stage}.{i}.{conv}.weight", f"f.layer{stage}.{i}.{conv}.bias"]
        keys += [f"f.layer{stage}.0.shortcut.0.weight", f"f.layer{stage}.0.shortcut.0.bias"]
    keys += ["f.linear.weight", "f.linear.bias", "energy_output.weight", "energy_output.bias",
             "class_output.weight", "class_output.bias"]
    return keys


def test_wrn_28_10_matches_the_papers_checkpoint_layout():
    state = JEM(depth=28, width=10).state_dict()
    assert sorted(state) == sorted(paper_keys(4))
    assert len(state) == 62
    assert sum(t.numel() for t in state.values()) == 36_478_389
    assert state["f.conv1.weight"].shape == (16, 3, 3, 3)
    assert state["f.layer1.0.shortcut.0.weight"].shape == (160, 16, 1, 1)
    assert state["f.layer3.0.conv2.weight"].shape == (640, 640, 3, 3)
    assert state["f.linear.weight"].shape == (10, 640)
    assert state["energy_output.weight"].shape == (1, 640)
    assert state["class_output.weight"].shape == (10, 640)


def test_class_output_follows_n_classes_but_unused_linear_stays_10():
    state = JEM(depth=10, width=1, n_classes=100).state_dict()
    assert state["class_output.weight"].shape == (100, 64)
    assert state["f.linear.weight"].shape == (10, 64)


@pytest.mark.parametrize("norm, extra", [
    ("batch", "f.bn1.running_mean"), ("instance", "f.bn1.weight"), ("layer", "f.bn1.weight"),
    ("act", "f.bn1.loc")])
def test_norms_add_bn_keys(norm, extra):
    keys = JEM(depth=10, width=1, norm=norm).state_dict().keys()
    assert extra in keys
    assert any(k.startswith("f.layer2.0.bn2.") for k in keys)
    assert not any(".bn" in k for k in JEM(depth=10, width=1).state_dict())


@pytest.mark.parametrize("norm", [None, "batch", "instance", "layer", "act"])
def test_feature_shape_and_pooling(norm):
    net = Wide_ResNet(10, 2, norm=norm, dropout_rate=0.1)
    x = torch.randn(4, 3, 32, 32)
    assert net(x).shape == (4, 128)
    summed = Wide_ResNet(10, 2, norm=norm, sum_pool=True)
    assert summed(x).shape == (4, 128)


def test_sum_pool_is_64_times_average_pool():
    torch.manual_seed(0)
    net = Wide_ResNet(10, 1).eval()
    x = torch.randn(2, 3, 32, 32)
    avg = net(x)
    net.sum_pool = True
    torch.testing.assert_close(net(x), avg * 64, rtol=1e-5, atol=1e-5)


def test_leaky_relu_slope_is_point_two():
    net = Wide_ResNet(10, 1)
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.2}


@pytest.mark.parametrize("depth", [9, 12, 27, 4])
def test_bad_depth_is_refused(depth):
    with pytest.raises(ValueError, match="6n\\+4"):
        check_depth(depth)


def test_actnorm_initialises_from_first_batch():
    net = Wide_ResNet(10, 1, norm="act")
    act = net.bn1
    assert act.initialized.item() == 0
    net(torch.randn(8, 3, 32, 32))
    assert act.initialized.item() == 1
    loc = act.loc.clone()
    net(torch.randn(8, 3, 32, 32) * 5)
    torch.testing.assert_close(act.loc, loc)  # only the first batch initialises
