"""The project's training step computes the paper's: same loss, gradients and replay buffer.

The paper's iteration is the one bench.py times (`PaperIteration`); both sides draw their random
numbers in the same order, so from one seed they must agree to float32 rounding.
"""
import copy

import pytest
import torch

from bench import Config, ConvolutionTimer, PaperIteration, ProjectIteration, convolution_profile
from jem.model import JEM
from jem.sampler import ChainSettings, ReplayBuffer, frozen_parameters, sample_q

CONFIG = Config(depth=10, width=1, batch_size=8, n_steps=3)
CPU = torch.device("cpu")


@pytest.fixture
def inputs():
    """A WRN-10-1, a replay buffer of 40 images, and one batch (data, labeled images, labels)."""
    torch.manual_seed(0)
    model = JEM(CONFIG.depth, CONFIG.width, n_classes=10)
    buffer_images = torch.rand(40, 3, 32, 32) * 2 - 1
    batch = (torch.rand(8, 3, 32, 32) * 2 - 1, torch.rand(8, 3, 32, 32) * 2 - 1,
             torch.randint(0, 10, (8,)))
    return model, buffer_images, batch


def one_step(side, batch, seed=1):
    """Loss, every gradient and the replay buffer after one step from the seed."""
    torch.manual_seed(seed)
    loss = side.step(*batch)
    grads = {f"grad {n}": p.grad for n, p in side.model.named_parameters() if p.grad is not None}
    return {"loss": loss, "buffer": side.buffer_images(), **grads}


def assert_same_step(expected, actual):
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=lambda m: f"{key}: {m}")


def test_default_step_computes_the_papers_loss_gradients_and_buffer(inputs):
    model, buffer_images, batch = inputs
    paper = one_step(PaperIteration(copy.deepcopy(model), buffer_images, CONFIG, CPU), batch)
    project = one_step(ProjectIteration(copy.deepcopy(model), buffer_images, CONFIG, CPU), batch)
    assert_same_step(paper, project)
    assert not torch.equal(paper["buffer"], buffer_images)  # the chains did write back


def test_the_comparison_notices_a_different_chain(inputs):
    model, buffer_images, batch = inputs
    longer = Config(**{**CONFIG.__dict__, "n_steps": CONFIG.n_steps + 1})
    paper = one_step(PaperIteration(copy.deepcopy(model), buffer_images, CONFIG, CPU), batch)
    project = one_step(ProjectIteration(copy.deepcopy(model), buffer_images, longer, CPU), batch)
    with pytest.raises(AssertionError):
        assert_same_step(paper, project)


def test_convolution_timer_counts_every_convolution_forward_and_backward(inputs):
    model, _, batch = inputs
    n_convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    with ConvolutionTimer(CPU) as forward_only:
        scores = model(batch[0])
    with ConvolutionTimer(CPU) as backward:
        scores.sum().backward()
    assert forward_only.calls == backward.calls == n_convolutions
    assert forward_only.seconds > 0 and backward.seconds > 0
    with ConvolutionTimer(CPU) as no_convolutions:
        model.class_output(torch.randn(4, model.f.last_dim)).sum().backward()
    assert no_convolutions.calls == 0 and no_convolutions.seconds == 0


def test_profile_sees_the_same_convolution_work_on_both_sides(inputs):
    """The paper runs its three loss passes apart, the project fuses them: different calls, same
    work."""
    model, buffer_images, batch = inputs
    sides = {"paper": PaperIteration(copy.deepcopy(model), buffer_images, CONFIG, CPU),
             "project": ProjectIteration(copy.deepcopy(model), buffer_images, CONFIG, CPU)}
    profile = convolution_profile(sides, batch, CPU, rounds=1)
    n_convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    chain = CONFIG.n_steps * 2 * n_convolutions  # forward and input gradient per SGLD step
    assert profile["convolution_calls"] == {"paper": chain + 3 * 2 * n_convolutions,
                                            "project": chain + 2 * n_convolutions}
    assert all(0 < share < 1 for share in profile["convolution_share"].values())
    assert profile["speedup_ceiling"] > 0


def test_frozen_parameters_are_restored_when_the_chain_fails(inputs):
    model = inputs[0]
    with pytest.raises(RuntimeError), frozen_parameters(model):
        raise RuntimeError("the chain diverged")
    assert all(p.requires_grad for p in model.parameters())


def test_cuda_graph_flag_is_ignored_off_the_gpu(inputs):
    model, buffer_images, _ = inputs
    results = []
    for cuda_graph in (False, True):
        buffer = ReplayBuffer(0, 10, 0.05, CPU, images=buffer_images.clone())
        torch.manual_seed(3)
        results.append(sample_q(model, buffer, 8,
                                chain=ChainSettings(n_steps=2, cuda_graph=cuda_graph)))
    assert torch.equal(results[0], results[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pyld", [{}, dict(in_steps=3, pyld_lr=0.2, eps=0.01, sgld_lr=0.5)],
                         ids=["sgld", "pyld"])
def test_captured_chain_replays_the_eager_chain_after_weight_updates(inputs, pyld):
    """Same starts, same noise, same samples, also once an optimizer step has moved the weights."""
    model, buffer_images, batch = inputs
    device = torch.device("cuda")
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # the first call captures; the second replays after the weights moved
        samples = {}
        for cuda_graph in (False, True):
            buffer = ReplayBuffer(0, 10, 0.05, device, images=buffer_images.to(device))
            torch.manual_seed(0)
            chain = ChainSettings(n_steps=3, cuda_graph=cuda_graph, **pyld)
            samples[cuda_graph] = sample_q(model, buffer, 8, chain=chain)

        torch.testing.assert_close(samples[True], samples[False])
        loss = model.classify(batch[0].to(device)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
