"""pullgeom.kernels.native.plan_gram (the fused MLP chain) against the plain-torch chain and the float64
dense metric, over a grid of plans; bad input; opcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pullgeom.kernels import native as ops
from pullgeom.kernels.chain_rows import chain_rows
from pullgeom.encoder_output import SIGMA_CONVENTIONS
from pullgeom.tracing.activations import ACTIVATION_CODES
from pullgeom.tracing.mlp_plan import trace_plan
from pullgeom.reference import dense_metric

pytestmark = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.extension_with_cuda() else [])

ACTIVATIONS = {
    "tanh": nn.Tanh(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.2), "elu": nn.ELU(0.7),
    "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(),
    "sigmoid": nn.Sigmoid(), "softplus": nn.Softplus(beta=2.0, threshold=1.5), "identity": nn.Identity(),
}


class MLPEncoder(nn.Module):
    """Flatten -> [Linear (BatchNorm) act] per hidden width -> (mu, out2) heads."""

    def __init__(self, widths, latent, activation="tanh", batchnorm=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers.append(nn.Linear(width_in, width_out))
            if batchnorm:
                bn = nn.BatchNorm1d(width_out)
                with torch.no_grad():
                    bn.running_mean.uniform_(-0.3, 0.3)
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.2, 0.2)
                layers.append(bn)
            layers.append(ACTIVATIONS[activation])
        self.trunk = nn.Sequential(*layers)
        self.mu = nn.Linear(widths[-1], latent)
        self.out2 = nn.Linear(widths[-1], latent)

    def forward(self, x):
        h = self.trunk(x)
        return self.mu(h), self.out2(h)


def plan_and_inputs(widths, latent, activation="tanh", batchnorm=False, batch=5, dtype=torch.float64, seed=0):
    encoder = MLPEncoder(widths, latent, activation, batchnorm, seed).eval().to(dtype)
    with torch.no_grad():
        plan = trace_plan(encoder)
    x = torch.randn(batch, widths[0], dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    first = plan.layers[0].weight
    return encoder, plan, x, (first @ first.T).contiguous()


def random_latent_sqrt(batch, latent, dtype=torch.float64):
    generator = torch.Generator().manual_seed(7)
    root = torch.randn(batch, latent, latent, dtype=dtype, generator=generator)
    return (root @ root.mT / latent).contiguous()


# (widths, latent): bottleneck at the heads, a narrow middle layer (compression mid-chain),
# rows fewer than every width, a single hidden layer, odd sizes.
SHAPES = [((9, 7, 5, 3), 2), ((11, 6, 2, 8), 3), ((10, 13, 12), 2), ((7, 5), 4), ((6, 9, 4), 5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("widths,latent", SHAPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_matches_torch_chain_in_float64(widths, latent, activation, device):
    _, plan, x, first_gram = plan_and_inputs(widths, latent, activation, batchnorm=True)
    for stochastic in (True, False):
        left, gram = (t.cpu() for t in ops.plan_gram(plan.to(device), x.to(device), stochastic=stochastic))
        rows = chain_rows(plan, x, "logvar", stochastic, None)
        assert left.shape == rows.shape
        # Any left with the same left^T left is valid: compare the Gram of the factor's columns.
        expected = rows.mT @ rows
        scale = expected.abs().amax().clamp_min(1e-300)
        torch.testing.assert_close(left.mT @ left / scale, expected / scale, rtol=0, atol=1e-12)
        torch.testing.assert_close(gram, left @ first_gram @ left.mT, rtol=1e-12, atol=1e-12 * scale.item())
        torch.testing.assert_close(gram, gram.mT, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sigma", SIGMA_CONVENTIONS)
@pytest.mark.parametrize("with_latent", [False, True])
def test_matches_dense_metric(sigma, with_latent, device):
    encoder, plan, x, _ = plan_and_inputs((8, 6, 3, 5), 3, "elu", batchnorm=True, batch=4)
    if sigma == "std":  # the second head must be a valid std for the reference: shift it positive
        with torch.no_grad():
            encoder.out2.bias += 5.0
            plan = trace_plan(encoder)
    latent_sqrt = random_latent_sqrt(4, 3) if with_latent else None
    left, _ = ops.plan_gram(plan.to(device), x.to(device), sigma=sigma,
                            latent_sqrt=None if latent_sqrt is None else latent_sqrt.to(device))
    assert_left_factor_matches(left.cpu(), plan, encoder, x, sigma, latent_sqrt)


def assert_left_factor_matches(left, plan, encoder, x, sigma, latent_sqrt):
    """(left W_1)^T (left W_1) equals the float64 dense metric of ``encoder`` at ``x`` (dz = 3)."""
    factor = left @ plan.layers[0].weight
    metric = factor.mT @ factor
    if latent_sqrt is not None:
        # dense_metric takes G_z from a decoder; build K^{1/2} A directly from the dense Jacobians.
        jac = torch.func.vmap(torch.func.jacrev(lambda xi: torch.cat(_heads(encoder, xi, sigma))))(x)
        blocks = [latent_sqrt @ jac[:, :3], latent_sqrt @ jac[:, 3:]]
        expected = sum(b.mT @ b for b in blocks)
    else:
        expected = dense_metric(encoder, x, sigma=sigma)
    scale = expected.abs().amax()
    torch.testing.assert_close(metric / scale, expected / scale, rtol=0, atol=1e-12)


def _heads(encoder, xi, sigma):
    from pullgeom.encoder_output import sigma_from_output

    mu, out2 = encoder(xi.unsqueeze(0))
    return mu[0], sigma_from_output(out2, sigma)[0]


def test_float32_tracks_float64():
    _, plan, x, _ = plan_and_inputs((20, 16, 12, 8), 4, "tanh", batchnorm=True, batch=6)
    _, gram64 = ops.plan_gram(plan, x)
    _, gram32 = ops.plan_gram(plan.to(dtype=torch.float32), x.float())
    top64 = torch.linalg.eigvalsh(gram64)
    top32 = torch.linalg.eigvalsh(gram32.double())
    # float32 round-off is ~1e-7 relative to the largest eigenvalue; 1e-5 leaves margin, a wrong
    # derivative or a missing row changes eigenvalues by O(1).
    torch.testing.assert_close(top32 / top64[:, -1:], top64 / top64[:, -1:], rtol=0, atol=1e-5)


def test_zero_size_batch():
    _, plan, x, _ = plan_and_inputs((9, 7, 5), 2)
    left, gram = ops.plan_gram(plan, x[:0])
    assert gram.shape == (0, 4, 4) and left.shape == (0, 4, 7)


def _raw_args(plan, x, first_gram):
    layers = plan.layers
    return [x, [layer.weight for layer in layers], [layer.bias for layer in layers],
            [layer.activation_code for layer in layers], [float(layer.param) for layer in layers],
            [float(layer.threshold) for layer in layers], plan.mu_weight, plan.s_weight, plan.s_bias,
            0, True, None, first_gram]


@pytest.mark.parametrize("position,make_bad,message", [
    (0, lambda t: t.int(), "x must be float32 or float64"),
    (0, lambda t: t.repeat(1, 2)[:, ::2], "x must be contiguous"),
    (0, lambda t: t[:, :-1].contiguous(), r"weights\[0\] must be"),
    (6, lambda t: t.float(), "mu_weight has dtype"),
    (8, lambda t: t[:-1].contiguous(), "s_bias must have shape"),
    (12, lambda t: t[:-1].contiguous(), "first_gram must have shape"),
    # Codes are checked before any kernel runs: one past the last, and negative.
    (3, lambda codes: [len(ACTIVATION_CODES)] + codes[1:], rf"activations\[0\] = {len(ACTIVATION_CODES)} "),
    (3, lambda codes: codes[:-1] + [-1], r"activations\[1\] = -1 "),
    (9, lambda code: len(SIGMA_CONVENTIONS), f"sigma = {len(SIGMA_CONVENTIONS)} "),
    (9, lambda code: -1, "sigma = -1 "),
])
def test_bad_input_names_the_argument(position, make_bad, message):
    _, plan, x, first_gram = plan_and_inputs((9, 7, 5), 2)
    args = _raw_args(plan, x, first_gram)
    args[position] = make_bad(args[position])
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pullgeom.plan_gram(*args)


def test_bad_latent_sqrt_shape():
    _, plan, x, first_gram = plan_and_inputs((9, 7, 5), 2)
    args = _raw_args(plan, x, first_gram)
    args[11] = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype)
    with pytest.raises(RuntimeError, match="latent_sqrt must have shape"):
        torch.ops.pullgeom.plan_gram(*args)


@pytest.mark.parametrize("with_latent", [False, True])
def test_opcheck(with_latent):
    _, plan, x, first_gram = plan_and_inputs((9, 7, 6, 5), 3, "softplus", batchnorm=True, batch=3)
    args = _raw_args(plan, x, first_gram)
    args[11] = random_latent_sqrt(3, 3) if with_latent else None
    torch.library.opcheck(torch.ops.pullgeom.plan_gram.default, tuple(args))
