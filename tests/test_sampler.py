import pytest
import torch

from jem.flags import train as train_flags
from dataclasses import replace

from jem.model import JEM
from jem.sampler import ChainSettings, ReplayBuffer, frozen_parameters, sample_q, sgld


@pytest.fixture
def model():
    torch.manual_seed(0)
    return JEM(depth=10, width=1, n_classes=10)


def test_one_sgld_step_is_gradient_ascent_plus_noise(model):
    model.eval()
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    x = x0.clone().requires_grad_(True)
    grad, = torch.autograd.grad(model(x).sum(), x)
    torch.manual_seed(123)
    noise = torch.randn_like(x0)
    torch.manual_seed(123)
    out = sgld(model, x0, ChainSettings(n_steps=1, sgld_lr=0.7, sgld_std=0.05))
    torch.testing.assert_close(out, x0 + 0.7 * grad + 0.05 * noise)
    assert not out.requires_grad


def test_sgld_raises_the_score_and_leaves_the_start_alone(model):
    model.eval()
    x0 = torch.rand(8, 3, 32, 32) * 2 - 1
    start = x0.clone()
    out = sgld(model, x0, ChainSettings(n_steps=10, sgld_lr=1.0, sgld_std=0.0))
    assert model(out).mean() > model(x0).mean()
    assert torch.equal(x0, start)


def test_uniform_starts_without_a_buffer():
    buffer = ReplayBuffer(0, 10, 0.05, "cpu")
    starts, inds = buffer.sample_start(16)
    assert inds is None and starts.shape == (16, 3, 32, 32)
    assert starts.min() >= -1 and starts.max() <= 1


def test_buffer_starts_in_uniform_noise():
    buffer = ReplayBuffer(100, 10, 0.05, "cpu")
    assert buffer.images.shape == (100, 3, 32, 32)
    assert buffer.images.min() >= -1 and buffer.images.max() <= 1 and buffer.images.std() > 0.5


def test_starts_come_from_the_buffer_at_the_returned_indices():
    images = torch.arange(50.0)[:, None, None, None].expand(50, 3, 32, 32).clone() + 10
    buffer = ReplayBuffer(0, 10, reinit_freq=0.0, device="cpu", images=images)
    starts, inds = buffer.sample_start(32)
    torch.testing.assert_close(starts, images[inds])
    assert inds.min() >= 0 and inds.max() < 50


def test_class_conditional_starts_stay_in_their_segment():
    images = torch.arange(100.0)[:, None, None, None].expand(100, 3, 32, 32).clone() + 10
    buffer = ReplayBuffer(0, 10, reinit_freq=0.0, device="cpu", images=images)
    y = torch.randint(0, 10, (500,))
    starts, inds = buffer.sample_start(500, y)
    assert torch.equal(inds // 10, y)  # segment y holds indices 10y .. 10y+9
    assert len(set(inds.tolist())) > 50


def test_reinit_rate_is_the_requested_frequency():
    images = torch.full((1000, 3, 32, 32), 5.0)  # outside [-1, 1], so fresh noise is recognisable
    buffer = ReplayBuffer(0, 10, reinit_freq=0.2, device="cpu", images=images)
    torch.manual_seed(0)
    starts, _ = buffer.sample_start(20000)
    fresh = (starts.abs() <= 1).flatten(1).all(1)
    assert fresh.float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert ((starts[~fresh] == 5.0).all())


def test_sample_q_writes_samples_back_and_restores_the_model(model):
    buffer = ReplayBuffer(20, 10, reinit_freq=0.0, device="cpu")
    before = buffer.images.clone()
    model.train()
    torch.manual_seed(0)
    samples = sample_q(model, buffer, 6, chain=ChainSettings(n_steps=3))
    assert samples.shape == (6, 3, 32, 32)
    changed = (buffer.images != before).flatten(1).any(1)
    assert 1 <= changed.sum() <= 6
    for row in changed.nonzero().flatten():
        assert any(torch.equal(buffer.images[row], s) for s in samples)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # the chain never touches weights


def test_conditional_sample_q_writes_into_the_label_segment(model):
    buffer = ReplayBuffer(40, 10, reinit_freq=0.0, device="cpu")
    before = buffer.images.clone()
    y = torch.full((3,), 7)
    sample_q(model, buffer, 3, y=y, chain=ChainSettings(n_steps=2))
    changed = (buffer.images != before).flatten(1).any(1).nonzero().flatten()
    assert len(changed) >= 1 and ((changed // 4) == 7).all()


def test_frozen_parameters_restores_only_what_was_trainable(model):
    model.class_output.weight.requires_grad_(False)
    with frozen_parameters(model):
        assert not any(p.requires_grad for p in model.parameters())
    assert not model.class_output.weight.requires_grad
    assert model.class_output.bias.requires_grad and model.f.conv1.weight.requires_grad


def test_repeated_index_keeps_one_whole_chain():
    buffer = ReplayBuffer(0, 10, 0.0, "cpu", images=torch.zeros(4, 3, 32, 32))
    inds = torch.tensor([2, 0, 2, 2])
    samples = torch.stack([torch.full((3, 32, 32), float(v)) for v in (1, 7, 3, 9)])
    buffer.write(inds, samples)
    assert torch.equal(buffer.images[2], samples[3])  # the last chain drawn at index 2, intact
    assert torch.equal(buffer.images[0], samples[1])
    assert buffer.images[[1, 3]].abs().sum() == 0


# --------------------------------------------------------------------------------------------------
# JEM++'s PYLD sampler.

def test_one_pyld_step_by_hand(model):
    """An outer clipped step of sgld_lr, in_steps clipped steps of pyld_lr each clamped, then
    noise."""
    model.eval()
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    x = x0.clone().requires_grad_(True)
    grad, = torch.autograd.grad(model(x).sum(), x)
    eps = grad.abs().median().item()  # clips about half of the pixels
    big = 0.9 / eps  # steps that push many pixels past +-1, so that every clamp matters
    expected = (x0 + 0.3 * big * grad.clamp(-eps, eps)).clamp(-1, 1)
    for _ in range(3):
        expected = (expected + big * grad.clamp(-eps, eps)).clamp(-1, 1)
    torch.manual_seed(5)
    expected = expected + 0.01 * torch.randn_like(x0)
    torch.manual_seed(5)
    out = sgld(model, x0, ChainSettings(n_steps=1, sgld_lr=0.3 * big, sgld_std=0.01, in_steps=3,
                                        pyld_lr=big, eps=eps))
    torch.testing.assert_close(out, expected)
    assert ((x0 + 4 * big * grad.clamp(-eps, eps)).abs() > 1).float().mean() > 0.1


def jempp_inner_loop(model, x, n_steps, in_steps, pyld_lr, eps):
    """JEM++'s sample_q for sgld_lr = sgld_std = 0 (their defaults), literally: per outer step the
    gradient p at the first convolution's output, then in_steps steps on the Hamiltonian <conv1(x),
    p> through conv1."""
    conv1 = model.f.conv1
    for _ in range(n_steps):
        x = x.detach().requires_grad_(True)
        conv1_out = []
        hook = conv1.register_forward_hook(lambda module, inputs, out: conv1_out.append(out))
        score = model(x).sum()
        hook.remove()
        p, = torch.autograd.grad(score, conv1_out)
        for _ in range(in_steps):
            hamiltonian = (conv1(x) * p).sum()
            step, = torch.autograd.grad(hamiltonian, x)
            x = (x + step.clamp(-eps, eps) * pyld_lr).clamp(-1, 1).detach().requires_grad_(True)
    return x.detach()


def test_pyld_inner_steps_through_conv1_equal_the_shared_gradient(model):
    """The first convolution is linear, so re-differentiating it at each inner iterate gives the
    outer gradient: the cheap chain (no pass per inner step) matches the authors' loop."""
    model.eval()
    torch.manual_seed(1)
    x0 = torch.rand(6, 3, 32, 32) * 2 - 1
    eps = 0.003
    literal = jempp_inner_loop(model, x0, n_steps=3, in_steps=5, pyld_lr=0.2, eps=eps)
    cheap = sgld(model, x0, ChainSettings(n_steps=3, sgld_lr=0.0, sgld_std=0.0, in_steps=5,
                                          pyld_lr=0.2, eps=eps))
    torch.testing.assert_close(cheap, literal)
    assert not torch.allclose(literal, x0, atol=1e-3)


def test_pyld_lr_zero_turns_the_inner_steps_off(model):
    """As in JEM++: pyld_lr <= 0 leaves only the SGLD part (here the paper's step)."""
    model.eval()
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.manual_seed(2)
    plain = sgld(model, x0, ChainSettings(n_steps=2, sgld_lr=0.5, sgld_std=0.01))
    torch.manual_seed(2)
    off = sgld(model, x0, ChainSettings(n_steps=2, sgld_lr=0.5, sgld_std=0.01, in_steps=5,
                                        pyld_lr=0.0))
    assert torch.equal(plain, off)


def test_sample_q_in_train_mode_uses_the_chain_batch_statistics():
    """train_mode=True (JEM++'s batch norm) runs the chain in training mode and restores eval mode
    after."""
    torch.manual_seed(0)
    model = JEM(depth=10, width=1, norm="batch", n_classes=10).eval()
    running = model.f.bn1.running_mean.clone()
    buffer = ReplayBuffer(20, 10, reinit_freq=0.0, device="cpu")
    sample_q(model, buffer, 6, chain=ChainSettings(n_steps=1, train_mode=True))
    assert not model.training
    # training-mode passes update the statistics
    assert not torch.equal(model.f.bn1.running_mean, running)
    running = model.f.bn1.running_mean.clone()
    sample_q(model, buffer, 6, chain=ChainSettings(n_steps=1))
    assert torch.equal(model.f.bn1.running_mean, running)


def test_the_sadajem_recipe_chain_is_their_clipped_and_clamped_step(model):
    """SADA-JEM's step is x <- clamp(x + lr * clamp(g, -1, 1), -1, 1) with their --sgld_lr 1 as lr
    and no noise; --recipe sadajem sets it as one PYLD inner step of pyld_lr = lr, clip eps = 1, and
    no outer step."""
    args = train_flags.parse_args(["--recipe", "sadajem"])
    args.n_classes = 10
    settings = train_flags.settings_from_args(args).step.chain
    assert settings == ChainSettings(n_steps=5, sgld_lr=0.0, sgld_std=0.0, in_steps=1, pyld_lr=1.0,
                                     eps=1.0, train_mode=True)
    model.eval()
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    # The network's input gradients are far below 1: scale the score so that the clip and the clamp
    # both act.
    score = lambda x: 3e4 * model(x)  # noqa: E731
    expected = x0.clone()
    for _ in range(2):
        x = expected.clone().requires_grad_(True)
        grad, = torch.autograd.grad(score(x).sum(), x)
        expected = (expected + 1.0 * grad.clamp(-1, 1)).clamp(-1, 1)
    assert (grad.abs() > 1).float().mean() > 0.1 and (expected.abs() == 1).float().mean() > 0.1
    torch.testing.assert_close(sgld(score, x0, replace(settings, n_steps=2)), expected)
