"""Backend ``autograd``: materialise A = [J_mu; J_sigma] with torch.func, any encoder.

In eval mode the samples of a batch are independent, so d out[i, j] / d x[i] for every i is
one vector-Jacobian product of the whole chunk with the cotangent e_j in every row: 2dz calls
of one ``torch.func.vjp`` pullback give A (B, 2dz, N), each running the encoder's ordinary
batched backward kernels. Why this loop: on a small conv encoder the per-sample vmap(jacrev)
took 1.7x its time, and vmapping the pullback over all 2dz cotangents a third of it but 33x the
memory of A (conv's batching rule), against ~2x A for the loop (BENCHMARKS.md, "measurements
behind design choices"). Modules run through ``functional_call`` with detached parameters so
no parameter gradients are tracked.
Small chunks of encoders without convolutions instead take every row at once
(``vectorized_jacobian``: ``torch.autograd.functional.jacobian`` of the batch-summed outputs,
``vectorize=True``): on the paper's MNIST MLP it took 0.55x (one thread) and 0.46x (two) the
loop's time at 16 samples and 0.97x and 0.62x at 64, but 1.45x and 0.99x at 256 and 1.45x and
1.43x at 1024 (the API's default chunk there is ~1,300 samples), so the loop stays above
``VECTORIZE_MAX_BATCH`` (BENCHMARKS.md, "The autograd backend against plain-torch Jacobian
recipes"). Its working set on an MLP is about A's size again (the 2dz cotangents'
activations), unlike conv's.
Memory per chunk: about 2 B * 2dz * N floats, which the API bounds through ``chunk_size``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vjp
from torch.nn.modules.conv import _ConvNd

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


# The largest chunk that takes ``vectorized_jacobian`` (module docstring: the crossover with the
# loop on the paper's MLP lies between 64 and 256 samples at one and at two threads).
VECTORIZE_MAX_BATCH = 64


def vectorized_jacobian(fn, x: Tensor) -> Tensor:
    """``batch_jacobian`` from one vectorised reverse pass of the batch-summed outputs: (B, m, N).

    Row j of the Jacobian of sum_i fn(x)[i] is d out[i, j] / d x[i] for every sample i at once,
    since sample i's outputs depend on x[i] alone; all m rows go through one vmapped backward.
    """
    jac = torch.autograd.functional.jacobian(lambda batch: fn(batch).sum(0), x, vectorize=True)
    return jac.flatten(2).transpose(0, 1)  # (m, B, *S) -> (B, m, N)


def _known_convolution_free(encoder) -> bool:
    """Whether ``encoder`` is a module (or a bound method of one, e.g. diffusers' ``vae.encode``)
    with no convolution inside: the only encoders ``vectorized_jacobian`` is measured to help.
    Any other callable's contents are unknown, so it keeps the loop."""
    module = getattr(encoder, "__self__", encoder)
    return isinstance(module, torch.nn.Module) and not any(isinstance(m, _ConvNd) for m in module.modules())


def encoder_jacobian(problem: Problem, x: Tensor) -> Tensor:
    """Per-sample Jacobian A of [mu; sigma] (or mu alone) at ``x: (B, *S)``: (B, 2dz or dz, N)."""
    fn = heads_function(problem.encoder, problem.sigma, problem.stochastic)
    if 0 < x.shape[0] <= VECTORIZE_MAX_BATCH and _known_convolution_free(problem.encoder):
        try:
            return vectorized_jacobian(fn, x)
        except torch.OutOfMemoryError:  # a RuntimeError too, but the API's chunk retry handles it
            raise
        except RuntimeError:
            # vmap cannot batch every op a conv-free module may hold (a custom backward that
            # reads a Python number, say); the loop runs the ordinary backward and serves all.
            pass
    return batch_jacobian(fn, x)


class AutogradBackend(Backend):
    name = "autograd"

    def factor(self, problem: Problem, x: Tensor) -> LowRankFactor:
        jac = encoder_jacobian(problem, x)
        root = problem.latent_sqrt(x)
        if root is not None:
            dz = problem.latent_dim
            jac = torch.cat([root @ jac[:, i * dz:(i + 1) * dz] for i in range(jac.shape[1] // dz)], dim=1)
        return LowRankFactor(jac)
