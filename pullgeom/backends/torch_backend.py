"""Backend ``torch``: the analytic layer chain of an MLP encoder in plain torch ops
(``pullgeom.kernels.chain_rows``, MATH.md 2): left factor (B, r', w_1) against the shared first
layer W_1, never the B x 2dz x N Jacobian."""

from __future__ import annotations

from torch import Tensor

from pullgeom.backends.base import Backend, Problem
from pullgeom.factor import LowRankFactor
from pullgeom.kernels.chain_rows import chain_rows


class TorchBackend(Backend):
    name = "torch"
    traceable = True

    def unsupported_reason(self, problem: Problem) -> str | None:
        if problem.plan is None:
            return f"the encoder is not a recognised MLP ({problem.trace.reason})"
        return None

    def factor(self, problem: Problem, x: Tensor) -> LowRankFactor:
        plan = problem.plan
        rows = chain_rows(plan, x.flatten(1), problem.sigma, problem.stochastic, problem.latent_sqrt(x))
        if not plan.layers:
            return LowRankFactor(rows)
        return LowRankFactor(rows, plan.layers[0].weight, plan.first_layer_gram)
