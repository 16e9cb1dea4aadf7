"""The Jacobian of a traced layer chain by hand: v -> J v and u -> J^T u without autograd graphs.

For an encoder that ``pullgeom.tracing.fx_trace.trace_chains`` reads as a chain of Conv2d, Linear,
eval-mode BatchNorm (1d/2d), elementwise activations, flatten and head slices -- conv VAEs such
as the paper's CelebA encoder, and every MLP the plan recognises -- the heads' Jacobian at x is

    J = C D_L S_L W_L ... D_1 S_1 W_1        (W_l: a convolution or matrix without bias,
                                              S_l: BatchNorm's per-channel scale,
                                              D_l = diag(act_l'(pre_l)), C: the heads)

so a product needs, per layer, one convolution (J v) or one transposed convolution (J^T u) and
an elementwise product with the derivative kept from the forward pass. Nothing else is stored:
one tensor the size of each activation (CelebA encoder, B = 16: 4 MiB), where the op tape
(``pullgeom.tracing.op_tape``, any encoder) keeps every op's inputs and ``torch.func`` graphs
(the pullback and its double-VJP JVP) 42-54 MiB; BENCHMARKS.md, "Per-product costs". Products
take any subset of the chunk's samples, so samples that have converged stop costing anything.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from pullgeom.encoder_output import sigma_derivative, sigma_from_output
from pullgeom.tracing.activations import activation_derivative, activation_forward
from pullgeom.tracing.fx_trace import (FLATTEN, ActivationOp, LayerChains, SliceOp, UnsupportedEncoder,
                                       split_trunk)


class NotAChain(UnsupportedEncoder):
    """The traced chains hold an op this module cannot differentiate by hand (message: which)."""


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's zero padding as two ints (``"same"`` resolved when it is symmetric)."""
    if conv.padding_mode != "zeros":
        raise NotAChain(f"Conv2d with padding_mode={conv.padding_mode!r}")
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(total % 2 for total in totals):
            raise NotAChain("Conv2d with asymmetric 'same' padding")
        return tuple(total // 2 for total in totals)
    return _pair(conv.padding)


def _channel_scale(bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """gamma / sqrt(running_var + eps): (C,), the Jacobian of an eval-mode BatchNorm."""
    if bn.training or bn.running_var is None:
        raise NotAChain(f"{type(bn).__name__} without running statistics in eval mode")
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    return bn.weight.detach() * inv_std if bn.affine else inv_std


class _Step:
    """One op of the chain at the recorded point: ``push`` / ``pull`` act on (c * B', ...) stacks
    of tangents / cotangents of the samples ``index`` (c vectors per sample, vector-major)."""

    def push(self, t: Tensor, index: Tensor, copies: int) -> Tensor:
        raise NotImplementedError

    def pull(self, g: Tensor, index: Tensor, copies: int) -> Tensor:
        raise NotImplementedError


class _LinearStep(_Step):
    def __init__(self, weight: Tensor):
        self.weight = weight  # (out, in)

    def push(self, t, index, copies):
        return F.linear(t, self.weight)

    def pull(self, g, index, copies):
        return g @ self.weight


class _ConvStep(_Step):
    def __init__(self, conv: nn.Conv2d, input_shape: torch.Size):
        self.weight = conv.weight.detach()
        self.stride, self.dilation, self.groups = conv.stride, conv.dilation, conv.groups
        self.padding = _conv_padding(conv)
        self.input_shape = input_shape[1:]  # (C_in, H, W): the transposed conv's output size

    def push(self, t, index, copies):
        return F.conv2d(t, self.weight, None, self.stride, self.padding, self.dilation, self.groups)

    def pull(self, g, index, copies):
        return torch.nn.grad.conv2d_input((g.shape[0], *self.input_shape), self.weight, g, self.stride,
                                          self.padding, self.dilation, self.groups)


class _ScaleStep(_Step):
    """Multiplication by a per-sample factor ``factor: (B, ...)`` (activation derivatives) or a
    shared one ``(1, ...)`` (BatchNorm scales); symmetric, so push and pull agree."""

    def __init__(self, factor: Tensor):
        self.factor = factor

    def push(self, t, index, copies):
        factor = self.factor if self.factor.shape[0] == 1 else self.factor[index]
        return (t.view(copies, -1, *t.shape[1:]) * factor).view(t.shape)

    pull = push


class _FlattenStep(_Step):
    def __init__(self, input_shape: torch.Size):
        self.input_shape = input_shape[1:]

    def push(self, t, index, copies):
        return t.flatten(1)

    def pull(self, g, index, copies):
        return g.reshape(g.shape[0], *self.input_shape)


class _SliceStep(_Step):
    def __init__(self, part: SliceOp, width: int):
        self.part, self.width = part, width

    def push(self, t, index, copies):
        return t[..., self.part.start:self.part.stop]

    def pull(self, g, index, copies):
        full = g.new_zeros(*g.shape[:-1], self.width)
        full[..., self.part.start:self.part.stop] = g
        return full


def _record(ops: list, h: Tensor) -> tuple[list[_Step], Tensor]:
    """Run ``ops`` forward from ``h`` keeping what their Jacobians need: (steps, output)."""
    steps: list[_Step] = []
    for op in ops:
        if isinstance(op, nn.Linear):
            steps.append(_LinearStep(op.weight.detach()))
            h = op(h)
        elif isinstance(op, nn.Conv2d):
            steps.append(_ConvStep(op, h.shape))
            h = op(h)
        elif isinstance(op, (nn.BatchNorm1d, nn.BatchNorm2d)):
            scale = _channel_scale(op)
            steps.append(_ScaleStep(scale.view(1, -1, *([1] * (h.dim() - 2)))))
            h = op(h)
        elif isinstance(op, ActivationOp):
            post = activation_forward(h, op)
            steps.append(_ScaleStep(activation_derivative(h, post, op)))
            h = post
        elif op is FLATTEN:
            steps.append(_FlattenStep(h.shape))
            h = h.flatten(1)
        elif isinstance(op, SliceOp):
            steps.append(_SliceStep(op, h.shape[-1]))
            h = h[..., op.start:op.stop]
        else:
            raise NotAChain(f"{type(op).__name__} layers")
    return steps, h


def _split_trunk(chains: LayerChains) -> tuple[list, list, list]:
    """(trunk, mu head, out2 head) of the chains' ops after the input, no-ops dropped."""
    return split_trunk(*([op for op in chain[1:] if op is not None] for chain in (chains.mu, chains.out2)))


class LayerChainJacobian:
    """The Jacobian of the encoder heads (mu, sigma) at a chunk ``x: (B, *S)`` from its chains.

    ``out``: (B, m) = [mu, sigma] (m = 2dz; [mu], m = dz, when not ``stochastic``), the chain's
    own forward, which the caller checks against the encoder. ``push(V, index)``: V (c, B', N)
    -> J V (c, B', m); ``pull(U, index)``: U (c, B', m) -> J^T U (c, B', N), for the samples
    ``index`` (B',) of the chunk. Raises ``NotAChain`` for ops it cannot differentiate.
    """

    def __init__(self, chains: LayerChains, x: Tensor, sigma: str, stochastic: bool):
        trunk, mu_head, s_head = _split_trunk(chains)
        self.input_shape = x.shape[1:]
        with torch.no_grad():
            self._trunk, features = _record(trunk, x)
            self._mu_head, mu = _record(mu_head, features)
            self._s_head, out2 = _record(s_head, features)
            if mu.dim() != 2 or out2.shape != mu.shape:
                raise NotAChain(f"heads of shapes {tuple(mu.shape)} and {tuple(out2.shape)}")
            self._sigma_slope = sigma_derivative(out2, sigma) if stochastic else None
            parts = [mu, sigma_from_output(out2, sigma)] if stochastic else [mu]
        self.out = torch.cat(parts, dim=1)
        self.dz = mu.shape[1]

    @staticmethod
    def _run(steps: list[_Step], t: Tensor, index: Tensor, copies: int, backward: bool) -> Tensor:
        for step in reversed(steps) if backward else steps:
            t = step.pull(t, index, copies) if backward else step.push(t, index, copies)
        return t

    def push(self, vectors: Tensor, index: Tensor) -> Tensor:
        c, b = vectors.shape[:2]
        with torch.no_grad():
            t = self._run(self._trunk, vectors.reshape(c * b, *self.input_shape), index, c, False)
            image = self._run(self._mu_head, t, index, c, False).view(c, b, self.dz)
            if self._sigma_slope is None:
                return image
            s = self._run(self._s_head, t, index, c, False).view(c, b, self.dz) * self._sigma_slope[index]
            return torch.cat([image, s], dim=2)

    def pull(self, vectors: Tensor, index: Tensor) -> Tensor:
        c, b = vectors.shape[:2]
        with torch.no_grad():
            g = self._run(self._mu_head, vectors[..., : self.dz].reshape(c * b, self.dz), index, c, True)
            if self._sigma_slope is not None:
                u = (vectors[..., self.dz:] * self._sigma_slope[index]).reshape(c * b, self.dz)
                g = g + self._run(self._s_head, u, index, c, True)
            back = self._run(self._trunk, g, index, c, True)
        return back.reshape(c, b, math.prod(self.input_shape))
