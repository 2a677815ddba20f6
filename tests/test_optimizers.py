"""SAM and ASAM against hand-computed updates, their state dict, and batch norm frozen for the
second pass."""
import copy

import pytest
import torch

from jem.model import JEM
from jem.optim import SAM, frozen_running_stats, sam_over_sgd

LR, WEIGHT_DECAY, RHO = 0.1, 0.01, 0.3


def toy_problem():
    """Two parameter tensors and a loss whose gradient w^3 changes with w, so that w + e matters."""
    params = [torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64)),
              torch.nn.Parameter(torch.tensor([[0.5]], dtype=torch.float64))]

    def loss_and_grad():
        loss = sum((p ** 4).sum() / 4 for p in params)
        loss.backward()
        return loss

    return params, loss_and_grad


def sam_step(params, loss_and_grad, optimizer):
    """One SAM update; returns the weights the closure ran at."""
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in params])
        return loss_and_grad()

    optimizer.zero_grad()
    loss_and_grad()
    optimizer.step(closure)
    assert len(seen) == 1  # one extra pass, at w + e
    return seen[0]


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_climbs_to_w_plus_e_and_steps_from_w_with_the_gradient_there(adaptive):
    params, loss_and_grad = toy_problem()
    w = [p.detach().clone() for p in params]
    optimizer = SAM(params, torch.optim.SGD, rho=RHO, adaptive=adaptive, lr=LR, momentum=0.9,
                    weight_decay=WEIGHT_DECAY)
    at = sam_step(params, loss_and_grad, optimizer)

    g = [wi ** 3 for wi in w]
    t = [wi.abs() if adaptive else torch.ones_like(wi) for wi in w]  # ASAM scales by |w|
    norm = torch.cat([(ti * gi).flatten() for ti, gi in zip(t, g)]).norm()
    e = [RHO * ti ** 2 * gi / norm for ti, gi in zip(t, g)]
    for a, wi, ei in zip(at, w, e):
        torch.testing.assert_close(a, wi + ei)
    # the first momentum step is lr * (gradient at w +
    # e + weight decay at w: the weights were put back)
    for p, wi, ei in zip(params, w, e):
        torch.testing.assert_close(p.detach(), wi - LR * ((wi + ei) ** 3 + WEIGHT_DECAY * wi))


def test_sam_is_not_a_plain_step():
    """The same toy update without the climb moves elsewhere: the test above can tell SAM from
    SGD."""
    params, loss_and_grad = toy_problem()
    w = [p.detach().clone() for p in params]
    sam_step(params, loss_and_grad, SAM(params, torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9))
    assert not torch.allclose(params[0].detach(), w[0] - LR * w[0] ** 3)


def test_adaptive_from_rho_one_half_as_sada_jem():
    model = torch.nn.Linear(2, 2)
    assert sam_over_sgd(model.parameters(), 0.1, 5e-4, rho=2.0).param_groups[0]["adaptive"]
    assert not sam_over_sgd(model.parameters(), 0.1, 5e-4, rho=0.05).param_groups[0]["adaptive"]


def test_state_dict_resumes_the_momentum_and_keeps_the_learning_rate_reachable():
    params, loss_and_grad = toy_problem()
    optimizer = SAM(params, torch.optim.SGD, rho=RHO, adaptive=True, lr=LR, momentum=0.9)
    sam_step(params, loss_and_grad, optimizer)
    state = copy.deepcopy(optimizer.state_dict())
    assert state["param_groups"][0]["rho"] == RHO and "momentum_buffer" in state["state"][0]
    weights = [p.detach().clone() for p in params]
    sam_step(params, loss_and_grad, optimizer)
    straight = [p.detach().clone() for p in params]

    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    resumed = SAM(params, torch.optim.SGD, rho=0.0, adaptive=False, lr=1.0, momentum=0.9)
    resumed.load_state_dict(state)
    sam_step(params, loss_and_grad, resumed)
    for p, s in zip(params, straight):
        assert torch.equal(p.detach(), s)
    resumed.param_groups[0]["lr"] = 0.0  # what the training loop's schedule does: it must reach SGD
    sam_step(params, loss_and_grad, resumed)
    for p, s in zip(params, straight):
        assert torch.equal(p.detach(), s)


def test_frozen_running_stats_normalise_as_in_training_and_keep_the_statistics():
    torch.manual_seed(0)
    model = JEM(depth=10, width=1, norm="batch").train()
    x = torch.randn(8, 3, 32, 32)
    model(x)  # running statistics away from their initial values
    before = copy.deepcopy(model.state_dict())
    with frozen_running_stats(model):
        frozen_out = model(x)
    after = model.state_dict()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    tracking_out = model(x)  # a normal training pass: batch statistics, and the running ones move
    torch.testing.assert_close(frozen_out, tracking_out)
    assert not torch.equal(before["f.bn1.running_mean"], model.state_dict()["f.bn1.running_mean"])


def test_a_closure_that_raises_leaves_the_weights_at_w_and_does_not_step():
    """The training loop raises inside the closure when SAM's second loss diverged."""
    params, loss_and_grad = toy_problem()
    w = [p.detach().clone() for p in params]
    optimizer = SAM(params, torch.optim.SGD, rho=RHO, adaptive=True, lr=LR, momentum=0.9)
    optimizer.zero_grad()
    loss_and_grad()

    def diverged():
        raise FloatingPointError("the loss at w + e is NaN")

    with pytest.raises(FloatingPointError):
        optimizer.step(diverged)
    assert all(torch.equal(p.detach(), wi) for p, wi in zip(params, w))
    assert not optimizer.state_dict()["state"]  # no momentum: the base optimizer never stepped
