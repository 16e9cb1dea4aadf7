"""pullgeom.kernels.native.sym_eigh against float64 torch.linalg.eigh: odd sizes, n from 2 to 256,
zero-size batches, repeated and zero eigenvalues; bad input; opcheck."""

from __future__ import annotations

import pytest
import torch

from pullgeom.kernels import native as ops

pytestmark = pytest.mark.skipif(ops.EXTENSION_ERROR is not None, reason=str(ops.EXTENSION_ERROR))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.extension_with_cuda() else [])

# Absolute error allowed relative to ||A||_2, per dtype: backward-stable solvers reach a small
# multiple of n * eps; these bounds are ~100x the errors seen and far below any real bug.
TOLERANCE = {torch.float64: 1e-11, torch.float32: 1e-4}


def random_symmetric(batch, n, dtype, seed=0, spectrum=None):
    generator = torch.Generator().manual_seed(seed)
    if spectrum is None:
        a = torch.randn(batch, n, n, dtype=torch.float64, generator=generator)
        return (a + a.mT).to(dtype)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, dtype=torch.float64, generator=generator))
    values = torch.as_tensor(spectrum, dtype=torch.float64).expand(batch, n)
    return ((q * values.unsqueeze(1)) @ q.mT).to(dtype)


def check_decomposition(a, values, vectors):
    """Eigenvalues vs float64 eigh, A V = V diag(values), V^T V = I, descending order."""
    tol = TOLERANCE[a.dtype]
    a64 = a.double()
    reference = torch.linalg.eigvalsh(a64).flip(-1)
    norm = reference.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    assert values.dtype == a.dtype and vectors.dtype == a.dtype
    assert torch.all(values[:, :-1] >= values[:, 1:])
    torch.testing.assert_close(values.double() / norm, reference / norm, rtol=0, atol=tol)
    v64 = vectors.double()
    residual = a64 @ v64 - v64 * values.double().unsqueeze(1)
    assert residual.abs().amax() <= tol * norm.amax() * a.shape[-1] ** 0.5
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    torch.testing.assert_close(v64.mT @ v64, eye.expand_as(v64), rtol=0, atol=tol * a.shape[-1] ** 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,n", [(3, 2), (2, 3), (4, 5), (3, 17), (2, 32), (2, 64), (1, 129), (1, 256)])
def test_random_symmetric(batch, n, dtype, device):
    a = random_symmetric(batch, n, dtype, seed=n)
    values, vectors = ops.sym_eigh(a.to(device))
    check_decomposition(a, values.cpu(), vectors.cpu())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eigenvectors_match_reference_where_gaps_allow(dtype):
    a = random_symmetric(4, 24, dtype, seed=3, spectrum=torch.linspace(10.0, 0.5, 24))
    _, vectors = ops.sym_eigh(a)
    _, reference = torch.linalg.eigh(a.double())
    cosines = (vectors.double() * reference.flip(-1)).sum(dim=1).abs()
    assert cosines.amin() >= 0.999


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spectrum", [
    [3.0, 3.0, 3.0, 1.0, 0.0, 0.0, 0.0],          # repeated top and zero eigenvalues
    [0.0] * 6,                                     # zero matrix
    [5.0, 5.0, 5.0, 5.0, 5.0],                    # multiple of the identity
    [2.0, 1e-9, 0.0, -1e-9, -2.0],                # indefinite, tiny entries
])
def test_repeated_and_zero_eigenvalues(spectrum, dtype, device):
    a = random_symmetric(3, len(spectrum), dtype, seed=5, spectrum=spectrum)
    values, vectors = (t.cpu() for t in ops.sym_eigh(a.to(device)))
    assert torch.isfinite(values).all() and torch.isfinite(vectors).all()
    check_decomposition(a, values, vectors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("n", [5, 100])  # 100: the CUDA kernel's global-memory path in float64
def test_non_finite_input_gives_nan(n, bad, dtype, device):
    # One off-diagonal entry: the CPU solver used to keep a finite eigenpair, the CUDA one
    # returned the finite diagonal and left a slot unwritten. Now the whole sample is NaN.
    a = random_symmetric(3, n, dtype, seed=n)
    clean = ops.sym_eigh(a.to(device))
    a[1, 0, n - 1] = bad
    values, vectors = (t.cpu() for t in ops.sym_eigh(a.to(device)))
    assert values[1].isnan().all() and vectors[1].isnan().all()
    for got, want in zip((values, vectors), clean, strict=True):  # the other samples are untouched
        torch.testing.assert_close(got[[0, 2]], want.cpu()[[0, 2]], rtol=0, atol=0)


def test_diagonal_and_one_by_one():
    a = torch.diag_embed(torch.tensor([[1.0, 4.0, -2.0, 0.0]], dtype=torch.float64))
    values, vectors = ops.sym_eigh(a)
    assert values.tolist() == [[4.0, 1.0, 0.0, -2.0]]
    assert vectors.abs().sum(dim=1).tolist() == [[1.0] * 4]
    values, vectors = ops.sym_eigh(torch.tensor([[[-3.0]]]))
    assert values.tolist() == [[-3.0]] and vectors.tolist() == [[[1.0]]]


def test_zero_size_batch():
    values, vectors = ops.sym_eigh(torch.zeros(0, 7, 7))
    assert values.shape == (0, 7) and vectors.shape == (0, 7, 7)


def test_uses_symmetric_part():
    a = random_symmetric(2, 6, torch.float64, seed=9)
    skew = torch.randn(2, 6, 6, dtype=torch.float64)
    values, _ = ops.sym_eigh(a + (skew - skew.mT))
    torch.testing.assert_close(values, torch.linalg.eigvalsh(a).flip(-1))


@pytest.mark.parametrize("bad,message", [
    (torch.zeros(2, 3, 3, dtype=torch.int32), "a must be float32 or float64"),
    (torch.zeros(2, 3, 4), r"a must be a batch of square matrices"),
    (torch.zeros(3, 3), r"a must be a batch of square matrices"),
    (torch.zeros(2, 3, 6)[:, :, ::2], "a must be contiguous"),
])
def test_bad_input_names_the_argument(bad, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.pullgeom.sym_eigh(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    torch.library.opcheck(torch.ops.pullgeom.sym_eigh.default, (random_symmetric(3, 9, dtype),))
