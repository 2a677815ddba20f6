"""The later recipes for this model as their authors published them: flag values over the paper's
defaults (the command of their README and scripts over their code's defaults: JEMPP's
train_jempp.py, SADAJEM's train_sadajem.py), for the flags that exist here.

`--recipe NAME` applies them to training (a flag given on the command line wins) and tells
evaluation how a published model was sampled. A new recipe is an entry here; a new sampler or
optimizer it needs goes next to its siblings in jem/sampler.py or jem/optim.py, chosen by a flag.
"""

RECIPES = {
    "jem": {},
    "jempp": dict(norm="batch", optimizer="sgd", lr=0.1, weight_decay=4e-4, warmup_iters=1000,
                  n_epochs=150, decay_epochs=[50, 100, 125], decay_rate=0.2, n_steps=10, in_steps=5,
                  pyld_lr=0.2, eps=1.0, sgld_lr=0.0, sgld_std=0.0, buffer_init="informative",
                  model="yopo", test_sigma=0.0),
    # SADA-JEM's chain step, x <- clamp(x + clamp(g, -1, 1), -1, 1), is one PYLD inner step of 1
    # (their --sgld_lr 1: see jem/flags/train.py sadajem_meanings). Their epoch is a pass over the
    # labeled batches of 128, and their run stops when |p_x_weight * l_p_x| > 1e5.
    "sadajem": dict(norm="batch", optimizer="sam", rho=2.0, lr=0.1, weight_decay=5e-4,
                    warmup_iters=1000, n_epochs=200, decay_epochs=[60, 120, 180], decay_rate=0.2,
                    sigma=0.0, n_valid=0, px_augment=False, labeled_batch_size=128,
                    epoch_over="labeled", n_steps=5, in_steps=1, pyld_lr=1.0, eps=1.0, sgld_lr=0.0,
                    sgld_std=0.0, buffer_init="informative", diverge_on="p_x",
                    diverge_threshold=1e5),
}

# The sampler of the paper's training, which a recipe's values replace (evaluation reads these to
# sample a published model as it was trained).
PAPER_SAMPLER = dict(sgld_lr=1.0, sgld_std=0.01, in_steps=0, pyld_lr=0.2, eps=1.0,
                     buffer_init="uniform", sigma=0.03)


def sampler_of(recipe):
    """The sampler flags a recipe trained with."""
    return {**PAPER_SAMPLER, **{k: v for k, v in RECIPES[recipe].items() if k in PAPER_SAMPLER}}
