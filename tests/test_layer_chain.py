"""Hand-written layer-chain Jacobian products (``pullgeom.tracing.layer_chain``) against torch.func.

Each encoder variant is traced, and ``push`` (J V) and ``pull`` (J^T U) are compared in float64
with the dense per-sample Jacobian of the encoder's heads from ``torch.func.jacrev``: any wrong
stride, padding, scale or derivative shows up far above the 1e-12 tolerance (round-off here is
~1e-15 of the entries).
"""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import jacrev, vmap
from zoo import randomise_batchnorm, seeded

from pullgeom.api import build_problem
from pullgeom.backends.base import Problem
from pullgeom.backends.lanczos_backend import RecordedJacobian, jacobian_products
from pullgeom.encoder_output import mean_and_std
from pullgeom.tracing.layer_chain import LayerChainJacobian, NotAChain
from pullgeom.tracing import encoder_trace
from pullgeom.tracing.fx_trace import trace_chains

ACTIVATIONS = {
    "tanh": torch.tanh, "relu": F.relu, "leaky_relu": lambda h: F.leaky_relu(h, 0.1), "elu": F.elu,
    "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "softplus": F.softplus,
}
FLATTENS = {
    "flatten(1)": lambda h: h.flatten(1),
    "nn.Flatten": nn.Flatten(),
    "view(B, -1)": lambda h: h.view(h.shape[0], -1),
}


class ConvNet(nn.Module):
    """conv -> BatchNorm2d -> act -> conv -> act -> flatten -> Linear heads (chunked or two)."""

    def __init__(self, conv: dict, activation: str = "tanh", flatten: str = "flatten(1)",
                 two_heads: bool = False, dz: int = 3, side: int = 7):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, **conv)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 2, stride=1, padding=1, groups=2)
        self.act = ACTIVATIONS[activation]
        self.flat = FLATTENS[flatten]
        with torch.no_grad():
            width = self.features(torch.zeros(1, 2, side, side)).shape[1]
        self.two_heads = two_heads
        if two_heads:
            self.mu, self.s = nn.Linear(width, dz), nn.Linear(width, dz)
        else:
            self.fc = nn.Linear(width, 2 * dz)

    def features(self, x):
        return self.flat(self.act(self.conv2(self.act(self.bn(self.conv1(x))))))

    def forward(self, x):
        h = self.features(x)
        if self.two_heads:
            return self.mu(h), self.s(h)
        mu, out2 = self.fc(h).chunk(2, dim=-1)
        return mu, out2


CONVS = {
    "stride 2, padding 1": dict(stride=2, padding=1),
    "same": dict(padding="same"),
    "valid, dilation 2": dict(padding="valid", dilation=2),
    "no bias, stride (2, 1), padding (1, 0)": dict(stride=(2, 1), padding=(1, 0), bias=False),
    "groups 2": dict(padding=1, groups=2),
}


def build(seed: int = 0, **kwargs) -> nn.Module:
    net = ConvNet(**{"conv": CONVS["stride 2, padding 1"], **kwargs})
    seeded(net, seed)
    randomise_batchnorm(net, torch.Generator().manual_seed(seed + 100))
    return net.double().eval()


def inputs(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def dense_jacobian(encoder, x, sigma, stochastic) -> torch.Tensor:
    """(B, m, N): the heads' Jacobian per sample, by torch.func."""

    def heads(sample):
        mu, std = mean_and_std(encoder, sample.unsqueeze(0), sigma)
        return (torch.cat([mu, std], dim=1) if stochastic else mu).squeeze(0)

    return vmap(jacrev(heads))(x).flatten(2)


def assert_products_match(encoder, x, sigma="logvar", stochastic=True, copies=2):
    chain = LayerChainJacobian(trace_chains(encoder), x, sigma, stochastic)
    jac = dense_jacobian(encoder, x, sigma, stochastic)  # (B, m, N)
    generator = torch.Generator().manual_seed(5)
    index = torch.tensor([2, 0])  # a subset, out of order: products follow ``index``
    v = torch.randn(copies, 2, jac.shape[2], dtype=x.dtype, generator=generator)
    u = torch.randn(copies, 2, jac.shape[1], dtype=x.dtype, generator=generator)
    sub = jac[index]
    scale = jac.abs().max().item()
    torch.testing.assert_close(chain.push(v, index), torch.einsum("bmn,cbn->cbm", sub, v),
                               rtol=0, atol=1e-12 * scale * jac.shape[2])
    torch.testing.assert_close(chain.pull(u, index), torch.einsum("bmn,cbm->cbn", sub, u),
                               rtol=0, atol=1e-12 * scale * jac.shape[1])
    mu, std = mean_and_std(encoder, x, sigma)
    torch.testing.assert_close(chain.out, torch.cat([mu, std], 1) if stochastic else mu, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("conv", list(CONVS))
def test_convolution_variants(conv):
    assert_products_match(build(conv=CONVS[conv]), inputs())


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activations(activation):
    assert_products_match(build(activation=activation), inputs())


@pytest.mark.parametrize("flatten", list(FLATTENS))
@pytest.mark.parametrize("two_heads", [False, True])
def test_flatten_forms_and_heads(flatten, two_heads):
    assert_products_match(build(flatten=flatten, two_heads=two_heads), inputs())


@pytest.mark.parametrize("sigma", ["logvar", "logstd", "std", "softplus"])
def test_sigma_conventions(sigma):
    assert_products_match(build(two_heads=True), inputs(), sigma=sigma)


def test_mean_head_only():
    assert_products_match(build(), inputs(), stochastic=False)


def test_push_and_pull_are_adjoint():
    """<J v, u> = <v, J^T u> per sample, whatever the layer."""
    x = inputs(2)
    chain = LayerChainJacobian(trace_chains(build(conv=CONVS["same"], activation="gelu")), x, "logvar", True)
    index = torch.arange(2)
    generator = torch.Generator().manual_seed(3)
    v = torch.randn(1, 2, x[0].numel(), dtype=x.dtype, generator=generator)
    u = torch.randn(1, 2, chain.out.shape[1], dtype=x.dtype, generator=generator)
    left = (chain.push(v, index) * u).sum(-1)
    right = (v * chain.pull(u, index)).sum(-1)
    torch.testing.assert_close(left, right, rtol=1e-12, atol=0)


def problem_for(encoder, x) -> Problem:
    return build_problem(encoder, x)[0]


def test_unsupported_padding_mode_falls_back_to_recorded_graphs():
    """padding_mode='reflect' has no hand-written Jacobian here: the products come from
    torch.func graphs instead, and still match the dense Jacobian."""
    encoder = build()
    encoder.conv1.padding_mode = "reflect"
    x = inputs()
    with pytest.raises(NotAChain, match="padding_mode='reflect'"):
        LayerChainJacobian(trace_chains(encoder), x, "logvar", True)
    jacobian = jacobian_products(problem_for(encoder, x), x)
    assert isinstance(jacobian, RecordedJacobian)
    index = torch.arange(3)
    v = torch.randn(1, 3, x[0].numel(), dtype=x.dtype, generator=torch.Generator().manual_seed(4))
    expected = torch.einsum("bmn,cbn->cbm", dense_jacobian(encoder, x, "logvar", True), v)
    torch.testing.assert_close(jacobian.push(v, index), expected, rtol=1e-10, atol=1e-12)


def test_traceable_encoders_use_the_layer_chain():
    x = inputs()
    assert isinstance(jacobian_products(problem_for(build(), x), x), LayerChainJacobian)
    assert isinstance(jacobian_products(problem_for(build(), x), x, products="autograd"), RecordedJacobian)
    with pytest.raises(ValueError, match="products='fast'"):
        jacobian_products(problem_for(build(), x), x, products="fast")


def test_chain_that_does_not_reproduce_the_encoder_is_not_used(monkeypatch):
    """The guard against a traced chain that misreads the encoder: when its forward disagrees
    with the encoder's on the probe samples, the op tape (``RecordedJacobian``) serves instead."""
    monkeypatch.setattr(encoder_trace, "outputs_agree", lambda ours, theirs: False)
    x = inputs()
    assert isinstance(jacobian_products(problem_for(build(), x), x), RecordedJacobian)
