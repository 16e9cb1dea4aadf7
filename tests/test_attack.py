"""Attacks: the eigendirection beats random and approaches PGD; metrics and shapes."""

import pytest
import torch

import pullgeom
from pullgeom.paper import attacks as attack
from pullgeom.paper.models import PaperVAE


@pytest.fixture(autouse=True)
def _no_autotune(monkeypatch):
    """Skip backend="auto"'s one-time timing of every backend (tens of seconds on a busy 2-core box):
    these tests check results, not which backend is fastest."""
    monkeypatch.setenv("PULLGEOM_AUTOTUNE", "0")


class LinearVAE(torch.nn.Module):
    """mu(x) = A x (known top direction), logvar constant, decoder = A^T z."""

    def __init__(self, a):
        super().__init__()
        self.a = a

        class Enc(torch.nn.Module):
            def forward(inner, x):
                mu = x.reshape(x.shape[0], -1) @ a.T
                return mu, torch.zeros_like(mu)

        class Dec(torch.nn.Module):
            def forward(inner, z):
                return (z @ a).reshape(z.shape[0], 1, 2, 2)

        self.encoder, self.decoder = Enc(), Dec()


def _linear_model():
    a = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    return LinearVAE(a)


def test_pgd_finds_the_top_singular_direction_of_a_linear_encoder():
    model = _linear_model()
    x = torch.rand(5, 1, 2, 2)
    eta = attack.pgd_attack(model, x, 0.5, steps=50)
    # max ||A eta|| over ||eta|| <= 0.5 is 3 * 0.5, reached at eta = +/- 0.5 e_1
    gain = (model.encoder(x + eta)[0] - model.encoder(x)[0]).norm(dim=-1)
    torch.testing.assert_close(gain, torch.full((5,), 1.5), rtol=1e-3, atol=0)
    assert torch.all(eta.reshape(5, -1).norm(dim=1) <= 0.5 + 1e-12)


def test_unit_eigen_attack_equals_pgd_on_a_linear_encoder_and_beats_random():
    model = _linear_model()
    x = torch.rand(6, 1, 2, 2)
    budgets = torch.tensor([0.1, 1.0])
    result = attack.theorem_check(model, x, budgets, pgd_steps=50)
    torch.testing.assert_close(
        torch.tensor(result["ratio_eigen_mu_to_pgd"]), torch.ones(2), rtol=1e-3, atol=0
    )
    assert max(result["ratio_random_to_pgd"]) < 0.95


def test_fig2_steps_by_the_top_singular_value_of_j_mu():
    # J_mu = A has singular values 3 and 1 (the eigenvalue of J_mu^T J_mu is 9): the authors' step
    # is delta * 3 along +/- e_1, not delta * 9.
    model = _linear_model()
    x = torch.rand(4, 1, 2, 2)
    spec = pullgeom.spectrum(model.encoder, x, k=1, stochastic=False)
    examples = attack.corrupted_examples(model, x, spec)
    for delta in attack.FIG2_DELTAS:
        step = (examples[f"corrupted_{delta}"] - x).reshape(4, -1)
        torch.testing.assert_close(step.abs(), torch.tensor([3.0 * delta, 0, 0, 0]).expand(4, 4),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(examples[f"reconstruction_{delta}"],
                                   model.decoder(model.encoder(x + step.reshape(x.shape))[0]))
    assert list(examples)[:2] == ["original", "reconstruction"]


def test_boxed_attack_curves_on_a_linear_encoder():
    # mu = A x with singular values 3 (pixel 0) and 1 (pixel 1); pixel 0 sits at 0.5 in the box
    # [0, 1], pixel 1 at 0.2. Budget 0.1: the box does not bind, the step is +/- 0.1 e_1, shift 0.3.
    # Budget 0.8: pixel 0 moves at most 0.5 (shift 1.5, the clipped eigen step, which perturb never
    # does worse than); the best in the ball and the box spends the rest, sqrt(0.64 - 0.25), up
    # pixel 1: shift sqrt(9 * 0.25 + 0.39) = sqrt(2.64), below the unboxed 3 * 0.8. (perturb is a
    # local ascent: on this degenerate G, pixel 1 has no gradient at 0.5 e_1, it need not get there.)
    model = _linear_model()
    x = torch.tensor([0.5, 0.2, 0.9, 0.1]).reshape(1, 1, 2, 2).repeat(3, 1, 1, 1)
    budgets = torch.tensor([0.1, 0.8], dtype=torch.float64)
    boxed = attack.perturb_curves(model, x, budgets, (0.0, 1.0))
    assert boxed.mse.shape == boxed.latent.shape == (1, 2)
    torch.testing.assert_close(boxed.latent[0, 0], torch.tensor(0.3, dtype=torch.float64), rtol=1e-5, atol=0)
    assert 1.5 * (1 - 1e-5) <= boxed.latent[0, 1] <= 2.64 ** 0.5 * (1 + 1e-5)
    # The curves are the means of the metrics of pullgeom.perturb's own steps, every budget at once.
    xs = x.repeat(2, 1, 1, 1)
    x_adv = pullgeom.perturb(model.encoder, xs, torch.tensor([0.1] * 3 + [0.8] * 3), box=(0.0, 1.0))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    mse, latent = attack.attack_metrics(model, xs, x_adv)
    torch.testing.assert_close(boxed.latent[0], latent.reshape(2, 3).mean(-1).double())
    torch.testing.assert_close(boxed.mse[0], mse.reshape(2, 3).mean(-1).double())
    with pytest.raises(ValueError):  # x outside the box: perturb says so
        attack.perturb_curves(model, x, torch.tensor([0.1], dtype=torch.float64), (0.3, 1.0))


def test_paper_and_unit_scaling_and_shapes():
    torch.manual_seed(0)
    model = _linear_model()
    x = torch.rand(3, 1, 2, 2)
    spec = pullgeom.spectrum(model.encoder, x, k=2)
    deltas = attack.log_grid(1e-2, 1.0, 5)
    unit = attack.eigen_attack(model, x, spec, deltas, "unit")
    paper = attack.eigen_attack(model, x, spec, deltas, "paper")
    assert unit.mse.shape == (2, 5) and paper.latent.shape == (2, 5)
    # latent shift along v_1 is sigma_1 * step: 3 delta (unit), 3 lambda_1 delta (paper), lambda_1 = 9.
    # The model runs in float32 (the curves are float64 only for averaging), hence float32 tolerances.
    float32_close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unit.latent[0], 3 * deltas, **float32_close)
    torch.testing.assert_close(paper.latent[0], 27 * deltas, **float32_close)
    torch.testing.assert_close(unit.latent[1], deltas, **float32_close)


def test_eigen_attack_beats_random_on_the_paper_vae():
    torch.manual_seed(0)
    model = PaperVAE().eval()
    x = torch.rand(8, 1, 28, 28)
    spec = pullgeom.spectrum(model.encoder, x, k=1)
    deltas = torch.tensor([0.5, 1.0])
    eigen = attack.eigen_attack(model, x, spec, deltas, "unit")
    rnd = attack.random_attack(model, x, deltas)
    assert torch.all(eigen.latent[0] > 3 * rnd.latent[0])
    examples = attack.corrupted_examples(model, x[:2], pullgeom.spectrum(model.encoder, x[:2]))
    assert set(examples) >= {"original", "reconstruction", "corrupted_0.5233", "reconstruction_0.7443"}
