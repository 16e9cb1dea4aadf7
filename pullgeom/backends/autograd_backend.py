"""Backend ``autograd``: materialise A = [J_mu; J_sigma] with torch.func, any encoder.

In eval mode the samples of a batch are independent, so d out[i, j] / d x[i] for every i is
one vector-Jacobian product of the whole chunk with the cotangent e_j in every row: 2dz calls
of one ``torch.func.vjp`` pullback give A (B, 2dz, N), each running the encoder's ordinary
batched backward kernels. Why this loop: on a small conv encoder the per-sample vmap(jacrev)
took 1.7x its time, and vmapping the pullback over all 2dz cotangents a third of it but 33x the
memory of A (conv's batching rule), against ~2x A for the loop (BENCHMARKS.md, "measurements
behind design choices"). Modules run through ``functional_call`` with detached parameters so
no parameter gradients are tracked.
Memory per chunk: about 2 B * 2dz * N floats, which the API bounds through ``chunk_size``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vjp

from pullgeom.backends.base import Backend, Problem
from pullgeom.encoder_output import heads_function
from pullgeom.factor import LowRankFactor


def batch_jacobian(fn, x: Tensor) -> Tensor:
    """Per-sample Jacobian of a batch-independent ``fn: (B, *S) -> (B, m)``: (B, m, N)."""
    out, pullback = vjp(fn, x)
    batch, m = out.shape
    jac = out.new_empty(batch, m, x[0].numel())
    cotangent = torch.zeros_like(out)
    for j in range(m):
        cotangent[:, j] = 1
        jac[:, j] = pullback(cotangent)[0].reshape(batch, -1)
        cotangent[:, j] = 0
    return jac


def encoder_jacobian(problem: Problem, x: Tensor) -> Tensor:
    """Per-sample Jacobian A of [mu; sigma] (or mu alone) at ``x: (B, *S)``: (B, 2dz or dz, N)."""
    return batch_jacobian(heads_function(problem.encoder, problem.sigma, problem.stochastic), x)


class AutogradBackend(Backend):
    name = "autograd"

    def factor(self, problem: Problem, x: Tensor) -> LowRankFactor:
        jac = encoder_jacobian(problem, x)
        root = problem.latent_sqrt(x)
        if root is not None:
            dz = problem.latent_dim
            jac = torch.cat([root @ jac[:, i * dz:(i + 1) * dz] for i in range(jac.shape[1] // dz)], dim=1)
        return LowRankFactor(jac)
