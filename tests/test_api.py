"""The public API: shapes, the factored metric, scores, and a clear error for every bad input."""

from __future__ import annotations

import math

import pytest
import torch

import pullgeom
from pullgeom.reference import dense_metric
from pullgeom.scores import von_neumann_entropy
from zoo import ConvEncoder, MLPDecoder, TwoHeadEncoder, seeded


@pytest.fixture
def encoder():
    return seeded(TwoHeadEncoder(10, (8, 6), 3), 0).double()


@pytest.fixture
def x():
    return torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_spectrum_fields_and_shapes(encoder, x):
    result = pullgeom.spectrum(encoder, x, k=3)
    assert result.eigenvalues.shape == (5, 3)
    assert result.eigenvectors.shape == (5, 3, 10)
    assert result.all_eigenvalues.shape == (5, 6)
    assert result.spectral_radius.shape == (5,) and result.entropy.shape == (5,)
    assert result.backend in {"torch", "cpp"}  # auto times the MLP backends and keeps the faster
    assert (result.eigenvalues[:, :-1] >= result.eigenvalues[:, 1:]).all()
    torch.testing.assert_close(result.spectral_radius, result.eigenvalues[:, 0])
    torch.testing.assert_close(result.eigenvectors.norm(dim=-1), torch.ones(5, 3, dtype=torch.float64))


def test_eigenvector_signs_are_canonical_and_deterministic(encoder, x):
    first = pullgeom.spectrum(encoder, x, k=3)
    second = pullgeom.spectrum(encoder, x.clone(), k=3)
    assert torch.equal(first.eigenvectors, second.eigenvectors)
    flat = first.eigenvectors.reshape(-1, 10)
    pivots = flat.gather(1, flat.abs().argmax(dim=1, keepdim=True))
    assert (pivots > 0).all()


def test_metric_factor_gram_matvec_dense(encoder, x):
    reference = dense_metric(encoder, x)
    for backend in ("torch", "autograd"):
        metric = pullgeom.metric(encoder, x, backend=backend)
        torch.testing.assert_close(metric.dense(), reference, rtol=1e-10, atol=1e-12)
        v = torch.randn(5, 10, dtype=torch.float64)
        torch.testing.assert_close(metric.matvec(v), (reference @ v.unsqueeze(-1)).squeeze(-1),
                                   rtol=1e-10, atol=1e-12)
        gram_values = torch.linalg.eigvalsh(metric.gram()).flip(-1)
        dense_values = torch.linalg.eigvalsh(reference).flip(-1)[:, : gram_values.shape[1]]
        torch.testing.assert_close(gram_values, dense_values, rtol=1e-9, atol=1e-12)


def test_metric_with_decoder_matches_dense(encoder, x):
    decoder = seeded(MLPDecoder(3, 5, 10), 1).double()
    reference = dense_metric(encoder, x, decoder=decoder)
    metric = pullgeom.metric(encoder, x, decoder=decoder, chunk_size=2)
    torch.testing.assert_close(metric.dense(), reference, rtol=1e-9, atol=1e-12)


def test_entropy_conventions_by_hand():
    isotropic = torch.tensor([[2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    assert von_neumann_entropy(isotropic, "max").item() == 0.0
    assert math.isclose(von_neumann_entropy(isotropic, "trace").item(), math.log(4), rel_tol=1e-12)
    spectrum = torch.tensor([[4.0, 1.0, 0.0, -1e-18]], dtype=torch.float64)
    expected_max = -(0.25 * math.log(0.25))  # p = (1, 0.25, 0, 0)
    expected_trace = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert math.isclose(von_neumann_entropy(spectrum, "max").item(), expected_max, rel_tol=1e-12)
    assert math.isclose(von_neumann_entropy(spectrum, "trace").item(), expected_trace, rel_tol=1e-12)
    assert von_neumann_entropy(torch.zeros(1, 3), "max").item() == 0.0


def test_scores_from_every_source(encoder, x):
    result = pullgeom.spectrum(encoder, x, k=2, entropy_norm="trace")
    from_spectrum = pullgeom.scores(result, entropy_norm="trace")
    from_encoder = pullgeom.scores(encoder, x, entropy_norm="trace")
    from_values = pullgeom.scores(result.all_eigenvalues, entropy_norm="trace")
    for s in (from_spectrum, from_encoder, from_values):
        torch.testing.assert_close(s.entropy, result.entropy)
        torch.testing.assert_close(s.spectral_radius, result.spectral_radius)
    lam = result.all_eigenvalues
    torch.testing.assert_close(from_spectrum.trace, lam.sum(-1))
    torch.testing.assert_close(from_spectrum.log_det, lam.log().sum(-1))
    assert (from_spectrum.rank == 6).all()


def test_empty_batch_gives_empty_spectrum(encoder):
    result = pullgeom.spectrum(encoder, torch.zeros(0, 10, dtype=torch.float64), k=2)
    assert result.eigenvalues.shape == (0, 2) and result.eigenvectors.shape == (0, 2, 10)
    assert result.all_eigenvalues.shape == (0, 6) and result.entropy.shape == (0,)


def test_half_precision_is_computed_in_float32():
    encoder = seeded(TwoHeadEncoder(10, (8,), 2), 2)
    x = torch.randn(3, 10)
    result = pullgeom.spectrum(encoder, x.half(), k=2)
    assert result.eigenvalues.dtype == torch.float32
    expected = pullgeom.spectrum(encoder, x.half().float(), k=2)
    torch.testing.assert_close(result.eigenvalues, expected.eigenvalues)


def test_backends_listing_says_why_not():
    infos = {info.name: info for info in pullgeom.backends()}
    assert infos["torch"].available and infos["autograd"].available
    for info in infos.values():
        assert info.available == (info.reason == "")


BAD_INPUTS = [
    ("nan", dict(x=lambda x: x.index_fill(0, torch.tensor([2]), float("nan"))), "NaN or inf.*index 2"),
    ("inf", dict(x=lambda x: x.index_fill(0, torch.tensor([0]), float("inf"))), "NaN or inf"),
    ("shape", dict(x=lambda x: x[:, :7]), "encoder rejected x of shape"),
    ("no batch dim", dict(x=lambda x: x[0]), "pass a batch"),
    ("integer", dict(x=lambda x: x.long()), "floating-point"),
    ("k zero", dict(k=0), "at least one"),
    ("k too big", dict(k=7), "k=7 exceeds r=6"),
    ("sigma", dict(sigma="variance"), "sigma='variance'"),
    ("entropy", dict(entropy_norm="shannon"), "entropy_norm='shannon'"),
    ("backend", dict(backend="fortran"), "backend='fortran' is unknown"),
    ("chunk", dict(chunk_size=0), "chunk_size"),
    ("decoder size", dict(decoder=lambda: seeded(MLPDecoder(4, 5, 10), 3).double()), "latents of size dz=3"),
]


@pytest.mark.parametrize("name, change, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error(encoder, x, name, change, message):
    kwargs = {"k": 2}
    for key, value in change.items():
        kwargs[key] = value(x) if key == "x" else (value() if callable(value) else value)
    inputs = kwargs.pop("x", x)
    with pytest.raises(ValueError, match=message):
        pullgeom.spectrum(encoder, inputs, **kwargs)


def test_training_mode_encoder_is_refused(x):
    encoder = TwoHeadEncoder(10, (8,), 3).double().train()
    with pytest.raises(ValueError, match=r"training mode.*call encoder.eval\(\)"):
        pullgeom.spectrum(encoder, x, k=2)


def test_dtype_mismatch_is_refused(x):
    with pytest.raises(ValueError, match="parameters are torch.float32"):
        pullgeom.spectrum(seeded(TwoHeadEncoder(10, (8,), 3), 4), x, k=2)


def test_forced_backend_that_cannot_serve_names_the_reason():
    encoder = seeded(ConvEncoder(side=4), 5)
    with pytest.raises(ValueError, match="backend 'torch' cannot serve.*Conv2d"):
        pullgeom.spectrum(encoder, torch.randn(2, 1, 4, 4), k=1, backend="torch")


class RunsOutOfMemoryAbove(torch.nn.Module):
    """Raises the real torch.OutOfMemoryError for batches above ``limit``, as a GPU would."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.batches = inner, limit, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("simulated allocation failure")
        return self.inner(x)


def test_out_of_memory_retries_once_with_half_the_chunk(encoder, x, caplog):
    wrapped = RunsOutOfMemoryAbove(encoder, limit=4)  # the 4-sample input probe fits
    with caplog.at_level("WARNING", logger="pullgeom"):
        result = pullgeom.spectrum(wrapped, x, k=2, chunk_size=5, backend="autograd")
    assert "retrying with chunk_size=2" in caplog.text
    sizes = [b for b in wrapped.batches if isinstance(b, int)]  # torch.fx's trace records a Proxy
    assert sizes == [4, 5, 2, 2, 1]  # probe, the failed chunk, then halves
    expected = pullgeom.spectrum(encoder, x, k=2, backend="autograd")
    torch.testing.assert_close(result.all_eigenvalues, expected.all_eigenvalues)
    with pytest.raises(torch.OutOfMemoryError):
        # 5 samples fail at chunk_size 20 and again at 10: a second failure is the caller's to fix.
        pullgeom.spectrum(RunsOutOfMemoryAbove(encoder, limit=4), x, k=2, chunk_size=20, backend="autograd")


def test_jacrev_recipe_baseline_matches(encoder, x):
    from pullgeom.reference import jacrev_spectrum

    values, vectors = jacrev_spectrum(encoder, x, k=2)
    result = pullgeom.spectrum(encoder, x, k=2)
    torch.testing.assert_close(values, result.all_eigenvalues, rtol=1e-9, atol=1e-12)
    cos = (vectors * result.eigenvectors).sum(-1).abs()
    torch.testing.assert_close(cos, torch.ones_like(cos))
