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

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from jem.data import make_loader
from jem.eval.datasets import check_labeled, load_eval_dataset, one_size_batches
from jem.sampler import ChainSettings, frozen_parameters, uncached_autocast
from jem.errors import UserError
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


def add_attack_flags(parser):
    """The flags of `--eval attack`; the data set, sigma, sgld_lr/std, batch size and seed are
    shared."""
    group = parser.add_argument_group("adversarial attack (--eval attack)")
    group.add_argument("--distance", choices=sorted(EPS_UNITS), default="Linf",
                       help="the attack's norm")
    group.add_argument("--eps", type=float, nargs="+", default=None,
                       help="attack budgets: for Linf in units of 1/255 of the [0, 1] pixel range "
                            f"(default {' '.join(map(str, DEFAULT_EPS['Linf']))}); for L2 the L2 "
                            "norm of the perturbation in [0, 1] pixel space (default "
                            f"{' '.join(map(str, DEFAULT_EPS['L2']))})")
    group.add_argument("--n_steps_pgd_attack", type=int, default=40,
                       help="PGD steps per attack (default %(default)s)")
    group.add_argument("--pgd_step_factor", type=float, default=2.5,
                       help="PGD step size = FACTOR * eps / "
                            "n_steps_pgd_attack (2.5 as in Madry et al.)")
    group.add_argument("--random_start", action=argparse.BooleanOptionalAction, default=True,
                       help="start PGD at a uniformly random point of the eps-ball (default on)")
    group.add_argument("--n_steps_refine", type=int, default=0,
                       help="SGLD steps on log p(x) the defended classifier takes before "
                            "classifying (the paper: 0, 1 or 10; default %(default)s); uses "
                            "--sgld_lr and --sgld_std, or the PYLD step of a model trained with it")
    group.add_argument("--n_dup_chains", type=int, default=5,
                       help="noisy copies of each input refined separately; "
                            "their logits are averaged (default %(default)s)")
    group.add_argument("--attack_grad", choices=ATTACK_GRADIENTS, default="exact",
                       help="the attacker's gradient through the refinement: exact (second order) "
                            "or straight_through (the classifier's gradient at the refined point, "
                            "as the paper's attack code; cheaper) (default %(default)s)")
    group.add_argument("--n_eval", type=int, default=500,
                       help="test images attacked, a fixed random subset "
                            "drawn with --seed (default %(default)s)")
    group.add_argument("--max_chains_per_pass", type=int, default=64,
                       help="most chains (image copies) refined in one pass "
                            "through the network; lower it if memory runs out; "
                            "the result does not change (default %(default)s)")
    return group


# --------------------------------------------------------------------------------------------------
# The defended classifier.

def draw_seed(rng):
    """A seed drawn from `rng`, so that every random draw of a run follows from --seed."""
    return int(torch.randint(2 ** 62, (1,), generator=rng))


def derived_generator(rng, device):
    """A generator on `device` seeded from `rng`."""
    return torch.Generator(device).manual_seed(draw_seed(rng))


class RefinedClassifier:
    """The paper's defence: average the logits of n_dup_chains noisy copies, each refined by SGLD.

    A chain is z_0 = 2x - 1 + sigma * N(0, I), then z_{t+1} = z_t + sgld_lr * d log p(z_t)/dz_t +
    sgld_std * N(0, I) for n_steps_refine steps, with log p = model(z) (logsumexp of the logits, or
    the energy head of an --uncond model); its logits are model.classify(z_T). A model trained with
    JEM++'s PYLD chain (`pyld`: in_steps, pyld_lr, eps) is refined with that chain's step instead
    (`refine_step`). The model should be in eval mode with frozen parameters (run_attack sees to
    both). `gradient` is how the attack differentiates through the refinement: "exact" or
    "straight_through" (see the module docstring).

    At most max_chains_per_pass chains go through the network at once. Every chain's noise comes
    from a generator seeded from `rng`, so a pass can be replayed exactly (see
    `group_scaled_loss_gradient`).
    """

    def __init__(self, model, sigma, n_steps_refine, n_dup_chains, sgld_lr, sgld_std,
                 max_chains_per_pass, rng,
                 gradient="exact", pyld=None):
        self.model = model
        self.pyld = pyld
        self.sigma = sigma
        self.n_steps_refine = n_steps_refine
        self.n_dup_chains = n_dup_chains
        self.sgld_lr = sgld_lr
        self.sgld_std = sgld_std
        self.max_chains_per_pass = max_chains_per_pass
        self.rng = rng
        self.gradient = gradient

    def chain_logits(self, x, n_chains, generator, differentiable):
        """Logits (N, n_chains, K) of n_chains refined copies of each image of x (pixels in [0, 1]).

        differentiable=True keeps a graph from the logits back to x: through every SGLD step
        (create_graph) for the exact gradient, or around them for the straight-through one, where
        each step is added as a constant (what the paper's `.data +=` did). Otherwise nothing is
        kept and memory stays flat.
        """
        def noise(like):
            return torch.randn(like.shape, generator=generator, device=like.device,
                               dtype=like.dtype)

        chains = x.repeat_interleave(n_chains, dim=0) * 2 - 1  # the model reads pixels in [-1, 1]
        chains = chains + self.sigma * noise(chains)
        through_steps = differentiable and self.gradient == "exact"
        # The SGLD steps need d log p / dz even when nothing else does; under --amp, autocast would
        # keep a bf16 copy of every step's z (a new leaf) until the whole evaluation ends.
        with torch.enable_grad(), uncached_autocast(x.device.type):
            for _ in range(self.n_steps_refine):
                z = chains if through_steps else chains.detach().requires_grad_(True)
                score_grad, = torch.autograd.grad(self.model(z).sum(), z,
                                                  create_graph=through_steps)
                chains = self.refine_step(chains, score_grad, noise)
        if not differentiable:
            chains = chains.detach()
        with torch.set_grad_enabled(differentiable):
            return self.model.classify(chains).view(len(x), n_chains, -1)

    def refine_step(self, chains, score_grad, noise):
        """One step of the model's sampler, out of place so that the exact gradient can pass through
        it: the paper's SGLD step, or PYLD's (sampler.pyld_step): the gradient clipped to [-eps,
        eps], an optional outer step of sgld_lr and in_steps inner steps of pyld_lr, each clamped to
        [-1, 1], then the noise."""
        if self.pyld is None:
            return chains + self.sgld_lr * score_grad + self.sgld_std * noise(chains)
        clipped = score_grad.clamp(-self.pyld["eps"], self.pyld["eps"])
        if self.sgld_lr > 0:
            chains = (chains + self.sgld_lr * clipped).clamp(-1, 1)
        for _ in range(self.pyld["in_steps"]):
            chains = (chains + self.pyld["pyld_lr"] * clipped).clamp(-1, 1)
        return chains + self.sgld_std * noise(chains) if self.sgld_std > 0 else chains

    def image_groups(self, n_images):
        """Slices of the batch whose chains fit in one pass (single images when one image's do
        not)."""
        per_group = max(1, self.max_chains_per_pass // self.n_dup_chains)
        return [slice(start, start + per_group) for start in range(0, n_images, per_group)]

    def chain_blocks(self):
        """How one image's chains are split over passes: all in one unless n_dup_chains is too
        large."""
        per_block = min(self.n_dup_chains, self.max_chains_per_pass)
        full, rest = divmod(self.n_dup_chains, per_block)
        return [per_block] * full + ([rest] if rest else [])

    def group_mean_logits(self, x, seed, differentiable):
        """Chain-averaged logits of one image group; block i draws its noise from seed + i."""
        total = 0
        for i, n_chains in enumerate(self.chain_blocks()):
            generator = torch.Generator(x.device).manual_seed(seed + i)
            total = total + self.chain_logits(x, n_chains, generator, differentiable).sum(1)
        return total / self.n_dup_chains

    @torch.no_grad()
    def logits(self, x):
        """Chain-averaged logits (N, K) for pixels x in [0, 1] (fresh noise on every call)."""
        return torch.cat([self.group_mean_logits(x[group], draw_seed(self.rng),
                                                 differentiable=False)
                          for group in self.image_groups(len(x))])

    def predict(self, x):
        return self.logits(x).argmax(1)

    def scaled_loss_gradient(self, x, y):
        """d/dx of the cross-entropy of the chain-averaged logits, through the refinement as
        `gradient` says, times a positive factor per image (see `cross_entropy_logit_gradient`); PGD
        uses only each image's direction."""
        grad = torch.empty_like(x)
        for group in self.image_groups(len(x)):
            grad[group] = self.group_scaled_loss_gradient(x[group], y[group], draw_seed(self.rng))
        return grad

    def group_scaled_loss_gradient(self, x, y, seed):
        x = x.detach().requires_grad_(True)
        if len(self.chain_blocks()) == 1:
            mean_logits = self.group_mean_logits(x, seed, differentiable=True)
            logit_grad = cross_entropy_logit_gradient(mean_logits.detach(), y)
            return torch.autograd.grad(mean_logits, x, grad_outputs=logit_grad)[0]
        # The image's chains need several passes, and the loss is not a sum over chains: first find
        # the loss gradient with respect to the averaged logits, then push it back through each
        # block of chains in turn, replaying the block's noise from its seed.
        logit_grad = cross_entropy_logit_gradient(self.group_mean_logits(x, seed,
                                                                         differentiable=False), y)
        grad = torch.zeros_like(x)
        for i, n_chains in enumerate(self.chain_blocks()):
            generator = torch.Generator(x.device).manual_seed(seed + i)
            block_logits = self.chain_logits(x, n_chains, generator, differentiable=True).sum(1)
            grad += torch.autograd.grad(block_logits, x,
                                        grad_outputs=logit_grad / self.n_dup_chains)[0]
        return grad


# --------------------------------------------------------------------------------------------------
# Projected gradient descent.


# --------------------------------------------------------------------------------------------------
# The evaluation mode.

def check_attack_args(args):
    if any(eps < 0 for eps in args.eps or []):
        raise UserError("--eps values cannot be negative")
    for flag in ("n_steps_pgd_attack", "n_steps_refine"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} cannot be negative")
    for flag in ("n_dup_chains", "n_eval", "max_chains_per_pass", "batch_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    if args.compile and args.n_steps_refine > 0 and args.attack_grad == "exact":
        raise UserError("the exact attack gradient differentiates through the SGLD refinement, "
                        "which torch.compile cannot (no double backward): drop --compile, use "
                        "--attack_grad straight_through or --n_steps_refine 0")


def attack_loader(args, n_classes, device):
    """n_eval images of the --dataset test split (a seeded random subset), pixels in [0, 1] without
    noise: what the attacker perturbs. The defended classifier adds the noise itself."""
    dataset = load_eval_dataset(args.dataset, args.data_root, 0.0, args.celeba_root,
                                normalize=False)
    check_labeled(dataset, n_classes, args.dataset, "--eval attack")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
    subset = Subset(dataset, order[:args.n_eval].tolist())
    return make_loader(subset, args.batch_size, train=False, device=device, workers=0)


def robust_correctness(classifier, x, y, eps_list, args, generator, bar):
    """Rows: right on the clean image, then per eps (ascending) right after every attack up to eps.

    Images already fooled are not attacked again: they count as fooled at every larger budget.
    """
    still_right = classifier.predict(x) == y
    correct = [still_right.clone()]
    for eps in eps_list:
        targets = still_right.nonzero().squeeze(1)
        if eps > 0 and len(targets):
            bar.set_postfix(eps=eps)
            x_adv = pgd_attack(classifier, x[targets], y[targets], eps * EPS_UNITS[args.distance],
                               args.distance,
                               args.n_steps_pgd_attack, args.pgd_step_factor, args.random_start,
                               generator)
            still_right[targets] = classifier.predict(x_adv) == y[targets]
        if eps > 0:
            bar.update(len(y))
        correct.append(still_right.clone())
    return torch.stack(correct)


def run_attack(args, model, replay_buffer, device):
    """`--eval attack`: clean and robust accuracy of the defended classifier per eps; saves
    attack.png.

    The replay buffer is not used (the attack starts from test images). Returns the dict that
    eval_wrn_ebm.py writes to attack.json.
    """
    check_attack_args(args)
    eps_list = sorted(set(args.eps or DEFAULT_EPS[args.distance]))
    rng = torch.Generator().manual_seed(args.seed)
    # a model trained with PYLD is refined with PYLD (jem/flags/evaluate.py sample_as_trained)
    chain = ChainSettings(args.n_steps_refine, args.sgld_lr, args.sgld_std, args.in_steps,
                          args.pyld_lr, args.pyld_eps)
    pyld = dict(in_steps=chain.in_steps, pyld_lr=chain.pyld_lr,
                eps=chain.eps) if chain.is_pyld else None
    classifier = RefinedClassifier(model, args.sigma, args.n_steps_refine, args.n_dup_chains,
                                   args.sgld_lr,
                                   args.sgld_std, args.max_chains_per_pass, rng, args.attack_grad,
                                   pyld)
    loader = attack_loader(args, model.n_classes, device)
    n_images = len(loader.dataset)
    bar = tqdm(total=n_images * sum(eps > 0 for eps in eps_list), unit="img",
               desc=f"PGD {args.distance}",
               disable=args.print_to_log)
    n_correct = torch.zeros(1 + len(eps_list), dtype=torch.long)
    with frozen_parameters(model):
        for x, y in one_size_batches(loader):
            x, y = x.to(device), y.to(device)
            n_correct += robust_correctness(classifier, x, y, eps_list, args,
                                            derived_generator(rng, device),
                                            bar).sum(1).cpu()
    bar.close()

    accuracy = (n_correct.double() / n_images).tolist()
    result = {"distance": args.distance, "eps": eps_list, "eps_unit": EPS_UNIT_NAMES[args.distance],
              "clean_accuracy": accuracy[0], "robust_accuracy": accuracy[1:], "n_images": n_images,
              "settings": {name: getattr(args, name) for name in ("dataset", "n_steps_pgd_attack",
                                                                  "pgd_step_factor", "random_start",
                                                                  "n_steps_refine", "n_dup_chains",
                                                                  "attack_grad", "sigma", "sgld_lr",
                                                                  "sgld_std", "in_steps", "pyld_lr",
                                                                  "pyld_eps", "seed")}}
    os.makedirs(args.save_dir, exist_ok=True)
    plot_path = os.path.join(args.save_dir, "attack.png")
    plot_robustness([(run_label(result), result)], plot_path)
    result["plot"] = plot_path
    return result


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
