"""--amp: a bf16 step computes the float32 step's loss and gradients to bf16's precision, a bf16
chain moves with every step, and a CPU without native bf16 trains in float32 after one line."""
import copy
import json
import os

import pytest
import torch

from jem.run import device as precision
import train_wrn_ebm
from bench import Config, ProjectIteration
from jem.model import JEM
from jem.sampler import ChainSettings, sgld

CPU = torch.device("cpu")
CONFIG = Config(depth=10, width=1, batch_size=16, n_steps=3)


def one_step(model, buffer_images, batch, flags):
    side = ProjectIteration(copy.deepcopy(model), buffer_images, CONFIG, CPU, flags)
    torch.manual_seed(1)
    loss = side.step(*batch)
    grads = {name: p.grad for name, p in side.model.named_parameters() if p.grad is not None}
    return loss, grads


@pytest.mark.parametrize("seed", [0, 1])
def test_a_bf16_step_gives_the_float32_loss_and_gradients_to_bf16_precision(seed):
    """Stated tolerances: the loss to 1e-3 relative; every parameter's gradient to 10% of its norm
    (bf16 keeps 8 bits; the p(x) gradient is a difference of two near-equal terms, which magnifies
    rounding) and all of them together to 2%. Measured: loss 1e-6 to 3e-5, worst gradient 4% (the
    first convolution's), all 0.6%."""
    torch.manual_seed(seed)
    model = JEM(CONFIG.depth, CONFIG.width, n_classes=10)
    buffer_images = torch.rand(40, 3, 32, 32) * 2 - 1
    batch = (torch.rand(16, 3, 32, 32) * 2 - 1, torch.rand(16, 3, 32, 32) * 2 - 1,
             torch.randint(0, 10, (16,)))
    loss32, grads32 = one_step(model, buffer_images, batch, [])
    loss16, grads16 = one_step(model, buffer_images, batch, ["amp"])
    assert loss16.dtype == torch.float32
    assert abs(loss16 - loss32) <= 1e-3 * abs(loss32)
    assert grads16.keys() == grads32.keys()
    for name, grad in grads32.items():
        assert (grads16[name] - grad).norm() <= 0.1 * grad.norm(), name
    flat32, flat16 = (torch.cat([g[n].flatten() for n in grads32]) for g in (grads32, grads16))
    assert (flat16 - flat32).norm() <= 0.02 * flat32.norm()
    assert not torch.equal(flat16, flat32)  # the step did run in bf16


def test_a_bf16_chain_takes_every_gradient_at_its_current_point():
    """Autocast caches the bf16 copy of a leaf that requires grad; the chain's x is one and moves in
    place, so a cached copy would give every step the gradient at the start (the bug that made --amp
    learn badly)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).requires_grad_(False)

    def score(x):  # its gradient, -2 conv^T conv(x), changes as fast as x does
        return -(conv(x) ** 2).flatten(1).sum(1)

    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    settings = ChainSettings(n_steps=3, sgld_lr=0.2, sgld_std=0.0)
    expected = x0.clone()
    # each step in a region of its own: nothing cached survives it
    for _ in range(settings.n_steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = expected.clone().requires_grad_(True)
            grad, = torch.autograd.grad(score(x).sum(), x)
        expected = expected + settings.sgld_lr * grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = x0.clone().requires_grad_(True)
        first_grad, = torch.autograd.grad(score(x).sum(), x)
        chain = sgld(score, x0, settings)
    stale = x0 + settings.n_steps * settings.sgld_lr * first_grad
    torch.testing.assert_close(chain, expected)
    assert (stale - expected).abs().max() > 0.1  # what the cached chain gave is far from it


def test_native_bf16_follows_the_cpu_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities",
                        lambda: {"avx2": True, "avx512_bf16": False, "amx_bf16": True})
    assert precision.cpu_bf16_features() == ["AMX-BF16"] and precision.native_bf16(CPU)
    assert "native bf16: AMX-BF16" in precision.describe_hardware(CPU)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": False})
    assert precision.cpu_bf16_features() == [] and not precision.native_bf16(CPU)
    assert "no native bf16" in precision.describe_hardware(CPU)


def test_amp_without_native_bf16_says_so_in_one_line_and_trains_in_float32(
        tiny_image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    autocast_flags = []
    real_autocast = precision.autocast

    def recording_autocast(device, enabled):
        autocast_flags.append(enabled)
        return real_autocast(device, enabled)

    monkeypatch.setattr("jem.step.autocast", recording_autocast)
    train_wrn_ebm.main(["--dataset", tiny_image_folder, "--depth", "10", "--width", "1",
                        "--n_steps", "1", "--batch_size", "16", "--n_epochs", "1", "--n_valid", "8",
                        "--buffer_size", "40", "--device", "cpu", "--amp", "--save_dir",
                        str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if "--amp" in line]
    assert len(lines) == 1 and "no native bf16" in lines[0] and "float32" in lines[0]
    assert autocast_flags and not any(autocast_flags)
    with open(os.path.join(tmp_path, "args.json")) as fh:
        args = json.load(fh)
    assert args["amp"] is False and "no native bf16" in args["hardware"]
    with open(os.path.join(tmp_path, "metrics.jsonl")) as fh:
        run = json.loads(fh.readline())
    assert run["kind"] == "run" and run["amp"] is False and run["hardware"] == args["hardware"]
