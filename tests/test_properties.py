"""Property-based parity: random MLP encoders against the float64 dense reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pullgeom
from checks import assert_matches_reference, reference_top
from zoo import MODULE_ACTIVATIONS, TwoHeadEncoder, seeded


@st.composite
def mlp_cases(draw):
    n_in = draw(st.integers(2, 12))
    widths = tuple(draw(st.lists(st.integers(1, 10), min_size=1, max_size=3)))
    dz = draw(st.integers(1, 4))
    activation = draw(st.sampled_from(sorted(MODULE_ACTIVATIONS)))
    batchnorm = draw(st.booleans())
    after = draw(st.booleans())
    sigma = draw(st.sampled_from(["logvar", "logstd", "std", "softplus"]))
    stochastic = draw(st.booleans())
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return n_in, widths, dz, activation, batchnorm, after, sigma, stochastic, batch, seed


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_cases(), st.sampled_from(["torch", "autograd"]))
def test_random_mlps_match_the_dense_reference(case, backend):
    n_in, widths, dz, activation, batchnorm, after, sigma, stochastic, batch, seed = case
    encoder = seeded(TwoHeadEncoder(n_in, widths, dz, activation, batchnorm, after), seed).double()
    x = torch.randn(batch, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    r = min((2 if stochastic else 1) * dz, n_in, *widths)
    k = min(2, r)
    result = pullgeom.spectrum(encoder, x, k=k, sigma=sigma, stochastic=stochastic, backend=backend)
    assert result.all_eigenvalues.shape == (batch, r)
    values, vectors = reference_top(encoder, x, k, sigma=sigma, stochastic=stochastic)
    assert_matches_reference(result, values, vectors, rtol=1e-9, cos_min=1 - 1e-6)
