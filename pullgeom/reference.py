"""Brute-force float64 reference: the per-sample dense Jacobian and the N x N metric.

This is the paper authors' recipe (form G, call a dense eigensolver per sample) and the
oracle every backend and kernel is tested against. It costs O(N^3) per sample: use it on
small inputs only.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch import Tensor

from pullgeom.encoder_output import (DEFAULT_SIGMA, as_decoder, as_encoder, latent_heads, on_latents,
                                     split_decoder_output)


def _as_float64(fn):
    if isinstance(fn, nn.Module):
        return copy.deepcopy(fn).double()
    return fn


def dense_metric(encoder, x: Tensor, *, decoder=None, stochastic: bool = True,
                 sigma: str | None = None) -> Tensor:
    """G(x) for every sample, float64: (B, N, N).

    Encoders and decoders as the API takes them (any output convention, whole VAE objects,
    latents of any shape flattened C-order, the decoder fed z in the latent's shape), read by
    the same conversion (``pullgeom.encoder_output``). ``sigma``: out2's convention (default
    "logvar").
    """
    sigma = sigma or DEFAULT_SIGMA
    encoder64, decode = _as_float64(as_encoder(encoder)), _as_float64(as_decoder(decoder))
    if decode is not None and x.shape[0]:
        with torch.no_grad():
            latent_shape = tuple(latent_heads(encoder64(x[:1].double()), 1, sigma)[0].shape[1:])
        decode = on_latents(decode, latent_shape)
    metrics = []
    for xi in x.double():
        def heads(inp, part):
            mu, std = latent_heads(encoder64(inp.unsqueeze(0)), 1, sigma)
            return (mu if part == 0 else std).reshape(-1)

        parts = (0, 1) if stochastic else (0,)
        jacobians = [torch.autograd.functional.jacobian(lambda v, part=part: heads(v, part), xi)
                     .reshape(-1, xi.numel()) for part in parts]
        if decode is None:
            g_z = torch.eye(jacobians[0].shape[0], dtype=torch.float64)
        else:
            z = heads(xi, 0).detach()

            def dec(v, part):
                mean, std = split_decoder_output(decode(v.unsqueeze(0)), sigma)
                return (mean if part == 0 else std).reshape(-1)

            j_mean = torch.autograd.functional.jacobian(lambda v: dec(v, 0), z)
            g_z = j_mean.T @ j_mean
            if split_decoder_output(decode(z.unsqueeze(0)), sigma)[1] is not None:
                j_std = torch.autograd.functional.jacobian(lambda v: dec(v, 1), z)
                g_z = g_z + j_std.T @ j_std
        metrics.append(sum(j.T @ g_z @ j for j in jacobians))
    if not metrics:
        n = x[0].numel() if x.shape[0] else int(torch.tensor(x.shape[1:]).prod())
        return torch.zeros(0, n, n, dtype=torch.float64)
    return torch.stack(metrics)


def dense_spectrum(encoder, x: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
    """Full eigendecomposition of the dense metric.

    Returns eigenvalues (B, N) descending and eigenvectors (B, N, N) as columns, float64.
    """
    values, vectors = torch.linalg.eigh(dense_metric(encoder, x, **kwargs))
    return values.flip(-1), vectors.flip(-1)


def jacrev_spectrum(encoder, x: Tensor, k: int = 5, sigma: str = DEFAULT_SIGMA) -> tuple[Tensor, Tensor]:
    """What a researcher writes by hand with torch.func: per-sample ``vmap(jacrev)`` for
    A = [J_mu; J_sigma], the small Gram A A^T, ``eigh``, and the top-k vectors A^T u / ||.||.

    The benchmarks' "autograd recipe" baseline. Returns eigenvalues (B, 2dz) descending and the
    top-k eigenvectors (B, k, N).
    """
    from torch.func import jacrev, vmap

    encoder = as_encoder(encoder)

    def heads(xi):
        mu, std = latent_heads(encoder(xi.unsqueeze(0)), 1, sigma)
        return torch.cat([mu[0].reshape(-1), std[0].reshape(-1)])

    with torch.no_grad():
        jac = vmap(jacrev(heads))(x).flatten(2)  # (B, 2dz, N)
    values, vectors = torch.linalg.eigh(jac @ jac.transpose(1, 2))
    top = jac.transpose(1, 2) @ vectors.flip(-1)[:, :, :k]
    return values.flip(-1), (top / top.norm(dim=1, keepdim=True)).transpose(1, 2)
