"""Batched symmetric eigendecomposition, descending, with deterministic signs."""

from __future__ import annotations

import torch
from torch import Tensor


def symmetric_eig_descending(gram: Tensor) -> tuple[Tensor, Tensor]:
    """All eigenpairs of symmetric ``gram: (B, r, r)``.

    Returns eigenvalues (B, r) descending and eigenvectors (B, r, r) as columns. Computed by
    ``torch.linalg.eigh`` (LAPACK syevd / cuSOLVER); this is the reference the batched Jacobi
    kernels are tested against.
    """
    if gram.shape[0] == 0:
        r = gram.shape[-1]
        return gram.new_zeros(0, r), gram.new_zeros(0, r, r)
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(-1), vectors.flip(-1)


def canonical_signs(vectors: Tensor, dim: int = 1) -> Tensor:
    """Flip each vector so its largest-magnitude entry is positive (first one on ties).

    vectors: (B, n, k) with the vectors along ``dim``; deterministic for a given input.
    """
    index = vectors.abs().argmax(dim=dim, keepdim=True)
    pivot = vectors.gather(dim, index)
    sign = torch.where(pivot < 0, -1.0, 1.0).to(vectors.dtype)
    return vectors * sign
