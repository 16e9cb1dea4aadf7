"""Batched top-k Lanczos on many small symmetric matrices, one matrix per program.

Each program keeps its matrix (padded to BLOCK x BLOCK) and the Krylov basis (STEPS x BLOCK)
in registers and runs ``steps`` Lanczos steps with full reorthogonalisation (classical
Gram-Schmidt applied twice: "twice is enough" keeps the basis orthonormal to round-off).
Rank-deficient spectra are the normal case for the pullback Gram, so a breakdown
(beta_j <= tol ||M||_F: the Krylov space is invariant) is not an error: the sample restarts
from a fresh pseudo-random direction orthogonalised against its basis and records beta_j = 0,
which splits T into independent blocks. This also finds every copy of a repeated eigenvalue,
which plain Lanczos cannot. Each sample breaks down and restarts on its own.

The launcher solves the tridiagonal T (steps x steps) in float64 (torch.linalg.eigh), maps the
top-k Ritz vectors back through the basis, and reports the true residuals ||M v - theta v||.
With ``steps = n`` the basis spans the whole space and the result is exact to round-off.

A matrix with a NaN or inf entry gets NaN values, vectors and residuals.

Op: ``torch.ops.pullgeom.triton_lanczos(gram, k, steps)``; CPU kernel (unless
``TRITON_INTERPRET=1``): ``torch.linalg.eigh`` (what ``steps = n`` converges to).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from pullgeom.linalg.eigh import symmetric_eig_descending
from pullgeom.kernels.triton import interpreting
from pullgeom.kernels.triton.scaled_matmul import check_floating

MAX_SIZE = 128  # the matrix and a full basis both live in registers: 2 * 128^2 values a program
# Breakdown threshold on beta_j / ||M||_F, a few hundred units of round-off per dtype.
TOLERANCES = {torch.float32: 256 * torch.finfo(torch.float32).eps,
              torch.float64: 256 * torch.finfo(torch.float64).eps}


@triton.jit
def _orthogonalize(w, basis):
    """w minus its projection on the rows of ``basis`` (zero rows project to nothing), twice."""
    w = w - tl.sum(basis * tl.sum(basis * w[None, :], axis=1)[:, None], axis=0)
    return w - tl.sum(basis * tl.sum(basis * w[None, :], axis=1)[:, None], axis=0)


@triton.jit
def lanczos_kernel(m_ptr, basis_ptr, alpha_ptr, beta_ptr, n, steps, stride_mb, stride_mr, stride_mc,
                   tol, seed, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """Grid (B,): basis[b] (steps, n) rows q_j, alpha[b] (steps,), beta[b] (steps,)."""
    batch = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    rows = idx[:, None]
    cols = idx[None, :]
    live = idx < n
    a = tl.load(m_ptr + batch * stride_mb + rows * stride_mr + cols * stride_mc,
                mask=(rows < n) & (cols < n), other=0.0)
    a = 0.5 * (a + tl.trans(a))
    norm = tl.sqrt(tl.sum(tl.sum(a * a, axis=1), axis=0))
    step_ids = tl.arange(0, STEPS)
    basis = tl.zeros((STEPS, BLOCK), dtype=a.dtype)
    alphas = tl.zeros((STEPS,), dtype=a.dtype)
    betas = tl.zeros((STEPS,), dtype=a.dtype)
    # Philox stream per sample: offsets j * BLOCK + i give step j its own fresh direction.
    q = tl.where(live, tl.randn(seed + batch, idx), 0.0).to(a.dtype)
    q = q / tl.sqrt(tl.sum(q * q, axis=0))
    q_prev = tl.zeros((BLOCK,), dtype=a.dtype)
    beta_prev = tl.sum(q_prev, axis=0)  # a zero scalar of a's dtype, carried through the loop
    for j in range(steps):
        basis = tl.where(step_ids[:, None] == j, q[None, :], basis)
        w = tl.sum(a * q[None, :], axis=1)
        alpha = tl.sum(w * q, axis=0)
        alphas = tl.where(step_ids == j, alpha, alphas)
        w = _orthogonalize(w - alpha * q - beta_prev * q_prev, basis)
        beta = tl.sqrt(tl.sum(w * w, axis=0))
        broke = beta <= tol * norm
        fresh = tl.where(live, tl.randn(seed + batch, idx + (j + 1) * BLOCK), 0.0).to(a.dtype)
        fresh = _orthogonalize(fresh, basis)
        fresh = fresh / tl.maximum(tl.sqrt(tl.sum(fresh * fresh, axis=0)), 1e-30)
        beta = tl.where(broke, 0.0, beta)
        betas = tl.where(step_ids == j, beta, betas)
        q_prev = q
        beta_prev = beta
        q = tl.where(broke, fresh, w / tl.maximum(beta, 1e-30))
    out = basis_ptr + batch * steps * n + step_ids[:, None] * n + cols
    tl.store(out, basis, mask=(step_ids[:, None] < steps) & (cols < n))
    tl.store(alpha_ptr + batch * steps + step_ids, alphas, mask=step_ids < steps)
    tl.store(beta_ptr + batch * steps + step_ids, betas, mask=step_ids < steps)


def num_warps(block: int) -> int:
    """Warps of a BLOCK program (not tuned on a GPU)."""
    return 4 if block <= 32 else 8


def _check_lanczos(gram: Tensor, k: int, steps: int) -> None:
    check_floating("gram", gram)
    if gram.dim() != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must be a batch of square matrices (B, n, n), got shape {tuple(gram.shape)}")
    n = gram.shape[1]
    if n > MAX_SIZE:
        raise ValueError(f"gram is {n} x {n}; the Triton Lanczos kernel takes n <= {MAX_SIZE}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and n={n}")
    if not k <= steps <= n:
        raise ValueError(f"steps={steps} must be between k={k} and n={n}")


def _residuals(gram: Tensor, values: Tensor, vectors: Tensor) -> Tensor:
    gram = 0.5 * (gram + gram.transpose(1, 2))
    return (gram @ vectors - vectors * values.unsqueeze(1)).norm(dim=1)


def lanczos_reference(gram: Tensor, k: int, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """torch.linalg.eigh's top k (what ``steps = n`` gives): the CPU kernel and the oracle."""
    _check_lanczos(gram, k, steps)
    values, vectors = symmetric_eig_descending(0.5 * (gram + gram.transpose(1, 2)))
    values, vectors = values[:, :k], vectors[:, :, :k]
    return values, vectors, _residuals(gram, values, vectors)


@triton_op("pullgeom::triton_lanczos", mutates_args={})
def triton_lanczos(gram: Tensor, k: int, steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k eigenpairs of symmetric gram: (B, n, n), n <= 128, from ``steps`` Lanczos steps.

    Returns Ritz values (B, k) descending, Ritz vectors (B, n, k) as unit columns and their
    residuals ||gram v - theta v|| (B, k). k <= steps <= n; steps = n is exact. Deterministic
    (fixed pseudo-random start per sample).
    """
    _check_lanczos(gram, k, steps)
    batch, n, _ = gram.shape
    if batch == 0:
        return gram.new_zeros(0, k), gram.new_zeros(0, n, k), gram.new_zeros(0, k)
    basis = gram.new_empty(batch, steps, n)
    alphas = gram.new_empty(batch, steps)
    betas = gram.new_empty(batch, steps)
    block = max(2, triton.next_power_of_2(n))
    wrap_triton(lanczos_kernel)[(batch,)](
        gram, basis, alphas, betas, n, steps, gram.stride(0), gram.stride(1), gram.stride(2),
        TOLERANCES[gram.dtype], 0x5EED, BLOCK=block, STEPS=max(2, triton.next_power_of_2(steps)),
        num_warps=num_warps(block))
    # A NaN or inf entry makes alpha_0 (and what follows) non-finite, and one non-finite
    # tridiagonal makes eigh raise for the whole batch: such samples solve a zero tridiagonal
    # and come back all NaN.
    finite = (torch.isfinite(alphas).all(dim=1) & torch.isfinite(betas).all(dim=1)).unsqueeze(1)
    # The tridiagonal solve in float64: it is steps x steps, and its small eigenvalues decide
    # which Ritz pairs are kept.
    diagonal = torch.where(finite, alphas, 0.0).double()
    off = torch.where(finite, betas, 0.0)[:, :-1].double()
    tridiagonal = torch.diag_embed(diagonal) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    ritz_values, ritz_vectors = symmetric_eig_descending(tridiagonal)
    values = ritz_values[:, :k].to(gram.dtype)
    vectors = basis.transpose(1, 2) @ ritz_vectors[:, :, :k].to(gram.dtype)
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(gram.dtype).tiny)
    values = torch.where(finite, values, torch.nan)
    vectors = torch.where(finite.unsqueeze(1), vectors, torch.nan)
    return values, vectors, torch.where(finite, _residuals(gram, values, vectors), torch.nan)


if not interpreting():
    triton_lanczos.register_kernel("cpu")(lanczos_reference)
