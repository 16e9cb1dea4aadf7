"""The paper's VAEs (Khan & Storkey, AISTATS 2023) as plain ``nn.Module``s.

MNIST / Fashion-MNIST (``PaperVAE``): encoder MLP 784-256-256-512-32 with BatchNorm before
every tanh, then two 32 x 32 linear heads (mu and log-variance); decoder the mirror
32-512-256-256-784, BatchNorm before every tanh, output logits (Bernoulli) or means (Gaussian,
either likelihood of ``LIKELIHOODS`` but Bernoulli).

CelebA (``CelebAVAE``, the paper's appendix): 64 x 64 x 3 images, conv filters 32, 64, 128,
256, 512 (kernel 4, stride 2: 64 -> 2 pixels), BatchNorm + tanh, latent 128, and a mirrored
transpose-conv decoder.

Every encoder follows pullgeom's contract: ``encoder(x) -> (mu, logvar)``, both (B, dz), so
``pullgeom.spectrum(encoder.eval(), x)`` works as is (``sigma="logvar"``). Every decoder's
``forward`` returns the mean of p(x | z) with the input's shape; ``logits`` gives the
pre-activation the Bernoulli loss needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

MNIST_SHAPE = (1, 28, 28)
CELEBA_SHAPE = (3, 64, 64)
PAPER_HIDDEN = (256, 256, 512, 32)
PAPER_LATENT_DIM = 32
CELEBA_CHANNELS = (32, 64, 128, 256, 512)
CELEBA_LATENT_DIM = 128
# The decoder likelihoods, by -log p(x | z) summed over pixels (``training.reconstruction_nll``):
# "bernoulli": binary cross-entropy on logits; "gaussian": 0.5 ||x - g(z)||^2 (unit variance);
# "sse": ||x - g(z)||^2, the summed squared error (F.mse_loss(..., reduction="sum")), a Gaussian of
# variance 1/2. The two Gaussians differ only by a factor 2 on the data term, which is what moves
# the beta at which a VAE collapses (docs/reproduction.md); their decoders output the mean as is.
LIKELIHOODS = ("bernoulli", "gaussian", "sse")


def _mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """Linear -> BatchNorm1d -> tanh for each consecutive pair of ``widths``."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(w_in, w_out), nn.BatchNorm1d(w_out), nn.Tanh()]
    return nn.Sequential(*layers)


def _check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood={likelihood!r}: pass one of {LIKELIHOODS}")


def check_celeba_channels(channels: tuple[int, ...]) -> None:
    """Conv widths for ``CelebAVAE``: 1 to 6 positive numbers (each block halves 64 pixels)."""
    if not 1 <= len(channels) <= 6 or min(channels) < 1:
        raise ValueError(f"channels={list(channels)}: pass 1 to 6 positive conv widths "
                         "(each stride-2 block halves the 64 x 64 image), e.g. 32 64 128 256 512")


class PaperEncoder(nn.Module):
    """x: (B, 1, 28, 28) or (B, 784) -> (mu, logvar), each (B, latent_dim)."""

    def __init__(self, input_dim: int = 784, hidden: tuple[int, ...] = PAPER_HIDDEN,
                 latent_dim: int = PAPER_LATENT_DIM):
        super().__init__()
        self.flatten = nn.Flatten()
        self.body = _mlp((input_dim, *hidden))
        self.mu = nn.Linear(hidden[-1], latent_dim)
        self.logvar = nn.Linear(hidden[-1], latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(self.flatten(x))
        return self.mu(h), self.logvar(h)


class PaperDecoder(nn.Module):
    """z: (B, latent_dim) -> mean of p(x | z): (B, *output_shape).

    The mirror of ``PaperEncoder``: latent_dim -> reversed(hidden[:-1]) -> output, BatchNorm
    before every tanh. Bernoulli: mean = sigmoid(logits); either Gaussian: mean = logits.
    """

    def __init__(self, latent_dim: int = PAPER_LATENT_DIM, hidden: tuple[int, ...] = PAPER_HIDDEN,
                 output_shape: tuple[int, ...] = MNIST_SHAPE, likelihood: str = "bernoulli"):
        super().__init__()
        _check_likelihood(likelihood)
        self.output_shape = tuple(output_shape)
        self.likelihood = likelihood
        output_dim = 1
        for size in output_shape:
            output_dim *= size
        self.body = _mlp((latent_dim, *reversed(hidden[:-1])))
        self.out = nn.Linear(hidden[0], output_dim)

    def logits(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> (B, *output_shape) pre-activations."""
        return self.out(self.body(z)).reshape(z.shape[0], *self.output_shape)

    def forward(self, z: Tensor) -> Tensor:
        logits = self.logits(z)
        return torch.sigmoid(logits) if self.likelihood == "bernoulli" else logits


class PaperVAE(nn.Module):
    """The paper's MNIST/Fashion-MNIST VAE: ``encoder`` (PaperEncoder) + ``decoder`` (PaperDecoder)."""

    def __init__(self, input_shape: tuple[int, ...] = MNIST_SHAPE, hidden: tuple[int, ...] = PAPER_HIDDEN,
                 latent_dim: int = PAPER_LATENT_DIM, likelihood: str = "bernoulli"):
        super().__init__()
        input_dim = 1
        for size in input_shape:
            input_dim *= size
        self.config = {"arch": "paper-mlp", "input_shape": list(input_shape), "hidden": list(hidden),
                       "latent_dim": latent_dim, "likelihood": likelihood}
        self.encoder = PaperEncoder(input_dim, hidden, latent_dim)
        self.decoder = PaperDecoder(latent_dim, hidden, input_shape, likelihood)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, *S) -> (reconstruction mean (B, *S) at z = mu, mu (B, dz), logvar (B, dz))."""
        mu, logvar = self.encoder(x)
        return self.decoder(mu), mu, logvar


class CelebAEncoder(nn.Module):
    """x: (B, 3, 64, 64) -> (mu, logvar), each (B, latent_dim).

    Five Conv2d(kernel 4, stride 2, padding 1) + BatchNorm2d + tanh blocks halve 64 -> 2
    pixels; the (512, 2, 2) features are flattened into the two linear heads.
    """

    def __init__(self, latent_dim: int = CELEBA_LATENT_DIM, channels: tuple[int, ...] = CELEBA_CHANNELS,
                 in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.Tanh()]
            c_in = c_out
        self.features = nn.Sequential(*layers, nn.Flatten())
        feature_dim = channels[-1] * (64 // 2 ** len(channels)) ** 2
        self.mu = nn.Linear(feature_dim, latent_dim)
        self.logvar = nn.Linear(feature_dim, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        return self.mu(h), self.logvar(h)


class CelebADecoder(nn.Module):
    """z: (B, latent_dim) -> mean image (B, 3, 64, 64).

    Linear to (512, 2, 2), then ConvTranspose2d(kernel 4, stride 2, padding 1) + BatchNorm2d +
    tanh blocks 512 -> 256 -> 128 -> 64 -> 32 (2 -> 32 pixels), a last transpose conv to
    64 x 64 x 3; Bernoulli mean = sigmoid, Gaussian mean = the raw output.
    """

    def __init__(self, latent_dim: int = CELEBA_LATENT_DIM, channels: tuple[int, ...] = CELEBA_CHANNELS,
                 out_channels: int = 3, likelihood: str = "gaussian"):
        super().__init__()
        _check_likelihood(likelihood)
        self.likelihood = likelihood
        self.side = 64 // 2 ** len(channels)
        self.top = channels[-1]
        self.project = nn.Linear(latent_dim, channels[-1] * self.side ** 2)
        layers: list[nn.Module] = [nn.BatchNorm1d(channels[-1] * self.side ** 2), nn.Tanh(),
                                   nn.Unflatten(1, (channels[-1], self.side, self.side))]
        reversed_channels = list(reversed(channels))
        for c_in, c_out in zip(reversed_channels[:-1], reversed_channels[1:], strict=True):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.BatchNorm2d(c_out),
                       nn.Tanh()]
        layers.append(nn.ConvTranspose2d(channels[0], out_channels, 4, stride=2, padding=1))
        self.body = nn.Sequential(*layers)

    def logits(self, z: Tensor) -> Tensor:
        """(B, latent_dim) -> (B, 3, 64, 64) pre-activations."""
        return self.body(self.project(z))

    def forward(self, z: Tensor) -> Tensor:
        logits = self.logits(z)
        return torch.sigmoid(logits) if self.likelihood == "bernoulli" else logits


class CelebAVAE(nn.Module):
    """The paper's appendix CelebA VAE (64 x 64 x 3, latent 128)."""

    def __init__(self, latent_dim: int = CELEBA_LATENT_DIM, channels: tuple[int, ...] = CELEBA_CHANNELS,
                 likelihood: str = "gaussian"):
        super().__init__()
        check_celeba_channels(channels)
        self.config = {"arch": "celeba-conv", "input_shape": list(CELEBA_SHAPE), "channels": list(channels),
                       "latent_dim": latent_dim, "likelihood": likelihood}
        self.encoder = CelebAEncoder(latent_dim, channels)
        self.decoder = CelebADecoder(latent_dim, channels, likelihood=likelihood)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, 3, 64, 64) -> (reconstruction mean, mu (B, dz), logvar (B, dz))."""
        mu, logvar = self.encoder(x)
        return self.decoder(mu), mu, logvar


def _build_paper_vae(config: dict) -> PaperVAE:
    return PaperVAE(tuple(config["input_shape"]), tuple(config["hidden"]), int(config["latent_dim"]),
                    config["likelihood"])


def _build_celeba_vae(config: dict) -> CelebAVAE:
    return CelebAVAE(int(config["latent_dim"]), tuple(config["channels"]), config["likelihood"])


@dataclass(frozen=True)
class Architecture:
    """One of the paper's VAEs: its sizes in the paper and how a model config (the ``config``
    attribute of the VAE, as stored in config.json) builds it.

    ``size_field`` is the config entry that sizes its layers: ``hidden`` (the MLP's widths) or
    ``channels`` (the conv widths); ``sizes`` is the paper's value of it.
    """

    name: str
    description: str  # how messages name it: "the {description}"
    input_shape: tuple[int, ...]  # (C, H, W) of the paper's images
    fixed_input: bool  # True: takes only ``input_shape`` (the conv blocks assume 64 x 64 x 3)
    size_field: str
    sizes: tuple[int, ...]
    latent_dim: int
    likelihood: str
    build: Callable[[dict], nn.Module]
    check_sizes: Callable[[tuple[int, ...]], None] | None = None  # raises ValueError on bad ``sizes``

    def paper_config(self) -> dict:
        """The paper's model config of this architecture (``build``'s argument, less ``arch``)."""
        return {"input_shape": list(self.input_shape), self.size_field: list(self.sizes),
                "latent_dim": self.latent_dim, "likelihood": self.likelihood}


# The one table of the paper's architectures: their sizes, defaults and builders.
ARCHITECTURES = {
    arch.name: arch
    for arch in (
        Architecture(name="paper-mlp", description="paper's MLP", input_shape=MNIST_SHAPE, fixed_input=False,
                     size_field="hidden", sizes=PAPER_HIDDEN, latent_dim=PAPER_LATENT_DIM,
                     likelihood="bernoulli", build=_build_paper_vae),
        Architecture(name="celeba-conv", description="celeba conv VAE", input_shape=CELEBA_SHAPE,
                     fixed_input=True, size_field="channels", sizes=CELEBA_CHANNELS,
                     latent_dim=CELEBA_LATENT_DIM, likelihood="gaussian", build=_build_celeba_vae,
                     check_sizes=check_celeba_channels),
    )
}
SIZE_FIELDS = tuple(arch.size_field for arch in ARCHITECTURES.values())


def build_model(config: dict) -> nn.Module:
    """A fresh VAE from its JSON config (the ``config`` attribute of either VAE)."""
    arch = ARCHITECTURES.get(config.get("arch"))
    if arch is None:
        raise ValueError(f"unknown architecture {config.get('arch')!r} in the model config; "
                         f"expected {' or '.join(repr(name) for name in ARCHITECTURES)}")
    return arch.build(config)
