"""Robustness scores of a pullback-metric spectrum (MATH.md 4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ENTROPY_NORMS = ("max", "trace")
# "paper": the paper's equations, the eigenvalues of G. "authors": what the authors' published
# code computes (../shared/paper/README.md in the project): the singular values of J_mu alone,
# s_i = sqrt(lambda_i(J_mu^T J_mu)), entropy over them normalised by the largest.
CONVENTIONS = ("paper", "authors")


def check_convention(convention: str, entropy_norm: str = "max") -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not known; use 'paper' (eigenvalues of G, the "
                         "paper's equations) or 'authors' (singular values of J_mu, the authors' code)")
    if convention == "authors" and entropy_norm != "max":
        raise ValueError("convention='authors' normalises the entropy by the largest singular value, as "
                         "the authors' code does; leave entropy_norm='max'")


def check_entropy_norm(entropy_norm: str) -> None:
    if entropy_norm not in ENTROPY_NORMS:
        raise ValueError(
            f"entropy_norm={entropy_norm!r} is not known; use 'max' (p = lambda / lambda_max, "
            "the paper's figures) or 'trace' (p = lambda / sum lambda, the density-matrix entropy)"
        )


def von_neumann_entropy(eigenvalues: Tensor, entropy_norm: str = "max") -> Tensor:
    """S = -sum_{p_i > 0} p_i log p_i over the last dim of ``eigenvalues: (B, r)`` -> (B,).

    Round-off negatives are clamped to 0 and zero eigenvalues contribute 0. An all-zero
    spectrum (a constant encoder) has entropy 0.
    """
    check_entropy_norm(entropy_norm)
    lam = eigenvalues.clamp_min(0)
    if entropy_norm == "max":
        denom = lam.amax(dim=-1, keepdim=True)
    else:
        denom = lam.sum(dim=-1, keepdim=True)
    p = lam / torch.where(denom > 0, denom, torch.ones_like(denom))
    terms = torch.where(p > 0, -p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return terms.sum(dim=-1)


@dataclass
class Scores:
    """Per-sample scores, each (B,)."""

    spectral_radius: Tensor
    entropy: Tensor
    trace: Tensor
    log_det: Tensor  # sum of log lambda over the nonzero spectrum
    rank: Tensor  # number of eigenvalues above the round-off threshold


def scores_from_eigenvalues(eigenvalues: Tensor, entropy_norm: str = "max") -> Scores:
    """Scores from the nonzero-spectrum eigenvalues ``(B, r)`` (any order).

    "Nonzero" means above r * eps * lambda_max, the round-off floor of the small eigenproblem.
    """
    lam = eigenvalues.clamp_min(0)
    radius = lam.amax(dim=-1) if lam.shape[-1] else lam.sum(dim=-1)
    floor = lam.shape[-1] * torch.finfo(lam.dtype).eps * radius.unsqueeze(-1)
    nonzero = lam > floor
    log_det = torch.where(nonzero, torch.log(torch.where(nonzero, lam, torch.ones_like(lam))),
                          torch.zeros_like(lam)).sum(dim=-1)
    return Scores(
        spectral_radius=radius,
        entropy=von_neumann_entropy(lam, entropy_norm),
        trace=lam.sum(dim=-1),
        log_det=log_det,
        rank=nonzero.sum(dim=-1),
    )


def authors_convention_scores(mean_eigenvalues: Tensor) -> Scores:
    """The authors' convention from the eigenvalues of J_mu^T J_mu ``(B, r)`` (a spectrum with
    ``stochastic=False``): every score of ``scores_from_eigenvalues`` taken over the singular values
    s = sqrt(lambda) of J_mu, the entropy normalised by the largest (spectral_radius = s_max)."""
    return scores_from_eigenvalues(mean_eigenvalues.clamp_min(0).sqrt(), "max")
