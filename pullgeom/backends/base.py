"""What every backend implements, and the resolved problem it is handed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pullgeom.compiled import assert_in_graph
from pullgeom.factor import LowRankFactor, eigenvectors_from_gram
from pullgeom.linalg.eigh import canonical_signs, symmetric_eig_descending
from pullgeom.encoder_output import mean_and_std
from pullgeom.latent_metric import LatentMetric
from pullgeom.tracing.encoder_trace import EncoderTrace
from pullgeom.tracing.mlp_plan import MLPPlan


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


@dataclass(frozen=True, kw_only=True)
class Problem:
    """Everything about one ``spectrum``/``metric`` call that does not change across chunks.

    encoder: the user's encoder (None only in a preparation remembered for torch.compile, which
    puts the live module back). input_shape: S, the per-sample shape of x; latent_dim: dz;
    rank: r, the size of the spectrum reported (``mlp_plan.rank_bound``); dtype: the
    computation's (x's; float32 for half inputs). trace: what the one tracing pass found and
    checked (layer chains, MLP plan). latent: the decoder's metric G_z, or None for G_z = I.
    """

    encoder: Callable | None
    sigma: str
    stochastic: bool
    input_shape: tuple[int, ...]
    latent_dim: int
    rank: int
    dtype: torch.dtype
    trace: EncoderTrace
    latent: LatentMetric | None = None

    @property
    def plan(self) -> MLPPlan | None:
        return self.trace.plan

    @property
    def input_numel(self) -> int:
        return math.prod(self.input_shape)

    def latent_sqrt(self, x: Tensor) -> Tensor | None:
        """G_z^{1/2} (B, dz, dz) at mu(x) for the chunk ``x: (B, *S)``; None without a decoder."""
        if self.latent is None:
            return None
        with torch.no_grad():
            mu, _ = mean_and_std(self.encoder, x, self.sigma)
        return self.latent.sqrt_at(mu)


# The batched top-k Lanczos op, with its missed-copy check, beats the cpp backend's dense
# eigensolve of the small Gram once the Gram is this large and k at most this part of it: 1.16x
# at r = 128 and 2.5x at r = 256 for k = 5, 1.08x to 2x at k = r / 16, but 0.83-0.91x at
# k = r / 8 (benchmarks/bench_top_k.py; BENCHMARKS.md, "Top k only").
TOP_K_MIN_SIZE = 128
TOP_K_MAX_FRACTION = 1 / 16


# How far above theta_k (relative to theta_1) the deflated Gram's top eigenvalue must lie to count
# as a copy the top-k solver missed: 100x the native solvers' residual tolerance (1e-6 in float32,
# 1e-10 in float64), so round-off in the top-k pairs is never mistaken for one.
MISSED_COPY_RTOL = {torch.float32: 1e-4, torch.float64: 1e-8}


def settle_missed_copies(backend: "Backend", gram: Tensor, k: int, values: Tensor,
                         vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k pairs (values (B, k), vectors (B, r', k)) of ``gram`` (B, r', r') from a single-vector
    Krylov solver, with every sample that missed a copy of a repeated eigenvalue solved densely.

    Such a solver sees one direction of each eigenspace its start vector reaches: its top k can
    converge without the other copies (issue 15: {5, 5, 5, 5, 1, ...} came back with one 5 from
    the native ``lanczos_topk``). The Gram is explicit, so the check is one more top-1 solve, on
    M - V diag(theta) V^T: the k pairs found deflate to 0, so its top eigenvalue is the largest
    one not among them, above theta_k only if one was missed. Those samples (rare) get the
    backend's dense ``eigh``.
    """
    found = (vectors * values.unsqueeze(1)) @ vectors.transpose(1, 2)
    left = backend.top_eigenpairs((gram - found).contiguous(), 1)[0][:, 0]
    rtol = MISSED_COPY_RTOL.get(gram.dtype, MISSED_COPY_RTOL[torch.float32])
    missed = left > values[:, k - 1] + rtol * values[:, 0].abs()
    if missed.any():
        dense_values, dense_vectors = backend.eigh(gram[missed])
        values, vectors = values.clone(), vectors.clone()
        values[missed], vectors[missed] = dense_values[:, :k], dense_vectors[:, :, :k]
    return values, vectors


def top_k_pays(size: int, k: int) -> bool:
    """Whether the top k eigenpairs of a (size x size) Gram are cheaper from a top-k solver."""
    return size >= TOP_K_MIN_SIZE and k <= TOP_K_MAX_FRACTION * size


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
    # True: ``backend="auto"`` may pick it by preference and timing (``pullgeom.backends.BACKENDS``
    # order); False: only by name, or through a cost model of its own (lanczos).
    auto_candidate = True
    # True: ``auto`` checks it against the ``torch`` backend before its first use per device,
    # dtype and layer plan (``first_use_check``): kernels that only run where no CI can see them.
    checked_on_first_use = False
    # True: solve() is tensor ops and registered pullgeom ops only (no Python loop on tensor
    # values), so torch.compile(fullgraph=True) traces it (see pullgeom.compiled).
    traceable = False

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None if this backend can run on ``device`` in this installation, else why not."""
        return None

    def auto_serves(self, device: torch.device) -> bool:
        """Whether ``backend="auto"`` should consider it on ``device`` (when available there)."""
        return True

    def unsupported_reason(self, problem: Problem) -> str | None:
        """None if this backend can serve ``problem``, else why not."""
        return None

    def factor(self, problem: Problem, x: Tensor) -> LowRankFactor:
        """Factor of G for the chunk x: (B, *S), G_z (``problem.latent``) included."""
        raise NotImplementedError

    def factor_and_gram(self, problem: Problem, x: Tensor) -> tuple[LowRankFactor, Tensor]:
        """The factor and its Gram M = F F^T: (B, r', r')."""
        factor = self.factor(problem, x)
        return factor, factor.gram()

    def eigh(self, gram: Tensor) -> tuple[Tensor, Tensor]:
        """All eigenpairs of (B, r', r'), eigenvalues descending, vectors as columns."""
        return symmetric_eig_descending(gram)

    def top_eigenpairs(self, gram: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
        """The top k eigenpairs of (B, r', r') by a batched top-k solver: values (B, k)
        descending, vectors (B, r', k); None when the backend has none."""
        return None

    def solve(self, problem: Problem, x: Tensor, k: int, top_k_only: bool = False) -> ChunkSpectrum:
        """Top-k eigenvectors and the nonzero spectrum for one chunk ``x: (B, *S)``.

        Default: factor and small Gram, all eigenpairs of the Gram, the top k mapped back
        through F^T (MATH.md 1). With ``top_k_only``, the backend's top-k solver serves where it
        beats the dense one (``top_k_pays``), checked for missed copies of repeated eigenvalues
        (``settle_missed_copies``): then only the top k values are known (the other slots 0,
        ``complete`` false). Matrix-free backends override this.
        """
        factor, gram = self.factor_and_gram(problem, x)
        check_finite_metric(gram)
        # Under torch.compile the dense solve serves: the missed-copy fallback is data-dependent.
        use_top_k = top_k_only and top_k_pays(gram.shape[-1], k) and not torch.compiler.is_compiling()
        top = self.top_eigenpairs(gram, k) if use_top_k else None
        complete = None
        if top is None:
            values, vectors = self.eigh(gram)
        else:
            top_values, vectors = settle_missed_copies(self, gram, k, *top)
            values = top_values.new_zeros(gram.shape[0], gram.shape[-1])
            values[:, :k] = top_values
            complete = torch.zeros(gram.shape[0], dtype=torch.bool, device=gram.device)
        values = values[:, : problem.rank].clamp_min(0)
        top_vectors = eigenvectors_from_gram(factor, vectors[:, :, :k])
        return ChunkSpectrum(values, canonical_signs(top_vectors, dim=1), complete=complete)
