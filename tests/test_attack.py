import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jem.eval import attack, defence
from jem.flags.evaluate import attack_settings
from test_docs import load_script
import eval_wrn_ebm
from jem.eval.attack import RefinedClassifier, add_attack_flags, pgd_attack, run_attack
from jem.data import make_synthetic
from jem.model import JEM
from jem.sampler import ChainSettings, sgld
from jem.errors import UserError

CPU = torch.device("cpu")


def eval_args(*argv):
    """The settings eval_wrn_ebm.py hands to run_attack, from its command line (the checkpoint is
    not read by run_attack)."""
    return attack_settings(eval_wrn_ebm.parse_args(["--load_path", "unused.pt", "--eval", "attack",
                                                    "--dataset", "synthetic", *argv]))


def classifier_for(model, n_steps_refine=0, n_dup_chains=1, sigma=0.0, sgld_lr=1.0, sgld_std=0.0,
                   max_chains_per_pass=64, seed=0, gradient="exact"):
    return RefinedClassifier(model, sigma, n_steps_refine, n_dup_chains, sgld_lr, sgld_std,
                             max_chains_per_pass, torch.Generator().manual_seed(seed), gradient)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = JEM(depth=10, width=1).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def model64():
    """Double precision and smooth activations, for gradient checks by finite differences (with
    LeakyReLU the score's gradient jumps wherever a unit changes sign, and the refined input jumps
    with it), and a steep energy (logits x100), so that SGLD steps bend the input's gradient
    measurably."""
    torch.manual_seed(0)
    model = JEM(depth=10, width=1).double().eval()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.LeakyReLU):
                setattr(module, name, torch.nn.Softplus())
    with torch.no_grad():
        model.class_output.weight.mul_(100)
        model.class_output.bias.mul_(100)
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------
# The defended classifier.

def test_without_refinement_noise_or_copies_it_is_the_plain_classifier(model):
    x = torch.rand(3, 3, 32, 32)
    logits = classifier_for(model).logits(x)
    # pixels [0, 1] -> the model's [-1, 1]
    torch.testing.assert_close(logits, model.classify(x * 2 - 1))


def test_the_defence_is_random_but_repeats_under_a_seed(model):
    x = torch.rand(4, 3, 32, 32)
    settings = dict(n_steps_refine=1, n_dup_chains=2, sigma=0.3, sgld_std=0.1)
    first, again = (classifier_for(model, **settings, seed=5).logits(x) for _ in range(2))
    other_seed = classifier_for(model, **settings, seed=6).logits(x)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other_seed)


def test_refinement_passes_the_attack_gradient_exactly(model64):
    """The attack's gradient through two SGLD steps is the true gradient of the loss (checked by
    finite differences along random directions; noise off, so the map is smooth) times one positive
    factor."""
    torch.manual_seed(1)
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([3])
    classifier = classifier_for(model64, n_steps_refine=2, n_dup_chains=1, sgld_lr=3.0)
    grad = classifier.scaled_loss_gradient(x, y)

    def loss(z):
        return F.cross_entropy(classifier.logits(z), y)

    h = 1e-6
    factors = []
    for direction in torch.randn(2, *x.shape, dtype=torch.float64):
        numerical = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
        factors.append((grad * direction).sum() / numerical)
    assert factors[0] > 0
    torch.testing.assert_close(factors[0], factors[1], rtol=1e-6, atol=0)
    # The refinement bends the gradient (by far more than the check's tolerance): a gradient that
    # skipped the refinement's Jacobian, this one, would fail the check above.
    plain = classifier_for(model64).scaled_loss_gradient(x, y)
    assert F.cosine_similarity(grad.flatten(), plain.flatten(), dim=0) < 0.9999


@pytest.mark.parametrize("n_images, n_dup_chains, max_chains_per_pass",
                         [(2, 1, 64), (1, 3, 2)])  # 1 pass, 2
def test_straight_through_is_the_classifiers_gradient_at_the_refined_point(model64, n_images,
                                                                           n_dup_chains,
                                                                           max_chains_per_pass):
    """The paper's estimate: refine, take the loss gradient at the refined chains, pass it back as
    if the refinement were the identity (times 2, the map from [0, 1] pixels to the model's [-1,
    1])."""
    x = torch.rand(n_images, 3, 32, 32, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([3, 5][:n_images])
    settings = dict(n_steps_refine=2, n_dup_chains=n_dup_chains, sigma=0.1, sgld_lr=3.0,
                    sgld_std=0.05, max_chains_per_pass=max_chains_per_pass, seed=4)
    straight = classifier_for(model64, gradient="straight_through",
                              **settings).scaled_loss_gradient(x, y)
    exact = classifier_for(model64, **settings).scaled_loss_gradient(x, y)

    # replays the same chains: the same seeds, drawn alike
    by_hand = classifier_for(model64, **settings)
    seed = defence.draw_seed(by_hand.rng)
    refined = []
    for i, n_chains in enumerate(by_hand.chain_blocks()):
        generator = torch.Generator().manual_seed(seed + i)
        chains = x.repeat_interleave(n_chains, dim=0) * 2 - 1
        chains = chains + 0.1 * torch.randn(chains.shape, generator=generator, dtype=x.dtype)
        for _ in range(2):
            z = chains.detach().requires_grad_(True)
            score_grad, = torch.autograd.grad(model64(z).sum(), z)
            chains = (chains + 3.0 * score_grad
                      + 0.05 * torch.randn(chains.shape, generator=generator, dtype=x.dtype))
        refined.append(chains.view(len(x), n_chains, 3, 32, 32))
    z_refined = torch.cat(refined, 1).requires_grad_(True)
    mean_logits = model64.classify(z_refined.flatten(0, 1)).view(len(x), n_dup_chains, -1).mean(1)
    logit_grad = attack.cross_entropy_logit_gradient(mean_logits.detach(), y)
    at_refined, = torch.autograd.grad(mean_logits, z_refined, grad_outputs=logit_grad)
    torch.testing.assert_close(straight, 2 * at_refined.sum(1))
    # The exact gradient goes through the refinement's Jacobian too: a few percent off here, far
    # beyond float64 rounding (the match above holds to 1e-7).
    assert (exact - straight).norm() > 0.01 * straight.norm()


def test_noisy_refinement_gives_a_nonzero_input_gradient(model):
    x = torch.rand(2, 3, 32, 32)
    classifier = classifier_for(model, n_steps_refine=2, n_dup_chains=2, sigma=0.03, sgld_std=0.01)
    grad = classifier.scaled_loss_gradient(x, torch.tensor([0, 1]))
    assert torch.isfinite(grad).all() and (grad.flatten(1).norm(dim=1) > 0).all()


def test_chains_split_over_passes_give_the_gradient_of_the_whole_average(model64):
    """With more chains than fit in a pass, the two-pass gradient is that of the loss of the full
    average (the same noise replayed in both passes), scaled by 1 / the runner-up class's
    probability."""
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([4])
    classifier = classifier_for(model64, n_steps_refine=1, n_dup_chains=3, sigma=0.3, sgld_std=0.1,
                                max_chains_per_pass=2)
    assert classifier.chain_blocks() == [2, 1]
    split = classifier.group_scaled_loss_gradient(x, y, seed=11)

    x_leaf = x.clone().requires_grad_(True)
    mean_logits = classifier.group_mean_logits(x_leaf, seed=11, differentiable=True)
    whole, = torch.autograd.grad(F.cross_entropy(mean_logits, y), x_leaf)
    runner_up = mean_logits.detach().softmax(1).scatter(1, y[:, None], 0).amax()
    torch.testing.assert_close(split, whole / runner_up)


def test_a_saturated_softmax_still_gives_an_ascent_direction():
    """float32 rounds softmax - one_hot to zero at a margin of ~100; the rescaled gradient keeps its
    direction."""
    moderate = torch.tensor([[3.0, 1.0, -2.0]])
    y = torch.tensor([0])
    exact = moderate.softmax(1) - F.one_hot(y, 3)
    torch.testing.assert_close(attack.cross_entropy_logit_gradient(moderate, y),
                               exact / exact[0, 1])
    saturated = torch.tensor([[150.0, 1.0, -2.0]])
    assert (saturated.softmax(1) - F.one_hot(y, 3)).abs().max() == 0
    assert attack.cross_entropy_logit_gradient(saturated, y)[0].tolist() == pytest.approx(
        [-1 - torch.e ** -3, 1.0, torch.e ** -3])


def test_batches_are_grouped_so_a_pass_never_exceeds_the_chain_limit(model):
    classifier = classifier_for(model, n_dup_chains=5, max_chains_per_pass=12)
    groups = classifier.image_groups(7)
    assert [(g.start, min(g.stop, 7)) for g in groups] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert classifier.chain_blocks() == [5]


# --------------------------------------------------------------------------------------------------
# PGD.

@pytest.mark.parametrize("distance, eps", [("Linf", 2 / 255), ("Linf", 64 / 255), ("L2", 0.25),
                                           ("L2", 8.0)])
def test_adversarial_examples_stay_in_the_ball_and_in_the_pixel_range(model, distance, eps):
    torch.manual_seed(2)
    x = torch.rand(6, 3, 32, 32)
    x[:, 0, :4] = 0.0  # pixels on the edges of [0, 1], where the box and the ball interact
    x[:, 1, :4] = 1.0
    y = torch.arange(6)
    x_adv = pgd_attack(classifier_for(model), x, y, eps, distance, n_steps=3, random_start=True,
                       generator=torch.Generator().manual_seed(0))
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if distance == "Linf" else delta.norm(dim=1)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (size <= eps * (1 + 1e-5) + 1e-7).all()
    assert (size > 0.5 * eps).all() if eps < 1 else (size > 0).all()  # the attack uses its budget


def test_eps_zero_leaves_the_images_alone(model):
    x = torch.rand(2, 3, 32, 32)
    x_adv = pgd_attack(classifier_for(model), x, torch.tensor([0, 1]), 0.0, "Linf", n_steps=5)
    assert torch.equal(x_adv, x)


# --------------------------------------------------------------------------------------------------
# The evaluation mode, end to end, on a tiny classifier trained on the images it is then attacked
# on.

N_IMAGES = 20


@pytest.fixture(scope="module")
def trained_model():
    """A WRN-10-1 fitted to the very synthetic test images run_attack draws (seconds, not
    minutes)."""
    images, labels = next(iter(attack.attack_loader(
        eval_args("--n_eval", str(N_IMAGES), "--seed", "0"), 10, CPU)))
    torch.manual_seed(0)
    model = JEM(depth=10, width=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        x = images * 2 - 1 + 0.03 * torch.randn_like(images)
        loss = F.cross_entropy(model.classify(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def linf_run(trained_model, tmp_path_factory):
    args = eval_args("--n_eval", str(N_IMAGES), "--seed", "0", "--distance", "Linf", "--eps", "32",
                     "0", "2", "--n_steps_pgd_attack", "10", "--n_steps_refine", "0",
                     "--n_dup_chains", "1", "--sigma", "0", "--save_dir",
                     str(tmp_path_factory.mktemp("attack")))
    return run_attack(args, trained_model, CPU)


def test_eps_zero_gives_the_clean_accuracy(linf_run):
    assert linf_run["eps"] == [0, 2, 32]  # sorted
    assert linf_run["clean_accuracy"] >= 0.9
    assert linf_run["robust_accuracy"][0] == linf_run["clean_accuracy"]


def test_robust_accuracy_never_rises_with_eps(linf_run):
    accuracy = linf_run["robust_accuracy"]
    assert all(later <= earlier for earlier, later in zip(accuracy, accuracy[1:]))


def test_an_undefended_classifier_falls_to_near_zero_at_large_linf_eps(linf_run):
    assert linf_run["robust_accuracy"][-1] <= 0.1


def test_the_run_is_described_and_plotted(linf_run):
    assert linf_run["n_images"] == N_IMAGES and linf_run["distance"] == "Linf"
    assert linf_run["settings"]["n_steps_refine"] == 0 and linf_run["settings"]["n_dup_chains"] == 1
    assert linf_run["settings"]["attack_grad"] == "exact"  # the default
    json.dumps(linf_run)  # eval_wrn_ebm.py writes it as attack.json
    with open(linf_run["plot"], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_defended_run_repeats_under_a_seed(trained_model, tmp_path):
    argv = ("--n_eval", "8", "--seed", "3", "--distance", "L2", "--eps", "0", "2",
            "--n_steps_pgd_attack", "2", "--n_steps_refine", "1", "--n_dup_chains", "2",
            "--save_dir", str(tmp_path))
    first, again = (run_attack(eval_args(*argv), trained_model, CPU) for _ in range(2))
    assert first == again
    assert first["robust_accuracy"][1] <= first["robust_accuracy"][0] == first["clean_accuracy"]


def test_image_folders_are_attacked_in_pixel_space(tiny_image_folder):
    loader = attack.attack_loader(eval_args("--dataset", tiny_image_folder, "--n_eval", "5"),
                                  10, CPU)
    x, y = next(iter(loader))
    assert x.shape == (5, 3, 32, 32) and 0 <= x.min() and x.max() <= 1 and x.std() > 0.1
    assert len(loader.dataset) == 5 and 0 <= y.min() and y.max() < 10


def test_unlabeled_images_cannot_be_attacked(tmp_path):
    for i in range(2):
        Image.fromarray(make_synthetic("test")[0][i]).save(tmp_path / f"{i}.png")
    with pytest.raises(UserError, match="labeled"):
        attack.attack_loader(eval_args("--dataset", str(tmp_path)), 10, CPU)


def test_eval_script_runs_the_attack_and_writes_attack_json(tiny_checkpoint, tiny_image_folder,
                                                            tmp_path):
    eval_wrn_ebm.main(["--load_path", tiny_checkpoint, "--eval", "attack", "--dataset",
                       tiny_image_folder, "--distance", "L2", "--eps", "0", "1",
                       "--n_steps_pgd_attack", "2", "--n_steps_refine", "1", "--n_dup_chains", "2",
                       "--n_eval", "6", "--device", "cpu", "--save_dir", str(tmp_path),
                       "--print_to_log"])
    result = attack.read_attack_result(str(tmp_path))
    assert result["n_images"] == 6 and len(result["robust_accuracy"]) == 2
    assert result["robust_accuracy"][0] == result["clean_accuracy"]
    assert (tmp_path / "attack.png").is_file()


# --------------------------------------------------------------------------------------------------
# Flags and the overlay helper.

def test_the_issue_command_line_parses_with_units_in_the_help():
    args = eval_args("--distance", "Linf", "--eps", "0", "1", "2", "4", "8", "16",
                     "--n_steps_pgd_attack", "40", "--n_steps_refine", "10", "--n_dup_chains", "5",
                     "--random_start")
    assert args.eps == (0, 1, 2, 4, 8, 16) and args.random_start and args.n_steps_refine == 10
    assert not eval_args("--no-random_start").random_start
    help_text = argparse.ArgumentParser()
    add_attack_flags(help_text)
    assert "1/255" in help_text.format_help() and "[0, 1] pixel space" in help_text.format_help()


@pytest.mark.parametrize("argv, message", [
    (["--eps", "-1"], "--eps"), (["--n_dup_chains", "0"], "--n_dup_chains"),
    (["--n_steps_refine", "-1"], "--n_steps_refine"),
    (["--compile", "--n_steps_refine", "1"], "--compile")])
def test_impossible_settings_are_user_errors(model, argv, message):
    with pytest.raises(UserError, match=message):
        run_attack(eval_args(*argv), model, CPU)


plot_attack = load_script("scripts/plot_attack.py")


def write_result(path, distance, n_steps_refine, nested):
    result = {"distance": distance, "eps": [0, 8],
              "robust_accuracy": [0.9, 0.2 + 0.05 * n_steps_refine],
              "settings": {"n_steps_refine": n_steps_refine, "n_dup_chains": 5}}
    path.write_text(json.dumps({"args": {"eval": "attack"}, "result": result} if nested
                               else result))
    return str(path)


def test_overlay_draws_several_runs_on_one_plot(tmp_path):
    runs = [write_result(tmp_path / f"refine{n}.json", "Linf", n, nested=n > 0) for n in (0, 1, 10)]
    out = tmp_path / "overlay.png"
    plot_attack.main(runs + ["--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert attack.run_label(attack.read_attack_result(runs[2])) == "10 SGLD steps, 5 chains"


def test_overlay_refuses_mixed_norms_and_foreign_files(tmp_path):
    runs = [write_result(tmp_path / "a.json", "Linf", 0, False),
            write_result(tmp_path / "b.json", "L2", 1, False)]
    with pytest.raises(UserError, match="one --distance"):
        plot_attack.main(runs + ["--out", str(tmp_path / "x.png")])
    (tmp_path / "other.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(UserError, match="no attack result"):
        plot_attack.main([str(tmp_path / "other.json")])


def test_a_pyld_model_is_refined_with_its_pyld_step(model):
    """The defence of a model trained with PYLD takes the sampler's PYLD step (no noise: the same
    chain)."""
    x = torch.rand(2, 3, 32, 32)
    pyld = dict(in_steps=3, pyld_lr=0.2, eps=0.01)
    classifier = RefinedClassifier(model, 0.0, 2, 1, 0.5, 0.0, 64, torch.Generator().manual_seed(0),
                                   "exact", pyld)
    refined = sgld(model, x * 2 - 1, ChainSettings(n_steps=2, sgld_lr=0.5, sgld_std=0.0, **pyld))
    torch.testing.assert_close(classifier.logits(x), model.classify(refined))
    sgld_refined = sgld(model, x * 2 - 1, ChainSettings(n_steps=2, sgld_lr=0.5, sgld_std=0.0))
    assert not torch.allclose(model.classify(refined), model.classify(sgld_refined))
    # the exact gradient passes the clamps
    grad = classifier.scaled_loss_gradient(x, torch.tensor([1, 2]))
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
