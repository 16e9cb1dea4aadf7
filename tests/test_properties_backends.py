"""Property-based parity of the native backends, and determinism of every backend.

Hypothesis draws the random MLP problems of tests/test_properties.py (depth, widths, activation,
BatchNorm placement, sigma convention, stochastic or not, flat or image-shaped inputs, with or
without a decoder, batch size) and checks ``backend="cpp"`` (and ``"triton"`` under
TRITON_INTERPRET=1, which tests/conftest.py sets on machines without a GPU, with very few
examples: the interpreter is slow) against the float64 dense reference with the direct backends'
tolerances there (every eigenvalue within 1e-9 of lambda_1). Every call must also leave the
encoder's and decoder's weights untouched. Determinism: the same input twice gives bit-identical
results on CPU, for each backend. Hypothesis runs derandomized, so CI sees the same examples.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import pullgeom
from pullgeom.kernels import native as ops
from test_properties import check_direct_backend, mlp_cases, mlp_problem
from zoo import TwoHeadEncoder, seeded

needs_extension = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


@needs_extension
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_cases())
def test_cpp_matches_the_dense_reference(case):
    check_direct_backend(mlp_problem(case), "cpp")


@needs_triton
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(mlp_cases())
def test_triton_matches_the_dense_reference(case):
    check_direct_backend(mlp_problem(case), "triton")


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
