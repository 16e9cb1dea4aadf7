"""Backends ``cpp`` (CPU) and ``cuda``: the compiled kernels of ``pullgeom._C``.

Both run the fused plan-to-Gram op (``pullgeom.kernels.native.plan_gram``: the MLP chain of MATH.md 2 with
at most r = min(2dz, widths) rows per sample, never the B x 2dz x N Jacobian) and the batched
small eigensolver ``pullgeom.kernels.native.sym_eigh``; the top-k Gram eigenvectors map back to input
space through ``LowRankFactor`` (one GEMM against the shared first layer).
They serve MLP plans with at least one hidden layer, in float32 or float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pullgeom.kernels import native
from pullgeom.backends.base import Backend, Problem
from pullgeom.factor import LowRankFactor


class NativeBackend(Backend):
    """The compiled kernels on one device type (``cpu`` for ``cpp``, ``cuda`` for ``cuda``)."""

    traceable = True

    def __init__(self, name: str, device_type: str):
        self.name = name
        self.device_type = device_type
        # The CUDA kernels run only on GPUs, where no CI sees them: auto checks them first.
        self.checked_on_first_use = device_type == "cuda"

    def unavailable_reason(self, device: torch.device) -> str | None:
        if native.EXTENSION_ERROR is not None:
            return native.EXTENSION_ERROR
        kind = torch.device(device).type
        if kind != self.device_type:
            return f"the {self.name} backend runs on {self.device_type} tensors, not {kind}"
        if self.device_type == "cuda":
            if not native.extension_with_cuda():
                return ("pullgeom was built without its CUDA kernels (torch without CUDA, or no nvcc at "
                        "build time); rebuild with FORCE_CUDA=1 `pip install --no-build-isolation .`")
            if not torch.cuda.is_available():
                return "no CUDA device is available"
        return None

    def unsupported_reason(self, problem: Problem) -> str | None:
        if problem.plan is None:
            return f"the encoder is not a recognised MLP ({problem.trace.reason})"
        if not problem.plan.layers:
            return "the encoder has no hidden layer (the torch backend serves it)"
        if problem.plan.mu_weight.dtype not in (torch.float32, torch.float64):
            return f"the kernels take float32 or float64, not {problem.plan.mu_weight.dtype}"
        return None

    def factor_and_gram(self, problem: Problem, x: Tensor) -> tuple[LowRankFactor, Tensor]:
        plan = problem.plan
        left, gram = native.plan_gram(plan, x.reshape(x.shape[0], -1).contiguous(), sigma=problem.sigma,
                                      stochastic=problem.stochastic, latent_sqrt=problem.latent_sqrt(x))
        return LowRankFactor(left, plan.layers[0].weight, plan.first_layer_gram), gram

    def factor(self, problem: Problem, x: Tensor) -> LowRankFactor:
        return self.factor_and_gram(problem, x)[0]

    def eigh(self, gram: Tensor) -> tuple[Tensor, Tensor]:
        scale = _unit_scale(gram)
        values, vectors = native.sym_eigh((gram / scale).contiguous())
        return values * scale[:, :, 0], vectors

    def top_eigenpairs(self, gram: Tensor, k: int) -> tuple[Tensor, Tensor]:
        scale = _unit_scale(gram)
        values, vectors, _, _ = native.lanczos_topk((gram / scale).contiguous(), k)
        return values * scale[:, :, 0], vectors


def _unit_scale(gram: Tensor) -> Tensor:
    """(B, 1, 1) largest |entry| of each Gram (1 for a zero one). The kernels square entries
    (norms): they underflow for a Gram of ~1e-200 and overflow past ~1e154 in float64. The
    eigenpairs of G / c are G's with the values divided by c, so they run on every sample's Gram
    scaled to a largest entry of 1."""
    largest = gram.abs().amax(dim=(1, 2), keepdim=True)
    return torch.where(largest > 0, largest, torch.ones_like(largest))


CPP = NativeBackend("cpp", "cpu")
CUDA = NativeBackend("cuda", "cuda")
