"""What every backend implements, and the resolved problem it is handed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from pullgeom.compiled import assert_in_graph
from pullgeom.factor import LowRankFactor, eigenvectors_from_gram
from pullgeom.linalg.eigh import canonical_signs, symmetric_eig_descending
from pullgeom.tracing.fx_trace import MLPPlan


@dataclass
class ChunkSpectrum:
    """What a backend returns for one chunk of B samples.

    eigenvalues: (B, r) descending, clamped >= 0 (the API keeps the first ``problem.rank``);
    eigenvectors: (B, N, k) unit columns with canonical signs; residuals: (B, k)
    ||G v - lambda v|| for iterative solvers, None for direct ones; complete: (B,) bool, whether
    ``eigenvalues`` is G's whole nonzero spectrum for that sample (an iterative solver stopped
    at the top k leaves the rest as lower bounds), None when it is for every sample.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor | None = None
    complete: Tensor | None = None


@dataclass
class Problem:
    """Everything about one ``spectrum``/``metric`` call that does not change across chunks.

    input_shape: S (per-sample shape of x); latent_dim: dz; rank: r, the size of the spectrum
    reported (min of 2dz -- dz without sigma --, N, and the plan's narrowest width).
    ``cache`` holds per-call constants a backend computes once (e.g. W_1 W_1^T).
    """

    encoder: Callable
    sigma: str
    stochastic: bool
    input_shape: tuple[int, ...]
    latent_dim: int
    rank: int
    plan: MLPPlan | None = None
    plan_reason: str = ""
    dtype: torch.dtype = torch.float32  # the computation's dtype (x's, float32 for half inputs)
    decoder: Callable | None = None  # for backends that apply G_z matrix-free
    cache: dict = field(default_factory=dict)

    def first_layer_gram(self) -> Tensor:
        """W_1 W_1^T (w_1, w_1) of the plan's first layer, computed once per call and shared."""
        if "first_layer_gram" not in self.cache:
            weight = self.plan.layers[0].weight
            self.cache["first_layer_gram"] = (weight @ weight.T).contiguous()
        return self.cache["first_layer_gram"]

    @property
    def input_numel(self) -> int:
        n = 1
        for size in self.input_shape:
            n *= size
        return n


def check_finite_metric(gram: Tensor) -> None:
    """Refuse a non-finite metric (e.g. sigma = exp(out2 / 2) overflowing) with the reason."""
    if torch.compiler.is_compiling():
        assert_in_graph(torch.isfinite(gram).all(), "the metric is not finite: the encoder's outputs or "
                        "their derivatives overflow; check the input scale, or compute in float64")
        return
    bad = ~torch.isfinite(gram.flatten(1)).all(dim=1)
    if bad.any():
        first = bad.nonzero()[0].item()
        raise ValueError(
            f"the metric is not finite for {int(bad.sum())} samples of this chunk (first: {first}): "
            "the encoder's outputs or their derivatives overflow (e.g. sigma = exp(out2 / 2) = inf); "
            "check the input scale, or compute in float64"
        )


class Backend:
    """A way to compute the factored metric and its small eigenproblem.

    Subclasses set ``name`` and override ``factor``; native backends also override
    ``factor_and_gram`` (fused kernel) and ``eigh`` (batched small eigensolver).
    """

    name = "base"
    # True: the backend applies G_z itself from ``problem.decoder`` (u -> J_g^T J_g u), so the
    # API does not form G_z^{1/2} densely and passes latent_sqrt=None.
    applies_latent_metric = False
    # True: solve() is tensor ops and registered pullgeom ops only (no Python loop on tensor
    # values), so torch.compile(fullgraph=True) traces it (see pullgeom.compiled).
    traceable = False

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None if this backend can run on ``device`` in this installation, else why not."""
        return None

    def unsupported_reason(self, problem: Problem) -> str | None:
        """None if this backend can serve ``problem``, else why not."""
        return None

    def factor(self, problem: Problem, x: Tensor, latent_sqrt: Tensor | None) -> LowRankFactor:
        """Factor of G for x: (B, *S); latent_sqrt: (B, dz, dz) = G_z^{1/2} or None."""
        raise NotImplementedError

    def factor_and_gram(self, problem: Problem, x: Tensor,
                        latent_sqrt: Tensor | None) -> tuple[LowRankFactor, Tensor]:
        """The factor and its Gram M = F F^T: (B, r', r')."""
        factor = self.factor(problem, x, latent_sqrt)
        return factor, factor.gram()

    def eigh(self, gram: Tensor) -> tuple[Tensor, Tensor]:
        """All eigenpairs of (B, r', r'), eigenvalues descending, vectors as columns."""
        return symmetric_eig_descending(gram)

    def solve(self, problem: Problem, x: Tensor, latent_sqrt: Tensor | None, k: int) -> ChunkSpectrum:
        """Top-k eigenvectors and the nonzero spectrum for one chunk ``x: (B, *S)``.

        Default: factor and small Gram, all eigenpairs of the Gram, the top k mapped back
        through F^T (MATH.md 1). Matrix-free backends override this.
        """
        factor, gram = self.factor_and_gram(problem, x, latent_sqrt)
        check_finite_metric(gram)
        values, vectors = self.eigh(gram)
        values = values[:, : problem.rank].clamp_min(0)
        top = eigenvectors_from_gram(factor, vectors[:, :, :k])
        return ChunkSpectrum(values, canonical_signs(top, dim=1))
