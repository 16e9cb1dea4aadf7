"""The pure-torch batched block Lanczos (pullgeom.linalg.lanczos) on explicit PSD matrices.

Oracle: float64 ``torch.linalg.eigh``. Tolerances: in float64 a converged Ritz value with
residual rho is off by at most rho^2 / gap; with tol = 1e-10 that is far below 1e-9 relative,
so 1e-9 catches any error in T's assembly (a wrong coupling block moves eigenvalues by O(1)).
"""

from __future__ import annotations

import pytest
import torch

from pullgeom.linalg.lanczos import dense_matvec, lanczos_topk


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These problems are tiny: extra threads only add synchronisation, and on an oversubscribed
    runner OpenMP's spin-waits made them ~100x slower (measured here: a 4-sample conv forward
    17 ms with 2 threads under load, 0.06 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def psd(batch: int, n: int, rank: int, seed: int = 0, spectrum: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, n, n) float64 PSD of the given rank, eigenvalues ``spectrum`` or uniform in [0.1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, rank, dtype=torch.float64, generator=generator))
    if spectrum is None:
        spectrum = torch.rand(batch, rank, dtype=torch.float64, generator=generator) * 0.9 + 0.1
    return (q * spectrum.expand(batch, rank).unsqueeze(1)) @ q.transpose(1, 2)


def start_block(batch: int, n: int, b: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, n, b, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def top_reference(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(a)
    return values.flip(-1)[:, :k], vectors.flip(-1)[:, :, :k]


@pytest.mark.parametrize("n,rank,k,b", [(7, 7, 3, 1), (40, 12, 5, 1), (40, 12, 5, 2), (33, 20, 4, 3),
                                        (50, 50, 1, 1)])
def test_matches_eigh(n, rank, k, b):
    a = psd(3, n, rank)
    result = lanczos_topk(dense_matvec(a), start_block(3, n, b), k, tol=1e-10)
    values, vectors = top_reference(a, k)
    assert result.converged.all()
    torch.testing.assert_close(result.eigenvalues, values, rtol=1e-9, atol=1e-12)
    cos = (result.eigenvectors * vectors).sum(dim=1).abs()
    assert (cos > 1 - 1e-8).all(), cos
    assert torch.allclose(result.eigenvectors.norm(dim=1), torch.ones(3, k, dtype=torch.float64))
    assert (result.residuals < 1e-8).all()
    # Cauchy interlacing: every Ritz value is a lower bound on the eigenvalue of the same rank.
    all_values = torch.linalg.eigvalsh(a).flip(-1)
    s = result.ritz_values.shape[1]
    assert (result.ritz_values <= all_values[:, :s] + 1e-12).all()


def test_explicit_residuals_agree_with_lanczos_estimate():
    a = psd(2, 30, 30, seed=3)
    explicit = lanczos_topk(dense_matvec(a), start_block(2, 30, 1), 3, tol=1e-3, explicit_residuals=True)
    estimated = lanczos_topk(dense_matvec(a), start_block(2, 30, 1), 3, tol=1e-3, explicit_residuals=False)
    assert (explicit.residuals > 0).any()  # not converged to round-off: the comparison has content
    torch.testing.assert_close(explicit.residuals, estimated.residuals, rtol=1e-6, atol=1e-12)
    vectors = explicit.eigenvectors
    direct = (a @ vectors - vectors * explicit.eigenvalues.unsqueeze(1)).norm(dim=1)
    torch.testing.assert_close(explicit.residuals, direct, rtol=1e-9, atol=1e-14)


def test_rank_deficient_pads_with_certified_zeros():
    a = psd(2, 25, 3, seed=4)
    result = lanczos_topk(dense_matvec(a), start_block(2, 25, 1), 5, tol=1e-10)
    values, _ = top_reference(a, 5)
    assert torch.isfinite(result.eigenvalues).all() and torch.isfinite(result.eigenvectors).all()
    assert result.exhausted.all()  # the restart block mapped to zero: the range is spanned
    torch.testing.assert_close(result.eigenvalues[:, :3], values[:, :3], rtol=1e-9, atol=1e-12)
    assert (result.eigenvalues[:, 3:] == 0).all()
    assert (result.eigenvectors[:, :, 3:] == 0).all()  # G singles out no null direction
    assert (result.ritz_values[:, 3:] < 1e-12).all()


def test_zero_operator():
    a = torch.zeros(2, 10, 10, dtype=torch.float64)
    result = lanczos_topk(dense_matvec(a), start_block(2, 10, 2), 3)
    assert (result.eigenvalues == 0).all() and (result.eigenvectors == 0).all()
    assert result.exhausted.all() and torch.isfinite(result.residuals).all()


def test_repeated_eigenvalue_found_by_restart():
    # Single-vector Krylov spaces see one copy of a repeated eigenvalue; the restart after the
    # invariant subspace must find the second.
    spectrum = torch.tensor([5.0, 5.0, 3.0, 1.0], dtype=torch.float64)
    a = psd(2, 30, 4, seed=5, spectrum=spectrum)
    result = lanczos_topk(dense_matvec(a), start_block(2, 30, 1), 3, tol=1e-10)
    torch.testing.assert_close(result.eigenvalues, spectrum[:3].expand(2, 3), rtol=1e-9, atol=1e-12)
    projector = result.eigenvectors[:, :, :2] @ result.eigenvectors[:, :, :2].transpose(1, 2)
    assert ((a @ projector) - 5 * projector).abs().max() < 1e-8  # the two vectors span the eigenspace


def test_per_sample_convergence_multiplies_only_active_samples():
    easy = psd(1, 40, 2, seed=6)
    hard = psd(1, 40, 40, seed=7)
    a = torch.cat([easy, hard])
    calls = []

    def matvec(vectors, index):
        calls.append(index.tolist())
        return a[index] @ vectors

    result = lanczos_topk(matvec, start_block(2, 40, 1), 2, tol=1e-10, explicit_residuals=False)
    assert result.converged.all()
    assert result.steps[0] < result.steps[1]
    assert calls[-1] == [1]  # the easy sample stopped being multiplied
    assert sum(len(c) for c in calls) == int(result.steps.sum())


def test_float32_operator():
    a = psd(2, 60, 16, seed=8)
    result = lanczos_topk(dense_matvec(a.float()), start_block(2, 60, 1, dtype=torch.float32), 5, tol=1e-5)
    values, _ = top_reference(a, 5)
    assert result.eigenvalues.dtype == torch.float32
    assert ((result.eigenvalues.double() - values).abs() / values[:, :1]).max() < 1e-5


def test_deterministic():
    a = psd(2, 30, 10, seed=9)
    first, second = (lanczos_topk(dense_matvec(a), start_block(2, 30, 1), 4,
                                  generator=torch.Generator().manual_seed(0)) for _ in range(2))
    assert torch.equal(first.eigenvalues, second.eigenvalues)
    assert torch.equal(first.eigenvectors, second.eigenvectors)


def test_rejects_bad_k():
    with pytest.raises(ValueError, match="k=0"):
        lanczos_topk(dense_matvec(psd(1, 5, 5)), start_block(1, 5, 1), 0)


def test_lifted_stopping_bounds_the_residual_of_the_lifted_vectors():
    # G = A^T A (N = 60) through its Gram M = A A^T (m = 30), eigenvalues i^-2: the lifted
    # v = A^T y / sqrt(theta) has residual ||A^T r|| / sqrt(theta) <= sqrt(lambda_1 / theta) ||r||,
    # so ``lifted`` stops a pair at ||r|| <= tol sqrt(theta_1 theta), 1 / 5 of tol theta_1 here.
    generator = torch.Generator().manual_seed(8)
    u, _ = torch.linalg.qr(torch.randn(2, 30, 30, dtype=torch.float64, generator=generator))
    w, _ = torch.linalg.qr(torch.randn(2, 60, 30, dtype=torch.float64, generator=generator))
    spectrum = torch.arange(1, 31, dtype=torch.float64) ** -2.0
    a = (u * spectrum.sqrt()) @ w.transpose(1, 2)  # (2, 30, 60)
    gram, metric = a @ a.transpose(1, 2), a.transpose(1, 2) @ a
    tol, k = 1e-6, 5

    def run(lifted):
        return lanczos_topk(dense_matvec(gram), start_block(2, 30, 1), k, tol=tol, explicit_residuals=False,
                            lifted=lifted)

    plain, lifted = run(False), run(True)
    assert lifted.converged.all() and not lifted.exhausted.any()  # stopped by the residual test
    theta = lifted.eigenvalues
    assert (lifted.residuals <= tol * (theta[:, :1] * theta).sqrt()).all()
    assert (plain.residuals > tol * (plain.eigenvalues[:, :1] * plain.eigenvalues).sqrt()).any()
    v = a.transpose(1, 2) @ lifted.eigenvectors
    v = v / v.norm(dim=1, keepdim=True)
    assert ((metric @ v - v * theta.unsqueeze(1)).norm(dim=1) <= tol * theta[:, :1]).all()
    torch.testing.assert_close(theta, spectrum[:k].expand(2, k), rtol=1e-9, atol=0.0)
