"""Traced chains -> MLP layer plan: the encoder as a chain the analytic backends differentiate by hand.

    h_0 = flatten(x)                                   (B, N)
    h_l = act_l(W_l h_{l-1} + b_l)       l = 1..L      BatchNorm (eval) folded into W_l, b_l
    mu  = W_mu h_L + b_mu,   out2 = W_s h_L + b_s      (B, dz) each

``fold_chains`` reads the weights of the modules ``pullgeom.tracing.fx_trace`` found, as they
are now; it raises ``NotAnMLP`` (saying why) for chains that are not such an MLP (convolutions,
say), which the layer-chain Jacobian (``pullgeom.tracing.layer_chain``) may still serve.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from pullgeom.tracing.activations import ACTIVATION_CODES, activation_forward
from pullgeom.tracing.fx_trace import (FLATTEN, ActivationOp, LayerChains, SliceOp, UnsupportedEncoder,
                                       split_trunk, trace_chains)


class NotAnMLP(UnsupportedEncoder):
    """The traced chains are not an MLP layer plan (the message says why)."""


def rank_bound(latent_dim: int, stochastic: bool, widths) -> int:
    """The rank rule: rank(G) <= min(2dz (dz without the sigma head), every width on the way),
    ``widths`` being the input size N and, for a layer plan, each hidden width. Sizes may be
    symbolic (``torch.sym_min``: the fake kernels call it under torch.compile)."""
    return functools.reduce(torch.sym_min, widths, (2 if stochastic else 1) * latent_dim)


@dataclass(frozen=True)
class DenseLayer:
    """One hidden layer ``h = act(W h_prev + b)`` with BatchNorm already folded in.

    weight: (out, in); bias: (out,). ``param`` is the activation's scalar: the negative
    slope (leaky_relu), alpha (elu), beta (softplus); ``threshold`` is softplus's.
    """

    weight: Tensor
    bias: Tensor
    activation: str = "identity"
    param: float = 0.0
    threshold: float = 20.0

    @property
    def activation_code(self) -> int:
        return ACTIVATION_CODES[self.activation]


@dataclass(frozen=True)
class MLPPlan:
    """An MLP encoder as a chain: hidden ``layers`` then the two linear heads.

    head weights: (dz, w_L) where w_L is the last hidden width (N when there is no hidden
    layer); head biases: (dz,). first_layer_gram: W_1 W_1^T (w_1, w_1) of the first hidden
    layer, None without one: every Gram of the analytic chain is R (W_1 W_1^T) R^T (MATH.md 2),
    so it is formed once, with the plan, and shared by every chunk of a call.
    """

    layers: tuple[DenseLayer, ...]
    mu_weight: Tensor
    mu_bias: Tensor
    s_weight: Tensor
    s_bias: Tensor
    first_layer_gram: Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.layers and self.first_layer_gram is None:
            weight = self.layers[0].weight
            object.__setattr__(self, "first_layer_gram", (weight @ weight.T).contiguous())

    @property
    def input_numel(self) -> int:
        first = self.layers[0].weight if self.layers else self.mu_weight
        return first.shape[1]

    @property
    def latent_dim(self) -> int:
        return self.mu_weight.shape[0]

    @property
    def widths(self) -> list[int]:
        """Input size, then each hidden width."""
        return [self.input_numel] + [layer.weight.shape[0] for layer in self.layers]

    def rank_bound(self, stochastic: bool) -> int:
        """Upper bound on rank(G) (``rank_bound``)."""
        return rank_bound(self.latent_dim, stochastic, self.widths)

    def to(self, device=None, dtype=None) -> "MLPPlan":
        def cast(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        layers = tuple(
            DenseLayer(cast(layer.weight), cast(layer.bias), layer.activation, layer.param, layer.threshold)
            for layer in self.layers
        )
        return MLPPlan(layers, cast(self.mu_weight), cast(self.mu_bias),
                       cast(self.s_weight), cast(self.s_bias))

@dataclass
class _Affine:
    """A per-feature affine map y = scale * x + shift (an eval-mode BatchNorm1d)."""

    scale: Tensor
    shift: Tensor

@dataclass
class _Linear:
    weight: Tensor
    bias: Tensor



def _batchnorm_affine(bn: nn.BatchNorm1d) -> _Affine:
    if bn.training:
        raise NotAnMLP("BatchNorm in training mode")
    if bn.running_mean is None:
        raise NotAnMLP("BatchNorm without running statistics")
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    scale = gamma * inv_std
    return _Affine(scale, beta - bn.running_mean * scale)



def trace_plan(encoder: nn.Module) -> MLPPlan:
    """Trace ``encoder`` into an ``MLPPlan`` or raise ``NotAnMLP`` saying why (eval mode:
    BatchNorm folds with its running statistics)."""
    try:
        chains = trace_chains(encoder)
    except NotAnMLP:
        raise
    except UnsupportedEncoder as reason:
        raise NotAnMLP(str(reason)) from None
    return fold_chains(chains)


def _resolve(op):
    """A chain op with the module's current weights read: nn.Linear -> _Linear, BatchNorm -> _Affine."""
    if isinstance(op, nn.Linear):
        bias = op.bias if op.bias is not None else op.weight.new_zeros(op.out_features)
        return _Linear(op.weight.detach(), bias.detach())
    if isinstance(op, nn.BatchNorm1d):
        return _batchnorm_affine(op)
    return op


def fold_chains(chains: LayerChains) -> MLPPlan:
    """The plan of traced chains, from the modules' weights as they are now.

    Pure torch and Python over the chains, so torch.compile traces it: a compiled spectrum
    re-reads the weights on every call instead of keeping the ones of its first call.
    """
    heads = (_mlp_ops(chain) for chain in (chains.mu, chains.out2))
    trunk, mu_head, s_head = ([_resolve(op) for op in ops] for ops in split_trunk(*heads))
    # Two separate heads: [Linear] each. One shared head: trunk ends with Linear, each
    # branch is [Slice].
    if len(mu_head) == 1 and len(s_head) == 1 and all(isinstance(h[0], SliceOp) for h in (mu_head, s_head)):
        if not trunk or not isinstance(trunk[-1], _Linear):
            raise NotAnMLP("the heads are slices of something other than a Linear output")
        shared = trunk.pop()
        mu_lin = _Linear(shared.weight[mu_head[0].start:mu_head[0].stop],
                         shared.bias[mu_head[0].start:mu_head[0].stop])
        s_lin = _Linear(shared.weight[s_head[0].start:s_head[0].stop],
                        shared.bias[s_head[0].start:s_head[0].stop])
    elif len(mu_head) == 1 and len(s_head) == 1 and all(isinstance(h[0], _Linear) for h in (mu_head, s_head)):
        mu_lin, s_lin = mu_head[0], s_head[0]
    else:
        raise NotAnMLP("the mu and sigma heads are not two Linear layers or one split Linear")
    if mu_lin.weight.shape != s_lin.weight.shape:
        raise NotAnMLP("the mu and sigma heads have different sizes")
    layers = _fold_trunk(trunk)
    # A trailing affine (BatchNorm after the last activation) folds into the heads.
    if layers and isinstance(layers[-1], _Affine):
        affine = layers.pop()
        mu_lin, s_lin = (_Linear(head.weight * affine.scale, head.bias + head.weight @ affine.shift)
                         for head in (mu_lin, s_lin))
    return MLPPlan(tuple(layers), mu_lin.weight, mu_lin.bias, s_lin.weight, s_lin.bias)



def _mlp_ops(chain: list) -> list:
    """The chain's ops after the input, no-ops and a leading flatten dropped (the plan works on
    flattened inputs); ``NotAnMLP`` for convolutions or a flatten between layers."""
    ops = [op for op in chain[1:] if op is not None]
    while ops and ops[0] is FLATTEN:
        ops.pop(0)
    for op in ops:
        if isinstance(op, (nn.Conv2d, nn.BatchNorm2d)):
            raise NotAnMLP(f"it has {type(op).__name__} layers, which an MLP plan cannot hold "
                           "(backend 'lanczos' runs such layer chains)")
        if op is FLATTEN:
            raise NotAnMLP("flatten after the first layer")
    return ops


def _fold_trunk(ops: list) -> list:
    """Fold BatchNorms into Linears and attach activations; ends in DenseLayers (+ _Affine)."""
    layers: list = []
    pending_affine: _Affine | None = None  # BatchNorm after an activation: folds forward
    for op in ops:
        if isinstance(op, _Linear):
            weight, bias = op.weight, op.bias
            if pending_affine is not None:
                bias = bias + weight @ pending_affine.shift
                weight = weight * pending_affine.scale
                pending_affine = None
            layers.append(DenseLayer(weight, bias))
        elif isinstance(op, _Affine):
            last = layers[-1] if layers else None
            if isinstance(last, DenseLayer) and last.activation == "identity" and pending_affine is None:
                layers[-1] = DenseLayer(last.weight * op.scale[:, None], last.bias * op.scale + op.shift)
            elif pending_affine is None:
                pending_affine = op
            else:
                pending_affine = _Affine(pending_affine.scale * op.scale,
                                         pending_affine.shift * op.scale + op.shift)
        elif isinstance(op, ActivationOp):
            if pending_affine is not None:
                raise NotAnMLP("an activation after a BatchNorm that follows an activation")
            last = layers[-1] if layers else None
            if not isinstance(last, DenseLayer) or last.activation != "identity":
                raise NotAnMLP("an activation that does not follow a Linear layer")
            layers[-1] = DenseLayer(last.weight, last.bias, op.name, op.param, op.threshold)
        elif isinstance(op, SliceOp):
            raise NotAnMLP("slicing inside the trunk")
    if pending_affine is not None:
        layers.append(pending_affine)
    return layers


_notified: set[int] = set()



def plan_forward(plan: MLPPlan, x2d: Tensor) -> tuple[Tensor, Tensor]:
    """``(mu, out2)`` of the plan on flattened inputs ``x2d: (B, N)``; used to check a plan."""
    h = x2d
    for layer in plan.layers:
        h = activation_forward(h @ layer.weight.T + layer.bias, layer)
    return h @ plan.mu_weight.T + plan.mu_bias, h @ plan.s_weight.T + plan.s_bias
