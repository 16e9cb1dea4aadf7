"""Backend ``triton``: the fused plan-to-Gram and the batched Jacobi eigensolver in Triton.

Same factor as the ``torch`` backend (left (B, r', w_1), right = W_1, W_1 W_1^T computed once
per call), but the reverse layer chain and the Gram run as Triton kernels
(``pullgeom.kernels.triton``) and the small eigenproblems as one Jacobi program per sample.
Runs on CUDA; on CPU only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pullgeom.kernels import triton as triton_kernels
from pullgeom.backends.base import Backend, Problem
from pullgeom.factor import LowRankFactor
from pullgeom.linalg.eigh import symmetric_eig_descending


class TritonBackend(Backend):
    name = "triton"
    traceable = True
    checked_on_first_use = True

    def unavailable_reason(self, device: torch.device) -> str | None:
        return triton_kernels.unavailable_reason(device)

    def unsupported_reason(self, problem: Problem) -> str | None:
        if problem.plan is None:
            return f"the encoder is not a recognised MLP ({problem.trace.reason})"
        if not problem.plan.layers:
            return "the encoder has no hidden layer (its metric is constant: use backend='torch')"
        return None

    def auto_serves(self, device: torch.device) -> bool:
        # On a CPU tensor Triton means its interpreter: a test aid, never the fast path.
        return device.type == "cuda"

    def factor_and_gram(self, problem: Problem, x: Tensor) -> tuple[LowRankFactor, Tensor]:
        # Imported on first use: defining the kernels reads TRITON_INTERPRET (pullgeom.kernels.triton).
        triton_kernels.load_ops()
        from pullgeom.kernels.triton.plan_gram import plan_gram

        plan = problem.plan
        left, gram = plan_gram(plan, x.reshape(x.shape[0], -1), sigma=problem.sigma,
                               stochastic=problem.stochastic, latent_sqrt=problem.latent_sqrt(x))
        return LowRankFactor(left, plan.layers[0].weight, plan.first_layer_gram), gram

    def factor(self, problem: Problem, x: Tensor) -> LowRankFactor:
        return self.factor_and_gram(problem, x)[0]

    def top_eigenpairs(self, gram: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
        """Triton Lanczos for r' <= 128 (one matrix per program), run for r' steps: exact to
        round-off, like the dense solve, at O(r'^3) without Jacobi's sweeps; None above."""
        triton_kernels.load_ops()
        from pullgeom.kernels.triton.lanczos import MAX_SIZE

        if gram.shape[-1] > MAX_SIZE:
            return None
        values, vectors, _ = torch.ops.pullgeom.triton_lanczos(gram, k, gram.shape[-1])
        return values, vectors

    def eigh(self, gram: Tensor) -> tuple[Tensor, Tensor]:
        """Jacobi in Triton for r' <= ``jacobi_eigh.MAX_SIZE`` (one matrix per program, held in
        shared memory, which sm_90 bounds); torch.linalg.eigh above."""
        triton_kernels.load_ops()
        from pullgeom.kernels.triton.jacobi_eigh import MAX_SIZE

        if gram.shape[-1] > MAX_SIZE:
            return symmetric_eig_descending(gram)
        return torch.ops.pullgeom.triton_eigh(gram)
