import pytest
import torch

from jem.model import JEM


@pytest.fixture
def model():
    torch.manual_seed(0)
    return JEM(depth=10, width=1, n_classes=10).eval()


def test_px_score_is_logsumexp_of_logits(model):
    x = torch.randn(5, 3, 32, 32)
    logits = model.classify(x)
    assert logits.shape == (5, 10)
    torch.testing.assert_close(model(x), torch.logsumexp(logits, dim=1))
    # and by hand, so a wrong reduction (max, mean, sum) would show
    top = logits.max(1, keepdim=True).values
    by_hand = top[:, 0] + (logits - top).exp().sum(1).log()

    torch.testing.assert_close(model(x), by_hand)


def test_conditional_score_gathers_the_label_logit(model):
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([3, 0, 9, 3])
    logits = model.classify(x)
    torch.testing.assert_close(model(x, y), logits[torch.arange(4), y])


def test_heads_returns_logits_and_score_in_one_pass(model):
    x = torch.randn(3, 3, 32, 32)
    logits, score = model.heads(x)
    torch.testing.assert_close(logits, model.classify(x))
    torch.testing.assert_close(score, model(x))


def test_unconditional_model_scores_with_its_energy_head():
    torch.manual_seed(0)
    model = JEM(depth=10, width=1, uncond=True).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), model.energy_output(model.f(x)).squeeze(1))
    assert not torch.allclose(model(x), model.classify(x).logsumexp(1))
    with pytest.raises(ValueError, match="unconditional"):
        model(x, torch.zeros(3, dtype=torch.long))
