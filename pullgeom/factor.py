"""The low-rank factored form of the pullback metric.

Every backend produces, per sample, a factor ``F = left @ right`` with ``G = F^T F``:

    left:  (B, r, m)   per-sample rows (r <= 2dz, the small side)
    right: (m, N)      shared by every sample, or None (then m = N and F = left)

For the analytic MLP chain ``right`` is the first layer's weight W_1 (MATH.md 2), so the N-wide
part is touched once per batch, and ``right @ right^T`` (m x m) is computed once. For the
``autograd`` backend ``left`` is the materialised, K^{1/2}-weighted Jacobian [J_mu; J_sigma].

Identity (MATH.md 1): the nonzero eigenvalues of G = F^T F (N x N) are those of the Gram
M = F F^T (r x r); if M u = lambda u then v = F^T u / sqrt(lambda) is a unit eigenvector of G.
Multiply-adds per sample: the Gram r m^2 + r^2 m (m^2 N once per batch for right right^T),
the small eigh O(r^3), the map-back of k vectors k (r m + m N) -- versus O(N^3) for a dense
eigensolver on G.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LowRankFactor:
    """G = (left @ right)^T (left @ right), per sample; see the module docstring for shapes."""

    left: Tensor
    right: Tensor | None = None
    right_gram: Tensor | None = None  # right @ right^T, cached (m, m)

    @property
    def rank_bound(self) -> int:
        return self.left.shape[1]

    def shared_gram(self) -> Tensor | None:
        if self.right is None:
            return None
        if self.right_gram is None:
            self.right_gram = self.right @ self.right.T
        return self.right_gram

    def gram(self) -> Tensor:
        """M = F F^T: (B, r, r), symmetrised against round-off."""
        shared = self.shared_gram()
        if shared is None:
            gram = self.left @ self.left.transpose(1, 2)
        else:
            gram = self.left @ shared @ self.left.transpose(1, 2)
        return 0.5 * (gram + gram.transpose(1, 2))

    def dense_factor(self) -> Tensor:
        """F: (B, r, N)."""
        return self.left if self.right is None else self.left @ self.right

    def transpose_apply(self, u: Tensor) -> Tensor:
        """F^T u for u: (B, r, k) -> (B, N, k).

        Computed as ((u^T left) right)^T: the shared ``right`` then meets all B k rows in one
        (B k, m) x (m, N) GEMM, where W^T (left^T u) would batch a thin (N, m) x (m, k) product
        per sample (10x slower on the paper encoder; BENCHMARKS.md, "Where the time goes").
        """
        back = u.transpose(1, 2) @ self.left  # (B, k, m)
        if self.right is not None:
            back = back @ self.right  # (B, k, N)
        return back.transpose(1, 2)

    def apply(self, v: Tensor) -> Tensor:
        """F v for v: (B, N, k) -> (B, r, k)."""
        if self.right is not None:
            v = self.right @ v
        return self.left @ v

    def matvec(self, v: Tensor) -> Tensor:
        """G v = F^T (F v) for v: (B, N) or (B, N, k)."""
        squeeze = v.dim() == 2
        if squeeze:
            v = v.unsqueeze(-1)
        out = self.transpose_apply(self.apply(v))
        return out.squeeze(-1) if squeeze else out

    def dense(self) -> Tensor:
        """G: (B, N, N). Only for small N: this is the matrix pullgeom exists to avoid."""
        factor = self.dense_factor()
        return factor.transpose(1, 2) @ factor


def eigenvectors_from_gram(factor: LowRankFactor, gram_vectors: Tensor) -> Tensor:
    """Map Gram eigenvectors back to input space: v = F^T u / ||F^T u|| (= F^T u / sqrt(lambda)).

    gram_vectors: (B, r, k) -> (B, N, k), unit norm. Normalising by the computed norm rather
    than sqrt(lambda) keeps unit length when lambda carries round-off. Where F^T u = 0 (lambda
    = 0: rank below k) the direction is in G's null space and comes back as zeros, never NaN.
    """
    back = factor.transpose_apply(gram_vectors)
    norms = back.norm(dim=1, keepdim=True)
    tiny = torch.finfo(back.dtype).tiny
    return torch.where(norms > tiny, back / norms.clamp_min(tiny), torch.zeros_like(back))
