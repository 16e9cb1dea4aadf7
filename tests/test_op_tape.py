"""The op tape's J v and J^T u (pullgeom.tracing.op_tape) against float64 autograd Jacobians.

Every test forms the whole Jacobian both ways from the tape (J e_i column by column through
``jvp``, J^T e_j row by row through ``vjp``) and compares it entry by entry with
``torch.autograd.functional.jacobian`` in float64, so a rule wrong in any direction fails, not
just on the vectors a random test happens to draw (a GroupNorm rule that misread a transposed
cotangent agreed with autograd on random cotangents and not on others).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pullgeom.backends.lanczos_backend import RecordedJacobian
from pullgeom.encoder_output import as_encoder, heads_function
from pullgeom.tracing.op_tape import OpTape, UnsupportedTape
from test_output_conventions import images, tiny_autoencoder_kl

TOL = 1e-12


def tape_jacobians(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(J from jvp, J from vjp, autograd's J), each (out.numel(), x.numel()), and checks the
    tape's recorded output is fn(x)."""
    tape = OpTape(fn, x)
    torch.testing.assert_close(tape.out, fn(x), rtol=0, atol=0)
    n, m = x.numel(), tape.out.numel()
    basis_in = torch.eye(n, dtype=x.dtype).reshape(n, *x.shape)
    basis_out = torch.eye(m, dtype=x.dtype).reshape(m, *tape.out.shape)
    forward = torch.stack([tape.jvp(e).reshape(-1) for e in basis_in], dim=1)
    reverse = torch.stack([tape.vjp(e).reshape(-1) for e in basis_out], dim=0)
    reference = torch.autograd.functional.jacobian(fn, x).reshape(m, n)
    return forward, reverse, reference


def assert_tape_exact(fn, x: torch.Tensor) -> None:
    forward, reverse, reference = tape_jacobians(fn, x)
    scale = reference.abs().max()
    assert scale > 0
    assert (forward - reference).abs().max() <= TOL * scale
    assert (reverse - reference).abs().max() <= TOL * scale


class ConvNormBlock(nn.Module):
    """Every hand rule: convolution (strided, padded, grouped, transposed), GroupNorm in NCHW
    and over (B, C, tokens) reached through transposes (the attention block's layout), SiLU,
    broadcast add/sub with alpha, scalar mul/div, mul and div by constants and by live tensors,
    zero padding, views, split and cat."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)
        self.norm = nn.GroupNorm(2, 4)
        self.token_norm = nn.GroupNorm(2, 4)
        self.bias = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        h = F.silu(self.norm(self.conv(F.pad(x, (0, 1, 0, 1)))))
        h = torch.sub(h, self.bias, alpha=0.5) * 2.0 / 3.0
        h = self.grouped(h) + h * h / (1.5 + h.tanh())
        tokens = h.flatten(2).transpose(1, 2)  # (B, T, C)
        tokens = self.token_norm(tokens.transpose(1, 2)).transpose(1, 2)
        h = tokens.transpose(1, 2).reshape(h.shape) + 0.1 * h
        a, b = self.up(h).split(1, dim=1)
        return torch.cat([a.flatten(1), (b * a).flatten(1), torch.add(a, b, alpha=-2).flatten(1)], dim=1)


class GenericOps(nn.Module):
    """Ops with no hand rule (PyTorch's own per-op derivatives): LayerNorm, softmax attention,
    nn.MultiheadAttention (recorded with gradients on, so it takes its differentiable path, not
    the fused no-grad kernel, which has no derivative), max with its integer indices, a detached
    branch (a constant), an unused branch (dropped), and grid_sample, which has no forward-mode
    derivative (its J v is the op's double VJP)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.grid = nn.Parameter(torch.rand(1, 3, 3, 2) * 2 - 1)

    def forward(self, x):  # x: (B, 3, 4)
        h = self.norm(x)
        attended, _ = self.mha(h, h, h)
        scores = torch.softmax(h @ h.transpose(1, 2), dim=-1) @ h
        peak, index = scores.max(dim=-1)
        _unused = torch.exp(h).sum()
        constant = x.detach().sin()
        image = (attended + constant).reshape(x.shape[0], 1, 3, 4)
        sampled = F.grid_sample(image, self.grid.expand(x.shape[0], -1, -1, -1), align_corners=False)
        return torch.cat([sampled.flatten(1), peak * index.to(x.dtype), attended.flatten(1)], dim=1)


class ActivationsAndMatmuls(nn.Module):
    """The diagonal rules (eval BatchNorm 1d/2d with running statistics, relu, gelu both ways,
    leaky_relu, elu, softplus, sigmoid, tanh), a subtraction of a live tensor, and the
    matrix-product rules (addmm with alpha and beta, its bias constant and live; mm with a live
    right factor; bmm with both factors live)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.linear = nn.Linear(12, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.weight = nn.Parameter(torch.randn(5, 6))
        self.left = nn.Parameter(torch.randn(4, 5))
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)

    def forward(self, x):  # x: (B, 1, 2, 2)
        h = F.relu(self.bn2(self.conv(x)) + 0.3).flatten(1)  # (B, 12)
        h = self.bn1(F.gelu(self.linear(h), approximate="tanh"))
        h = F.softplus(F.elu(F.leaky_relu(h, 0.2), alpha=0.7), beta=2.0) + F.gelu(h).sigmoid()
        h = torch.sub(h, h.cos(), alpha=0.5)  # live subtrahend
        h = torch.addmm(self.linear.bias[:5], h, self.weight.T, beta=0.5, alpha=2.0)  # constant bias
        h = torch.addmm(h, h, self.weight[:, :5].T, beta=0.5, alpha=2.0).tanh()  # (B, 5), bias live
        pairs = torch.bmm(h.unsqueeze(2), h.unsqueeze(1))  # (B, 5, 5), both factors live
        return torch.cat([pairs.flatten(1), (self.left @ h.T).T], dim=1)


def test_hand_rules_give_the_exact_jacobian():
    torch.manual_seed(0)
    block = ConvNormBlock().double().eval()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    assert_tape_exact(block, x)
    # channels_last input: the convolutions and GroupNorm then run in that layout
    assert_tape_exact(block, x.contiguous(memory_format=torch.channels_last))


def test_activation_and_matmul_rules_give_the_exact_jacobian():
    torch.manual_seed(2)
    model = ActivationsAndMatmuls().double().eval()
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    tape = OpTape(model, x)
    ruled = {str(op.func) for op in tape.ops}
    for name in ("native_batch_norm", "relu", "gelu", "leaky_relu", "elu", "softplus", "sigmoid", "tanh",
                 "addmm", "aten.mm", "bmm"):
        assert any(name in func for func in ruled), f"the model no longer exercises {name}: {sorted(ruled)}"
    assert_tape_exact(model, x)


def test_generic_rules_give_the_exact_jacobian():
    torch.manual_seed(1)
    model = GenericOps().double().eval()
    assert_tape_exact(model, torch.randn(2, 3, 4, dtype=torch.float64))


def test_diffusers_encoder_heads_exact():
    vae = tiny_autoencoder_kl()
    heads = heads_function(as_encoder(vae), None, True)
    assert_tape_exact(heads, images(2, seed=3))


def test_in_place_functions_fall_back_to_recorded_graphs():
    def in_place(x):
        h = x * 2
        h.add_(1.0)
        return h.sin().flatten(1)

    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedTape, match="in place"):
        OpTape(in_place, x)
    recorded = RecordedJacobian(in_place, x)
    everyone = torch.arange(2)
    v = torch.randn(3, 2, 3, dtype=torch.float64)
    reference = torch.autograd.functional.jacobian(in_place, x)  # (2, 3, 2, 3): sample-diagonal
    expected = torch.einsum("bibj,cbj->cbi", reference, v)
    torch.testing.assert_close(recorded.push(v, everyone), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(recorded.pull(v, everyone), torch.einsum("bibj,cbi->cbj", reference, v),
                               rtol=1e-12, atol=1e-12)


def test_an_op_without_any_derivative_is_named():
    def fused_attention(x):  # the fused kernel under no_grad-only fast path: no derivative at all
        q = x.unsqueeze(1)
        return torch.ops.aten._native_multi_head_attention(
            q, q, q, 2, 1, torch.eye(2, 6, dtype=x.dtype).T.contiguous(), torch.zeros(6, dtype=x.dtype),
            torch.eye(2, dtype=x.dtype), torch.zeros(2, dtype=x.dtype), need_weights=False)[0].flatten(1)

    x = torch.randn(3, 2, dtype=torch.float64)
    tape = OpTape(fused_attention, x)
    with pytest.raises(UnsupportedTape, match="_native_multi_head_attention"):
        tape.jvp(torch.ones_like(x))


def test_output_independent_of_the_input_has_zero_jacobian():
    weight = torch.randn(3, dtype=torch.float64)
    tape = OpTape(lambda x: weight.expand(x.shape[0], 3) * 1.0, torch.randn(2, 4, dtype=torch.float64))
    assert torch.equal(tape.jvp(torch.ones(2, 4, dtype=torch.float64)), torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(tape.vjp(torch.ones(2, 3, dtype=torch.float64)), torch.zeros(2, 4, dtype=torch.float64))
