"""Backend ``triton``: the fused plan-to-Gram and the batched Jacobi eigensolver in Triton.

Same factor as the ``torch`` backend (left (B, r', w_1), right = W_1, W_1 W_1^T computed once
per call), but the reverse layer chain and the Gram run as Triton kernels
(``pullgeom.kernels.triton``) and the small eigenproblems as one Jacobi program per sample.
Runs on CUDA; on CPU only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pullgeom.kernels import triton as pullgeom_triton
from pullgeom.backends.base import Backend, Problem
from pullgeom.factor import LowRankFactor
from pullgeom.linalg.eigh import symmetric_eig_descending


class TritonBackend(Backend):
    name = "triton"
    traceable = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        return pullgeom_triton.unavailable_reason(device)

    def unsupported_reason(self, problem: Problem) -> str | None:
        if problem.plan is None:
            return f"the encoder is not a recognised MLP ({problem.plan_reason})"
        if not problem.plan.layers:
            return "the encoder has no hidden layer (its metric is constant: use backend='torch')"
        return None

    def factor_and_gram(self, problem: Problem, x: Tensor,
                        latent_sqrt: Tensor | None) -> tuple[LowRankFactor, Tensor]:
        # Imported on first use: defining the kernels reads TRITON_INTERPRET (pullgeom.kernels.triton).
        pullgeom_triton.load_ops()
        from pullgeom.kernels.triton.plan_gram import plan_gram

        first = problem.plan.layers[0].weight
        shared = problem.first_layer_gram()
        left, gram = plan_gram(problem.plan, x.reshape(x.shape[0], -1), problem.sigma, problem.stochastic,
                               latent_sqrt, shared)
        return LowRankFactor(left, first, shared), gram

    def factor(self, problem: Problem, x: Tensor, latent_sqrt: Tensor | None) -> LowRankFactor:
        return self.factor_and_gram(problem, x, latent_sqrt)[0]

    def eigh(self, gram: Tensor) -> tuple[Tensor, Tensor]:
        """Jacobi in Triton for r' <= 256 (one matrix per program); torch.linalg.eigh above."""
        pullgeom_triton.load_ops()
        from pullgeom.kernels.triton.jacobi_eigh import MAX_SIZE

        if gram.shape[-1] > MAX_SIZE:
            return symmetric_eig_descending(gram)
        return torch.ops.pullgeom.triton_eigh(gram)
