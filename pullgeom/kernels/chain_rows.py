"""The reverse layer chain of an MLP plan in torch, parameterised by the matmul that runs it.

With D_l = diag(act'(pre_l)) and the heads C = [W_mu; diag(d sigma / d s) W_s] (MATH.md 2):

    A = C D_L W_L D_{L-1} ... W_2 D_1 W_1

The chain runs in reverse with few rows: start from P = K^{1/2} C (K^{1/2} = G_z^{1/2} per
head block, or I), so P^T P = C^T K C; whenever the rows outnumber the current width, replace
the rows R by the triangular factor of R's QR (R^T R unchanged), so the chain carries at most
the narrowest width seen so far. The result is ``left = R D_1`` (B, r', w_1), and A^T A =
(left W_1)^T (left W_1): the Gram is left (W_1 W_1^T) left^T with W_1 W_1^T formed once per
plan (``MLPPlan.first_layer_gram``).

One implementation for every Python path: the ``torch`` backend runs it with torch matmuls, the
Triton op (``pullgeom.kernels.triton.plan_gram``) with its fused scaled-matmul kernel; the
C++/CUDA kernels (csrc/) implement the same steps natively.

Multiply-adds per sample for the paper's encoder (784-256-256-512-32, dz=32): about 9 M
(32 rows through 512x256, 256x256 and the 256x256 first-layer Gram) versus 30 M to
materialise A with 64 rows, and ~480 M for eigh of the 784 x 784 metric.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from pullgeom.encoder_output import sigma_derivative
from pullgeom.tracing.activations import activation_derivative, activation_forward
from pullgeom.tracing.mlp_plan import MLPPlan

# (a (B, M, K), scale (B, K) or None, w (B or 1, K, N)) -> (a * scale[:, None, :]) @ w: (B, M, N)
ScaledMatmul = Callable[[Tensor, Tensor | None, Tensor], Tensor]


def torch_scaled_matmul(a: Tensor, scale: Tensor | None, w: Tensor) -> Tensor:
    """The ``ScaledMatmul`` in plain torch."""
    return (a if scale is None else a * scale.unsqueeze(1)) @ w


def compress_rows(rows: Tensor) -> Tensor:
    """(B, p, q) with p > q -> (B, q, q) triangular T with T^T T = rows^T rows."""
    if rows.shape[1] <= rows.shape[2]:
        return rows
    return torch.linalg.qr(rows, mode="r")[1]


def forward_derivatives(plan: MLPPlan, x2d: Tensor) -> tuple[list[Tensor], Tensor]:
    """Activation derivatives per layer [(B, w_l)] and out2 (B, dz) at ``x2d: (B, N)``."""
    derivatives = []
    h = x2d
    for layer in plan.layers:
        pre = torch.addmm(layer.bias, h, layer.weight.T)
        h = activation_forward(pre, layer)
        derivatives.append(activation_derivative(pre, h, layer))
    return derivatives, torch.addmm(plan.s_bias, h, plan.s_weight.T)


def head_rows(plan: MLPPlan, out2: Tensor, sigma: str, stochastic: bool,
              latent_sqrt: Tensor | None) -> Tensor:
    """P = K^{1/2} C: (B, 2dz or dz, w_L)."""
    blocks = [plan.mu_weight.expand(out2.shape[0], -1, -1)]
    if stochastic:
        blocks.append(sigma_derivative(out2, sigma).unsqueeze(-1) * plan.s_weight)
    if latent_sqrt is not None:
        blocks = [latent_sqrt @ block for block in blocks]
    return torch.cat(blocks, dim=1)


def chain_rows(plan: MLPPlan, x2d: Tensor, sigma: str, stochastic: bool, latent_sqrt: Tensor | None,
               matmul: ScaledMatmul = torch_scaled_matmul) -> Tensor:
    """The per-sample left factor ``left = R D_1``: (B, r', w_1), r' <= ``plan.rank_bound``
    (P itself, (B, r', N), for a plan without hidden layers). ``x2d: (B, N)``;
    ``latent_sqrt``: (B, dz, dz) = G_z^{1/2} or None."""
    derivatives, out2 = forward_derivatives(plan, x2d)
    rows = compress_rows(head_rows(plan, out2, sigma, stochastic, latent_sqrt))
    for index in range(len(plan.layers) - 1, 0, -1):
        rows = compress_rows(matmul(rows, derivatives[index], plan.layers[index].weight.unsqueeze(0)))
    return rows * derivatives[0].unsqueeze(1) if plan.layers else rows
