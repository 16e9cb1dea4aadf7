"""Every pure-Python backend against the float64 brute-force dense reference."""

from __future__ import annotations

import pytest
import torch

import pullgeom
from checks import assert_matches_reference, reference_top
from zoo import (ChunkHeadEncoder, ConvEncoder, MLPDecoder, NormalEncoder, TwoHeadEncoder,
                 seeded)

BACKENDS = ["torch", "autograd"]


def inputs(batch, *shape, seed=0):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


ARCHITECTURES = [
    # (name, n_in, widths, dz, activation, batchnorm, bn_after_activation)
    ("tanh-bn", 11, (9, 7), 3, "tanh", True, False),
    ("relu", 10, (8, 8), 2, "relu", False, False),
    ("leaky-bn-after", 9, (7,), 3, "leaky_relu", True, True),
    ("elu", 8, (6, 5, 6), 2, "elu", True, False),
    ("gelu", 7, (9,), 3, "gelu", False, False),
    ("gelu-tanh", 7, (5, 6), 2, "gelu_tanh", True, False),
    ("silu", 10, (6,), 4, "silu", True, False),
    ("sigmoid", 9, (8, 4), 3, "sigmoid", False, False),
    ("softplus", 8, (7,), 3, "softplus", True, False),
    ("identity", 12, (5,), 2, "identity", False, False),
    ("narrow-middle", 13, (10, 2, 10), 4, "tanh", True, False),
    ("wide-heads", 6, (9,), 5, "tanh", False, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_mlp_float64_matches_dense_reference(arch, backend):
    name, n_in, widths, dz, activation, batchnorm, after = arch
    encoder = seeded(TwoHeadEncoder(n_in, widths, dz, activation, batchnorm, after, dropout=True), 1).double()
    x = inputs(4, n_in).double()
    k = min(3, 2 * dz, min(widths))
    result = pullgeom.spectrum(encoder, x, k=k, backend=backend)
    assert result.backend == backend
    values, vectors = reference_top(encoder, x, k)
    assert_matches_reference(result, values, vectors, rtol=1e-10, cos_min=1 - 1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", ["logvar", "logstd", "std", "softplus"])
@pytest.mark.parametrize("stochastic", [True, False])
def test_sigma_conventions_and_stochastic_flag(backend, sigma, stochastic):
    encoder = seeded(TwoHeadEncoder(10, (8, 6), 3), 2).double()
    x = inputs(3, 10, seed=1).double()
    result = pullgeom.spectrum(encoder, x, k=2, sigma=sigma, stochastic=stochastic, backend=backend)
    values, vectors = reference_top(encoder, x, 2, sigma=sigma, stochastic=stochastic)
    assert_matches_reference(result, values, vectors, rtol=1e-10, cos_min=1 - 1e-8)
    assert result.all_eigenvalues.shape[1] == (6 if stochastic else 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [False, True])
def test_single_chunked_head_custom_forward(backend, split):
    encoder = seeded(ChunkHeadEncoder(12, 7, 3, split=split), 3).double()
    x = inputs(3, 3, 4, seed=2).double()
    result = pullgeom.spectrum(encoder, x, k=4, backend=backend)
    values, vectors = reference_top(encoder, x, 4)
    assert result.eigenvectors.shape == (3, 4, 3, 4)
    assert_matches_reference(result, values, vectors, rtol=1e-10, cos_min=1 - 1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gaussian_decoder", [False, True])
def test_decoder_metric(backend, gaussian_decoder):
    encoder = seeded(TwoHeadEncoder(9, (8,), 3), 4).double()
    decoder = seeded(MLPDecoder(3, 6, 9, gaussian=gaussian_decoder), 5).double()
    x = inputs(3, 9, seed=3).double()
    result = pullgeom.spectrum(encoder, x, k=3, decoder=decoder, backend=backend)
    values, vectors = reference_top(encoder, x, 3, decoder=decoder)
    assert_matches_reference(result, values, vectors, rtol=1e-10, cos_min=1 - 1e-8)


def test_conv_encoder_runs_on_autograd_and_matches():
    encoder = seeded(ConvEncoder(side=5, channels=2, dz=3), 6).double()
    x = inputs(3, 1, 5, 5, seed=4).double()
    result = pullgeom.spectrum(encoder, x, k=4)
    assert result.backend == "autograd"
    values, vectors = reference_top(encoder, x, 4)
    assert_matches_reference(result, values, vectors, rtol=1e-10, cos_min=1 - 1e-8)
    with pytest.raises(ValueError, match="not a recognised MLP"):
        pullgeom.spectrum(encoder, x, k=2, backend="torch")


def test_normal_distribution_output():
    encoder = seeded(NormalEncoder(8, 6, 2), 7).double()
    x = inputs(3, 8, seed=5).double()
    result = pullgeom.spectrum(encoder, x, k=2)
    values, vectors = reference_top(encoder, x, 2)
    assert_matches_reference(result, values, vectors, rtol=1e-10, cos_min=1 - 1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_top_k_within_1e4_of_float64(backend):
    encoder = seeded(TwoHeadEncoder(30, (24, 16), 6), 8)
    x = inputs(6, 30, seed=6)
    result = pullgeom.spectrum(encoder, x, k=5, backend=backend)
    assert result.eigenvalues.dtype == torch.float32
    values, vectors = reference_top(encoder, x, 5)
    rel = ((result.eigenvalues.double() - values[:, :5]).abs() / values[:, :5]).max().item()
    assert rel <= 1e-4, f"float32 top-5 eigenvalues {rel:.2e} relative from float64"


def test_backends_agree_and_chunking_is_invisible():
    encoder = seeded(TwoHeadEncoder(16, (12, 8), 4), 9).double()
    x = inputs(11, 16, seed=7).double()
    whole = pullgeom.spectrum(encoder, x, k=4, backend="torch")
    for backend, chunk in (("torch", 3), ("autograd", 4), ("autograd", None)):
        other = pullgeom.spectrum(encoder, x, k=4, backend=backend, chunk_size=chunk)
        torch.testing.assert_close(other.all_eigenvalues, whole.all_eigenvalues, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(other.eigenvectors, whole.eigenvectors, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(other.entropy, whole.entropy, rtol=1e-10, atol=1e-12)


def test_rank_follows_the_narrowest_layer():
    encoder = seeded(TwoHeadEncoder(13, (10, 2, 10), 4), 10).double()
    x = inputs(2, 13, seed=8).double()
    for backend in BACKENDS:
        result = pullgeom.spectrum(encoder, x, k=2, backend=backend)
        assert result.all_eigenvalues.shape == (2, 2)
    with pytest.raises(ValueError, match="r=2"):
        pullgeom.spectrum(encoder, x, k=3)
