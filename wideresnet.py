"""The Wide-ResNet trunk used by JEM (Zagoruyko & Komodakis 2016, as modified by the JEM paper).

Pre-activation blocks, LeakyReLU(0.2) everywhere, biases on every convolution and, by default, no
normalisation at all: the paper found that batch norm hurts the SGLD sampler. The module names
(`conv1`, `layer1.0.bn1`, `shortcut.0`, `linear`, ...) are kept exactly so that checkpoints written
by the paper's code load with `strict=True`.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = (None, "batch", "instance", "layer", "act")


class ActNorm(nn.Module):
    """Per-channel affine layer initialised from the first batch it sees (Glow's ActNorm).

    After that first batch it is a fixed per-sample affine map, so it does not couple examples.
    """

    def __init__(self, num_channels):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        self.loc.copy_(-mean)
        self.scale.copy_(1.0 / (std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x):
        if self.training and self.initialized.item() == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


def make_norm(num_channels, norm):
    """The normalisation layer named by `--norm`; None gives an identity with no parameters."""
    if norm is None:
        return nn.Identity()
    if norm == "batch":
        # momentum=0.9 as in the paper's code (running stats follow the latest batch closely).
        return nn.BatchNorm2d(num_channels, momentum=0.9)
    if norm == "instance":
        return nn.InstanceNorm2d(num_channels, affine=True)
    if norm == "layer":
        return nn.GroupNorm(1, num_channels)
    if norm == "act":
        return ActNorm(num_channels)
    raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")


class WideBasic(nn.Module):
    """Pre-activation residual block; conv2 carries the stride, as in the paper's code."""

    def __init__(self, in_planes, planes, dropout_rate, stride=1, norm=None, leak=0.2):
        super().__init__()
        self.lrelu = nn.LeakyReLU(leak)
        self.bn1 = make_norm(in_planes, norm)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout_rate) if dropout_rate > 0 else nn.Identity()
        self.bn2 = make_norm(planes, norm)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True))

    def forward(self, x):
        out = self.dropout(self.conv1(self.lrelu(self.bn1(x))))
        out = self.conv2(self.lrelu(self.bn2(out)))
        return out + self.shortcut(x)


def check_depth(depth):
    """A Wide-ResNet has depth 6n+4 (n blocks in each of three stages); returns n."""
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError("Wide-ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got "
                         f"{depth}")
    return (depth - 4) // 6


class Wide_ResNet(nn.Module):
    """Feature extractor: image (N, C, 32, 32) -> feature vector (N, 64 * widen_factor).

    `linear` is never used by JEM; it exists (with 10 outputs, as in the paper's code) only so that
    the paper's checkpoints load strictly.
    """

    def __init__(self, depth, widen_factor, num_classes=10, input_channels=3, sum_pool=False,
                 norm=None, leak=0.2, dropout_rate=0.0):
        super().__init__()
        n = check_depth(depth)
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.sum_pool = sum_pool
        self.last_dim = widths[3]
        self.lrelu = nn.LeakyReLU(leak)
        self.conv1 = nn.Conv2d(input_channels, widths[0], kernel_size=3, padding=1, bias=True)
        in_planes = widths[0]
        stages = []
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for block_stride in [stride] + [1] * (n - 1):
                blocks.append(WideBasic(in_planes, planes, dropout_rate, block_stride, norm, leak))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn1 = make_norm(widths[3], norm)
        self.linear = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.lrelu(self.bn1(out))
        if self.sum_pool:
            return out.flatten(2).sum(2)
        return F.avg_pool2d(out, 8).flatten(1)
