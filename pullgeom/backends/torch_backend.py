"""Backend ``torch``: the analytic layer chain of an MLP encoder in plain torch ops.

With D_l = diag(act'(pre_l)) and the heads C = [W_mu; diag(d sigma / d s) W_s] (MATH.md 2):

    A = C D_L W_L D_{L-1} ... W_2 D_1 W_1

The chain runs in reverse with few rows: start from P, any matrix with P^T P = C^T K C
(K = blockdiag(G_z, G_z) or I); whenever the rows outnumber the current width, replace the
rows R by the triangular factor of R's QR (R^T R unchanged), so the chain carries at most
the narrowest width seen so far. The result is ``left = R`` (B, r, w_1) and the shared
``right = W_1`` (w_1, N): the Gram is R (W_1 W_1^T) R^T with W_1 W_1^T computed once.

Multiply-adds per sample for the paper's encoder (784-256-256-512-32, dz=32): about 9 M
(32 rows through 512x256, 256x256 and the 256x256 first-layer Gram) versus 30 M to
materialise A with 64 rows, and ~480 M for eigh of the 784 x 784 metric.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pullgeom.backends.base import Backend, Problem
from pullgeom.encoder_output import sigma_derivative
from pullgeom.factor import LowRankFactor
from pullgeom.tracing.fx_trace import MLPPlan, activation_derivative, activation_forward


def compress_rows(rows: Tensor) -> Tensor:
    """(B, p, q) with p > q -> (B, q, q) triangular T with T^T T = rows^T rows."""
    if rows.shape[1] <= rows.shape[2]:
        return rows
    return torch.linalg.qr(rows, mode="r")[1]


def forward_derivatives(plan: MLPPlan, x2d: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
    """Activation derivatives per layer [(B, w_l)], the last hidden h_L and out2 (B, dz)."""
    derivatives = []
    h = x2d
    for layer in plan.layers:
        pre = torch.addmm(layer.bias, h, layer.weight.T)
        h = activation_forward(pre, layer)
        derivatives.append(activation_derivative(pre, h, layer))
    out2 = torch.addmm(plan.s_bias, h, plan.s_weight.T)
    return derivatives, h, out2


def head_rows(plan: MLPPlan, out2: Tensor, sigma: str, stochastic: bool,
              latent_sqrt: Tensor | None) -> Tensor:
    """P = K^{1/2} C: (B, 2dz or dz, w_L)."""
    batch = out2.shape[0]
    mu_rows = plan.mu_weight.expand(batch, -1, -1)
    blocks = [mu_rows]
    if stochastic:
        blocks.append(sigma_derivative(out2, sigma).unsqueeze(-1) * plan.s_weight)
    if latent_sqrt is not None:
        blocks = [latent_sqrt @ block for block in blocks]
    return torch.cat(blocks, dim=1)


def chain_rows(plan: MLPPlan, x2d: Tensor, sigma: str, stochastic: bool,
               latent_sqrt: Tensor | None) -> Tensor:
    """The per-sample left factor R: (B, r', w_1) (or (B, r', N) with no hidden layer)."""
    derivatives, _, out2 = forward_derivatives(plan, x2d)
    rows = compress_rows(head_rows(plan, out2, sigma, stochastic, latent_sqrt))
    for index in range(len(plan.layers) - 1, -1, -1):
        rows = rows * derivatives[index].unsqueeze(1)
        if index > 0:
            rows = compress_rows(rows @ plan.layers[index].weight)
    return rows


def first_layer(plan: MLPPlan) -> Tensor | None:
    return plan.layers[0].weight if plan.layers else None


class TorchChainBackend(Backend):
    name = "torch"
    traceable = True

    def unsupported_reason(self, problem: Problem) -> str | None:
        if problem.plan is None:
            return f"the encoder is not a recognised MLP ({problem.plan_reason})"
        return None

    def factor(self, problem: Problem, x: Tensor, latent_sqrt: Tensor | None) -> LowRankFactor:
        plan = problem.plan
        rows = chain_rows(plan, x.flatten(1), problem.sigma, problem.stochastic,
                          latent_sqrt)
        right = first_layer(plan)
        if right is None:
            return LowRankFactor(rows)
        return LowRankFactor(rows, right, problem.first_layer_gram())
