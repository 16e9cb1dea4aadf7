"""The autograd backend's choice between one vectorised reverse pass and the loop of VJPs:
whichever it takes, A must be the float64 reference's."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pullgeom
from pullgeom.backends.autograd_backend import vectorized_jacobian
from pullgeom.encoder_output import heads_function
from pullgeom.reference import dense_spectrum


class ScaleWithCheckedGradient(torch.autograd.Function):
    """y = 2x whose backward reads a Python number from the gradient, which vmap cannot batch."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        if not torch.isfinite(grad).all().item():
            raise FloatingPointError("non-finite gradient")
        return 2 * grad


class NoBatchingRule(nn.Module):
    """A conv-free encoder with an op whose backward vmap cannot batch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(12, 8)
        self.heads = nn.Linear(8, 6)

    def forward(self, x):
        h = ScaleWithCheckedGradient.apply(torch.tanh(self.body(x.flatten(1))))
        return self.heads(h).chunk(2, dim=1)


class ConvEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.norm = nn.GroupNorm(1, 2)
        self.heads = nn.Linear(2 * 4 * 3, 6)

    def encode(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        return self.heads(h.flatten(1)).chunk(2, dim=1)


def check_against_reference(encoder, x):
    result = pullgeom.spectrum(encoder, x, k=3, backend="autograd")
    reference, _ = dense_spectrum(encoder, x)
    top = reference[:, :1]
    assert torch.allclose(result.eigenvalues, reference[:, :3], rtol=0, atol=1e-10 * top.max().item())


def test_a_conv_free_module_vmap_cannot_batch_falls_back_to_the_loop():
    torch.manual_seed(0)
    encoder = NoBatchingRule().double().eval()
    with pytest.raises(RuntimeError):  # what the fallback is for
        vectorized_jacobian(heads_function(encoder, "logvar", True), torch.randn(3, 12, dtype=torch.float64))
    check_against_reference(NoBatchingRule().double().eval(), torch.randn(3, 12, dtype=torch.float64))


def test_a_bound_method_of_a_conv_module_is_seen_as_convolutional():
    torch.manual_seed(1)
    model = ConvEncoder().double().eval()
    check_against_reference(model.encode, torch.randn(3, 1, 4, 3, dtype=torch.float64))
