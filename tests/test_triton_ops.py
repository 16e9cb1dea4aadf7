"""The Triton ops against float64 references: scaled matmul, plan-to-Gram, Jacobi eigh.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
only while this module defines the kernels and during its tests, so other test modules keep
their backends); shapes are small because the interpreter runs each program in numpy.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton", reason="the Triton ops need triton (installed in CI)")

from triton_env import DEVICE, INTERPRET, load_triton_ops  # noqa: E402

load_triton_ops()

from pullgeom.encoder_output import sigma_from_output  # noqa: E402
from pullgeom.tracing.mlp_plan import trace_plan  # noqa: E402
from pullgeom.reference import dense_metric  # noqa: E402
from pullgeom.kernels.triton.plan_gram import plan_gram  # noqa: E402

ops = torch.ops.pullgeom
REPO = Path(__file__).resolve().parents[1]
# float32 kernels accumulate in float32: relative errors of a few 1e-6 on these sizes, so 2e-5
# of the largest entry passes round-off and fails any wrong index, scale or mask (errors O(1)).
MATMUL_RTOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    """The triton backend checks TRITON_INTERPRET per call: set it for these tests only."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """|actual - expected| <= rtol * max|expected|, printing the first mismatching index."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    error = (actual.double().cpu() - expected.double().cpu()).abs()
    bound = rtol * max(expected.abs().max().item(), 1e-30)
    if error.max().item() > bound:
        first = tuple((error > bound).nonzero()[0].tolist())
        raise AssertionError(f"{what}: max error {error.max().item():.3e} > {bound:.3e}, first at {first}: "
                             f"{actual[first].item()} vs {expected[first].item()}")


# ----------------------------------------------------------------------------------------
# scaled matmul

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,p,q,n", [(3, 5, 37, 70), (1, 1, 1, 1), (2, 17, 16, 33), (0, 4, 5, 6),
                                         (2, 3, 0, 4), (1, 65, 40, 3), (3, 65, 20, 70)])
def test_scaled_matmul_matches_float64(dtype, batch, p, q, n):
    gen = torch.Generator().manual_seed(batch * 1000 + p * 100 + q + n)
    rows, scale, weight = (torch.randn(*shape, generator=gen, dtype=torch.float64)
                           for shape in ((batch, p, q), (batch, q), (q, n)))
    expected = (rows * scale.unsqueeze(1)) @ weight
    out = ops.triton_scaled_matmul(rows.to(DEVICE, dtype), scale.to(DEVICE, dtype), weight.to(DEVICE, dtype))
    assert out.shape == (batch, p, n) and out.dtype == dtype
    assert_close_rel(out, expected, MATMUL_RTOL[dtype], "scaled matmul")


def test_scaled_matmul_grid_fits_cuda_limits_for_large_batches(monkeypatch):
    # The batch sat on grid axis 1, which CUDA caps at 65,535: B = 100,000 samples failed to
    # launch. The interpreter has no such cap and runs ~10 ms a program (B = 70,000 would take
    # minutes), so this checks the launcher's grid instead of running it.
    from pullgeom.kernels.triton import scaled_matmul

    grids = []

    class Launch:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(scaled_matmul, "wrap_triton", lambda kernel: Launch())
    batch = 100_000
    scaled_matmul.launch_scaled_bmm(torch.zeros(batch, 70, 3), torch.zeros(batch, 3), torch.zeros(1, 3, 2))
    (grid,) = grids
    assert len(grid) == 1 and grid[0] <= 2**31 - 1, f"grid {grid} exceeds CUDA's limits"
    assert grid[0] == batch * 2  # 70 rows: two 64-row tiles per sample, every sample covered


def test_scaled_matmul_takes_strided_inputs():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 19, 6, generator=gen, dtype=torch.float64).transpose(1, 2)  # (3, 6, 19) view
    scale = torch.randn(19, 3, generator=gen, dtype=torch.float64).T
    weight = torch.randn(21, 19, generator=gen, dtype=torch.float64).T
    expected = (rows * scale.unsqueeze(1)) @ weight
    out = ops.triton_scaled_matmul(rows.to(DEVICE), scale.to(DEVICE), weight.to(DEVICE))
    assert_close_rel(out, expected, MATMUL_RTOL[torch.float64], "strided scaled matmul")


@pytest.mark.parametrize("args,message", [
    (((2, 3, 4), (2, 4), (5, 6)), "weight"),
    (((2, 3, 4), (2, 5), (4, 6)), "scale"),
    (((3, 4), (2, 4), (4, 6)), "rows"),
])
def test_scaled_matmul_rejects_bad_shapes(args, message):
    tensors = [torch.zeros(*shape, device=DEVICE) for shape in args]
    with pytest.raises(ValueError, match=message):
        ops.triton_scaled_matmul(*tensors)


def test_scaled_matmul_rejects_mixed_dtypes():
    with pytest.raises(ValueError, match="weight"):
        ops.triton_scaled_matmul(torch.zeros(1, 2, 3, device=DEVICE), torch.zeros(1, 3, device=DEVICE),
                                 torch.zeros(3, 2, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="rows"):
        ops.triton_scaled_matmul(torch.zeros(1, 2, 3, dtype=torch.int64, device=DEVICE),
                                 torch.zeros(1, 3, device=DEVICE), torch.zeros(3, 2, device=DEVICE))


# ----------------------------------------------------------------------------------------
# Jacobi eigh

def matrices_with_spectrum(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with random orthogonal Q, float64: (B, n, n)."""
    gen = torch.Generator().manual_seed(seed)
    batch, n = eigenvalues.shape
    q = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64))[0]
    return q @ torch.diag_embed(eigenvalues) @ q.transpose(1, 2)


def check_eigh(matrices: torch.Tensor, dtype: torch.dtype, k: int) -> None:
    """Top-k eigenvalues to 1e-4 relative (float32; 1e-10 float64), vectors |cos| >= 0.999
    where the relative gap to the neighbours is >= 1e-2, and A V = V diag(values) overall."""
    values, vectors = ops.triton_eigh(matrices.to(DEVICE, dtype))
    ref_values, ref_vectors = torch.linalg.eigh(matrices)
    ref_values, ref_vectors = ref_values.flip(-1), ref_vectors.flip(-1)
    batch, n, _ = matrices.shape
    assert values.shape == (batch, n) and vectors.shape == (batch, n, n)
    values, vectors = values.double().cpu(), vectors.double().cpu()
    assert (values[:, :-1] >= values[:, 1:]).all(), "eigenvalues are not descending"
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    scale = ref_values.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    top_error = (values[:, :k] - ref_values[:, :k]).abs() / ref_values[:, :k].abs().clamp_min(1e-3 * scale)
    assert top_error.max() <= rtol, f"top-{k} relative eigenvalue error {top_error.max():.3e}"
    # Every eigenvalue (zeros included) to round-off of the largest.
    assert_close_rel(values, ref_values, 10 * rtol, "all eigenvalues")
    residual = (matrices @ vectors - vectors * values.unsqueeze(1)).norm(dim=1) / scale
    assert residual.max() <= 10 * rtol, f"eigenpair residual {residual.max():.3e}"
    assert_close_rel(vectors.transpose(1, 2) @ vectors, torch.eye(n).expand(batch, n, n), 10 * rtol,
                     "orthonormality")
    padded = torch.cat([scale * 1e30, ref_values, -scale * 1e30], dim=1)
    gap = torch.minimum(padded[:, :-2] - padded[:, 1:-1], padded[:, 1:-1] - padded[:, 2:]) / scale
    cosines = (vectors * ref_vectors).sum(dim=1).abs()
    separated = gap >= 1e-2
    assert (cosines[separated] >= 0.999).all(), f"min |cos| {cosines[separated].min():.6f}"


SIZES = [1, 2, 3, 7, 16, 31, 48] if INTERPRET else [1, 2, 3, 7, 16, 31, 48, 64, 100, 127, 128]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_eigh_random_spectra(dtype, n):
    # The interpreter runs programs one after another (~0.6 s a sweep at n = 48): few there.
    batch = 3 if not INTERPRET else 1 if n > 40 else 2 if n > 20 else 3
    gen = torch.Generator().manual_seed(n)
    eigenvalues = torch.randn(batch, n, generator=gen, dtype=torch.float64).exp()
    check_eigh(matrices_with_spectrum(eigenvalues, seed=n), dtype, k=min(n, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_repeated_and_zero_eigenvalues(dtype):
    # Rank-deficient Grams are the normal case (rank < r): zeros and exact repeats.
    eigenvalues = torch.tensor([[5.0, 5.0, 5.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                                [3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    check_eigh(matrices_with_spectrum(eigenvalues, seed=5), dtype, k=5)


def test_eigh_diagonal_zero_and_indefinite_inputs():
    diagonal = torch.diag_embed(torch.tensor([[1.0, 4.0, 2.0, 3.0, 0.0]], dtype=torch.float64))
    check_eigh(diagonal, torch.float32, k=4)
    zero_values, zero_vectors = ops.triton_eigh(torch.zeros(2, 6, 6, device=DEVICE))
    assert (zero_values == 0).all() and torch.isfinite(zero_vectors).all()
    indefinite = torch.tensor([[[2.0, -1.0, 0.5], [-1.0, -3.0, 0.0], [0.5, 0.0, 1.0]]], dtype=torch.float64)
    check_eigh(indefinite, torch.float32, k=3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_eigh_non_finite_input_gives_nan(bad, dtype):
    # One off-diagonal entry: the sweeps stopped at once and the kernel returned the finite
    # diagonal (here 1, 2, ..., 6) as the spectrum. Now the whole sample is NaN, the others exact.
    matrices = torch.diag_embed(torch.arange(1.0, 7.0, dtype=dtype).expand(3, 6)).contiguous()
    matrices[1, 0, 5] = bad
    values, vectors = (t.cpu() for t in ops.triton_eigh(matrices.to(DEVICE)))
    assert values[1].isnan().all() and vectors[1].isnan().all()
    assert (values[[0, 2]] == torch.arange(6.0, 0.0, -1.0, dtype=dtype)).all()
    assert (vectors[[0, 2]].abs() == torch.eye(6, dtype=dtype).flip(-1)).all()


def test_eigh_zero_size_batch_and_matrix():
    values, vectors = ops.triton_eigh(torch.zeros(0, 7, 7, device=DEVICE))
    assert values.shape == (0, 7) and vectors.shape == (0, 7, 7)
    values, vectors = ops.triton_eigh(torch.zeros(3, 0, 0, device=DEVICE))
    assert values.shape == (3, 0) and vectors.shape == (3, 0, 0)


# 129: above MAX_SIZE = 128, the largest block whose A and V fit sm_90's shared memory.
@pytest.mark.parametrize("shape,message", [((3, 4), "gram"), ((2, 3, 4), "square"), ((1, 129, 129), "128")])
def test_eigh_rejects_bad_input(shape, message):
    with pytest.raises(ValueError, match=message):
        ops.triton_eigh(torch.zeros(*shape, device=DEVICE))


# ----------------------------------------------------------------------------------------
# Lanczos

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 5, 16, 33])
def test_lanczos_full_steps_is_exact(dtype, n):
    eigenvalues = torch.randn(2, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64).exp()
    matrices = matrices_with_spectrum(eigenvalues, seed=n + 1)
    k = min(n, 3)
    values, vectors, residuals = ops.triton_lanczos(matrices.to(DEVICE, dtype), k, n)
    assert values.shape == (2, k) and vectors.shape == (2, n, k) and residuals.shape == (2, k)
    ref_values, ref_vectors = torch.linalg.eigh(matrices)
    ref_values, ref_vectors = ref_values.flip(-1)[:, :k], ref_vectors.flip(-1)[:, :, :k]
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    relative = (values.double().cpu() - ref_values).abs() / ref_values
    assert relative.max() <= rtol, f"Ritz values off by {relative.max():.3e} relative"
    actual = (matrices @ vectors.double().cpu() - vectors.double().cpu() * values.double().cpu().unsqueeze(1))
    torch.testing.assert_close(residuals.double().cpu(), actual.norm(dim=1), rtol=1e-2, atol=10 * rtol)
    assert residuals.max() <= 10 * rtol * ref_values[:, 0].max()
    top = ref_values[:, :1]
    padded = torch.cat([top * 1e30, torch.linalg.eigvalsh(matrices).flip(-1), -top * 1e30], dim=1)
    gap = torch.minimum(padded[:, :-2] - padded[:, 1:-1], padded[:, 1:-1] - padded[:, 2:])[:, :k] / top
    cosines = (vectors.double().cpu() * ref_vectors).sum(dim=1).abs()
    assert (cosines[gap >= 1e-2] >= 0.999).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lanczos_restarts_on_breakdown_and_finds_repeats(dtype):
    # Rank 5 of 20 with a triple eigenvalue: the Krylov space of one start vector is invariant
    # after 3 steps, so finding 5, 5, 5 needs the restarts; 10 < 20 steps suffice.
    spectrum = torch.tensor([5.0, 5.0, 5.0, 2.0, 1.0] + [0.0] * 15, dtype=torch.float64).expand(3, 20)
    matrices = matrices_with_spectrum(spectrum.contiguous(), seed=9)
    values, vectors, residuals = ops.triton_lanczos(matrices.to(DEVICE, dtype), 5, 10)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    assert_close_rel(values, spectrum[:, :5], rtol, "Ritz values with repeats")
    assert residuals.max() <= 10 * rtol * 5
    assert_close_rel(vectors.transpose(1, 2) @ vectors, torch.eye(5).expand(3, 5, 5), 10 * rtol,
                     "orthonormal Ritz vectors")
    assert torch.isfinite(vectors).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lanczos_non_finite_input_gives_nan(bad, dtype):
    # One NaN sample made the float64 tridiagonal solve raise for the whole batch; now that
    # sample is all NaN and the others are unchanged.
    eigenvalues = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.5, 0.25]], dtype=torch.float64).expand(3, 6)
    matrices = matrices_with_spectrum(eigenvalues.contiguous(), seed=4).to(dtype)
    clean = ops.triton_lanczos(matrices.to(DEVICE), 2, 6)
    matrices[1, 2, 4] = bad
    values, vectors, residuals = (t.cpu() for t in ops.triton_lanczos(matrices.to(DEVICE), 2, 6))
    assert values[1].isnan().all() and vectors[1].isnan().all() and residuals[1].isnan().all()
    for got, want in zip((values, vectors, residuals), clean, strict=True):
        torch.testing.assert_close(got[[0, 2]], want.cpu()[[0, 2]], rtol=0, atol=0)


def test_lanczos_partial_steps_bound_by_residuals():
    # Few steps: Ritz values need not have converged, but each lies below the eigenvalue of
    # the same rank (Cauchy interlacing) and within its residual of some eigenvalue.
    eigenvalues = torch.randn(3, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64).exp()
    matrices = matrices_with_spectrum(eigenvalues, seed=3)
    values, _, residuals = ops.triton_lanczos(matrices.to(DEVICE, torch.float64), 4, 8)
    ref = eigenvalues.sort(dim=1, descending=True).values
    values, residuals = values.cpu(), residuals.cpu()
    assert (values <= ref[:, :4] + 1e-10).all()
    distance = (values.unsqueeze(-1) - ref.unsqueeze(1)).abs().amin(dim=-1)
    assert (distance <= residuals + 1e-10).all()


def test_lanczos_zero_matrix_zero_batch_and_bad_input():
    values, vectors, residuals = ops.triton_lanczos(torch.zeros(2, 6, 6, device=DEVICE), 2, 4)
    assert (values == 0).all() and torch.isfinite(vectors).all() and (residuals == 0).all()
    values, vectors, residuals = ops.triton_lanczos(torch.zeros(0, 6, 6, device=DEVICE), 2, 4)
    assert values.shape == (0, 2) and vectors.shape == (0, 6, 2) and residuals.shape == (0, 2)
    with pytest.raises(ValueError, match="steps"):
        ops.triton_lanczos(torch.zeros(1, 6, 6, device=DEVICE), 3, 2)
    with pytest.raises(ValueError, match="k="):
        ops.triton_lanczos(torch.zeros(1, 6, 6, device=DEVICE), 7, 6)
    with pytest.raises(ValueError, match="128"):
        ops.triton_lanczos(torch.zeros(1, 129, 129, device=DEVICE), 1, 1)


# ----------------------------------------------------------------------------------------
# plan-to-Gram

class MLPEncoder(nn.Module):
    """flatten -> [Linear (BatchNorm) act]* -> mu, out2 heads."""

    def __init__(self, widths: list[int], dz: int, activations: list[nn.Module], batchnorm: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for fan_in, fan_out, act in zip(widths[:-1], widths[1:], activations, strict=True):
            layers.append(nn.Linear(fan_in, fan_out))
            if batchnorm:
                bn = nn.BatchNorm1d(fan_out)
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-0.2, 0.2)
                layers.append(bn)
            layers.append(act)
        self.trunk = nn.Sequential(*layers)
        self.mu = nn.Linear(widths[-1], dz)
        self.logvar = nn.Linear(widths[-1], dz)

    def forward(self, x):
        h = self.trunk(x.flatten(1))
        return self.mu(h), self.logvar(h)


# widths, dz, activations, batchnorm: covers every activation code, QR compression (2dz > w_L,
# rows > a middle width), one hidden layer, and a BatchNorm fold.
PLAN_CASES = [
    ([12, 9, 7], 3, [nn.Tanh(), nn.ELU(0.7)], True),
    ([10, 8, 6, 5], 4, [nn.GELU(), nn.SiLU(), nn.Softplus(beta=1.5)], False),
    ([11, 6], 5, [nn.LeakyReLU(0.2)], False),
    ([9, 13, 3, 8], 2, [nn.Sigmoid(), nn.GELU(approximate="tanh"), nn.ReLU()], True),
]


def make_encoder(case_index: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(case_index)
    widths, dz, acts, bn = PLAN_CASES[case_index]
    return MLPEncoder(widths, dz, acts, bn).eval().to(dtype)


@pytest.mark.parametrize("case_index", range(len(PLAN_CASES)))
@pytest.mark.parametrize("stochastic", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plan_gram_matches_dense_metric(case_index, stochastic, dtype):
    encoder = make_encoder(case_index, dtype)
    plan = trace_plan(encoder).to(device=DEVICE)
    n = PLAN_CASES[case_index][0][0]
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(7), dtype=dtype)
    first = plan.layers[0].weight
    left, gram = plan_gram(plan, x.to(DEVICE), stochastic=stochastic)
    expected = dense_metric(encoder, x, stochastic=stochastic)
    # The chain carries at most the narrowest width seen (QR compression), never more rows.
    widths, dz = PLAN_CASES[case_index][0], PLAN_CASES[case_index][1]
    assert left.shape == (5, min([(2 if stochastic else 1) * dz] + widths[1:]), widths[1])
    factor = left.double().cpu() @ first.double().cpu()
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    assert_close_rel(factor.transpose(1, 2) @ factor, expected, rtol, "F^T F vs dense metric")
    rank = min(plan.rank_bound(stochastic), gram.shape[1])
    gram_values = torch.linalg.eigvalsh(gram.double().cpu()).flip(-1)[:, :rank]
    dense_values = torch.linalg.eigvalsh(expected).flip(-1)[:, :rank]
    top = min(rank, 3)
    relative = (gram_values[:, :top] - dense_values[:, :top]).abs() / dense_values[:, :top]
    assert relative.max() <= rtol, f"top eigenvalues off by {relative.max():.3e} relative"


@pytest.mark.parametrize("sigma", ["logstd", "std", "softplus"])
def test_plan_gram_with_latent_metric_and_sigma_conventions(sigma):
    encoder = make_encoder(0, torch.float64)
    plan = trace_plan(encoder).to(device=DEVICE)
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    root = torch.randn(3, 3, 3, generator=gen, dtype=torch.float64)
    latent_sqrt = root @ root.transpose(1, 2)  # symmetric PSD: G_z^{1/2}, G_z = latent_sqrt^2
    first = plan.layers[0].weight
    left, _ = plan_gram(plan, x.to(DEVICE), sigma=sigma, latent_sqrt=latent_sqrt.to(DEVICE))
    # Dense float64 reference by hand: A = [J_mu; J_sigma] from autograd, G = A^T K A.
    blocks = []
    for xi, sqrt in zip(x, latent_sqrt, strict=True):
        def heads(v, xi=xi):
            mu, out2 = encoder(v.unsqueeze(0))
            return torch.cat([mu[0], sigma_from_output(out2[0], sigma)])
        jac = torch.autograd.functional.jacobian(heads, xi)
        g_z = sqrt @ sqrt
        blocks.append(jac[:3].T @ g_z @ jac[:3] + jac[3:].T @ g_z @ jac[3:])
    factor = left.cpu() @ first.cpu()
    assert_close_rel(factor.transpose(1, 2) @ factor, torch.stack(blocks), 1e-10, "F^T K F")


def test_plan_gram_zero_size_batch():
    plan = trace_plan(make_encoder(1)).to(device=DEVICE)
    left, gram = plan_gram(plan, torch.zeros(0, 10, device=DEVICE))
    assert left.shape == (0, 5, 8) and gram.shape == (0, 5, 5)


def test_plan_gram_rejects_bad_input():
    plan = trace_plan(make_encoder(0)).to(device=DEVICE)
    with pytest.raises(ValueError, match="first_gram"):
        wrong_gram = dataclasses.replace(plan, first_layer_gram=plan.layers[0].weight)  # W_1, not W_1 W_1^T
        plan_gram(wrong_gram, torch.zeros(2, 12, device=DEVICE))
    with pytest.raises(ValueError, match="latent_sqrt"):
        plan_gram(plan, torch.zeros(2, 12, device=DEVICE), latent_sqrt=torch.zeros(2, 4, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        plan_gram(plan, torch.zeros(2, 12, dtype=torch.float64, device=DEVICE))


# ----------------------------------------------------------------------------------------
# torch.library checks

def opcheck_samples():
    gen = torch.Generator().manual_seed(11)
    plan = trace_plan(make_encoder(0)).to(device=DEVICE)
    first = plan.layers[0].weight
    layers = plan.layers
    plan_args = (torch.randn(3, 12, generator=gen).to(DEVICE), [layer.weight for layer in layers],
                 [layer.bias for layer in layers], [layer.activation_code for layer in layers],
                 [float(layer.param) for layer in layers], [float(layer.threshold) for layer in layers],
                 plan.mu_weight, plan.s_weight, plan.s_bias, None, first @ first.T, 0, True)
    sym = torch.randn(2, 5, 5, generator=gen)
    return [
        (ops.triton_scaled_matmul.default, (torch.randn(2, 3, 4, generator=gen).to(DEVICE),
                                            torch.randn(2, 4, generator=gen).to(DEVICE),
                                            torch.randn(4, 5, generator=gen).to(DEVICE))),
        (ops.triton_eigh.default, ((sym + sym.transpose(1, 2)).to(DEVICE),)),
        (ops.triton_plan_gram.default, plan_args),
        (ops.triton_lanczos.default, ((sym + sym.transpose(1, 2)).to(DEVICE), 2, 4)),
    ]


@pytest.mark.parametrize("index", range(4))
def test_opcheck(index):
    op, args = opcheck_samples()[index]
    # Under the interpreter, torch's wrap_triton hands back the raw InterpretedFunction
    # (torch/_library/triton.py), so fake-tensor tracing would run the kernel on fake
    # tensors: only the schema and autograd-registration checks apply there.
    utils = ("test_schema", "test_autograd_registration") if INTERPRET else \
        ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, test_utils=utils)


COMPILE_SCRIPT = textwrap.dedent("""
    import torch
    from pullgeom.tracing.mlp_plan import DenseLayer, MLPPlan
    from pullgeom.kernels.triton import load_ops
    from pullgeom.kernels.triton.plan_gram import plan_gram
    load_ops()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    layers = (DenseLayer(torch.randn(8, 12), torch.randn(8), "tanh"),
              DenseLayer(torch.randn(6, 8), torch.randn(6), "relu"))
    plan = MLPPlan(layers, torch.randn(4, 6), torch.randn(4), torch.randn(4, 6), torch.randn(4)).to(device)

    def spectrum_of(x):
        left, gram = plan_gram(plan, x)
        values, vectors = torch.ops.pullgeom.triton_eigh(gram)
        return values, left.transpose(1, 2) @ vectors

    x = torch.randn(5, 12, device=device)
    # Without a GPU no Triton driver exists, so AOT/Inductor cannot lower the kernels: there
    # Dynamo's own backend checks the fullgraph trace (through the ops' fake kernels).
    backend = "inductor" if device == "cuda" else "eager"
    compiled = torch.compile(spectrum_of, fullgraph=True, backend=backend)
    for got, want in zip(compiled(x), spectrum_of(x)):
        torch.testing.assert_close(got.abs(), want.abs(), rtol=1e-4, atol=1e-4)
    print("compiled", backend)
""")


def test_compile_fullgraph_traces_the_ops():
    # A fresh process without TRITON_INTERPRET: compile needs the JIT kernels (see test_opcheck);
    # on CPU the ops then run their registered plain-torch CPU kernels.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled" in result.stdout
