"""Shared benchmark fixtures: the paper's MNIST encoder and MNIST-like inputs.

The encoder is Khan & Storkey's 784-256-256-512-32 MLP with BatchNorm + tanh after every
hidden Linear and two 32 -> 32 heads (mu, log-variance), random weights, eval mode. BatchNorm
running statistics are randomised so the folded affine maps are not the identity.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pullgeom.paper.models import PaperEncoder

def paper_encoder(seed: int = 0, dtype: torch.dtype = torch.float32) -> PaperEncoder:
    """The paper's encoder with random weights and BatchNorm statistics, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    encoder = PaperEncoder()
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.1, 0.1, generator=generator)
    return encoder.eval().to(dtype)


def mnist_like(batch: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(batch, 1, 28, 28) in [0, 1], about 80% exact zeros (MNIST's background ratio)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 1, 28, 28, generator=generator)
    mask = torch.rand(batch, 1, 28, 28, generator=generator) < 0.2
    return (x * mask).to(dtype)


@pytest.fixture(scope="session")
def encoder() -> PaperEncoder:
    return paper_encoder()


@pytest.fixture(scope="session")
def inputs_256() -> torch.Tensor:
    return mnist_like(256)
