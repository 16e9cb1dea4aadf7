"""Fused plan-to-Gram for MLP layer plans (MATH.md 2), with the reverse chain in Triton.

Per sample, with D_l = diag(act'(pre_l)) and heads C = [W_mu; diag(d sigma / d s) W_s]:

    P    = K^{1/2} C                         (2dz or dz rows; K^{1/2} = latent_sqrt or I)
    R    <- (R D_l) W_l      l = L..2         Triton: scaled_bmm_kernel, D_l fused into the load
    left = R D_1                              (B, r', w_1)
    Gram = left (W_1 W_1^T) left^T            (B, r', r'); W_1 W_1^T is passed in, computed once

The chain itself (with its QR compression of the rows) is ``pullgeom.kernels.chain_rows``, run
here with the Triton scaled matmul. The forward pass (pre-activations and act') is plain torch:
it is one dense matmul per layer that cuBLAS already does at peak.

Op: ``torch.ops.pullgeom.triton_plan_gram`` (schema in ``triton_plan_gram``); ``plan_gram``
calls it with an ``MLPPlan``. CPU kernel (unless ``TRITON_INTERPRET=1``): the same chain with
torch matmuls in place of the Triton kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from pullgeom.encoder_output import SIGMA_CONVENTIONS
from pullgeom.kernels.chain_rows import ScaledMatmul, chain_rows, torch_scaled_matmul
from pullgeom.kernels.triton import interpreting
from pullgeom.kernels.triton.scaled_matmul import check_floating, launch_scaled_bmm
from pullgeom.tracing.activations import ACTIVATIONS
from pullgeom.tracing.mlp_plan import DenseLayer, MLPPlan


def _check_plan_inputs(x: Tensor, weights: list[Tensor], biases: list[Tensor], activations: list[int],
                       params: list[float], thresholds: list[float], mu_weight: Tensor, s_weight: Tensor,
                       s_bias: Tensor, latent_sqrt: Tensor | None, first_gram: Tensor, sigma: int) -> None:
    check_floating("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be (B, N), got shape {tuple(x.shape)}")
    if not weights:
        raise ValueError("weights is empty: the fused chain needs at least one hidden layer")
    if not (len(weights) == len(biases) == len(activations) == len(params) == len(thresholds)):
        raise ValueError("weights, biases, activations, params and thresholds must have one entry per layer")
    width = x.shape[1]
    for index, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        check_floating(f"weights[{index}]", weight, x)
        check_floating(f"biases[{index}]", bias, x)
        if weight.dim() != 2 or weight.shape[1] != width or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"weights[{index}] {tuple(weight.shape)} / biases[{index}] {tuple(bias.shape)} "
                             f"do not follow a layer of width {width}")
        width = weight.shape[0]
        if not 0 <= activations[index] < len(ACTIVATIONS):
            raise ValueError(f"activations[{index}] = {activations[index]} is not a code in "
                             "plan.ACTIVATION_CODES")
    for name, head in (("mu_weight", mu_weight), ("s_weight", s_weight)):
        check_floating(name, head, x)
        if head.dim() != 2 or head.shape[1] != width:
            raise ValueError(f"{name} must be (dz, {width}), got {tuple(head.shape)}")
    if mu_weight.shape != s_weight.shape or tuple(s_bias.shape) != (s_weight.shape[0],):
        raise ValueError(f"mu_weight {tuple(mu_weight.shape)}, s_weight {tuple(s_weight.shape)} and "
                         f"s_bias {tuple(s_bias.shape)} must be (dz, w_L), (dz, w_L) and (dz,)")
    check_floating("s_bias", s_bias, x)
    dz = mu_weight.shape[0]
    if latent_sqrt is not None:
        check_floating("latent_sqrt", latent_sqrt, x)
        if tuple(latent_sqrt.shape) != (x.shape[0], dz, dz):
            raise ValueError(f"latent_sqrt must be (B, dz, dz) = {(x.shape[0], dz, dz)}, "
                             f"got {tuple(latent_sqrt.shape)}")
    check_floating("first_gram", first_gram, x)
    w1 = weights[0].shape[0]
    if tuple(first_gram.shape) != (w1, w1):
        raise ValueError(f"first_gram must be W_1 W_1^T: ({w1}, {w1}), got {tuple(first_gram.shape)}")
    if not 0 <= sigma < len(SIGMA_CONVENTIONS):
        raise ValueError(f"sigma = {sigma} is not a code in encoder.SIGMA_CODES")


def _chain_gram(matmul: ScaledMatmul, x: Tensor, weights: list[Tensor], biases: list[Tensor],
                activations: list[int], params: list[float], thresholds: list[float], mu_weight: Tensor,
                s_weight: Tensor, s_bias: Tensor, latent_sqrt: Tensor | None, first_gram: Tensor,
                sigma: int, stochastic: bool) -> tuple[Tensor, Tensor]:
    _check_plan_inputs(x, weights, biases, activations, params, thresholds, mu_weight, s_weight,
                       s_bias, latent_sqrt, first_gram, sigma)
    specs = zip(weights, biases, activations, params, thresholds, strict=True)
    layers = tuple(DenseLayer(w, b, ACTIVATIONS[code], param, threshold)
                   for w, b, code, param, threshold in specs)
    # The mu head's bias does not enter the Jacobian: the op's schema leaves it out.
    plan = MLPPlan(layers, mu_weight, mu_weight.new_zeros(mu_weight.shape[0]), s_weight, s_bias,
                   first_layer_gram=first_gram)
    left = chain_rows(plan, x, SIGMA_CONVENTIONS[sigma], stochastic, latent_sqrt, matmul)
    gram = matmul(matmul(left, None, first_gram.unsqueeze(0)), None, left.transpose(1, 2))
    return left, 0.5 * (gram + gram.transpose(1, 2))


@triton_op("pullgeom::triton_plan_gram", mutates_args={})
def triton_plan_gram(x: Tensor, weights: list[Tensor], biases: list[Tensor], activations: list[int],
                     params: list[float], thresholds: list[float], mu_weight: Tensor, s_weight: Tensor,
                     s_bias: Tensor, latent_sqrt: Tensor | None, first_gram: Tensor, sigma: int,
                     stochastic: bool) -> tuple[Tensor, Tensor]:
    """Left factor (B, r', w_1) and Gram (B, r', r') of a plan's metric at x: (B, N).

    weights[l]: (w_l, w_{l-1}), biases[l]: (w_l,) with BatchNorm folded; activations: codes of
    ``tracing.activations.ACTIVATION_CODES`` with their ``params``/``thresholds``; heads (dz, w_L),
    s_bias (dz,); latent_sqrt: (B, dz, dz) = G_z^{1/2} or None; first_gram: W_1 W_1^T (w_1, w_1);
    sigma: a code of ``encoder_output.SIGMA_CODES``; stochastic: include the sigma head.
    r' <= min(2dz, widths). left^T left equals that of ``chain_rows.chain_rows`` with torch
    matmuls (the rows may differ by an orthogonal transform). Deterministic.
    """
    return _chain_gram(launch_scaled_bmm, x, weights, biases, activations, params, thresholds, mu_weight,
                       s_weight, s_bias, latent_sqrt, first_gram, sigma, stochastic)


def _plan_gram_cpu(x: Tensor, weights: list[Tensor], biases: list[Tensor], activations: list[int],
                   params: list[float], thresholds: list[float], mu_weight: Tensor, s_weight: Tensor,
                   s_bias: Tensor, latent_sqrt: Tensor | None, first_gram: Tensor, sigma: int,
                   stochastic: bool) -> tuple[Tensor, Tensor]:
    return _chain_gram(torch_scaled_matmul, x, weights, biases, activations, params, thresholds, mu_weight,
                       s_weight, s_bias, latent_sqrt, first_gram, sigma, stochastic)


if not interpreting():
    triton_plan_gram.register_kernel("cpu")(_plan_gram_cpu)


def plan_gram(plan: MLPPlan, x2d: Tensor, *, sigma: str = "logvar", stochastic: bool = True,
              latent_sqrt: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``triton_plan_gram`` for an ``MLPPlan`` (>= 1 hidden layer) at ``x2d: (B, N)``: left
    (B, r', w_1) and gram (B, r', r'); the same signature as ``pullgeom.kernels.native.plan_gram``."""
    layers = plan.layers
    return torch.ops.pullgeom.triton_plan_gram(
        x2d, [layer.weight for layer in layers], [layer.bias for layer in layers],
        [layer.activation_code for layer in layers],
        [float(layer.param) for layer in layers], [float(layer.threshold) for layer in layers],
        plan.mu_weight, plan.s_weight, plan.s_bias, latent_sqrt, plan.first_layer_gram,
        SIGMA_CONVENTIONS.index(sigma), stochastic)
