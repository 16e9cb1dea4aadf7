"""Trace once, check once: what the fast paths know about an encoder, for one call.

``trace_encoder`` runs the one ``torch.fx`` pass (``fx_trace.trace_chains``), folds the chains
into an MLP layer plan when they are one (``mlp_plan.fold_chains``), and checks whatever it found
against the encoder's own output on a few probe samples: a traced path that does not reproduce
the encoder (a mis-read module, an op fx saw differently) is dropped, never used. The result is
an immutable ``EncoderTrace`` that every backend reads; nothing traces or checks again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from pullgeom.encoder_output import outputs_agree, sigma_from_output
from pullgeom.tracing.fx_trace import LayerChains, UnsupportedEncoder, trace_chains
from pullgeom.tracing.layer_chain import LayerChainJacobian
from pullgeom.tracing.mlp_plan import MLPPlan, fold_chains, plan_forward

log = logging.getLogger("pullgeom")


@dataclass(frozen=True)
class EncoderTrace:
    """What tracing found, checked against the encoder.

    chains: the encoder's layer chains when their hand-written Jacobian (``LayerChainJacobian``)
    reproduces the encoder's (mu, sigma), else None. plan: the MLP layer plan folded from them,
    on the probe's device and dtype, else None. reason: why there is no plan ("" when there is).
    """

    chains: LayerChains | None
    plan: MLPPlan | None
    reason: str

    @staticmethod
    def untraced(reason: str) -> "EncoderTrace":
        return EncoderTrace(None, None, reason)


_notified: set[int] = set()


def _log_fallback(encoder, reason: str) -> None:
    """INFO once per encoder object: the fallback is exact, so a warning would have nothing to fix."""
    if id(encoder) not in _notified:
        _notified.add(id(encoder))
        log.info("pullgeom: %s is not a recognised MLP (%s); backend 'auto' runs it on the autograd "
                 "backend (or on lanczos when its Jacobian is too large to hold)",
                 type(encoder).__name__, reason)


def trace_encoder(encoder, probe: Tensor, mu: Tensor, std: Tensor, sigma: str) -> EncoderTrace:
    """Trace ``encoder`` and check the result on ``probe: (b, *S)``, whose encoder outputs are
    ``mu, std: (b, dz)`` (sigma already converted from out2 with the ``sigma`` convention)."""
    try:
        chains = trace_chains(encoder)
    except UnsupportedEncoder as error:
        _log_fallback(encoder, str(error))
        return EncoderTrace.untraced(str(error))
    with torch.no_grad():
        try:
            plan = fold_chains(chains).to(device=probe.device, dtype=probe.dtype)
            reason = ""
        except UnsupportedEncoder as error:
            plan, reason = None, str(error)
        if plan is not None and plan.input_numel != probe[0].numel():
            plan, reason = None, "its traced layer plan does not take inputs of this size"
        if plan is not None:
            plan_mu, out2 = plan_forward(plan, probe.reshape(probe.shape[0], -1))
            if not _reproduces(plan_mu, sigma_from_output(out2, sigma), mu, std):
                plan, reason = None, "its traced layer plan does not reproduce its output"
        # A plan that reproduces the encoder is its chains folded, so they reproduce it too.
        if plan is None and not _chains_reproduce(chains, probe, mu, std, sigma):
            chains = None
    if plan is None:
        _log_fallback(encoder, reason)
    return EncoderTrace(chains, plan, reason)


def _chains_reproduce(chains: LayerChains, probe: Tensor, mu: Tensor, std: Tensor, sigma: str) -> bool:
    try:
        ours = LayerChainJacobian(chains, probe, sigma, stochastic=True).out
    except UnsupportedEncoder:  # ops without a hand-written Jacobian
        return False
    dz = ours.shape[1] // 2
    return _reproduces(ours[:, :dz], ours[:, dz:], mu, std)


def _reproduces(our_mu: Tensor, our_std: Tensor, mu: Tensor, std: Tensor) -> bool:
    return (our_mu.shape == mu.shape and our_std.shape == std.shape
            and outputs_agree(our_mu, mu) and outputs_agree(our_std, std))
