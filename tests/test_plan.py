"""Layer-plan recognition by tracing the user's own module."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pullgeom.tracing.mlp_plan import NotAnMLP, plan_forward, trace_plan
from pullgeom.api import build_problem
from zoo import ChunkHeadEncoder, ConvEncoder, NormalEncoder, TwoHeadEncoder, seeded


class MethodActivations(nn.Module):
    """Custom forward using tensor methods and torch.flatten."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 8)
        self.b = nn.Linear(8, 6)
        self.mu = nn.Linear(6, 2)
        self.s = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.flatten(x, 1)
        h = self.a(h).tanh()
        h = F.softplus(self.b(h), beta=3.0, threshold=5.0)
        return self.mu(h), self.s(h)


class SlicedHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.SiLU())
        self.head = nn.Linear(7, 6)

    def forward(self, x):
        out = self.head(self.body(x))
        return out[:, :3], out[:, 3:]


class SkipConnection(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.mu = nn.Linear(5, 2)
        self.s = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x)) + x
        return self.mu(h), self.s(h)


class SplitForms(nn.Module):
    """The input flattened and the heads split in one of the spellings users write."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.body = nn.Linear(12, 7)
        self.head = nn.Linear(7, 6)

    def forward(self, x):
        out = self.head(torch.tanh(self.body(x.view(-1, 12))))
        if self.form == "torch.chunk":
            return torch.chunk(out, 2, dim=1)  # the pair itself, not unpacked
        if self.form == "torch.split":
            mu, out2 = torch.split(out, 3, dim=-1)
            return mu, out2
        mu, out2 = out.split([3, 3], dim=1)
        return mu, out2


@pytest.mark.parametrize("factory, shape", [
    (lambda: SplitForms("torch.chunk"), (3, 4)),
    (lambda: SplitForms("torch.split"), (12,)),
    (lambda: SplitForms("split sections"), (2, 6)),
    (lambda: TwoHeadEncoder(10, (8, 6), 3), (10,)),
    (lambda: TwoHeadEncoder(10, (8,), 3, "relu", bn_after_activation=True, dropout=True), (10,)),
    (lambda: ChunkHeadEncoder(12, 7, 3), (3, 4)),
    (lambda: ChunkHeadEncoder(12, 7, 3, split=True), (12,)),
    (MethodActivations, (3, 4)),
    (SlicedHeads, (5,)),
], ids=["torch.chunk-view(-1, n)", "torch.split", "split-sections", "sequential", "bn-after-act", "chunk-view", "split", "methods", "slices"])
def test_recognised_plans_reproduce_the_forward_pass(factory, shape):
    encoder = seeded(factory(), 0).double()
    plan = trace_plan(encoder)
    x = torch.randn(4, *shape, dtype=torch.float64)
    mu, out2 = plan_forward(plan, x.reshape(4, -1))
    mu_ref, out2_ref = encoder(x)
    torch.testing.assert_close(mu, mu_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out2, out2_ref, rtol=1e-12, atol=1e-12)


def test_plan_records_activation_parameters():
    plan = trace_plan(seeded(MethodActivations(), 1))
    assert [layer.activation for layer in plan.layers] == ["tanh", "softplus"]
    assert plan.layers[1].param == 3.0 and plan.layers[1].threshold == 5.0
    assert plan.widths == [12, 8, 6] and plan.latent_dim == 2


@pytest.mark.parametrize("factory, reason", [
    (lambda: ConvEncoder(), "Conv2d"),
    (lambda: NormalEncoder(6, 5, 2), "could not trace"),
    (SkipConnection, "combines several tensors"),
])
def test_non_mlps_are_refused_with_a_reason(factory, reason):
    with pytest.raises(NotAnMLP, match=reason):
        trace_plan(seeded(factory(), 2))


def test_fallback_is_logged_once(caplog):
    encoder, x = seeded(ConvEncoder(), 3), torch.rand(2, 1, 6, 6)
    with caplog.at_level(logging.INFO, logger="pullgeom"):
        assert build_problem(encoder, x)[0].plan is None
        assert build_problem(encoder, x)[0].plan is None
    notices = [r for r in caplog.records if "runs it on the autograd backend" in r.message]
    assert len(notices) == 1


def test_training_mode_batchnorm_is_not_folded():
    encoder = TwoHeadEncoder(6, (5,), 2).train()
    with pytest.raises(NotAnMLP, match="training mode"):
        trace_plan(encoder)
