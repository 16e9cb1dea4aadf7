"""The activations an MLP layer plan can hold: their codes, values and derivatives.

``ACTIVATIONS`` is the one list of names; a name's index is its integer code, which the native
kernels read (csrc/common/chain_codes.h must list the same names in the same order; a test checks
it). ``activation_forward`` / ``activation_derivative`` are the plain-torch formulas every
Python path uses (the torch and Triton chains, the layer-chain Jacobian, plan checks).
A layer here is anything with ``activation`` (a name), ``param`` and ``threshold``: the
negative slope (leaky_relu), alpha (elu), beta and threshold (softplus).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = (
    "identity", "tanh", "relu", "leaky_relu", "elu", "gelu", "gelu_tanh",
    "silu", "sigmoid", "softplus",
)
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def activation_forward(pre: Tensor, layer) -> Tensor:
    kind = layer.activation
    if kind == "identity":
        return pre
    if kind == "tanh":
        return torch.tanh(pre)
    if kind == "relu":
        return torch.relu(pre)
    if kind == "leaky_relu":
        return F.leaky_relu(pre, layer.param)
    if kind == "elu":
        return F.elu(pre, layer.param)
    if kind == "gelu":
        return F.gelu(pre)
    if kind == "gelu_tanh":
        return F.gelu(pre, approximate="tanh")
    if kind == "silu":
        return F.silu(pre)
    if kind == "sigmoid":
        return torch.sigmoid(pre)
    if kind == "softplus":
        return F.softplus(pre, layer.param, layer.threshold)
    raise AssertionError(f"unknown activation {kind}")


def activation_derivative(pre: Tensor, post: Tensor, layer) -> Tensor:
    """act'(pre), reusing the forward value ``post`` where the identity allows (MATH.md 2)."""
    kind = layer.activation
    if kind == "identity":
        return torch.ones_like(pre)
    if kind == "tanh":
        return 1 - post * post
    if kind == "relu":
        return (pre > 0).to(pre.dtype)
    if kind == "leaky_relu":
        # Scalars would make a float32 tensor: build the slope in pre's dtype.
        return torch.where(pre > 0, torch.ones_like(pre), torch.full_like(pre, layer.param))
    if kind == "elu":
        return torch.where(pre > 0, torch.ones_like(pre), post + layer.param)
    if kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(pre / math.sqrt(2)))
        return cdf + pre * torch.exp(-0.5 * pre * pre) / math.sqrt(2 * math.pi)
    if kind == "gelu_tanh":
        c = math.sqrt(2 / math.pi)
        u = c * (pre + 0.044715 * pre**3)
        t = torch.tanh(u)
        return 0.5 * (1 + t) + 0.5 * pre * (1 - t * t) * c * (1 + 3 * 0.044715 * pre * pre)
    if kind == "silu":
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    if kind == "sigmoid":
        return post * (1 - post)
    if kind == "softplus":
        scaled = pre * layer.param
        return torch.where(scaled > layer.threshold, torch.ones_like(pre), torch.sigmoid(scaled))
    raise AssertionError(f"unknown activation {kind}")

