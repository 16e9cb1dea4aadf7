"""Assertions shared by the parity tests: a result against the float64 dense reference."""

from __future__ import annotations

import torch

from pullgeom.reference import dense_spectrum


def reference_top(encoder, x, k, **kwargs):
    """Float64 dense eigenvalues (B, N) and top-k eigenvectors (B, k, N)."""
    values, vectors = dense_spectrum(encoder, x, **kwargs)
    return values, vectors[:, :, :k].transpose(1, 2)


def well_separated(values: torch.Tensor, k: int, gap: float) -> torch.Tensor:
    """(B, k) mask of eigenvalues separated from both neighbours by > gap * lambda_1."""
    lam = values[:, : k + 1]
    scale = values[:, :1].clamp_min(1e-300)
    above = torch.cat([torch.full_like(lam[:, :1], float("inf")), lam[:, :-1] - lam[:, 1:]], dim=1)
    below = torch.cat([lam[:, :-1] - lam[:, 1:], torch.full_like(lam[:, :1], float("inf"))], dim=1)
    sep = torch.minimum(above, below)[:, :k] / scale
    return (sep > gap) & (lam[:, :k] / scale > gap)


def assert_matches_reference(result, ref_values, ref_vectors, *, rtol, cos_min, gap=1e-3):
    """Top-k eigenvalues within ``rtol * lambda_1``; well-separated eigenvectors |cos| >= cos_min.

    Every eigenvalue in ``all_eigenvalues`` must match too (those past the rank are ~0).
    """
    k = result.eigenvalues.shape[1]
    r = result.all_eigenvalues.shape[1]
    scale = ref_values[:, :1].clamp_min(1e-30)
    got_all = result.all_eigenvalues.double()
    err_all = ((got_all - ref_values[:, :r]).abs() / scale).max().item()
    assert err_all <= rtol, f"all_eigenvalues off by {err_all:.3e} relative (tolerance {rtol:.1e})"
    err_top = ((result.eigenvalues.double() - ref_values[:, :k]).abs() / scale).max().item()
    assert err_top <= rtol, f"top-{k} eigenvalues off by {err_top:.3e} relative"
    batch = result.eigenvectors.shape[0]
    vectors = result.eigenvectors.reshape(batch, k, -1).double()
    norms = vectors.norm(dim=-1)
    mask = well_separated(ref_values, k, gap)
    assert torch.allclose(norms[mask], torch.ones_like(norms[mask]), atol=1e-4)
    cos = (vectors * ref_vectors).sum(-1).abs()
    if mask.any():
        worst = cos[mask].min().item()
        assert worst >= cos_min, f"eigenvector |cos| {worst:.6f} < {cos_min} where the gap allows"
