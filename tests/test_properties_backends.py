"""Property-based parity of the native backends, and determinism of every backend.

Hypothesis draws random MLP encoders (depth, widths, activation, BatchNorm placement, sigma
convention, stochastic or not, batch size) and checks ``backend="cpp"`` (and ``"triton"``
under TRITON_INTERPRET=1, which tests/conftest.py sets on machines without a GPU, with very
few examples: the interpreter is slow) against the float64
dense reference, as tests/test_properties.py does for torch/autograd. Every call must also
leave the encoder's weights untouched. Determinism: the same input twice gives bit-identical
results on CPU, for each backend. Hypothesis runs derandomized, so CI sees the same examples.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pullgeom
from checks import assert_matches_reference, reference_top
from pullgeom import ops
from zoo import MODULE_ACTIVATIONS, TwoHeadEncoder, seeded

needs_extension = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


@st.composite
def mlp_cases(draw):
    n_in = draw(st.integers(2, 12))
    widths = tuple(draw(st.lists(st.integers(1, 10), min_size=1, max_size=3)))
    dz = draw(st.integers(1, 4))
    activation = draw(st.sampled_from(sorted(MODULE_ACTIVATIONS)))
    batchnorm, after = draw(st.booleans()), draw(st.booleans())
    sigma = draw(st.sampled_from(["logvar", "logstd", "std", "softplus"]))
    stochastic = draw(st.booleans())
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    return n_in, widths, dz, activation, batchnorm, after, sigma, stochastic, batch, seed


def check_against_reference(case, backend: str) -> None:
    n_in, widths, dz, activation, batchnorm, after, sigma, stochastic, batch, seed = case
    encoder = seeded(TwoHeadEncoder(n_in, widths, dz, activation, batchnorm, after), seed).double()
    x = torch.randn(batch, n_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    weights = {name: value.clone() for name, value in encoder.state_dict().items()}
    r = min((2 if stochastic else 1) * dz, n_in, *widths)
    k = min(2, r)
    result = pullgeom.spectrum(encoder, x, k=k, sigma=sigma, stochastic=stochastic, backend=backend)
    assert result.backend == backend
    for name, value in encoder.state_dict().items():  # the encoder is the caller's: read, never written
        assert torch.equal(value, weights[name]), f"{backend} modified the encoder's {name}"
    assert result.all_eigenvalues.shape == (batch, r)
    values, vectors = reference_top(encoder, x, k, sigma=sigma, stochastic=stochastic)
    assert_matches_reference(result, values, vectors, rtol=1e-9, cos_min=1 - 1e-6)


@needs_extension
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_cases())
def test_cpp_matches_the_dense_reference(case):
    check_against_reference(case, "cpp")


@needs_triton
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_cases())
def test_triton_matches_the_dense_reference(case):
    check_against_reference(case, "triton")


@pytest.mark.parametrize("backend", ["torch", "autograd", "cpp", "triton", "lanczos"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_input_twice_gives_bit_identical_results(backend, dtype):
    if backend == "cpp" and ops.EXTENSION_ERROR is not None:
        pytest.skip(ops.EXTENSION_ERROR)
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    encoder = seeded(TwoHeadEncoder(20, (12, 8), 3, "elu", True, False), 3).to(dtype)
    x = torch.randn(5, 20, dtype=dtype, generator=torch.Generator().manual_seed(4))
    first = pullgeom.spectrum(encoder, x, k=3, backend=backend)
    second = pullgeom.spectrum(encoder, x.clone(), k=3, backend=backend)
    for field in ("eigenvalues", "eigenvectors", "all_eigenvalues", "spectral_radius", "entropy"):
        a, b = getattr(first, field), getattr(second, field)
        assert a.dtype == dtype and torch.equal(a, b), f"{backend} {field} differs between two calls"
    # Canonical signs: each eigenvector's largest-magnitude entry is positive.
    flat = first.eigenvectors.reshape(5, 3, -1)
    largest = flat.gather(-1, flat.abs().argmax(-1, keepdim=True))
    assert (largest > 0).all()
