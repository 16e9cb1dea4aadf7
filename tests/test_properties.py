"""Property-based parity: random MLP and conv encoders against the float64 dense reference.

Hypothesis draws MLPs (depth, widths, activation, BatchNorm placement, sigma convention,
stochastic or not, flat inputs (B, N) or images (B, C, H, W) through the encoder's Flatten, with
or without a decoder (with or without its own sigma head), batch size; checked on torch and
autograd and lanczos here (LANCZOS_REGRESSIONS: cases it once got wrong), on cpp and triton in tests/test_properties_backends.py) and small conv encoders on images (Conv2d with
random channels, kernel, stride and padding, optional BatchNorm2d, an activation, Flatten, then
two Linear heads or one Linear chunked in two; checked on autograd and lanczos, the backends that
serve encoders without a layer plan). Every call must also leave the encoder's and decoder's
weights untouched. Hypothesis runs derandomized, so CI sees the same examples every time;
examples are few (both property files run in about 40 s on 2 cores) because each is checked
against a dense N x N eigendecomposition.

Tolerances, float64: the direct backends (torch, autograd, cpp, triton) every eigenvalue within
1e-9 of lambda_1, well-separated eigenvectors to |cos| >= 1 - 1e-6 (round-off only) and the
entropy to 1e-7; lanczos the top-k within 1e-6 of lambda_1 (it stops at residuals of
1e-5 lambda_1, an eigenvalue error of about residual^2 / gap), eigenvectors to |cos| >= 0.999
where the gap is >= 1e-3 lambda_1 (angle about residual / gap), its other slots lower bounds
(Cauchy interlacing), the whole spectrum to 1e-6 and the entropy to 1e-4 for samples it marks
``complete`` (NaN entropy for the others), and its reported residuals the explicit
||G v - lambda v|| of the dense G."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import pullgeom
from checks import assert_matches_reference, reference_top, well_separated
from pullgeom.reference import dense_metric
from pullgeom.spectral_scores import von_neumann_entropy
from zoo import MODULE_ACTIVATIONS, MLPDecoder, TwoHeadEncoder, seeded

SIGMAS = ["logvar", "logstd", "std", "softplus"]


@st.composite
def mlp_cases(draw) -> dict:
    """A random MLP encoder problem; ``image`` (C, H, W) or None: x (B, C, H, W) through the
    encoder's Flatten, or x (B, n_in); ``decoder``: None, or the width of an MLP decoder (with a
    sigma head when ``gaussian``) whose latent metric G_z enters G."""
    image = draw(st.none() | st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3)))
    case = dict(
        image=image,
        n_in=image[0] * image[1] * image[2] if image else draw(st.integers(2, 12)),
        widths=tuple(draw(st.lists(st.integers(1, 10), min_size=1, max_size=3))),
        dz=draw(st.integers(1, 4)),
        activation=draw(st.sampled_from(sorted(MODULE_ACTIVATIONS))),
        batchnorm=draw(st.booleans()), after=draw(st.booleans()),
        sigma=draw(st.sampled_from(SIGMAS)),
        stochastic=draw(st.booleans()),
        decoder=draw(st.none() | st.integers(1, 6)),
        gaussian=draw(st.booleans()),
        batch=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**16)),
    )
    return case


def mlp_problem(case: dict):
    """(encoder, x (B, *S), k, r, spectrum kwargs) for an ``mlp_cases`` draw, float64."""
    encoder = seeded(TwoHeadEncoder(case["n_in"], case["widths"], case["dz"], case["activation"],
                                    case["batchnorm"], case["after"]), case["seed"]).double()
    shape = case["image"] or (case["n_in"],)
    x = torch.randn(case["batch"], *shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(case["seed"]))
    r = min((2 if case["stochastic"] else 1) * case["dz"], case["n_in"], *case["widths"])
    kwargs = dict(sigma=case["sigma"], stochastic=case["stochastic"])
    if case["decoder"] is not None:
        kwargs["decoder"] = seeded(MLPDecoder(case["dz"], case["decoder"], 5, gaussian=case["gaussian"]),
                                   case["seed"] + 1).double()
    return encoder, x, min(2, r), r, kwargs


class ConvHeads(nn.Module):
    """Conv2d, [BatchNorm2d], activation, Flatten; then two Linear heads, or one chunked in two."""

    def __init__(self, in_channels, height, width, channels, kernel, stride, padding, batchnorm,
                 activation, dz, one_head):
        super().__init__()
        norm = [nn.BatchNorm2d(channels)] if batchnorm else []
        conv = nn.Conv2d(in_channels, channels, kernel, stride=stride, padding=padding)
        self.body = nn.Sequential(conv, *norm, MODULE_ACTIVATIONS[activation](), nn.Flatten())
        out_height, out_width = ((side + 2 * padding - kernel) // stride + 1 for side in (height, width))
        features = channels * out_height * out_width
        self.one_head = one_head
        self.heads = nn.ModuleList([nn.Linear(features, 2 * dz)] if one_head else
                                   [nn.Linear(features, dz), nn.Linear(features, dz)])

    def forward(self, x):
        h = self.body(x)
        if self.one_head:
            return self.heads[0](h).chunk(2, dim=-1)
        return self.heads[0](h), self.heads[1](h)


@st.composite
def conv_cases(draw):
    in_channels = draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    height, width = draw(st.integers(kernel, 6)), draw(st.integers(kernel, 6))
    channels = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 1))
    batchnorm = draw(st.booleans())
    activation = draw(st.sampled_from(sorted(MODULE_ACTIVATIONS)))
    dz = draw(st.integers(1, 3))
    one_head = draw(st.booleans())
    sigma = draw(st.sampled_from(SIGMAS))
    stochastic = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    return (in_channels, height, width, channels, kernel, stride, padding, batchnorm, activation, dz,
            one_head, sigma, stochastic, batch, seed)


def conv_problem(case):
    """(encoder, x (B, C, H, W), k, r, spectrum kwargs) for a ``conv_cases`` draw, float64."""
    (in_channels, height, width, channels, kernel, stride, padding, batchnorm, activation, dz, one_head,
     sigma, stochastic, batch, seed) = case
    encoder = seeded(ConvHeads(in_channels, height, width, channels, kernel, stride, padding, batchnorm,
                               activation, dz, one_head), seed).double()
    generator = torch.Generator().manual_seed(seed)
    for bn in encoder.modules():  # zoo.seeded gives BatchNorm1d statistics only
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.float64) * 0.3)
            bn.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
    x = torch.randn(batch, in_channels, height, width, dtype=torch.float64, generator=generator)
    r = min((2 if stochastic else 1) * dz, x[0].numel())  # no layer plan: the bound is 2dz and N
    return encoder, x, min(3, r), r, dict(sigma=sigma, stochastic=stochastic)


def spectrum_leaving_weights_alone(encoder, x, k, backend, **kwargs):
    models = {"encoder": encoder, "decoder": kwargs.get("decoder")}
    weights = {(role, name): value.clone() for role, model in models.items() if model is not None
               for name, value in model.state_dict().items()}
    result = pullgeom.spectrum(encoder, x, k=k, backend=backend, **kwargs)
    assert result.backend == backend
    for (role, name), value in weights.items():  # the models are the caller's: read, never written
        assert torch.equal(models[role].state_dict()[name], value), f"{backend} modified the {role}'s {name}"
    return result


def check_direct_backend(problem, backend: str) -> None:
    """A direct backend (factor, small Gram, eigh): every eigenvalue to float64 round-off."""
    encoder, x, k, r, kwargs = problem
    result = spectrum_leaving_weights_alone(encoder, x, k, backend, **kwargs)
    assert result.all_eigenvalues.shape == (x.shape[0], r) and result.complete.all()
    assert result.eigenvectors.shape == (x.shape[0], k, *x.shape[1:])
    values, vectors = reference_top(encoder, x, k, **kwargs)
    assert_matches_reference(result, values, vectors, rtol=1e-9, cos_min=1 - 1e-6)
    expected = von_neumann_entropy(values[:, :r], "max")
    torch.testing.assert_close(result.entropy, expected, rtol=1e-7, atol=1e-7)


def check_lanczos(problem) -> None:
    """The matrix-free backend to its own tolerance (module docstring)."""
    encoder, x, k, r, kwargs = problem
    batch = x.shape[0]
    result = spectrum_leaving_weights_alone(encoder, x, k, "lanczos", **kwargs)
    assert result.all_eigenvalues.shape == (batch, r) and result.residuals.shape == (batch, k)
    metric = dense_metric(encoder, x, **kwargs)
    values, vectors = torch.linalg.eigh(metric)
    values, vectors = values.flip(-1), vectors.flip(-1)[:, :, :k].transpose(1, 2)
    scale = values[:, :1].clamp_min(1e-300)
    # Below its resolution (residual 1e-5 lambda_1) Lanczos cannot tell an eigenvalue from 0: a
    # converged Ritz value there may approximate a zero eigenvalue instead (seen: 1.5e-11 for
    # 5e-10 with lambda_1 = 3.6e-5), so those are held to 1e-4 of lambda_1, the rest to 1e-6.
    error = (result.eigenvalues - values[:, :k]).abs() / scale
    allowed = torch.where(values[:, :k] >= 1e-4 * scale, 1e-6, 1e-4)
    assert (error <= allowed).all(), f"top-{k} eigenvalues off by {error.max().item():.2e} of lambda_1"
    above = ((result.all_eigenvalues - values[:, :r]) / scale).max().item()
    assert above <= 1e-9, f"a slot exceeds its eigenvalue by {above:.1e} of lambda_1"
    assert (result.all_eigenvalues >= 0).all()
    # A sample marked complete has its whole spectrum and a true entropy; the others NaN entropy.
    done = result.complete
    whole = ((result.all_eigenvalues - values[:, :r]).abs() / scale)[done]
    assert whole.numel() == 0 or whole.max() <= 1e-6, f"a complete spectrum is off by {whole.max():.2e}"
    assert torch.equal(result.entropy.isnan(), ~done)
    torch.testing.assert_close(result.entropy[done], von_neumann_entropy(values[:, :r], "max")[done],
                               rtol=1e-4, atol=1e-4)
    got = result.eigenvectors.reshape(batch, k, -1)
    mask = well_separated(values, k, 1e-3)
    cos = (got * vectors).sum(-1).abs()
    assert (cos[mask] >= 0.999).all(), f"eigenvector |cos| {cos[mask].min().item():.6f} < 0.999"
    columns = got.transpose(1, 2)
    explicit = (metric @ columns - columns * result.eigenvalues.unsqueeze(1)).norm(dim=1)
    torch.testing.assert_close(result.residuals, explicit, rtol=0, atol=1e-10 * scale.max().item())


EXAMPLES = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=40, **EXAMPLES)
@given(mlp_cases(), st.sampled_from(["torch", "autograd"]))
def test_random_mlps_match_the_dense_reference(case, backend):
    check_direct_backend(mlp_problem(case), backend)


# Cases where backend="lanczos" by name with a decoder used to miss lambda_2, found by the
# property test below (the first as generated, the others as hypothesis shrank them): with block
# size 1 and k = 2 a sample's second Ritz pair met the residual tolerance while approximating one
# of G's zero eigenvalues, and lambda_2 (4e-4 to 1.5e-3 of lambda_1) was never found. Fixed: a
# k-th Ritz value below the resolution (tol lambda_1) no longer certifies convergence.
LANCZOS_REGRESSIONS = {
    "generated": dict(image=None, n_in=4, widths=(8,), dz=4, activation="elu", batchnorm=True, after=False,
                      sigma="logstd", stochastic=False, decoder=2, gaussian=True, batch=4, seed=13862),
    "shrunk": dict(image=None, n_in=4, widths=(8,), dz=4, activation="elu", batchnorm=True, after=False,
                   sigma="logvar", stochastic=False, decoder=2, gaussian=True, batch=4, seed=13862),
    "image": dict(image=(1, 3, 3), n_in=9, widths=(5, 4), dz=4, activation="silu", batchnorm=True,
                  after=False, sigma="logvar", stochastic=False, decoder=3, gaussian=False, batch=4,
                  seed=15452),
}


@settings(max_examples=20, **EXAMPLES)
@given(mlp_cases())
def test_random_mlps_on_lanczos_match_the_dense_reference(case):
    check_lanczos(mlp_problem(case))


@pytest.mark.parametrize("name", sorted(LANCZOS_REGRESSIONS))
def test_lanczos_with_a_decoder_finds_a_small_second_eigenvalue(name):
    check_lanczos(mlp_problem(LANCZOS_REGRESSIONS[name]))


@settings(max_examples=20, **EXAMPLES)
@given(conv_cases())
def test_random_conv_encoders_on_autograd_match_the_dense_reference(case):
    check_direct_backend(conv_problem(case), "autograd")


@settings(max_examples=20, **EXAMPLES)
@given(conv_cases())
def test_random_conv_encoders_on_lanczos_match_the_dense_reference(case):
    check_lanczos(conv_problem(case))
