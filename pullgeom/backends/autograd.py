"""Backend ``autograd``: materialise A = [J_mu; J_sigma] with torch.func, any encoder.

Per sample: jacrev of x -> (mu, sigma) gives A (2dz x N) in 2dz vector-Jacobian products,
vmapped over the chunk; eval-mode modules run through ``functional_call`` with detached
parameters so no parameter gradients are tracked. Memory per chunk: B * 2dz * N floats,
which the API bounds through ``chunk_size``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call, jacrev, vmap

from pullgeom.backends.base import Backend, Problem
from pullgeom.encoder import mean_and_std
from pullgeom.factor import LowRankFactor


def single_sample_function(module_or_fn, transform):
    """Wrap ``module_or_fn`` as f(x_i) for one sample ``x_i: S``, with frozen parameters."""
    if isinstance(module_or_fn, nn.Module):
        params = {name: p.detach() for name, p in module_or_fn.named_parameters()}
        buffers = dict(module_or_fn.named_buffers())

        def call(batch):
            return functional_call(module_or_fn, (params, buffers), (batch,))
    else:
        call = module_or_fn

    def per_sample(xi: Tensor):
        return transform(call(xi.unsqueeze(0)))

    return per_sample


def encoder_jacobian(problem: Problem, x: Tensor) -> Tensor:
    """Per-sample Jacobian of [mu; sigma] (or mu alone): (B, 2dz or dz, N)."""

    def heads(output_of_batch):
        mu, std = mean_and_std(lambda _: output_of_batch, None, problem.sigma)
        return torch.cat([mu[0], std[0]]) if problem.stochastic else mu[0]

    per_sample = single_sample_function(problem.encoder, heads)
    jac = vmap(jacrev(per_sample))(x)
    return jac.reshape(x.shape[0], jac.shape[1], -1)


class AutogradBackend(Backend):
    name = "autograd"

    def factor(self, problem: Problem, x: Tensor, latent_sqrt: Tensor | None) -> LowRankFactor:
        jac = encoder_jacobian(problem, x)
        if latent_sqrt is not None:
            dz = problem.latent_dim
            blocks = [latent_sqrt @ jac[:, i * dz:(i + 1) * dz] for i in range(jac.shape[1] // dz)]
            jac = torch.cat(blocks, dim=1)
        return LowRankFactor(jac)
