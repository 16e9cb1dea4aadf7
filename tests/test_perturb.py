"""``pullgeom.perturb``: the budget and the box hold exactly, the unboxed step is the float64
reference's top eigenvector step, and the boxed step maximises eta^T G eta over ball ∩ box."""

from __future__ import annotations

import pytest
import torch

import pullgeom
from pullgeom.perturbation import TIE_RTOL, ball_box_maximiser
from pullgeom.reference import dense_metric, dense_spectrum
from zoo import MLPDecoder, TwoHeadEncoder, seeded

# Float32 round-off of ||x + eta - x|| against eps: a few ulps of eps, never a visible overshoot.
NORM_SLACK = {torch.float32: 1e-6, torch.float64: 1e-12}


def images(batch: int, n: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """(batch, n) in [0, 1] with a third of the pixels exactly at 0 and a sixth exactly at 1."""
    x = torch.rand(batch, n, generator=generator, dtype=dtype)
    u = torch.rand(batch, n, generator=generator)
    return torch.where(u < 1 / 3, 0, torch.where(u > 5 / 6, 1, x)).to(dtype)


def quadratic(metric: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """eta^T G eta per sample for G: (B, N, N), eta: (B, N)."""
    return torch.einsum("bi,bij,bj->b", eta, metric, eta)


def heads_shift(encoder, x, x_adv):
    with torch.no_grad():
        (mu, logvar), (mu2, logvar2) = encoder(x), encoder(x_adv)
    return (mu2 - mu).square().sum(1) + ((0.5 * logvar2).exp() - (0.5 * logvar).exp()).square().sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_budget_and_box_hold_for_many_random_cases(dtype):
    generator = torch.Generator().manual_seed(0)
    for case in range(9):
        n = int(torch.randint(3, 30, (1,), generator=generator))
        encoder = seeded(TwoHeadEncoder(n, (7,), 3), case).to(dtype)
        x = images(6, n, generator, dtype)
        # Budgets from far inside the box to past its diameter (the corner case: s = inf).
        eps = torch.rand(6, generator=generator, dtype=dtype) * 10 ** float(torch.randint(-3, 2, (1,),
                                                                                          generator=generator))
        box = (0.0, 1.0)
        if case % 3 == 2:  # per-pixel bounds, x on some of them
            lo = torch.minimum(x, torch.rand(n, generator=generator, dtype=dtype) * -0.1)
            hi = torch.maximum(x, 1 + torch.rand(n, generator=generator, dtype=dtype) * 0.1)
            box = (lo, hi)
        for chosen_box in (None, box):
            x_adv = pullgeom.perturb(encoder, x, eps, box=chosen_box)
            assert x_adv.dtype == dtype and x_adv.shape == x.shape
            assert ((x_adv - x).norm(dim=1) <= eps * (1 + NORM_SLACK[dtype])).all()
            if chosen_box is not None:
                lo, hi = (torch.as_tensor(b, dtype=dtype).expand_as(x) for b in chosen_box)
                assert ((x_adv >= lo) & (x_adv <= hi)).all()
                # The budget is spent (to the rounding of pixels near 1, an ulp each) unless the step
                # stopped at a corner of the box inside the ball.
                ulp = 4 * torch.finfo(dtype).eps  # a pixel on a bound may be stepped an ulp towards x
                corner = (((x_adv - lo).abs() <= ulp) | ((x_adv - hi).abs() <= ulp)).all(dim=1)
                spent = (x_adv - x).norm(dim=1) >= eps * (1 - 1e-4) - 2 * torch.finfo(dtype).eps * n ** 0.5
                assert (spent | corner).all()


def test_pixels_on_the_box_edges_only_move_inward():
    encoder = seeded(TwoHeadEncoder(12, (9,), 3), 3)
    x = torch.zeros(4, 12)
    x[2:] = 1.0
    x_adv = pullgeom.perturb(encoder, x, 0.5, box=(0.0, 1.0))
    assert (x_adv[:2] >= 0).all() and (x_adv[2:] <= 1).all()
    assert torch.allclose((x_adv - x).norm(dim=1), torch.full((4,), 0.5))


@pytest.mark.parametrize("stochastic", [True, False])
def test_without_box_it_is_the_reference_top_eigenvector_step(stochastic):
    encoder = seeded(TwoHeadEncoder(10, (8, 6), 3), 0).double()
    x = torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps = torch.tensor([0.01, 0.1, 0.5, 1.0, 3.0], dtype=torch.float64)
    _, vectors = dense_spectrum(encoder, x, stochastic=stochastic)
    top = vectors[:, :, 0]
    eta = pullgeom.perturb(encoder, x, eps, stochastic=stochastic) - x
    plus, minus = x + eps[:, None] * top, x - eps[:, None] * top
    if stochastic:
        larger = heads_shift(encoder, x, plus) >= heads_shift(encoder, x, minus)
    else:
        with torch.no_grad():
            mu = encoder(x)[0]
            larger = (encoder(plus)[0] - mu).norm(dim=1) >= (encoder(minus)[0] - mu).norm(dim=1)
    expected_sign = torch.where(larger, 1.0, -1.0)
    torch.testing.assert_close(eta, expected_sign.double()[:, None] * eps[:, None] * top, rtol=0, atol=1e-10)


def test_without_box_with_a_decoder_it_is_the_reference_step():
    encoder = seeded(TwoHeadEncoder(10, (8, 6), 3), 0).double()
    decoder = seeded(MLPDecoder(3, 5, 10), 1).double()
    x = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, vectors = dense_spectrum(encoder, x, decoder=decoder)
    eta = pullgeom.perturb(encoder, x, 0.2, decoder=decoder) - x
    # Up to the sign (chosen by the G_z-weighted shift): the reference direction.
    agreement = (eta * vectors[:, :, 0]).sum(1).abs() / 0.2
    torch.testing.assert_close(agreement, torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-10)


def test_box_beats_the_clipped_eigen_step_and_reaches_brute_force_on_tiny_problems():
    generator = torch.Generator().manual_seed(4)
    for case in range(4):
        encoder = seeded(TwoHeadEncoder(6, (8,), 2), 10 + case).double()
        x = images(3, 6, generator)
        eps = torch.tensor([0.05, 0.3, 1.0], dtype=torch.float64)
        metric = dense_metric(encoder, x)
        _, vectors = torch.linalg.eigh(metric)
        top = vectors[:, :, -1]
        # Run to convergence (the defaults stop after 10 steps: enough for the latent shift).
        eta = pullgeom.perturb(encoder, x, eps, box=(0.0, 1.0), starts=4, steps=200, tol=1e-9) - x
        default = pullgeom.perturb(encoder, x, eps, box=(0.0, 1.0)) - x
        ours = quadratic(metric, eta)
        clipped = torch.maximum(*(quadratic(metric, (x + sign * eps[:, None] * top).clamp(0, 1) - x)
                                  for sign in (1, -1)))
        # Candidates within TIE_RTOL of the best form are chosen between by the measured shift.
        assert (ours >= clipped * (1 - TIE_RTOL)).all()
        assert (quadratic(metric, default) >= clipped * (1 - TIE_RTOL)).all()
        best = brute_force_maximum(metric, x, eps)
        assert (ours <= best * (1 + 1e-6)).all()  # the brute force is a valid lower bound on the max
        assert (ours >= best * (1 - 1e-6)).all(), (case, ours / best)
        assert (quadratic(metric, default) >= best * 0.99).all(), (case, quadratic(metric, default) / best)


def project_ball_box(y, eps, lower, upper):
    """Euclidean projection onto ||eta|| <= eps, lower <= eta <= upper (lower <= 0 <= upper):
    eta = clip(y / (1 + t), lower, upper) with t >= 0 found by bisection. y: (R, N), eps: (R, 1)."""
    # t = ||y|| / eps - 1 already brings y / (1 + t) into the ball, so the root lies below it.
    low, high = torch.zeros_like(eps), (y.norm(dim=1, keepdim=True) / eps).clamp_min(1)
    inside = torch.minimum(torch.maximum(y, lower), upper).norm(dim=1, keepdim=True) <= eps
    for _ in range(60):
        t = (low + high) / 2
        over = torch.minimum(torch.maximum(y / (1 + t), lower), upper).norm(dim=1, keepdim=True) > eps
        low, high = torch.where(over, t, low), torch.where(over, high, t)
    t = torch.where(inside, 0, high)
    return torch.minimum(torch.maximum(y / (1 + t), lower), upper)


def brute_force_maximum(metric, x, eps, starts=100, steps=100):
    """max eta^T G eta over ball ∩ [0, 1] box per sample: projected gradient ascent on the quadratic
    from ``starts`` random feasible points each (an independent projection, not the LMO)."""
    batch, n = x.shape
    generator = torch.Generator().manual_seed(5)
    lower, upper = (-x).repeat_interleave(starts, 0), (1 - x).repeat_interleave(starts, 0)
    radius = eps.repeat_interleave(starts)[:, None]
    g = metric.repeat_interleave(starts, 0)
    eta = project_ball_box(torch.randn(batch * starts, n, generator=generator, dtype=torch.float64) * radius,
                           radius, lower, upper)
    step = 1 / torch.linalg.eigvalsh(metric)[:, -1].repeat_interleave(starts)[:, None]
    for _ in range(steps):
        eta = project_ball_box(eta + step * (g @ eta.unsqueeze(-1)).squeeze(-1), radius, lower, upper)
    return quadratic(g, eta).reshape(batch, starts).amax(1)


@pytest.mark.parametrize("box", [None, (0.0, 1.0)])
def test_refining_on_the_measured_shift_keeps_the_constraints_and_never_loses(box):
    encoder = seeded(TwoHeadEncoder(12, (9,), 3), 5).double()
    x = images(6, 12, torch.Generator().manual_seed(9))
    eps = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    plain = pullgeom.perturb(encoder, x, eps, box=box)
    refined = pullgeom.perturb(encoder, x, eps, box=box, refine=4)
    assert ((refined - x).norm(dim=1) <= eps * (1 + 1e-12)).all()
    assert ((refined >= 0) & (refined <= 1)).all() or box is None
    # The starting point is among the iterates kept, so the measured shift never drops.
    assert (heads_shift(encoder, x, refined) >= heads_shift(encoder, x, plain) * (1 - 1e-12)).all()
    assert (heads_shift(encoder, x, refined) > heads_shift(encoder, x, plain) * (1 + 1e-6)).any()


def test_ball_box_maximiser_is_exact():
    generator = torch.Generator().manual_seed(6)
    g = torch.randn(200, 9, generator=generator, dtype=torch.float64)
    g[:20, :3] = 0  # coordinates the objective ignores
    lower = -torch.rand(200, 9, generator=generator, dtype=torch.float64)
    upper = torch.rand(200, 9, generator=generator, dtype=torch.float64)
    lower[:40, 0], upper[40:80, 1] = 0, 0  # pixels on the box's edges
    eps = torch.rand(200, generator=generator, dtype=torch.float64) * 2
    y = ball_box_maximiser(g, eps, lower, upper)
    assert ((y >= lower) & (y <= upper)).all()
    assert (y.norm(dim=1) <= eps * (1 + 1e-12)).all()
    # The linear maximum over the convex set equals the best point of a fine projected ascent.
    best = project_ball_box(g * 1e6, eps[:, None], lower, upper)
    torch.testing.assert_close((g * y).sum(1), (g * best).sum(1), rtol=1e-9, atol=1e-12)


def test_lanczos_products_give_the_same_attack():
    encoder = seeded(TwoHeadEncoder(12, (9,), 3), 2).double()
    x = images(3, 12, torch.Generator().manual_seed(7))
    for box in (None, (0.0, 1.0)):
        factored = pullgeom.perturb(encoder, x, 0.4, box=box, backend="torch")
        matrix_free = pullgeom.perturb(encoder, x, 0.4, box=box, backend="lanczos")
        torch.testing.assert_close(matrix_free, factored, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), "finite and > 0"),
    (dict(eps=-1.0), "finite and > 0"),
    (dict(eps=float("nan")), "finite and > 0"),
    (dict(eps=torch.ones(3)), "one budget per sample"),
    (dict(eps=0.1, box=(1.0, 0.0)), "lo < hi"),
    (dict(eps=0.1, box=(0.5, 0.5)), "lo < hi"),
    (dict(eps=0.1, box=(0.0,)), r"pass \(lo, hi\)"),
    (dict(eps=0.1, box=(0.0, torch.ones(3))), "broadcastable"),
    (dict(eps=0.1, box=(0.2, 1.0)), "outside box"),
    (dict(eps=0.1, starts=0), "starts=0"),
    (dict(eps=0.1, steps=-1), "steps=-1"),
    (dict(eps=0.1, refine=1.5), "refine=1.5"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    encoder = seeded(TwoHeadEncoder(10, (8,), 3), 0)
    x = images(5, 10, torch.Generator().manual_seed(8), torch.float32)
    with pytest.raises(ValueError, match=match):
        pullgeom.perturb(encoder, x, **kwargs)


def test_an_encoder_returning_a_normal_needs_no_sigma():
    """sigma left unset: a Normal gives sigma itself, so perturb must not pass a convention."""

    class NormalEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(6, 3)

        def forward(self, x):
            h = self.linear(x)
            return torch.distributions.Normal(h, torch.nn.functional.softplus(h))

    torch.manual_seed(0)
    encoder = NormalEncoder().double().eval()
    x = torch.rand(3, 6, dtype=torch.float64)
    x_adv = pullgeom.perturb(encoder, x, 0.1, box=(0.0, 1.0))
    assert ((x_adv - x).norm(dim=1) <= 0.1 * (1 + 1e-12)).all()
    assert ((x_adv >= 0) & (x_adv <= 1)).all()
    assert (x_adv != x).any()
