"""What lets ``torch.compile(fullgraph=True)`` trace through ``pullgeom.spectrum``.

Preparing a call -- probing the encoder, tracing its layers with torch.fx, checking the traced
plan against the encoder's own output, timing the backends -- is Python that Dynamo cannot
trace. So every eager call remembers what it prepared, per call signature (input shape, dtype,
device, sigma, stochastic, backend, chunk_size, decoder), in an attribute of the encoder
module (``_pullgeom_prepared``: it lives and is copied with the module and is not part of its
state_dict), and a call being compiled looks that up instead. It re-folds the layer plan from
the encoder's weights as they are at run time (``fold_chains`` is plain torch), so a compiled
spectrum never serves the weights of an earlier call. Hence the one rule: call
``pullgeom.spectrum`` once eagerly with the same arguments before compiling it; a compiled
call without that says so.

Data-dependent checks (NaN inputs, an overflowing metric) become ``torch._assert_async``
inside a compiled graph: the same message, raised when the graph runs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pullgeom.tracing.mlp_plan import fold_chains

# The encoder attribute holding {call signature -> PreparedCall}. An attribute rather than a
# global weak dictionary: Dynamo guards on what it reads, and a global's entries vanish
# mid-compile whenever some other encoder is freed.
_ATTRIBUTE = "_pullgeom_prepared"


@dataclass(frozen=True)
class PreparedCall:
    """An eager call's preparation: the problem without the encoder (the module holds this) and
    without plan tensors (re-folded from the live weights per call), its backend and chunk."""

    problem: object  # backends.Problem
    folds_plan: bool  # whether the eager call had a layer plan, to re-fold from problem.trace.chains
    backend: object  # backends.Backend
    chunk: int

    @staticmethod
    def of(problem, backend, chunk: int) -> "PreparedCall":
        trace = replace(problem.trace, plan=None)
        folds_plan = problem.plan is not None
        return PreparedCall(replace(problem, encoder=None, trace=trace), folds_plan, backend, chunk)

    @property
    def decoder(self):
        latent = self.problem.latent
        return None if latent is None else latent.decoder


class CallSignature(NamedTuple):
    """What a prepared call depends on besides the encoder and decoder (the batch size aside)."""

    sample_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    sigma: str
    stochastic: bool
    backend: str
    chunk_size: int | None


def call_signature(x: Tensor, sigma: str, stochastic: bool, backend: str,
                   chunk_size: int | None) -> CallSignature:
    return CallSignature(tuple(x.shape[1:]), x.dtype, x.device, sigma, stochastic, backend, chunk_size)


def remember(encoder, signature: CallSignature, prepared: PreparedCall) -> None:
    """Store an eager call's preparation on the encoder (only modules can be compiled through:
    encoders that are plain functions have no layer plan and run eagerly)."""
    if isinstance(encoder, nn.Module):
        encoder.__dict__.setdefault(_ATTRIBUTE, {})[signature] = prepared


def recall(encoder, signature: CallSignature, decoder):
    """(problem, backend, chunk) for a call being compiled, from the matching eager call.

    The layer structure is the eager call's; the weights are read when the graph runs.
    """
    prepared = getattr(encoder, _ATTRIBUTE, {}).get(signature)
    if prepared is None or prepared.decoder is not decoder:
        raise RuntimeError(
            "pullgeom.spectrum under torch.compile needs one eager call with the same encoder, "
            "decoder, input shape, dtype, device, sigma, stochastic, backend and chunk_size first "
            "(it traces the encoder's layers with torch.fx, which Dynamo cannot trace); "
            "call pullgeom.spectrum(...) once outside the compiled function"
        )
    if not prepared.backend.traceable:
        from pullgeom.backends import traceable_backend_names

        names = ", ".join(repr(name) for name in traceable_backend_names())
        raise RuntimeError(
            f"the {prepared.backend.name!r} backend loops until convergence in Python and cannot be "
            f"compiled; compile with backend={names} (encoders with a layer plan)"
        )
    problem = prepared.problem
    trace = problem.trace
    if prepared.folds_plan:
        with torch.no_grad():  # as in eager: spectra are not differentiated through
            plan = fold_chains(trace.chains).to(device=signature.device, dtype=signature.dtype)
        trace = replace(trace, plan=plan)
    return replace(problem, encoder=encoder, trace=trace), prepared.backend, prepared.chunk


def assert_in_graph(condition: Tensor, message: str) -> None:
    """Inside a compiled graph: fail with ``message`` when ``condition`` (a bool tensor) is false."""
    torch._assert_async(condition, message)
