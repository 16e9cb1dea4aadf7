"""Small encoders and decoders of every style the core must handle, for the tests.

Each factory returns an eval-mode module with non-trivial BatchNorm statistics, so a bug
in folding BatchNorm or in an activation derivative changes the spectrum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODULE_ACTIVATIONS = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "elu": lambda: nn.ELU(0.7), "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"),
    "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "softplus": lambda: nn.Softplus(beta=2.0),
    "identity": nn.Identity,
}


def randomise_batchnorm(module: nn.Module, generator: torch.Generator) -> nn.Module:
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm1d):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.3)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.randn(bn.num_features, generator=generator))
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=generator) * 0.3)
    return module.eval()


class TwoHeadEncoder(nn.Module):
    """nn.Sequential body (Flatten, Linear, [BatchNorm], activation...) and two Linear heads."""

    def __init__(self, n_in, widths, dz, activation="tanh", batchnorm=True, bn_after_activation=False,
                 dropout=False):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = n_in
        for width in widths:
            layers.append(nn.Linear(prev, width))
            if batchnorm and not bn_after_activation:
                layers.append(nn.BatchNorm1d(width))
            layers.append(MODULE_ACTIVATIONS[activation]())
            if batchnorm and bn_after_activation:
                layers.append(nn.BatchNorm1d(width))
            if dropout:
                layers.append(nn.Dropout(0.3))
            prev = width
        self.body = nn.Sequential(*layers)
        self.mu = nn.Linear(prev, dz)
        self.logvar = nn.Linear(prev, dz)

    def forward(self, x):
        h = self.body(x)
        return self.mu(h), self.logvar(h)


class ChunkHeadEncoder(nn.Module):
    """A custom forward with functional activations and one Linear head, chunked in two."""

    def __init__(self, n_in, width, dz, split=False):
        super().__init__()
        self.fc1 = nn.Linear(n_in, width)
        self.bn1 = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 2 * dz)
        self.split = split
        self.dz = dz

    def forward(self, x):
        h = x.view(x.size(0), -1)
        h = F.leaky_relu(self.bn1(self.fc1(h)), 0.1)
        h = torch.tanh(self.fc2(h))
        out = self.head(h)
        if self.split:
            mu, out2 = out.split(self.dz, dim=-1)
        else:
            mu, out2 = out.chunk(2, dim=-1)
        return mu, out2


class ConvEncoder(nn.Module):
    """A small conv encoder: not an MLP, so it runs on the autograd backend."""

    def __init__(self, side=6, channels=3, dz=3):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels * side * side, 2 * dz)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x))).flatten(1)
        mu, logvar = self.fc(h).chunk(2, dim=-1)
        return mu, logvar


class NormalEncoder(nn.Module):
    """Returns a torch.distributions.Normal (sigma = softplus of the second head)."""

    def __init__(self, n_in, width, dz):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, width), nn.Tanh())
        self.mu = nn.Linear(width, dz)
        self.s = nn.Linear(width, dz)

    def forward(self, x):
        h = self.body(x)
        return torch.distributions.Normal(self.mu(h), F.softplus(self.s(h)) + 1e-3)


class MLPDecoder(nn.Module):
    """Decoder returning its mean, or (mean, logvar) with ``gaussian=True``."""

    def __init__(self, dz, width, n_out, gaussian=False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dz, width), nn.Tanh())
        self.mean = nn.Linear(width, n_out)
        self.logvar = nn.Linear(width, n_out) if gaussian else None

    def forward(self, z):
        h = self.body(z)
        mean = torch.sigmoid(self.mean(h))
        return mean if self.logvar is None else (mean, self.logvar(h))


def seeded(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = max(param.shape[-1], 1)
            param.copy_(torch.randn(param.shape, generator=generator) * (1.5 / fan_in**0.5))
    return randomise_batchnorm(module, generator)
