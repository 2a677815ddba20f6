"""Projected gradient descent (Madry et al., 2018) in L-inf and L2, on a classifier that gives the
gradient of its loss (jem/eval/attack.py RefinedClassifier): random start in the eps-ball, steps
along the steepest ascent direction, projection onto the ball and the [0, 1] box."""
import torch
import torch.nn.functional as F


def cross_entropy_logit_gradient(logits, y):
    """d CE(logits, y) / d logits, divided per row by its largest wrong-class entry.

    The plain gradient, softmax - one_hot, rounds to exactly zero once the classifier is confident
    enough (a logit margin of about 100 in float32), which would stall PGD on the very images it has
    to move. Divided by the runner-up's probability it becomes exp(l_k - max_{j != y} l_j) for k !=
    y and minus their sum for y: the same direction, never zero.
    """
    wrong_logits = logits.scatter(1, y[:, None], float("-inf"))
    wrong = (wrong_logits - wrong_logits.amax(1, keepdim=True)).exp()
    return wrong - F.one_hot(y, logits.shape[1]).to(logits.dtype) * wrong.sum(1, keepdim=True)


def random_point_in_ball(x, eps, distance, generator):
    """Perturbations drawn uniformly from the eps-ball (one per image of x)."""
    if distance == "Linf":
        return (torch.rand(x.shape, generator=generator, device=x.device,
                           dtype=x.dtype) * 2 - 1) * eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    # Uniform in volume: radius eps * U^(1/D), which for images is almost always close to eps.
    u = torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype)
    return direction * (eps * u ** (1 / x[0].numel())).view(-1, 1, 1, 1)


def project(x, x_adv, eps, distance):
    """The nearest point of the eps-ball around x (then clipped into [0, 1], which never leaves the
    ball: clipping only moves a pixel towards x's own pixel, itself in [0, 1])."""
    delta = x_adv - x
    if distance == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = delta * (eps / norms).clamp(max=1)
    return (x + delta).clamp(0, 1)


def steepest_ascent_direction(grad, distance):
    """The unit step (in the attack's norm) that raises the loss most to first order."""
    if distance == "Linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def pgd_attack(classifier, x, y, eps, distance, n_steps, step_factor=2.5, random_start=True,
               generator=None):
    """Adversarial examples for `classifier` within `eps` of x (in [0, 1] pixel space) and inside
    [0, 1].

    Step size step_factor * eps / n_steps; see the module docstring for the rule.
    """
    if eps == 0:
        return x.clone()
    step_size = step_factor * eps / max(n_steps, 1)
    x_adv = x
    if random_start:
        x_adv = project(x, x + random_point_in_ball(x, eps, distance, generator), eps, distance)
    for _ in range(n_steps):
        grad = classifier.scaled_loss_gradient(x_adv, y)
        x_adv = project(x, x_adv + step_size * steepest_ascent_direction(grad, distance), eps,
                        distance)
    return x_adv
