"""The JEM energy model: a Wide-ResNet classifier whose logits also define an energy.

    p(y | x) = softmax(f(x))[y]                       (the classifier, unchanged)
    -E(x, y) = f(x)[y]                                (class-conditional score)
    -E(x)    = logsumexp_y f(x)[y]                    (the "px" score)

With `uncond=True` the p(x) score comes from a separate scalar head instead (`energy_output`), and
the model cannot sample class-conditionally.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from jem.errors import UserError
from wideresnet import Wide_ResNet


class JEM(nn.Module):
    """Thin wrapper around a Wide-ResNet; attribute names match the paper's checkpoints."""

    def __init__(self, depth=28, width=10, norm=None, dropout_rate=0.0, n_classes=10, uncond=False):
        super().__init__()
        self.f = Wide_ResNet(depth, width, norm=norm, dropout_rate=dropout_rate)
        self.energy_output = nn.Linear(self.f.last_dim, 1)
        self.class_output = nn.Linear(self.f.last_dim, n_classes)
        self.n_classes = n_classes
        self.uncond = uncond

    def classify(self, x):
        """Logits f(x), shape (N, n_classes)."""
        return self.class_output(self.f(x))

    def heads(self, x):
        """Logits and the log p(x) score (= -E(x)) from one pass through the trunk."""
        features = self.f(x)
        logits = self.class_output(features)
        return logits, self.px_score(features, logits)

    def px_score(self, features, logits):
        """-E(x) in float32 at least, also from bf16 logits (--amp): the energy gap is a small
        difference of two of them. A float64 model keeps float64 (the attack's gradient checks by
        finite differences need it)."""
        if self.uncond:
            return at_least_float32(self.energy_output(features).squeeze(1))
        return at_least_float32(logits).logsumexp(1)

    def forward(self, x, y=None):
        """-E(x) when y is None, else -E(x, y) = f(x)[y]. Shape (N,)."""
        if y is None:
            return self.heads(x)[1]
        if self.uncond:
            raise ValueError("an unconditional JEM (--uncond) has no class-conditional energy")
        return at_least_float32(self.classify(x)).gather(1, y[:, None]).squeeze(1)


def at_least_float32(tensor):
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class Heads(nn.Module):
    """A JEM's (logits, score) pass as a module's forward, the call DistributedDataParallel
    wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.heads(x)


@dataclass(frozen=True)
class ModelSettings:
    """The network: WRN-depth-width (the paper: WRN-28-10 without norm) and its heads."""

    depth: int = 28
    width: int = 10
    norm: Optional[str] = None  # None | batch | instance | layer | act
    dropout_rate: float = 0.0
    n_classes: int = 10
    uncond: bool = False  # score p(x) with the scalar head energy_output


def build_model(settings):
    """The JEM model that ModelSettings describe; a depth that is not 6n+4 is one line."""
    try:
        return JEM(settings.depth, settings.width, settings.norm, settings.dropout_rate,
                   settings.n_classes, settings.uncond)
    except ValueError as e:
        raise UserError(f"{e} (--depth)") from None
