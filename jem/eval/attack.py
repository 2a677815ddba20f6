"""Adversarial robustness of JEM: PGD attacks on a classifier that first refines its input with
SGLD.

The paper's third experiment. Run it through the evaluation script:

    python eval_wrn_ebm.py --load_path M.pt --eval attack --dataset cifar_test --distance Linf \
        --eps 0 1 2 4 8 16 --n_steps_pgd_attack 40 --n_steps_refine 10 --n_dup_chains 5 \
        --save_dir runs/refine10

and draw several such runs (say --n_steps_refine 0, 1 and 10) on one plot:

    python scripts/plot_attack.py runs/refine0 runs/refine1 runs/refine10 --out robustness.png

The defended classifier (`RefinedClassifier`) maps the attacker's pixels in [0, 1] to the model's
[-1, 1], adds N(0, sigma^2) noise, copies every image into n_dup_chains chains, moves each chain
n_steps_refine SGLD steps up log p(x) and averages the chains' logits. With sigma 0, no refinement
and one chain it is the plain classifier.

The attacker's gradient through the refinement (--attack_grad):
    exact              (default) differentiates through every SGLD step (second order): the true
    gradient
                       of the defended classifier's loss, the strongest first-order attack on it.
    straight_through   the classifier's gradient at the refined point, passed back to the input as
    if the
                       refinement were the identity (a BPDA-style estimate). This is what the
                       paper's attack code computed: it moved its chains through `.data`, which
                       autograd does not see.
The exact gradient makes the attack stronger, so robust accuracies with it can be lower than the
paper's; straight_through reproduces the paper's setting and is cheaper (no second-order pass).

Units of --eps: for Linf, 1/255 of the [0, 1] pixel range (8 means 8/255); for L2, the L2 norm of
the perturbation of the whole image in [0, 1] pixel space (0.5 is the usual CIFAR-10 budget). The
paper's foolbox L2 budgets are root-mean-square distances per pixel: multiply them by sqrt(3 * 32 *
32) = 55.4.

PGD (Madry et al., 2018): start at a uniformly random point of the eps-ball (--random_start), then
n_steps_pgd_attack steps up the cross-entropy of the defended classifier, each of size
pgd_step_factor * eps / n_steps_pgd_attack (2.5, Madry's rule: enough to cross the ball and back),
along sign(gradient) for Linf or gradient / ||gradient||_2 for L2, each followed by projection onto
the eps-ball and the [0, 1] box. The last iterate is the adversarial example. Only each image's
gradient direction matters, so the gradient is computed up to a positive factor that keeps it from
underflowing to zero when the classifier is very confident (`cross_entropy_logit_gradient`).

Robust accuracy at eps counts an image as robust when the defended classifier is right on it clean
and on the attacks at every budget up to eps: an attack that succeeded inside a smaller ball is also
inside the larger one. The curve therefore never rises with eps, even though the defence is random.
"""
import argparse
import json
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from jem.data import make_loader
from jem.eval.datasets import check_labeled, load_eval_dataset, one_size_batches
from jem.sampler import ChainSettings, frozen_parameters
from jem.errors import UserError
from jem.eval.defence import RefinedClassifier, derived_generator
from jem.eval.pgd import cross_entropy_logit_gradient, pgd_attack  # noqa: F401 (tests)
from jem.eval.plots import plot_robustness

EPS_UNITS = {  # --eps value -> perturbation size in [0, 1] pixel space
    "Linf": 1 / 255,
    "L2": 1.0,
}
EPS_UNIT_NAMES = {"Linf": "1/255 of the [0, 1] pixel range",
                  "L2": "L2 norm of the whole-image perturbation in [0, 1] pixel space"}
DEFAULT_EPS = {"Linf": [0, 1, 2, 4, 8, 16], "L2": [0, 0.25, 0.5, 1, 2]}
ATTACK_GRADIENTS = ("exact", "straight_through")  # see the module docstring


@dataclass(frozen=True)
class AttackSettings:
    """One `--eval attack` run: the attack, the defence's refinement and the images attacked."""

    distance: str = "Linf"  # Linf | L2
    eps: tuple = ()  # budgets in EPS_UNITS; empty: DEFAULT_EPS
    n_steps_pgd_attack: int = 40
    pgd_step_factor: float = 2.5
    random_start: bool = True
    n_steps_refine: int = 0  # the defence's chain steps (chain.n_steps is not used)
    n_dup_chains: int = 5
    attack_grad: str = "exact"  # exact | straight_through
    max_chains_per_pass: int = 64
    chain: ChainSettings = ChainSettings()  # the refinement's step: SGLD, or PYLD for a PYLD model
    sigma: float = 0.03  # noise the defence adds to its input
    dataset: str = "cifar_test"
    data_root: str = "../data"
    celeba_root: Optional[str] = None
    n_eval: int = 500  # test images attacked, a seeded random subset
    batch_size: int = 64
    seed: int = 1
    save_dir: str = "."
    compile: bool = False
    quiet: bool = False


def add_attack_flags(parser):
    """The flags of `--eval attack`; the data set, sigma, sgld_lr/std, batch size and seed are
    shared."""
    add = parser.add_argument_group("adversarial attack (--eval attack)").add_argument
    add("--distance", choices=sorted(EPS_UNITS), default="Linf", help="the attack's norm")
    add("--eps", type=float, nargs="+", default=None,
        help="attack budgets: for Linf in units of 1/255 of the [0, 1] pixel range "
             f"(default {' '.join(map(str, DEFAULT_EPS['Linf']))}); for L2 the L2 "
             "norm of the perturbation in [0, 1] pixel space (default "
             f"{' '.join(map(str, DEFAULT_EPS['L2']))})")
    add("--n_steps_pgd_attack", type=int, default=40,
        help="PGD steps per attack (default %(default)s)")
    add("--pgd_step_factor", type=float, default=2.5,
        help="PGD step size = FACTOR * eps / n_steps_pgd_attack (2.5 as in Madry et al.)")
    add("--random_start", action=argparse.BooleanOptionalAction, default=True,
        help="start PGD at a uniformly random point of the eps-ball (default on)")
    add("--n_steps_refine", type=int, default=0,
        help="SGLD steps on log p(x) the defended classifier takes before classifying "
             "(the paper: 0, 1 or 10; default %(default)s); uses --sgld_lr and --sgld_std, "
             "or the PYLD step of a model trained with it")
    add("--n_dup_chains", type=int, default=5,
        help="noisy copies of each input refined separately; their logits are averaged "
             "(default %(default)s)")
    add("--attack_grad", choices=ATTACK_GRADIENTS, default="exact",
        help="the attacker's gradient through the refinement: exact (second order) or "
             "straight_through (the classifier's gradient at the refined point, as the paper's "
             "attack code; cheaper) (default %(default)s)")
    add("--n_eval", type=int, default=500,
        help="test images attacked, a fixed random subset drawn with --seed (default %(default)s)")
    add("--max_chains_per_pass", type=int, default=64,
        help="most chains (image copies) refined in one pass through the network; "
             "lower it if memory runs out; the result does not change (default %(default)s)")


# --------------------------------------------------------------------------------------------------
# The defended classifier.


# --------------------------------------------------------------------------------------------------
# Projected gradient descent.


# --------------------------------------------------------------------------------------------------
# The evaluation mode.

def check_attack_args(settings):
    if any(eps < 0 for eps in settings.eps):
        raise UserError("--eps values cannot be negative")
    for flag in ("n_steps_pgd_attack", "n_steps_refine"):
        if getattr(settings, flag) < 0:
            raise UserError(f"--{flag} cannot be negative")
    for flag in ("n_dup_chains", "n_eval", "max_chains_per_pass", "batch_size"):
        if getattr(settings, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if settings.compile and settings.n_steps_refine > 0 and settings.attack_grad == "exact":
        raise UserError("the exact attack gradient differentiates through the SGLD refinement, "
                        "which torch.compile cannot (no double backward): drop --compile, use "
                        "--attack_grad straight_through or --n_steps_refine 0")


def attack_loader(settings, n_classes, device):
    """n_eval images of the data set's test split (a seeded random subset), pixels in [0, 1]
    without noise: what the attacker perturbs. The defended classifier adds the noise itself."""
    dataset = load_eval_dataset(settings.dataset, settings.data_root, 0.0, settings.celeba_root,
                                normalize=False)
    check_labeled(dataset, n_classes, settings.dataset, "--eval attack")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(settings.seed))
    subset = Subset(dataset, order[:settings.n_eval].tolist())
    return make_loader(subset, settings.batch_size, train=False, device=device, workers=0)


def robust_correctness(classifier, x, y, eps_list, settings, generator, bar):
    """Rows: right on the clean image, then per eps (ascending) right after every attack up to eps.

    Images already fooled are not attacked again: they count as fooled at every larger budget.
    """
    still_right = classifier.predict(x) == y
    correct = [still_right.clone()]
    for eps in eps_list:
        targets = still_right.nonzero().squeeze(1)
        if eps > 0 and len(targets):
            bar.set_postfix(eps=eps)
            x_adv = pgd_attack(classifier, x[targets], y[targets],
                               eps * EPS_UNITS[settings.distance], settings.distance,
                               settings.n_steps_pgd_attack, settings.pgd_step_factor,
                               settings.random_start, generator)
            still_right[targets] = classifier.predict(x_adv) == y[targets]
        if eps > 0:
            bar.update(len(y))
        correct.append(still_right.clone())
    return torch.stack(correct)


def defended_classifier(model, settings, rng):
    """The model behind its refinement: the model's own step (PYLD for a PYLD model) on n_dup_chains
    noisy copies of each input."""
    chain = settings.chain
    pyld = dict(in_steps=chain.in_steps, pyld_lr=chain.pyld_lr, eps=chain.eps) \
        if chain.is_pyld else None
    return RefinedClassifier(model, settings.sigma, settings.n_steps_refine, settings.n_dup_chains,
                             chain.sgld_lr, chain.sgld_std, settings.max_chains_per_pass, rng,
                             settings.attack_grad, pyld)


def run_attack(settings, model, device):
    """Clean and robust accuracy of the defended classifier per eps; saves attack.png. Returns
    what eval_wrn_ebm.py writes to attack.json."""
    check_attack_args(settings)
    eps_list = sorted(set(settings.eps or DEFAULT_EPS[settings.distance]))
    rng = torch.Generator().manual_seed(settings.seed)
    classifier = defended_classifier(model, settings, rng)
    loader = attack_loader(settings, model.n_classes, device)
    n_images = len(loader.dataset)
    bar = tqdm(total=n_images * sum(eps > 0 for eps in eps_list), unit="img",
               desc=f"PGD {settings.distance}", disable=settings.quiet)
    n_correct = torch.zeros(1 + len(eps_list), dtype=torch.long)
    with frozen_parameters(model):
        for x, y in one_size_batches(loader):
            x, y = x.to(device), y.to(device)
            generator = derived_generator(rng, device)
            n_correct += robust_correctness(classifier, x, y, eps_list, settings, generator,
                                            bar).sum(1).cpu()
    bar.close()

    accuracy = (n_correct.double() / n_images).tolist()
    result = {"distance": settings.distance, "eps": eps_list,
              "eps_unit": EPS_UNIT_NAMES[settings.distance], "clean_accuracy": accuracy[0],
              "robust_accuracy": accuracy[1:], "n_images": n_images,
              "settings": recorded_settings(settings)}
    os.makedirs(settings.save_dir, exist_ok=True)
    plot_path = os.path.join(settings.save_dir, "attack.png")
    plot_robustness([(run_label(result), result)], plot_path)
    result["plot"] = plot_path
    return result


def recorded_settings(settings):
    """What attack.json records of a run (the names of the flags that set them)."""
    chain = settings.chain
    return {"dataset": settings.dataset, "n_steps_pgd_attack": settings.n_steps_pgd_attack,
            "pgd_step_factor": settings.pgd_step_factor, "random_start": settings.random_start,
            "n_steps_refine": settings.n_steps_refine, "n_dup_chains": settings.n_dup_chains,
            "attack_grad": settings.attack_grad, "sigma": settings.sigma,
            "sgld_lr": chain.sgld_lr, "sgld_std": chain.sgld_std, "in_steps": chain.in_steps,
            "pyld_lr": chain.pyld_lr, "pyld_eps": chain.eps, "seed": settings.seed}


# --------------------------------------------------------------------------------------------------
# Reading results back (scripts/plot_attack.py overlays several runs).

def run_label(result):
    """The legend of one run: its refinement steps with the sampler the model was trained with (PYLD
    when its chain had inner steps, else SGLD), its chains, and a straight-through gradient."""
    settings = result["settings"]
    chains = settings["n_dup_chains"]
    pyld = settings.get("in_steps", 0) > 0 and settings.get("pyld_lr", 0) > 0
    straight_through = ", straight-through gradient" \
        if settings.get("attack_grad") == "straight_through" else ""
    return (f"{settings['n_steps_refine']} {'PYLD' if pyld else 'SGLD'} steps, {chains} "
            f"chain{'s' if chains > 1 else ''}{straight_through}")


def read_attack_result(path):
    """The attack result in an attack.json (or in the attack.json of a save dir).

    The result's keys may sit at the top level or one level down (under the key the evaluation
    script files it under), next to the run's arguments.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "attack.json")
    try:
        with open(path) as fh:
            saved = json.load(fh)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read attack result {path} ({e}); pass attack.json files or their "
                        "save dirs")
    candidates = [saved, *saved.values()] if isinstance(saved, dict) else []
    for candidate in candidates:
        if isinstance(candidate,
                      dict) and "robust_accuracy" in candidate and "settings" in candidate:
            return candidate
    raise UserError(f"{path} holds no attack result; pass the attack.json that --eval attack "
                    "writes")
