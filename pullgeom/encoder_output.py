"""The encoder/decoder output contract and the sigma conventions.

An encoder maps ``x: (B, *S)`` to ``(mu, out2)`` with ``mu, out2: (B, dz)``, or to a
``torch.distributions.Normal``. ``sigma=`` names what ``out2`` is; each convention gives
``sigma = sigma_of(out2)`` and its elementwise derivative ``d sigma / d out2``, which the
analytic MLP chain needs for the sigma head's Jacobian ``diag(d sigma / d s) W_s``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

SIGMA_CONVENTIONS = ("logvar", "logstd", "std", "softplus")
# Integer codes shared with the native kernels (csrc/, pullgeom/kernels/triton/).
SIGMA_CODES = {name: code for code, name in enumerate(SIGMA_CONVENTIONS)}


def check_sigma_convention(sigma: str) -> None:
    if sigma not in SIGMA_CONVENTIONS:
        raise ValueError(
            f"sigma={sigma!r} is not a known convention; pass one of {SIGMA_CONVENTIONS} "
            "to say what the encoder's second output is"
        )


def sigma_from_output(out2: Tensor, sigma: str) -> Tensor:
    """Standard deviation from the encoder's second output, elementwise."""
    if sigma == "logvar":
        return torch.exp(0.5 * out2)
    if sigma == "logstd":
        return torch.exp(out2)
    if sigma == "std":
        return out2
    if sigma == "softplus":
        return F.softplus(out2)
    check_sigma_convention(sigma)
    raise AssertionError("unreachable")


def sigma_derivative(out2: Tensor, sigma: str) -> Tensor:
    """``d sigma / d out2`` elementwise (same shape as ``out2``)."""
    if sigma == "logvar":
        return 0.5 * torch.exp(0.5 * out2)
    if sigma == "logstd":
        return torch.exp(out2)
    if sigma == "std":
        return torch.ones_like(out2)
    if sigma == "softplus":
        return torch.sigmoid(out2)
    check_sigma_convention(sigma)
    raise AssertionError("unreachable")


def split_encoder_output(output, sigma: str) -> tuple[Tensor, Tensor]:
    """``(mu, sigma)`` from whatever the encoder returned.

    Accepts ``(mu, out2)`` (tuple or list) or a ``torch.distributions.Normal`` (whose
    ``scale`` is already sigma, so the convention is ignored).
    """
    if isinstance(output, torch.distributions.Normal):
        return output.loc, output.scale
    if isinstance(output, (tuple, list)) and len(output) == 2:
        mu, out2 = output
        if not (isinstance(mu, Tensor) and isinstance(out2, Tensor)):
            raise ValueError("the encoder must return two tensors (mu, out2)")
        if mu.shape != out2.shape:
            raise ValueError(
                f"the encoder returned mu {tuple(mu.shape)} and out2 {tuple(out2.shape)}; "
                "both heads must have the same shape (B, dz)"
            )
        return mu, sigma_from_output(out2, sigma)
    raise ValueError(
        "the encoder must return (mu, out2) or a torch.distributions.Normal, "
        f"got {type(output).__name__}"
    )


def split_decoder_output(output, sigma: str) -> tuple[Tensor, Tensor | None]:
    """``(mean, sigma or None)`` from a decoder that returns its mean or ``(mean, out2)``."""
    if isinstance(output, Tensor):
        return output, None
    if isinstance(output, torch.distributions.Normal):
        return output.loc, output.scale
    if isinstance(output, (tuple, list)) and len(output) == 2:
        mean, out2 = output
        return mean, sigma_from_output(out2, sigma)
    raise ValueError(
        "the decoder must return its mean, (mean, out2) or a torch.distributions.Normal, "
        f"got {type(output).__name__}"
    )


def mean_and_std(encoder: Callable, x: Tensor, sigma: str) -> tuple[Tensor, Tensor]:
    """Run the encoder and flatten both heads to ``(B, dz)``."""
    mu, std = split_encoder_output(encoder(x), sigma)
    return mu.flatten(1), std.flatten(1)


def outputs_agree(ours: Tensor, theirs: Tensor) -> bool:
    """Whether a re-implementation's outputs (a traced plan or layer chain) reproduce the
    encoder's, to the round-off of the dtype: the guard against a mis-traced module."""
    tol = 1e-4 if ours.dtype == torch.float32 else 1e-9
    return torch.allclose(ours, theirs, rtol=tol, atol=tol * (1 + theirs.abs().max().item()))


def frozen_call(module_or_fn):
    """``module_or_fn`` as a plain function of its input, parameters detached (no parameter
    gradients are tracked by the Jacobian transforms that call it), its attention routed to
    the math kernel.

    Every caller differentiates what it returns, and the fused scaled-dot-product attention
    kernels (CPU flash attention; on CUDA flash and memory-efficient) have a first backward
    but neither forward-mode AD (``jacfwd`` of a decoder) nor a double backward (the lanczos
    backend's J v is the VJP of a VJP), while the math kernel is composed of ordinary ops that
    have both. The kernel is chosen when the forward runs, so the context covers the forward
    only; the recorded graph then holds the math kernel's ops for every later replay.
    """
    if isinstance(module_or_fn, nn.Module):
        params = {name: p.detach() for name, p in module_or_fn.named_parameters()}
        buffers = dict(module_or_fn.named_buffers())

        def call(batch):
            return functional_call(module_or_fn, (params, buffers), (batch,))
    else:
        call = module_or_fn

    def differentiable_call(batch):
        with sdpa_kernel(SDPBackend.MATH):
            return call(batch)

    return differentiable_call


def single_sample_function(module_or_fn, transform):
    """Wrap ``module_or_fn`` as f(x_i) for one sample ``x_i: S`` (for torch.func transforms
    vmapped over samples), parameters frozen; ``transform`` maps the batch-of-one output."""
    call = frozen_call(module_or_fn)
    return lambda xi: transform(call(xi.unsqueeze(0)))


def heads_function(encoder, sigma: str, stochastic: bool) -> Callable[[Tensor], Tensor]:
    """x (B, *S) -> [mu, sigma] (B, 2dz), or mu (B, dz) when not ``stochastic``: the function
    whose per-sample Jacobian A = [J_mu; J_sigma] factors G = A^T A. Parameters frozen."""
    call = frozen_call(encoder)

    def heads(batch: Tensor) -> Tensor:
        mu, std = mean_and_std(call, batch, sigma)
        return torch.cat([mu, std], dim=1) if stochastic else mu

    return heads
