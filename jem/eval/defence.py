"""The defended classifier of the paper's robustness experiment: the input refined by a few steps of
the model's own chain over several noisy copies, the copies' logits averaged; and the gradient an
attacker takes through it (exact, or straight through the refinement as the paper's attack code).
"""
import torch

from jem.eval.pgd import cross_entropy_logit_gradient
from jem.sampler import uncached_autocast


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
