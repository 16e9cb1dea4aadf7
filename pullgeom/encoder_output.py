"""The encoder/decoder output contract and the sigma conventions: one conversion for every path.

An encoder maps ``x: (B, *S)`` to a diagonal Gaussian over latents of any shape ``(B, *L)``,
``dz = prod(L)``, returned in one of the ``ENCODER_CONVENTIONS``; ``split_encoder_output`` reads
every one of them (the API's probe, the Jacobian heads, the dense reference and the latent
metric all go through it), and ``mean_and_std`` flattens mu and sigma alike, C-order, to
``(B, dz)``. For a ``(mu, out2)`` tuple, ``sigma=`` names what ``out2`` is; each convention gives
``sigma = sigma_of(out2)`` and its elementwise derivative ``d sigma / d out2``, which the
analytic MLP chain needs for the sigma head's Jacobian ``diag(d sigma / d s) W_s``. The other
conventions carry sigma themselves, and ``sigma=`` does not apply to them.

Whole VAE objects whose encoder is unambiguous resolve to it (``as_encoder``, ``as_decoder``):
a diffusers ``AutoencoderKL`` encodes with ``encode`` and decodes with ``decode(z).sample``; a
pythae model has ``.encoder`` and ``.decoder``. A decoder receives z in the encoder's latent
shape ``(B, *L)`` (``on_latents``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Independent, Normal
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

SIGMA_CONVENTIONS = ("logvar", "logstd", "std", "softplus")
# Integer codes shared with the native kernels (csrc/, pullgeom/kernels/triton/).
SIGMA_CODES = {name: code for code, name in enumerate(SIGMA_CONVENTIONS)}
# What out2 of a (mu, out2) pair is when sigma= is left unset (the paper's convention).
DEFAULT_SIGMA = "logvar"


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


ENCODER_CONVENTIONS = (
    "(mu, out2): two tensors of one shape, out2 read with sigma= (one of "
    + ", ".join(SIGMA_CONVENTIONS) + ")",
    "torch.distributions.Normal(mu, std)",
    "torch.distributions.Independent(Normal(mu, std), n), any n",
    "an object whose .latent_dist has .mean and .std (diffusers' AutoencoderKLOutput)",
    "a dict or ModelOutput with 'embedding' and 'log_covariance' (log variance: pythae)",
)
DECODER_CONVENTIONS = (
    "its mean (a tensor)",
    "(mean, out2), out2 read with sigma=",
    "a torch.distributions.Normal, or Independent(Normal, n)",
    "a dict or ModelOutput with 'reconstruction' (pythae) or 'sample' (diffusers' DecoderOutput)",
)


def _listed(conventions: tuple[str, ...]) -> str:
    return "; ".join(f"({i}) {c}" for i, c in enumerate(conventions, 1))


def _as_normal(output) -> Normal | None:
    """The Normal inside ``Independent(...(Normal))`` (reinterpreting batch dims as event dims
    changes the log-density, not loc or scale), the Normal itself, else None."""
    while isinstance(output, Independent):
        output = output.base_dist
    return output if isinstance(output, Normal) else None


def _encoder_parts(output) -> tuple[Tensor, Tensor, str | None]:
    """``(mu, second, convention)``: ``second`` is sigma under ``convention``, or, when
    ``convention`` is None (a ``(mu, out2)`` tuple), out2 under the caller's ``sigma=``."""
    normal = _as_normal(output)
    if normal is not None:
        return normal.loc, normal.scale, "std"
    latent_dist = getattr(output, "latent_dist", None)
    if latent_dist is not None and hasattr(latent_dist, "mean") and hasattr(latent_dist, "std"):
        # diffusers' DiagonalGaussianDistribution: std = exp(logvar / 2) of logvar clamped to
        # [-30, 20]. Its .std is differentiated as it stands, clamp included: that is the sigma
        # the model samples with, so where the clamp is active sigma does not depend on x and
        # J_sigma's rows are exactly 0 (a property of the model, not a lost derivative).
        return latent_dist.mean, latent_dist.std, "std"
    if isinstance(output, Mapping) and "embedding" in output and "log_covariance" in output:
        # pythae: log_covariance is the log variance (its VAEs sample with exp(log_covariance / 2)).
        return output["embedding"], output["log_covariance"], "logvar"
    if reads_sigma(output):
        return output[0], output[1], None
    found = f" with keys {list(output)}" if isinstance(output, Mapping) else ""
    raise ValueError(f"the encoder returned {type(output).__name__}{found}, which fits none of the output "
                     f"conventions pullgeom reads: {_listed(ENCODER_CONVENTIONS)}; return one of them "
                     "(wrap the encoder in a function if needed)")


def reads_sigma(output) -> bool:
    """Whether ``sigma=`` applies to an encoder's or decoder's ``output``: only the out2 of a
    ``(mu, out2)`` pair needs it; every other convention carries sigma itself or has none."""
    return isinstance(output, (tuple, list)) and len(output) == 2


def split_encoder_output(output, sigma: str) -> tuple[Tensor, Tensor]:
    """``(mu, sigma)`` from whatever the encoder returned, in the encoder's own shape ``(B, *L)``.

    ``output`` in any of ``ENCODER_CONVENTIONS``; ``sigma`` applies to a ``(mu, out2)`` tuple only.
    A ``ValueError`` lists the conventions when ``output`` fits none.
    """
    mu, second, convention = _encoder_parts(output)
    if not (isinstance(mu, Tensor) and isinstance(second, Tensor)):
        raise ValueError(f"the encoder returned {type(mu).__name__} and {type(second).__name__} where "
                         "pullgeom reads mu and sigma; return tensors")
    if mu.shape != second.shape:
        raise ValueError(
            f"the encoder returned mu {tuple(mu.shape)} and its second head {tuple(second.shape)}; "
            "both must have the same shape (B, *L)"
        )
    return mu, sigma_from_output(second, convention or sigma)


def _is_decoder_mapping(output) -> bool:
    return isinstance(output, Mapping) and ("reconstruction" in output or "sample" in output)


def split_decoder_output(output, sigma: str) -> tuple[Tensor, Tensor | None]:
    """``(mean, sigma or None)`` from a decoder's output in any of ``DECODER_CONVENTIONS``."""
    if isinstance(output, Tensor):
        return output, None
    normal = _as_normal(output)
    if normal is not None:
        return normal.loc, normal.scale
    if _is_decoder_mapping(output):
        return output["reconstruction" if "reconstruction" in output else "sample"], None
    if reads_sigma(output):
        mean, out2 = output
        return mean, sigma_from_output(out2, sigma)
    raise ValueError(f"the decoder returned {type(output).__name__}, which fits none of the output "
                     f"conventions pullgeom reads: {_listed(DECODER_CONVENTIONS)}")


def flat_latents(t: Tensor) -> Tensor:
    """(B, *L) -> (B, dz), C order; a latent of one number per sample, (B,), -> (B, 1)."""
    return t.flatten(1) if t.dim() > 1 else t.unsqueeze(1)


def latent_heads(output, batch: int, sigma: str) -> tuple[Tensor, Tensor]:
    """``split_encoder_output`` of an encoder's ``output`` for a batch of ``batch`` samples:
    ``(mu, sigma)``, each ``(B, *L)``, checked to be batched along their first dimension."""
    mu, std = split_encoder_output(output, sigma)
    if mu.dim() == 0 or mu.shape[0] != batch:
        raise ValueError(f"the encoder returned mu of shape {tuple(mu.shape)} for a batch of {batch}; "
                         "its first dimension must be the batch, (B, *L)")
    return mu, std


def mean_and_std(encoder: Callable, x: Tensor, sigma: str) -> tuple[Tensor, Tensor]:
    """Run the encoder on ``x: (B, *S)`` and flatten both heads alike to ``(B, dz)``."""
    mu, std = latent_heads(encoder(x), x.shape[0], sigma)
    return flat_latents(mu), flat_latents(std)


# ----------------------------------------------------------------------------------------
# Whole VAE objects.

def _defined_in(model, package: str) -> bool:
    return any(cls.__module__.split(".")[0] == package for cls in type(model).__mro__)


def _is_diffusers_vae(model) -> bool:
    return (isinstance(model, nn.Module) and _defined_in(model, "diffusers")
            and callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None)))


def _is_pythae_model(model) -> bool:
    return (isinstance(model, nn.Module) and _defined_in(model, "pythae")
            and isinstance(getattr(model, "encoder", None), nn.Module)
            and isinstance(getattr(model, "decoder", None), nn.Module))


class DiffusersEncode(nn.Module):
    """x -> ``vae.encode(x)`` (an ``AutoencoderKLOutput``), the VAE a submodule so that its
    parameters are the module's (frozen, dtype- and device-checked like any encoder's)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor):
        return self.vae.encode(x)


class DiffusersDecode(nn.Module):
    """z (B, *L) -> ``vae.decode(z).sample``, the decoded mean image."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).sample


def as_encoder(model):
    """The encoder of a whole VAE object where it is unambiguous (a diffusers VAE: its
    ``encode``; a pythae model: its ``.encoder``), else ``model`` itself (the same object)."""
    if _is_diffusers_vae(model):
        return DiffusersEncode(model)
    if _is_pythae_model(model):
        return model.encoder
    return model


def as_decoder(model):
    """The decoder of a whole VAE object (diffusers: ``decode(z).sample``; pythae:
    ``.decoder``), else ``model`` itself (the same object; None stays None)."""
    if _is_diffusers_vae(model):
        return DiffusersDecode(model)
    if _is_pythae_model(model):
        return model.decoder
    return model


class OnLatents(nn.Module):
    """A decoder fed flat latents ``z: (B, dz)`` as the encoder's ``(B, *L)``: the backends
    handle z flat, the decoder (a conv decoder of a (B, 4, 32, 32) latent) wants its shape."""

    def __init__(self, decoder: Callable, latent_shape: tuple[int, ...]):
        super().__init__()
        self.decoder = decoder  # a submodule when it is a module: its parameters are ours
        self.latent_shape = latent_shape

    def forward(self, z: Tensor):
        return self.decoder(z.reshape(z.shape[0], *self.latent_shape))


def on_latents(decoder, latent_shape: tuple[int, ...]):
    """``decoder`` taking ``z: (B, dz)`` for latents of shape ``(B, *latent_shape)``: itself when
    the latents are flat already (``latent_shape`` (dz,) or (), a number per sample), else
    wrapped in ``OnLatents``."""
    if decoder is None or len(latent_shape) <= 1:
        return decoder
    return OnLatents(decoder, tuple(latent_shape))


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
