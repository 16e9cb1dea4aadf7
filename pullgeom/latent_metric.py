"""The decoder-induced latent metric G_z (paper Eq. 11, MATH.md 3).

G_z(z) = J_{mu_g}^T J_{mu_g} + J_{sigma_g}^T J_{sigma_g}  (dz x dz), at z = mu(x).

dz is small, so forward mode (dz Jacobian-vector products, vmapped) is the cheap direction.
The metric enters the small problem through its symmetric square root, taken from its
eigendecomposition so that a singular G_z (dead decoder units) is handled without NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch.func import jacfwd, vmap

from pullgeom.encoder_output import DEFAULT_SIGMA, single_sample_function, split_decoder_output


def latent_metric(decoder, z: Tensor, sigma: str = DEFAULT_SIGMA) -> Tensor:
    """G_z for each latent ``z: (B, dz)`` -> (B, dz, dz)."""

    def outputs(output_of_batch):
        mean, std = split_decoder_output(output_of_batch, sigma)
        mean = mean.reshape(-1)
        return mean if std is None else torch.cat([mean, std.reshape(-1)])

    per_sample = single_sample_function(decoder, outputs)
    jac = vmap(jacfwd(per_sample))(z)  # (B, N_out or 2 N_out, dz)
    return jac.transpose(1, 2) @ jac


def symmetric_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric PSD square root of ``matrix: (B, n, n)``; round-off negatives clamp to 0."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)


@dataclass(frozen=True)
class LatentMetric:
    """The decoder's metric G_z inserted into G = J^T G_z J: the one way a decoder reaches a backend.

    decoder: z (B, dz) -> an output in any of ``encoder_output.DECODER_CONVENTIONS`` (the API
    wraps a decoder of shaped latents in ``encoder_output.OnLatents``); sigma: the convention of
    its out2.
    Backends that factor G densely take ``sqrt_at``; the matrix-free one applies
    J_g^T J_g u through the decoder's Jacobian (``pullgeom.backends.lanczos_backend``).
    """

    decoder: Callable
    sigma: str

    def sqrt_at(self, z: Tensor) -> Tensor:
        """G_z^{1/2} (B, dz, dz) at latents ``z: (B, dz)``."""
        return symmetric_sqrt(latent_metric(self.decoder, z, self.sigma))
