"""pullgeom.kernels.native.lanczos_topk against float64 torch.linalg.eigh: low-rank and indefinite
matrices, breakdown and deflation (k > rank, repeated eigenvalues, zero matrices), residuals,
zero-size batches; bad input; opcheck."""

from __future__ import annotations

import pytest
import torch

from pullgeom.kernels import native as ops

pytestmark = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.extension_with_cuda() else [])


def low_rank_psd(batch, n, rank, dtype=torch.float64, seed=0):
    factor = torch.randn(batch, n, rank, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (factor @ factor.mT).to(dtype)


def with_spectrum(batch, spectrum, dtype=torch.float64, seed=0):
    n = len(spectrum)
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64, generator=generator))
    values = torch.as_tensor(spectrum, dtype=torch.float64)
    return ((q * values) @ q.mT).to(dtype)


def check_topk(a, k, values, vectors, residuals, value_tol, cos_min=0.999):
    a64 = a.double()
    reference_values, reference_vectors = torch.linalg.eigh(a64)
    reference_values, reference_vectors = reference_values.flip(-1), reference_vectors.flip(-1)
    scale = reference_values.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    assert torch.isfinite(values).all() and torch.isfinite(vectors).all() and torch.isfinite(residuals).all()
    torch.testing.assert_close(values.double() / scale, reference_values[:, :k] / scale,
                               rtol=0, atol=value_tol)
    v64 = vectors.double()
    eye = torch.eye(k, dtype=torch.float64).expand(a.shape[0], k, k)
    torch.testing.assert_close(v64.mT @ v64, eye, rtol=0, atol=1e-5)
    explicit = (a64 @ v64 - v64 * values.double().unsqueeze(1)).norm(dim=1)
    torch.testing.assert_close(residuals.double(), explicit, rtol=1e-3, atol=1e-6 * scale.amax().item())
    # Eigenvectors where the gap to both neighbours is at least 1% of the spectral radius.
    padded = torch.cat([reference_values[:, :1] + scale, reference_values,
                        reference_values[:, -1:] - scale], 1)
    gaps = torch.minimum(padded[:, :-2] - padded[:, 1:-1], padded[:, 1:-1] - padded[:, 2:])[:, :k] / scale
    cosines = (v64 * reference_vectors[:, :, :k]).sum(dim=1).abs()
    assert torch.all(cosines[gaps > 1e-2] >= cos_min)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,value_tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("batch,n,rank,k", [(4, 40, 6, 3), (3, 17, 17, 5), (2, 64, 32, 5), (1, 2, 2, 2)])
def test_low_rank_psd(batch, n, rank, k, dtype, value_tol, device):
    a = low_rank_psd(batch, n, rank, dtype, seed=n)
    values, vectors, residuals, steps = (t.cpu() for t in ops.lanczos_topk(a.to(device), k))
    check_topk(a, k, values, vectors, residuals, value_tol)
    assert torch.all(steps <= n)


def test_indefinite_gets_algebraically_largest():
    a = with_spectrum(3, [4.0, 3.0, 1.0, 0.5, -2.0, -6.0, -7.0], seed=1)
    values, vectors, residuals, _ = ops.lanczos_topk(a, 3)
    check_topk(a, 3, values, vectors, residuals, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_k_above_rank_deflates_to_zero_eigenvalues(device):
    a = low_rank_psd(3, 30, 2, seed=4)
    values, vectors, residuals, steps = (t.cpu() for t in ops.lanczos_topk(a.to(device), 5))
    check_topk(a, 5, values, vectors, residuals, 1e-10)
    torch.testing.assert_close(values[:, 2:], torch.zeros(3, 3, dtype=torch.float64), rtol=0, atol=1e-10)
    # The breakdown after the rank-2 Krylov space plus one null-space restart ends the run.
    assert torch.all(steps <= 4)


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_top_eigenvalue_found_through_restarts(device):
    a = with_spectrum(2, [3.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0], seed=2)
    values, vectors, residuals, _ = (t.cpu() for t in ops.lanczos_topk(a.to(device), 4))
    check_topk(a, 4, values, vectors, residuals, 1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,value_tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("spectrum", [
    [5.0, 5.0, 5.0, 2.0, 1.0] + [0.0] * 15,                   # repeated top, rank-deficient
    [4.0, 4.0 + 1e-7, 4.0 - 1e-7, 4.0 + 2e-7, 1.0, 0.5] + [0.1] * 10,  # cluster below float32 round-off
    [3.0, 3.0, 2.999, 2.0, 2.0] + [-1.0] * 11,                # repeats next to a resolved cluster
])
def test_repeated_and_clustered_top_eigenvalues(spectrum, dtype, value_tol, device):
    # A float32 matrix is known to ~eps32 ||A||: its repeated eigenvalue is a cluster split by that
    # much. A breakdown test at float64's eps resolved the cluster instead, converged on one copy
    # and returned e.g. [5, 5, 2, 1, 0] with tiny residuals; float64 eigh of the same matrix is the
    # reference, and every copy must be found.
    a = with_spectrum(3, spectrum, dtype, seed=len(spectrum))
    values, vectors, residuals, _ = (t.cpu() for t in ops.lanczos_topk(a.to(device), 5))
    check_topk(a, 5, values, vectors, residuals, value_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_and_identity_matrices(dtype):
    identity = 2.5 * torch.eye(6, dtype=dtype).expand(2, 6, 6)
    for matrix, value in ((torch.zeros(2, 6, 6, dtype=dtype), 0.0), (identity, 2.5)):
        values, vectors, residuals, steps = ops.lanczos_topk(matrix.contiguous(), 3)
        assert torch.all(values == value) and torch.all(residuals.abs() < 1e-6) and torch.all(steps == 1)
        torch.testing.assert_close(vectors.mT @ vectors, torch.eye(3, dtype=dtype).expand(2, 3, 3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan(bad, dtype, device):
    # One off-diagonal entry is enough: the kernel used to return NaN values with finite
    # vectors (and a finite slot on other solvers), which downstream code takes for a result.
    a = low_rank_psd(3, 8, 3, dtype, seed=6)
    clean = ops.lanczos_topk(a.to(device), 2)
    a[1, 2, 5] = bad
    values, vectors, residuals, steps = (t.cpu() for t in ops.lanczos_topk(a.to(device), 2))
    assert values[1].isnan().all() and vectors[1].isnan().all() and residuals[1].isnan().all()
    assert steps[1] == 0
    for got, want in zip((values, vectors, residuals, steps), clean, strict=True):  # the others untouched
        torch.testing.assert_close(got[[0, 2]], want.cpu()[[0, 2]], rtol=0, atol=0)


def test_step_limit_reports_residuals():
    a = with_spectrum(1, torch.linspace(1.0, 0.9, 50).tolist(), seed=3)
    values, vectors, residuals, steps = ops.lanczos_topk(a, 2, max_steps=4)
    assert steps.item() == 4 and torch.isfinite(values).all()
    explicit = (a @ vectors - vectors * values.unsqueeze(1)).norm(dim=1)
    torch.testing.assert_close(residuals, explicit)
    assert residuals.amax() > 1e-6  # a clustered spectrum is not resolved in 4 steps: say so


def test_zero_size_batch():
    values, vectors, residuals, steps = ops.lanczos_topk(torch.zeros(0, 5, 5), 2)
    assert values.shape == (0, 2) and vectors.shape == (0, 5, 2) and residuals.shape == (0, 2)
    assert steps.shape == (0,) and steps.dtype == torch.int64


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(2, 3, 3, dtype=torch.int64), 1, 3, 1e-6), "a must be float32 or float64"),
    ((torch.zeros(2, 3, 4), 1, 3, 1e-6), "a must be a batch of square matrices"),
    ((torch.zeros(2, 3, 3), 4, 4, 1e-6), "k = 4 must be between 1 and n = 3"),
    ((torch.zeros(2, 3, 3), 2, 1, 1e-6), "max_steps = 1 must be at least k = 2"),
    ((torch.zeros(2, 3, 3), 2, 3, 0.0), "tol = 0 must be a relative tolerance"),
])
def test_bad_input_names_the_argument(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pullgeom.lanczos_topk(*args)


def test_opcheck():
    torch.library.opcheck(torch.ops.pullgeom.lanczos_topk.default, (low_rank_psd(3, 12, 4), 3, 12, 1e-10))
