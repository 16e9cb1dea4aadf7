"""The decoder-induced latent metric G_z (paper Eq. 11, MATH.md 3).

G_z(z) = J_{mu_g}^T J_{mu_g} + J_{sigma_g}^T J_{sigma_g}  (dz x dz), at z = mu(x).

dz is small, so forward mode (dz Jacobian-vector products, vmapped) is the cheap direction.
The metric enters the small problem through its symmetric square root, taken from its
eigendecomposition so that a singular G_z (dead decoder units) is handled without NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jacfwd, vmap

from pullgeom.backends.autograd_backend import single_sample_function
from pullgeom.encoder_output import split_decoder_output


def latent_metric(decoder, z: Tensor, sigma: str = "logvar") -> Tensor:
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
