"""Batched small symmetric eigensolver: parallel two-sided Jacobi, one matrix per program.

Each program holds its matrix A (padded to BLOCK x BLOCK, a power of two) and the rotations V
in registers. A sweep is BLOCK - 1 rounds of the round-robin ("circle method") pairing: every
round pairs all indices into BLOCK / 2 disjoint pairs (p, q) and applies their Jacobi
rotations at once, A <- J^T A J, V <- V J, which zeroes every a_pq of the round. Disjoint
rotations act on distinct columns, so J^T A J is two elementwise updates with a gather of the
partner column / row (O(BLOCK^2) per round, no matmul):

    (A J)[:, j] = c_j A[:, j] + sg_j A[:, partner(j)],   sg = -s on p, +s on q

with the rotation of Golub & Van Loan's sym.schur2: tau = (a_qq - a_pp) / (2 a_pq),
t = sign(tau) / (|tau| + sqrt(1 + tau^2)), c = 1 / sqrt(1 + t^2), s = t c. Padding rows are
zero, so their a_pq is 0 and their rotation is the identity: they never mix with real ones.
Sweeps stop when ||offdiag(A)||_F^2 <= tol^2 ||A||_F^2 or after ``max_sweeps``.
A matrix with a NaN or inf entry gets NaN eigenvalues and eigenvectors.

Op: ``torch.ops.pullgeom.triton_eigh(gram)``; its CPU kernel (unless ``TRITON_INTERPRET=1``)
is ``torch.linalg.eigh`` via ``symmetric_eig_descending``.
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

# One matrix per program: A and V are BLOCK x BLOCK tiles, and the compiled kernel stages them
# through shared memory: 64 KiB (float32) / 128 KiB (float64) at BLOCK = 128 for sm_90, but
# 256 / 512 KiB at 256, over the 227 KiB a block may have (OutOfResources at launch). Measured
# by scripts/compile_triton_sm90.py; larger matrices go to torch.linalg.eigh (triton backend).
MAX_SIZE = 128
MAX_SWEEPS = 30  # quadratic convergence takes 6-10 sweeps; 30 bounds a pathological input
# Stopping tolerance on ||offdiag||_F / ||A||_F, a few units of round-off per dtype.
TOLERANCES = {torch.float32: 4 * torch.finfo(torch.float32).eps,
              torch.float64: 4 * torch.finfo(torch.float64).eps}


@triton.jit
def jacobi_eigh_kernel(a_ptr, values_ptr, vectors_ptr, n, stride_ab, stride_ar, stride_ac,
                       max_sweeps, tol_sq, BLOCK: tl.constexpr):
    """Grid (B,): eigenvalues (unsorted) of a[b] into values[b, :n], vectors[b] as columns."""
    batch = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    rows = idx[:, None]
    cols = idx[None, :]
    inside = (rows < n) & (cols < n)
    a = tl.load(a_ptr + batch * stride_ab + rows * stride_ar + cols * stride_ac, mask=inside, other=0.0)
    a = 0.5 * (a + tl.trans(a))
    eye = rows == cols
    v = tl.where(eye, 1.0, 0.0).to(a.dtype)
    total = tl.sum(tl.sum(a * a, axis=1), axis=0)
    # NaN or inf entries (x - x is NaN only for those): the sweeps would stop at once, off being
    # NaN, and return the diagonal as if it were the spectrum; the whole sample is NaN instead.
    non_finite = tl.sum(tl.sum(tl.where(a - a == 0, 0, 1), axis=1), axis=0) > 0
    off = tl.sum(tl.sum(tl.where(eye, 0.0, a * a), axis=1), axis=0)
    sweep = 0
    while (sweep < max_sweeps) & (off > tol_sq * total):
        for step in range(BLOCK - 1):
            # Circle method: BLOCK - 1 stays put, the others pair as i + j = 2 step (mod BLOCK - 1).
            partner = (2 * step - idx + (BLOCK - 1)) % (BLOCK - 1)
            partner = tl.where(partner == idx, BLOCK - 1, partner)
            partner = tl.where(idx == BLOCK - 1, step, partner)
            pair = cols == partner[:, None]
            diag = tl.sum(tl.where(eye, a, 0.0), axis=1)
            diag_partner = tl.gather(diag, partner, axis=0)
            is_p = idx < partner
            # Both members of a pair read the same element a[p, q]: a[q, p] can differ by
            # round-off, and near a repeated eigenvalue that flips the sign of tau on one
            # side only, which would make J (and V) non-orthogonal.
            own = tl.sum(tl.where(pair, a, 0.0), axis=1)  # a[i, partner(i)]
            apq = tl.where(is_p, own, tl.gather(own, partner, axis=0))
            nonzero = apq != 0
            tau = tl.where(is_p, diag_partner - diag, diag - diag_partner) / (2 * tl.where(nonzero, apq, 1.0))
            # Clamped so tau^2 cannot overflow float32: beyond 1e18 the rotation (t < 5e-19)
            # is the identity to working precision either way.
            size = tl.minimum(tl.abs(tau), 1e18)
            t = tl.where(tau >= 0, 1.0, -1.0) / (size + tl.sqrt(1 + size * size))
            t = tl.where(nonzero, t, 0.0)
            c = 1 / tl.sqrt(1 + t * t)
            sg = tl.where(is_p, -t * c, t * c)
            partner_cols = tl.broadcast_to(partner[None, :], (BLOCK, BLOCK))
            partner_rows = tl.broadcast_to(partner[:, None], (BLOCK, BLOCK))
            half = a * c[None, :] + tl.gather(a, partner_cols, axis=1) * sg[None, :]
            a = half * c[:, None] + tl.gather(half, partner_rows, axis=0) * sg[:, None]
            # The rotation annihilates a_pq; store the exact zero instead of its round-off.
            a = tl.where(pair, 0.0, a)
            v = v * c[None, :] + tl.gather(v, partner_cols, axis=1) * sg[None, :]
        off = tl.sum(tl.sum(tl.where(eye, 0.0, a * a), axis=1), axis=0)
        sweep += 1
    diag = tl.where(non_finite, float("nan"), tl.sum(tl.where(eye, a, 0.0), axis=1))
    v = tl.where(non_finite, float("nan"), v)
    tl.store(values_ptr + batch * n + idx, diag, mask=idx < n)
    tl.store(vectors_ptr + batch * n * n + rows * n + cols, v, mask=inside)


def num_warps(block: int) -> int:
    """Warps of a BLOCK program. Not tuned on a GPU (none was available when this was written):
    enough warps that a BLOCK x BLOCK tile is a few dozen registers a thread up to BLOCK = 64."""
    return 4 if block <= 32 else 8 if block <= 64 else 16


def _check_gram(gram: Tensor) -> None:
    check_floating("gram", gram)
    if gram.dim() != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must be a batch of square matrices (B, n, n), got shape {tuple(gram.shape)}")
    if gram.shape[1] > MAX_SIZE:
        raise ValueError(f"gram is {gram.shape[1]} x {gram.shape[1]}; the Triton Jacobi kernel holds one "
                         f"matrix per program and takes n <= {MAX_SIZE}")


def eigh_reference(gram: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh, descending: the CPU kernel and the oracle."""
    _check_gram(gram)
    return symmetric_eig_descending(gram)


@triton_op("pullgeom::triton_eigh", mutates_args={})
def triton_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """All eigenpairs of symmetric gram: (B, n, n), n <= 128 (the average with gram^T is used).

    Returns eigenvalues (B, n) descending and eigenvectors (B, n, n) as columns (signs
    arbitrary but deterministic). Jacobi gives small eigenvalues to high relative accuracy.
    """
    _check_gram(gram)
    batch, n, _ = gram.shape
    values = gram.new_empty(batch, n)
    vectors = gram.new_empty(batch, n, n)
    if batch == 0 or n == 0:
        return values, vectors
    block = max(2, triton.next_power_of_2(n))
    tol = TOLERANCES[gram.dtype]
    wrap_triton(jacobi_eigh_kernel)[(batch,)](
        gram, values, vectors, n, gram.stride(0), gram.stride(1), gram.stride(2),
        MAX_SWEEPS, tol * tol, BLOCK=block, num_warps=num_warps(block))
    order = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, order), vectors.gather(2, order.unsqueeze(1).expand(batch, n, n))


if not interpreting():
    triton_eigh.register_kernel("cpu")(eigh_reference)
