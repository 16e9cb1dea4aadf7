"""Backend ``lanczos`` (matrix-free JVP/VJP Lanczos) against the float64 dense reference.

Small conv encoders (8 x 8 x 1 inputs, N = 64) keep the dense N x N reference cheap. Tolerances:
the issue's 1e-4 relative on the top 5 in float32 (float32 products carry ~1e-6 relative
round-off, the convergence tolerance 1e-5 an eigenvalue error ~1e-10 / gap); 1e-9 in float64,
where only T's assembly could account for an error that size.
"""

from __future__ import annotations

import runpy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_lanczos import single_thread  # noqa: F401 (autouse fixture)
from torch.utils._python_dispatch import TorchDispatchMode
from zoo import ConvEncoder, MLPDecoder, seeded

import pullgeom
from pullgeom.api import build_problem
from pullgeom.backends import choose_backend
from pullgeom.backends.autograd_backend import encoder_jacobian
from pullgeom.backends.lanczos_backend import LanczosBackend, PullbackOperator, lanczos_mode
from pullgeom.paper.models import CelebAEncoder
from pullgeom.reference import dense_metric, dense_spectrum

SIDE = 8


@pytest.fixture(autouse=True, params=["layer chain", "op tape"])
def products(request, monkeypatch):
    """Every test runs on both ways of taking J v and J^T u: the hand-written layer chain (what
    these traceable conv encoders get) and the op tape (any other encoder)."""
    if request.param == "op tape":
        lanczos_module = pullgeom.backends.lanczos_backend
        layer_chain_or_graphs = lanczos_module.jacobian_products
        monkeypatch.setattr(lanczos_module, "jacobian_products",
                            lambda problem, x, products="auto": layer_chain_or_graphs(problem, x, "autograd"))
    return request.param


def conv_encoder(dz: int = 6, seed: int = 0, dtype=torch.float64):
    return seeded(ConvEncoder(side=SIDE, channels=3, dz=dz), seed).to(dtype)


def inputs(batch: int = 3, seed: int = 1, dtype=torch.float64):
    return torch.rand(batch, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def problem_for(encoder, x, stochastic=True, decoder=None):
    return build_problem(encoder, x, stochastic=stochastic, decoder=decoder)[0]


def assert_top_matches(result, encoder, x, k, rtol, **kwargs):
    values, vectors = dense_spectrum(encoder, x, **kwargs)
    scale = values[:, :1]
    error = ((result.eigenvalues.double() - values[:, :k]).abs() / scale).max().item()
    assert error <= rtol, f"top-{k} eigenvalues off by {error:.2e} relative to lambda_1"
    got = result.eigenvectors.reshape(x.shape[0], k, -1).double()
    cos = (got * vectors[:, :, :k].transpose(1, 2)).sum(-1).abs()
    gaps = (values[:, :k] - values[:, 1:k + 1]).min(dim=1).values / scale[:, 0]
    assert (gaps > 1e-3).all(), "test setup: pick an encoder whose top-k eigenvalues are separated"
    assert cos.min() > 1 - 1e3 * rtol, cos


@pytest.mark.parametrize("stochastic", [True, False])
def test_parity_float64(stochastic):
    encoder, x = conv_encoder(), inputs()
    result = pullgeom.spectrum(encoder, x, k=5, backend="lanczos", stochastic=stochastic)
    assert result.backend == "lanczos"
    assert_top_matches(result, encoder, x, 5, 1e-9, stochastic=stochastic)
    # The backend's stopping rule (tol = 1e-5 relative residual), checked on explicit residuals.
    assert (result.residuals <= 1e-5 * result.spectral_radius.unsqueeze(1)).all()


def test_parity_float32():
    encoder, x = conv_encoder(dz=12, seed=2), inputs(4, seed=3)
    result = pullgeom.spectrum(encoder.float(), x.float(), k=5, backend="lanczos")
    assert result.eigenvalues.dtype == torch.float32
    assert_top_matches(result, encoder, x, 5, 1e-4)


def test_all_eigenvalues_are_lower_bounds():
    wide, xw = conv_encoder(dz=20, seed=6), inputs(2, seed=7)  # r = 40, stops long before
    run = LanczosBackend().run(problem_for(wide, xw), xw, 3)
    assert not run.exhausted.any() and (run.steps < 40).all()
    reference = dense_spectrum(wide, xw)[0]
    slots = pullgeom.spectrum(wide, xw, k=3, backend="lanczos").all_eigenvalues
    assert (slots <= reference[:, :40] * (1 + 1e-9) + 1e-15).all()  # Cauchy interlacing


def test_decoder_metric_matrix_free():
    encoder, x = conv_encoder(dz=5, seed=8), inputs(2, seed=9)
    decoder = seeded(MLPDecoder(5, 12, 20, gaussian=True), 10).double()
    metric = dense_metric(encoder, x, decoder=decoder)
    vectors = torch.randn(2, 64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    operator = PullbackOperator(problem_for(encoder, x, decoder=decoder), x)
    everyone = torch.arange(2)
    torch.testing.assert_close(operator.matvec(vectors, everyone), metric @ vectors, rtol=1e-10, atol=1e-13)
    result = pullgeom.spectrum(encoder, x, k=4, backend="lanczos", decoder=decoder)
    assert_top_matches(result, encoder, x, 4, 1e-9, decoder=decoder)


def head_jacobian(encoder, x, stochastic=True):
    """Per-sample Jacobian of [mu; sigma] (or mu) by torch.autograd.functional, float64: (B, m, N)."""
    def heads(xi):
        mu, logvar = encoder(xi.unsqueeze(0))
        parts = [mu, torch.exp(logvar / 2)] if stochastic else [mu]
        return torch.cat(parts, dim=1).reshape(-1)

    return torch.stack([torch.autograd.functional.jacobian(heads, xi).reshape(-1, xi.numel()) for xi in x])


@pytest.mark.parametrize("stochastic", [True, False])
def test_gram_products_match_the_dense_factor(stochastic):
    """lift = A^T, gram_matvec = A A^T and matvec = A^T A for A = J (no decoder)."""
    encoder, x = conv_encoder(dz=4, seed=30), inputs(3, seed=31)
    problem = problem_for(encoder, x, stochastic)
    factor = head_jacobian(encoder, x, stochastic)
    generator = torch.Generator().manual_seed(32)
    # the test's own Jacobian against the package's float64 reference
    metric = dense_metric(encoder, x, stochastic=stochastic)
    torch.testing.assert_close(factor.transpose(1, 2) @ factor, metric, rtol=1e-10, atol=1e-13)
    operator = PullbackOperator(problem, x)
    m = factor.shape[1]
    assert operator.gram_dim == m
    index = torch.tensor([2, 0])
    u = torch.randn(2, m, 3, dtype=torch.float64, generator=generator)
    v = torch.randn(2, 64, 3, dtype=torch.float64, generator=generator)
    a = factor[index]
    close = dict(rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(operator.lift(u, index), a.transpose(1, 2) @ u, **close)
    torch.testing.assert_close(operator.gram_matvec(u, index), a @ (a.transpose(1, 2) @ u), **close)
    torch.testing.assert_close(operator.matvec(v, index), a.transpose(1, 2) @ (a @ v), **close)


@pytest.mark.parametrize("dz,space", [(6, "gram"), (40, "input")])
def test_runs_on_the_smaller_space(monkeypatch, dz, space):
    """2dz = 12 <= N = 64: the Krylov process runs on the Gram; 2dz = 80 > N: on G itself. Both
    give G's eigenpairs, with explicit residuals ||G v - theta v|| <= tol * lambda_1."""
    encoder, x = conv_encoder(dz=dz, seed=33), inputs(2, seed=34)
    seen = []
    for name in ("matvec", "gram_matvec"):
        original = getattr(PullbackOperator, name)

        def spy(self, vectors, index, original=original, name=name):
            seen.append((name, vectors.shape[1]))
            return original(self, vectors, index)

        monkeypatch.setattr(PullbackOperator, name, spy)
    result = pullgeom.spectrum(encoder, x, k=5, backend="lanczos")
    sizes = {size for name, size in seen if name == "gram_matvec"}
    if space == "gram":
        assert sizes == {2 * dz}  # every Lanczos product on R^2dz ...
        assert sum(name == "matvec" for name, _ in seen) == 5  # ... G only for the k explicit residuals
    else:
        assert not sizes
    assert_top_matches(result, encoder, x, 5, 1e-9)
    metric = dense_metric(encoder, x)
    vectors = result.eigenvectors.reshape(2, 5, -1).transpose(1, 2)  # (B, N, k)
    direct = (metric @ vectors - vectors * result.eigenvalues.unsqueeze(1)).norm(dim=1)
    torch.testing.assert_close(result.residuals, direct, rtol=1e-6, atol=1e-13)
    assert (direct <= 1e-5 * result.spectral_radius.unsqueeze(1)).all()


def test_products_of_a_subset_of_samples():
    encoder, x = conv_encoder(), inputs(4)
    metric = dense_metric(encoder, x)
    operator = PullbackOperator(problem_for(encoder, x), x)
    index = torch.tensor([3, 1])
    vectors = torch.randn(2, 64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    expected = metric[index] @ vectors
    torch.testing.assert_close(operator.matvec(vectors, index), expected, rtol=1e-10, atol=1e-13)


def test_rank_deficient_encoder_no_nan():
    encoder = conv_encoder(dz=3, seed=13)
    with torch.no_grad():  # sigma head constant: J_sigma = 0, rank 3 while the bound r is 6
        encoder.fc.weight[3:] = 0
    x = inputs(2, seed=14)
    result = pullgeom.spectrum(encoder, x, k=5, backend="lanczos")
    values, _ = dense_spectrum(encoder, x)
    assert torch.isfinite(result.eigenvalues).all() and torch.isfinite(result.eigenvectors).all()
    torch.testing.assert_close(result.eigenvalues[:, :3], values[:, :3], rtol=1e-9, atol=0.0)
    assert (result.eigenvalues[:, 3:] == 0).all() and (result.eigenvectors[:, 3:] == 0).all()
    # The Krylov space exhausted G's range, so every slot of the spectrum is exact (zeros too).
    run = LanczosBackend().run(problem_for(encoder, x), x, 5)
    assert run.exhausted.all()
    atol = 1e-12 * values[0, 0].item()
    torch.testing.assert_close(result.all_eigenvalues, values[:, :6], rtol=1e-9, atol=atol)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return out


def test_never_materialises_a_batch_of_jacobians():
    encoder, x = conv_encoder(dz=32, seed=15, dtype=torch.float32), inputs(4, seed=16, dtype=torch.float32)
    problem = problem_for(encoder, x)  # 2dz = 64 = N: A would be B x 64 x 64
    jacobian_numel = x.shape[0] * 64 * 64
    with LargestTensor() as control:
        encoder_jacobian(problem, x)
    assert control.numel >= jacobian_numel  # the detector sees the autograd path's A
    with LargestTensor() as seen:
        run = LanczosBackend().run(problem, x, 3)
    assert (run.steps < 40).all()
    assert seen.numel < jacobian_numel, f"largest tensor {seen.numel} >= B x 2dz x N = {jacobian_numel}"


def test_metric_refuses_clearly():
    encoder, x = conv_encoder(), inputs()
    with pytest.raises(ValueError, match="matrix-free"):
        pullgeom.metric(encoder, x, backend="lanczos")


def test_deterministic():
    encoder, x = conv_encoder(), inputs()
    first = pullgeom.spectrum(encoder, x, k=3, backend="lanczos")
    second = pullgeom.spectrum(encoder, x, k=3, backend="lanczos")
    assert torch.equal(first.eigenvalues, second.eigenvalues)
    assert torch.equal(first.eigenvectors, second.eigenvectors)


def test_cost_model_and_auto(monkeypatch):
    small, x = conv_encoder(dz=3), inputs()
    small_problem = problem_for(small, x)
    assert lanczos_mode(small_problem, "cpu") is None  # 2dz = 6 rows: materialising is cheaper
    celeba = CelebAEncoder().eval()
    # A whole spectrum takes r + 1 = 257 products, each dearer than one of autograd's 256 VJPs:
    # autograd, while one sample's A (256 x 12,288 floats, 12 MiB) fits.
    celeba_problem = problem_for(celeba, torch.rand(1, 3, 64, 64))
    assert (celeba_problem.latent_dim, celeba_problem.rank) == (128, 256)
    assert lanczos_mode(celeba_problem, "cpu") is None
    # 8,192 rows of A (dz = 4,096, rank still 256): 384 MiB a sample, past what materialising
    # may take; its 257 products fit the whole-spectrum budget (test_large_encoders.py: the rest).
    large = replace(celeba_problem, latent_dim=4096)
    assert lanczos_mode(large, "cpu") == "whole spectrum"
    chosen = choose_backend("auto", large, torch.device("cpu"))
    assert chosen.name == "lanczos" and chosen.whole_spectrum
    assert choose_backend("auto", small_problem, torch.device("cpu")).name != "lanczos"


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_auto_runs_lanczos_to_the_whole_spectrum(monkeypatch, dtype, rtol):
    """When auto picks lanczos (here: the materialising limit set to 0 bytes) it reports every
    eigenvalue, so entropy and the scores are G's, as with autograd."""
    lanczos_module = pullgeom.backends.lanczos_backend
    monkeypatch.setattr(lanczos_module, "MATERIALISE_LIMIT_BYTES", 0)
    encoder, x = conv_encoder(dz=10, seed=4, dtype=dtype), inputs(3, seed=5, dtype=dtype)
    result = pullgeom.spectrum(encoder, x, k=3)
    assert result.backend == "lanczos" and result.complete.all()
    values = dense_spectrum(encoder.double(), x.double())[0][:, :20]
    scale = values[:, :1]
    error = ((result.all_eigenvalues.double() - values).abs() / scale).max().item()
    assert error <= rtol, f"whole spectrum off by {error:.2e} relative to lambda_1"
    reference = pullgeom.spectrum(encoder.double(), x.double(), k=3, backend="autograd")
    for norm in ("max", "trace"):
        torch.testing.assert_close(pullgeom.scores(result, entropy_norm=norm).entropy.double(),
                                   pullgeom.scores(reference, entropy_norm=norm).entropy,
                                   rtol=1e3 * rtol, atol=1e3 * rtol)


def test_tol_sets_the_stopping_rule():
    """spectrum(tol=) reaches the backend: a loose tol stops sooner, within its bound, and every
    Ritz value is still within its residual of an eigenvalue of G (float64 reference)."""
    wide, x = conv_encoder(dz=20, seed=6), inputs(2, seed=7)
    loose = pullgeom.spectrum(wide, x, k=3, backend="lanczos", tol=1e-2)
    assert (loose.residuals <= 1e-2 * loose.spectral_radius.unsqueeze(1)).all()
    reference = dense_spectrum(wide, x)[0]
    distance = (loose.eigenvalues.unsqueeze(2) - reference.unsqueeze(1)).abs().amin(dim=2)
    assert (distance <= loose.residuals * (1 + 1e-9)).all()
    problem = problem_for(wide, x)
    assert (LanczosBackend(tol=1e-2).run(problem, x, 3).steps < LanczosBackend().run(problem, x, 3).steps).all()
    for bad in (0, 1.5, "1e-3"):
        with pytest.raises(ValueError, match="tol"):
            pullgeom.spectrum(wide, x, k=3, backend="lanczos", tol=bad)


def test_top_k_lanczos_reports_no_truncated_entropy():
    """backend='lanczos' by name stops at the top k: samples whose spectrum it did not finish
    are not ``complete``, and their entropy, trace and log-determinant are NaN, not the
    values of a truncated spectrum; the spectral radius is still reported."""
    wide, x = conv_encoder(dz=20, seed=6), inputs(2, seed=7)  # r = 40, stops long before
    result = pullgeom.spectrum(wide, x, k=3, backend="lanczos")
    assert not result.complete.any()
    assert result.entropy.isnan().all()
    scores = result.scores()
    assert scores.trace.isnan().all() and scores.log_det.isnan().all() and scores.entropy.isnan().all()
    reference = dense_spectrum(wide, x)[0]
    torch.testing.assert_close(scores.spectral_radius, reference[:, 0], rtol=1e-9, atol=0)
    small, xs = conv_encoder(dz=2, seed=8), inputs(2, seed=9)  # r = 4: the Krylov space fills up
    finished = pullgeom.spectrum(small, xs, k=2, backend="lanczos")
    assert finished.complete.all() and not finished.entropy.isnan().any()


def test_celeba_example_smoke(capsys):
    pytest.importorskip("PIL")
    example = runpy.run_path(str(Path(__file__).parents[1] / "examples" / "celeba_conv.py"))
    example["main"](["--smoke"])
    out = capsys.readouterr().out
    assert "top-5 eigenvalues" in out and "entropy (trace)" in out and "one-step attack" in out


def test_spectrum_applies_the_decoder_metric_matrix_free(monkeypatch):
    """backend="lanczos" never forms G_z densely: the API's dense path is not reached."""
    import pullgeom.api

    def dense_latent_metric(*args, **kwargs):
        raise AssertionError("the lanczos backend must apply G_z through the decoder's Jacobian")

    encoder, x = conv_encoder(dz=5, seed=8), inputs(2, seed=9)
    decoder = seeded(MLPDecoder(5, 12, 20, gaussian=True), 10).double()
    monkeypatch.setattr(pullgeom.latent_metric.LatentMetric, "sqrt_at", dense_latent_metric)
    result = pullgeom.spectrum(encoder, x, k=4, backend="lanczos", decoder=decoder)
    assert_top_matches(result, encoder, x, 4, 1e-9, decoder=decoder)
    with pytest.raises(AssertionError, match="lanczos backend must apply"):
        pullgeom.spectrum(encoder, x, k=4, backend="autograd", decoder=decoder)
